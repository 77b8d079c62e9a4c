"""The MLO-MAE engine: MAE, classification head and learned masker trained together, one call per iteration.

    engine = MLOEngine(mae, masker, head, **default_optimizers(mae, head, masker),
                       train_batches=next_train, val_batches=next_val)
    for images, _ in loader:                 # in place of the loop's forward/backward/step
        stats = engine.step(images)          # {"pretrain_loss": ..., "val_loss": ..., ...}

Each call makes one pretrain step (masks chosen by the masker, loss weighted by its
probabilities); every `masker_every` calls it also makes one finetune step of the head (on
labeled train data) and one masker step (the hypergradient of the validation loss, see
maskkit.hypergrad). The MAE is used only through the MAE protocol (maskkit.mae), so the timm,
official-MAE and Hugging Face adapters all work.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from maskkit.diagnostics import plan_diagnostics
from maskkit.hypergrad import (
    DARTS_FDS,
    DARTS_PATHS,
    DARTS_SCALES,
    HYPERGRADS,
    UnrollWindow,
    darts_masker_grad,
    finetune_step,
    optimizer_params,
    pretrain_step,
    ridge_step,
    trainable,
    zeros_for_none,
)
from maskkit.mae import is_mae, policy_aux_loss
from maskkit.optim import param_groups
from maskkit.plan import MaskPlan, check_ratio
from maskkit.policies.base import MaskPolicy

Batch = tuple[Tensor, Tensor]
LEVEL2S = ("head", "ridge")

#: keys of `MLOEngine.step`'s result on every call, and the extra ones on masker iterations.
STEP_KEYS = ("step", "pretrain_loss", "mask_prob_mean", "mask_prob_std", "mask_entropy",
             "masker_updated", "lr_mae", "lr_head", "lr_masker")
MASKER_STEP_KEYS = ("head_loss", "val_loss", "val_acc", "masker_grad_norm")
#: collapse diagnostics on every call (maskkit.diagnostics; logit_spread for learned scorers, mask_iou for B > 1).
DIAGNOSTIC_KEYS = ("mask_iou", "mask_pos_entropy", "logit_spread")

#: the reference's optimizer settings (MLO-MAE, issue 4): AdamW at every level.
PRESETS: dict[str, dict[str, float]] = {
    "cifar": {"mae_lr": 1e-4, "mae_wd": 1e-3, "head_lr": 1e-3, "masker_lr": 1e-3},
    "imagenet": {"mae_lr": 1.5e-4, "mae_wd": 0.05, "head_lr": 5e-4, "masker_lr": 5e-5},
}


@dataclass
class MLOConfig:
    """The schedule and the hypergradient of the MLO engine (defaults: the MLO-MAE reference).

    Args:
        ratio: mask ratio of the pretrain step, or None for the masker's own ratio. Default None.
        masker_every: one finetune step and one masker step after every this many pretrain steps. Default 2.
        unroll_steps: K, pretrain steps unrolled by hypergrad="unroll" (<= masker_every). Default 1.
        hypergrad: "darts" (finite differences, no double backward through the MAE) or "unroll"
            (exact reverse mode through K steps). Default "darts".
        darts_paths: "both" (masker -> pretrain -> validation and masker -> pretrain -> finetune
            -> validation, as the reference) or "direct" (the first only). Default "both".
        darts_scale: "optimizer" (exact per-element derivative of the pretrain/head optimizer's
            update) or "lr" (the bare learning rate, as betty). Default "optimizer".
        darts_r: finite-difference radius r; eps = r / ||direction||. Default 0.01 (DARTS, betty).
        darts_fd: "central" (two MAE forwards, as DARTS/betty) or "forward" (one forward, reusing the
            pretrain step's per-patch losses; error O(eps)). Default "central".
        first_order: unroll without second-order terms (hypergrad="unroll" only). Default False.
        masker_start: masker warm-up, in pretrain steps: the masker is first updated at the end of
            the first cycle that ends at or after this step. Before that the head still steps
            (plainly, without a hypergradient), so its validation loss means something when the
            masker starts. Default 0 (from the first cycle, as the reference).
        level2: "head" (the paper: a linear head trained by one step per cycle; its validation
            loss drives the masker) or "ridge" (a ridge-regression probe refit in closed form on each
            labeled batch, `maskkit.hypergrad.ridge_step`; the engine's head is then not used).
            "ridge" needs hypergrad="darts". Default "head".
        ridge: the ridge probe's regularisation, relative to the features' mean squared norm. Default 0.1.
        grad_clip, head_grad_clip, masker_grad_clip: max gradient norm per level, or None. Default None.
        amp: "bf16" runs the MAE forward of the real pretrain steps under bfloat16 autocast; the
            finetune step, the validation loss, the darts finite differences and the steps inside an
            unroll window stay float32. Default "none".
        masker_reg: weight of the anti-collapse penalty added to the level-3 objective: the mean
            over patches of KL(Bernoulli(p) || Bernoulli(r)) between the masker's probability p of
            hiding each patch and the mask ratio r (`prior_kl`), on the pretrain batch of each masker
            step. It pulls every probability back toward the ratio, the value of uniform masking,
            so a masker can only stray from uniform where the validation loss pays for it.
            Default 0.0 (off: runs stay bit-identical to runs without it).
        total_steps: the length of the run, for the context key `progress` = step / total_steps that
            the masker's schedules read (e.g. guided_ramp), when `step` is not given `progress`.
            Default None (no progress: schedules at their full value).
    """

    ratio: float | None = None
    masker_every: int = 2
    unroll_steps: int = 1
    hypergrad: str = "darts"
    darts_paths: str = "both"
    darts_scale: str = "optimizer"
    darts_r: float = 0.01
    darts_fd: str = "central"
    first_order: bool = False
    masker_start: int = 0
    level2: str = "head"
    ridge: float = 0.1
    grad_clip: float | None = None
    head_grad_clip: float | None = None
    masker_grad_clip: float | None = None
    amp: str = "none"
    masker_reg: float = 0.0
    total_steps: int | None = None

    def __post_init__(self) -> None:
        if self.ratio is not None:
            self.ratio = check_ratio(self.ratio)
        if self.amp not in ("none", "bf16"):
            raise ValueError(f"amp must be 'none' or 'bf16', got {self.amp!r}")
        for name in ("masker_every", "unroll_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.hypergrad not in HYPERGRADS:
            raise ValueError(f"hypergrad must be one of {HYPERGRADS}, got {self.hypergrad!r}")
        if self.darts_paths not in DARTS_PATHS:
            raise ValueError(f"darts_paths must be one of {DARTS_PATHS}, got {self.darts_paths!r}")
        if self.darts_scale not in DARTS_SCALES:
            raise ValueError(f"darts_scale must be one of {DARTS_SCALES}, got {self.darts_scale!r}")
        if self.darts_fd not in DARTS_FDS:
            raise ValueError(f"darts_fd must be one of {DARTS_FDS}, got {self.darts_fd!r}")
        if not (isinstance(self.darts_r, (int, float)) and self.darts_r > 0):
            raise ValueError(f"darts_r must be a positive number, got {self.darts_r!r}")
        if isinstance(self.masker_start, bool) or not isinstance(self.masker_start, int) or self.masker_start < 0:
            raise ValueError(f"masker_start must be a non-negative integer, got {self.masker_start!r}")
        if self.level2 not in LEVEL2S:
            raise ValueError(f"level2 must be one of {LEVEL2S}, got {self.level2!r}")
        if self.level2 == "ridge" and self.hypergrad != "darts":
            raise ValueError("level2='ridge' is implemented for hypergrad='darts' only")
        if not (isinstance(self.ridge, (int, float)) and self.ridge > 0):
            raise ValueError(f"ridge must be a positive number, got {self.ridge!r}")
        if self.hypergrad == "unroll" and self.unroll_steps > self.masker_every:
            raise ValueError(
                f"unroll_steps ({self.unroll_steps}) must not exceed masker_every ({self.masker_every}): "
                "each pretrain step is unrolled at most once"
            )
        if isinstance(self.masker_reg, bool) or not isinstance(self.masker_reg, (int, float)) or not (
            math.isfinite(self.masker_reg) and self.masker_reg >= 0
        ):
            raise ValueError(f"masker_reg must be a non-negative number, got {self.masker_reg!r}")
        if self.total_steps is not None and (
            isinstance(self.total_steps, bool) or not isinstance(self.total_steps, int) or self.total_steps < 1
        ):
            raise ValueError(f"total_steps must be a positive integer or None, got {self.total_steps!r}")
        for name in ("grad_clip", "head_grad_clip", "masker_grad_clip"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"{name} must be a positive number or None, got {value!r}")


def default_optimizers(
    mae: nn.Module, head: nn.Module, masker: nn.Module, preset: str = "cifar"
) -> dict[str, torch.optim.Optimizer]:
    """The reference's AdamW optimizers, as keyword arguments of `MLOEngine`.

    MAE: AdamW betas (0.9, 0.95), lr/weight decay 1e-4/1e-3 ("cifar") or 1.5e-4/0.05
    ("imagenet"), no decay on biases, norms, pos embeddings and tokens. Head: lr 1e-3 / 5e-4;
    masker: lr 1e-3 / 5e-5; both with torch's AdamW defaults otherwise (the issue names none).
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown optimizer preset {preset!r}; choose one of {sorted(PRESETS)}")
    if not getattr(masker, "learnable", False) or not trainable(masker):
        raise TypeError(f"masker must be a learnable MaskPolicy with parameters (e.g. 'learned'), "
                        f"got {type(masker).__name__}")
    cfg = PRESETS[preset]
    return {
        "mae_optimizer": torch.optim.AdamW(param_groups(mae, cfg["mae_wd"]), lr=cfg["mae_lr"], betas=(0.9, 0.95)),
        "head_optimizer": torch.optim.AdamW(trainable(head), lr=cfg["head_lr"]),
        "masker_optimizer": torch.optim.AdamW(trainable(masker), lr=cfg["masker_lr"]),
    }


class MLOEngine:
    """Three-level MLO-MAE training: MAE (pretrain), head (finetune), masker (hypergradient).

    Args:
        mae: an nn.Module with the MAE protocol (maskkit.mae; any adapter).
        masker: a learnable MaskPolicy whose plans carry their probabilities in `plan.weights`.
        head: nn.Module mapping encoder features [B, D] to logits [B, classes].
        mae_optimizer, head_optimizer, masker_optimizer: their optimizers (see `default_optimizers`).
        schedulers: optional LR schedulers {"mae" | "head" | "masker": scheduler}, each stepped
            after its optimizer's step.
        config: the schedule and hypergradient (MLOConfig).
        train_batches, val_batches: callables returning the next labeled (images, labels)
            batch, used when `step` is not given one.
        generator: torch.Generator for the masker's random draws (e.g. Gumbel selection).
        grad_sync: optional differentiable map of the gradient lists of the unrolled MAE and head
            steps (hypergrad="unroll"), e.g. `maskkit.distributed.differentiable_mean`: those steps
            do not go through optimizer.step(), so data parallelism averages them here.
    """

    def __init__(
        self,
        mae: nn.Module,
        masker: nn.Module,
        head: nn.Module,
        *,
        mae_optimizer: torch.optim.Optimizer,
        head_optimizer: torch.optim.Optimizer,
        masker_optimizer: torch.optim.Optimizer,
        schedulers: dict[str, Any] | None = None,
        config: MLOConfig | None = None,
        train_batches: Callable[[], Batch] | None = None,
        val_batches: Callable[[], Batch] | None = None,
        generator: torch.Generator | None = None,
        grad_sync: Callable[[list], list] | None = None,
    ) -> None:
        if not is_mae(mae):
            raise TypeError(f"mae must be an nn.Module with the MAE protocol (maskkit.mae), got {type(mae).__name__}")
        if not isinstance(masker, MaskPolicy) or not getattr(masker, "learnable", False):
            raise TypeError(f"masker must be a learnable MaskPolicy (e.g. 'learned'), got {type(masker).__name__}")
        if not isinstance(head, nn.Module):
            raise TypeError(f"head must be an nn.Module (features [B, D] -> logits), got {type(head).__name__}")
        for name, opt in (("mae_optimizer", mae_optimizer), ("head_optimizer", head_optimizer),
                          ("masker_optimizer", masker_optimizer)):
            if not isinstance(opt, torch.optim.Optimizer):
                raise TypeError(f"{name} must be a torch.optim.Optimizer, got {type(opt).__name__}")
        schedulers = dict(schedulers or {})
        unknown = set(schedulers) - {"mae", "head", "masker"}
        if unknown:
            raise ValueError(f"schedulers keys must be 'mae', 'head' or 'masker', got {sorted(unknown)}")
        for fn, name in ((train_batches, "train_batches"), (val_batches, "val_batches")):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be a callable returning (images, labels)")
        self.mae, self.masker, self.head = mae, masker, head
        self.mae_optimizer, self.head_optimizer, self.masker_optimizer = mae_optimizer, head_optimizer, masker_optimizer
        self.schedulers = schedulers
        self.config = MLOConfig() if config is None else config
        if not isinstance(self.config, MLOConfig):
            raise TypeError(f"config must be an MLOConfig, got {type(self.config).__name__}")
        self.train_batches, self.val_batches = train_batches, val_batches
        self.generator = generator
        self.grad_sync = grad_sync
        self.step_count = 0
        _check_differentiable_optimizers(self.config, mae_optimizer, head_optimizer)
        self._window: UnrollWindow | None = None

    # ---- schedule -----------------------------------------------------------------------------

    def masker_due(self, step: int | None = None) -> bool:
        """Whether iteration `step` (default: the next one) ends with a finetune and a masker step."""
        step = self.step_count if step is None else step
        return (step + 1) % self.config.masker_every == 0

    def masker_learning(self, step: int | None = None) -> bool:
        """Whether the cycle of iteration `step` (default: the next one) ends with a masker update
        (False during the masker warm-up, `config.masker_start`)."""
        step = self.step_count if step is None else step
        every = self.config.masker_every
        cycle_end = step - step % every + every - 1  # the cycle's last iteration
        return cycle_end >= self.config.masker_start

    def _in_unroll_window(self, step: int) -> bool:
        every, k = self.config.masker_every, self.config.unroll_steps
        return self.config.hypergrad == "unroll" and step % every >= every - k and self.masker_learning(step)

    # ---- one iteration ------------------------------------------------------------------------

    def step(self, images: Tensor, *, train_batch: Batch | None = None, val_batch: Batch | None = None,
             progress: float | None = None) -> dict[str, float]:
        """One training iteration; returns floats (keys STEP_KEYS and DIAGNOSTIC_KEYS, plus MASKER_STEP_KEYS on
        masker steps, and masker_prior_kl / masker_aux_loss there when those terms are on).

        progress: how far training has come, in [0, 1], passed to the masker (its `guided_ramp`);
        default step / config.total_steps, or none when that is not set.
        """
        if not isinstance(images, Tensor) or images.dim() != 4:
            raise ValueError(f"images must be a [B, C, H, W] tensor, got {getattr(images, 'shape', type(images))}")
        cfg, s = self.config, self.step_count
        if progress is None and cfg.total_steps is not None:
            progress = min(1.0, s / cfg.total_steps)
        due = self.masker_due(s)
        learning = due and self.masker_learning(s)
        if due:  # fetch labeled batches first, so a missing one fails before any update
            train_batch = self._batch(train_batch, self.train_batches, "train_batch")
            val_batch = self._batch(val_batch, self.val_batches, "val_batch")

        stats: dict[str, float] = {"step": float(s)}
        if self._in_unroll_window(s):
            if self._window is None:
                self._window = UnrollWindow(self.mae, self.masker, self.mae_optimizer, first_order=cfg.first_order,
                                            grad_sync=self.grad_sync)
            out = self._window.pretrain_step(images, ratio=cfg.ratio, generator=self.generator, grad_clip=cfg.grad_clip,
                                             progress=progress)
            loss, plan, per_patch, record = out.loss.detach(), out.plan, out.per_patch.detach(), None
        else:
            record = pretrain_step(self.mae, self.masker, self.mae_optimizer, images, ratio=cfg.ratio,
                                   generator=self.generator, grad_clip=cfg.grad_clip,
                                   keep_params=learning and cfg.hypergrad == "darts",
                                   autocast_dtype=torch.bfloat16 if cfg.amp == "bf16" else None, progress=progress)
            loss, plan, per_patch = record.loss, record.plan, record.per_patch
        self._scheduler_step("mae")
        stats["pretrain_loss"] = float(loss)
        stats.update(_mask_stats(_probs(plan).detach()))
        stats.update(plan_diagnostics(self.masker, plan, per_patch))
        extra = self._level3_extra(plan, per_patch, stats) if learning else None

        if due:
            if self._window is not None:
                window, self._window = self._window, None
                grads, ft = window.finish(self.head, self.head_optimizer, train_batch, val_batch,
                                          head_grad_clip=cfg.head_grad_clip)
            elif learning:
                if cfg.level2 == "ridge":
                    ft = ridge_step(self.mae, train_batch, val_batch, ridge=cfg.ridge,
                                    mae_params=optimizer_params(self.mae_optimizer))
                else:
                    ft = finetune_step(self.mae, self.head, self.head_optimizer, train_batch, val_batch,
                                       mae_params=optimizer_params(self.mae_optimizer), paths=cfg.darts_paths,
                                       scale=cfg.darts_scale, grad_clip=cfg.head_grad_clip)
                grads = darts_masker_grad(self.mae, self.masker, record, ft.vector, self.mae_optimizer,
                                          scale=cfg.darts_scale, r=cfg.darts_r, fd=cfg.darts_fd)
            else:  # masker warm-up: a plain head step, no hypergradient
                ft = finetune_step(self.mae, self.head, self.head_optimizer, train_batch, val_batch,
                                   paths=None, grad_clip=cfg.head_grad_clip)
            self._scheduler_step("head")
            if learning:
                if extra is not None:
                    grads = [g + e for g, e in zip(grads, extra, strict=True)]
                stats["masker_grad_norm"] = self._masker_update(grads)
                self._scheduler_step("masker")
            stats.update(head_loss=float(ft.head_loss), val_loss=float(ft.val_loss), val_acc=float(ft.val_acc))
        stats["masker_updated"] = float(learning)
        for level, opt in (("mae", self.mae_optimizer), ("head", self.head_optimizer), ("masker", self.masker_optimizer)):
            stats[f"lr_{level}"] = float(opt.param_groups[0]["lr"])
        self.step_count += 1
        return stats

    def _level3_extra(self, plan: MaskPlan, per_patch: Tensor, stats: dict[str, float]) -> list[Tensor] | None:
        """Gradients w.r.t. the masker of the level-3 terms besides the validation loss, on this step's plan:
        `masker_reg` x prior_kl(p, r) and the masker's own `aux_loss`, if any (None when there are none)."""
        terms = []
        if self.config.masker_reg > 0:
            ratio = self.config.ratio if self.config.ratio is not None else self.masker.ratio
            kl = prior_kl(_probs(plan), ratio)
            stats["masker_prior_kl"] = float(kl.detach())
            terms.append(self.config.masker_reg * kl)
        aux = policy_aux_loss(self.masker, plan, per_patch)
        if aux is not None:
            stats["masker_aux_loss"] = float(aux.detach())
            terms.append(aux)
        if not terms:
            return None
        params = trainable(self.masker)
        return zeros_for_none(torch.autograd.grad(sum(terms), params, retain_graph=True, allow_unused=True), params)

    def _masker_update(self, grads: list[Tensor]) -> float:
        params = trainable(self.masker)
        for p, g in zip(params, grads, strict=False):
            p.grad = g.detach().to(p.dtype)
        norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
        if self.config.masker_grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, self.config.masker_grad_clip)
        self.masker_optimizer.step()
        self.masker_optimizer.zero_grad(set_to_none=True)
        return norm

    def _scheduler_step(self, level: str) -> None:
        if level in self.schedulers:
            self.schedulers[level].step()

    @staticmethod
    def _batch(given: Batch | None, source: Callable[[], Batch] | None, name: str) -> Batch:
        batch = given if given is not None else (source() if source is not None else None)
        if batch is None:
            raise ValueError(f"this iteration steps the head and masker: pass {name}= or give the engine a "
                             f"{'train_batches' if name == 'train_batch' else 'val_batches'} callable")
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise TypeError(f"{name} must be a pair (images, labels), got {type(batch).__name__}")
        return batch[0], batch[1]

    # ---- checkpointing ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: step, the three models, optimizers, schedulers, generator."""
        if self._window is not None:
            raise RuntimeError("MLOEngine.state_dict: an unroll window is open (mid masker cycle); "
                               "checkpoint after a masker step (when engine.masker_due() was just True)")
        return {
            "step": self.step_count,
            "config": asdict(self.config),
            "mae": self.mae.state_dict(),
            "masker": self.masker.state_dict(),
            "head": self.head.state_dict(),
            "optimizers": {"mae": self.mae_optimizer.state_dict(), "head": self.head_optimizer.state_dict(),
                           "masker": self.masker_optimizer.state_dict()},
            "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
            "generator": None if self.generator is None else self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`'s output (the engine must be built with the same kinds of objects)."""
        missing = {"step", "mae", "masker", "head", "optimizers"} - set(state)
        if missing:
            raise ValueError(f"not an MLOEngine state dict: missing {sorted(missing)}")
        if set(state.get("schedulers", {})) != set(self.schedulers):
            raise ValueError(f"scheduler keys differ: checkpoint {sorted(state.get('schedulers', {}))}, "
                             f"engine {sorted(self.schedulers)}")
        self._window = None
        self.mae.load_state_dict(state["mae"])
        self.masker.load_state_dict(state["masker"])
        self.head.load_state_dict(state["head"])
        self.mae_optimizer.load_state_dict(state["optimizers"]["mae"])
        self.head_optimizer.load_state_dict(state["optimizers"]["head"])
        self.masker_optimizer.load_state_dict(state["optimizers"]["masker"])
        for k, s in self.schedulers.items():
            s.load_state_dict(state["schedulers"][k])
        if state.get("generator") is not None:
            if self.generator is None:
                raise ValueError("the checkpoint holds a generator state but this engine has no generator")
            self.generator.set_state(state["generator"])
        self.step_count = int(state["step"])


def _check_differentiable_optimizers(config: MLOConfig, mae_optimizer: torch.optim.Optimizer,
                                     head_optimizer: torch.optim.Optimizer) -> None:
    """Fail at construction, not at the first masker step, when a hypergradient cannot use an optimizer."""
    from maskkit.unroll import check_optimizer

    supported = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)
    for level, opt in (("MAE", mae_optimizer), ("head", head_optimizer)):
        if config.hypergrad == "unroll":
            check_optimizer(opt)  # UnrollError (a ValueError) naming the optimizer
        elif config.darts_scale == "optimizer" and not isinstance(opt, supported):
            raise ValueError(
                f"the darts hypergradient needs the derivative of the {level} optimizer's update, known for "
                f"SGD, Adam and AdamW, not {type(opt).__name__}: use one of those, or darts_scale='lr'"
            )


def prior_kl(probs: Tensor, ratio: float) -> Tensor:
    """Mean over patches of KL(Bernoulli(p) || Bernoulli(r)): probs [B, N] in (0, 1) against the ratio r.

    0 exactly when every probability equals the ratio (uniform masking's marginal); it grows as the
    masker pushes patches toward always or never hidden, the signature of a collapsed one-rule mask.
    """
    p = probs.clamp(1e-6, 1 - 1e-6)
    return (p * torch.log(p / ratio) + (1 - p) * torch.log((1 - p) / (1 - ratio))).mean()


def _probs(plan: MaskPlan) -> Tensor:
    """The masking probabilities of a learned policy's plan (its weights when it sets no `probs`)."""
    return plan.weights if plan.probs is None else plan.probs


def _mask_stats(probs: Tensor) -> dict[str, float]:
    """Mean, std and mean binary entropy (nats) of the masking probabilities [B, N]."""
    p = probs.double().clamp(1e-12, 1 - 1e-12)
    entropy = -(p * p.log() + (1 - p) * (1 - p).log()).mean()
    return {"mask_prob_mean": float(p.mean()), "mask_prob_std": float(p.std()) if p.numel() > 1 else 0.0,
            "mask_entropy": float(entropy) if math.isfinite(float(entropy)) else float("nan")}
