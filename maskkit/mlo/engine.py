"""The MLO-MAE engine: MAE, classification head and learned masker trained together, one call per iteration.

    engine = MLOEngine(mae, masker, head, **default_optimizers(mae, head, masker),
                       train_batches=next_train, val_batches=next_val)
    for images, _ in loader:                 # in place of the loop's forward/backward/step
        stats = engine.step(images)          # {"pretrain_loss": ..., "val_loss": ..., ...}

Each call makes one pretrain step (masks chosen by the masker, loss weighted by its
probabilities); every `masker_every` calls it also makes one finetune step of the head (on
labeled train data) and one masker step (the hypergradient of the validation loss, see
maskkit.mlo.base: a registered `Hypergradient` method computes it, so the engine
names none). The MAE is used only through the MAE protocol (maskkit.mae), so the timm,
official-MAE and Hugging Face adapters all work.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor, nn

from maskkit.diagnostics import plan_diagnostics
from maskkit.mae import is_mae, policy_aux_loss
from maskkit.mlo.base import HYPERGRADS, Hypergradient, check_masker_grads
from maskkit.mlo.config import MLOConfig
from maskkit.mlo.steps import PretrainStep, finetune_step, pretrain_step, trainable, zeros_for_none
from maskkit.optim import param_groups
from maskkit.plan import MaskPlan
from maskkit.policies.base import MaskPolicy

Batch = tuple[Tensor, Tensor]

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
        #: this engine's hypergradient method (its own instance: it may hold an open window)
        self.hypergradient: Hypergradient = self.config.create_hypergrad()
        self.hypergradient.check_optimizers(mae_optimizer, head_optimizer)

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

    def can_checkpoint(self) -> bool:
        """Whether `state_dict()` may be taken now (False while the hypergradient's window is open)."""
        return self.hypergradient.can_checkpoint(self)

    def can_undo_step(self) -> bool:
        """Whether every `step` can be undone alone by loading a `state_dict()` taken before it (no
        hypergradient window spans several steps): what skipping a non-finite batch needs."""
        return self.hypergradient.window_steps() <= 1

    # ---- one iteration ------------------------------------------------------------------------

    def step(self, images: Tensor, *, train_batch: Batch | None = None, val_batch: Batch | None = None,
             progress: float | None = None) -> dict[str, float]:
        """One training iteration; returns floats (keys STEP_KEYS and DIAGNOSTIC_KEYS, plus MASKER_STEP_KEYS on
        masker steps, and masker_prior_kl / masker_aux_loss there when those terms are on).

        progress: how far training has come, in [0, 1], passed to the masker (its `guided_ramp`);
        default step / config.total_steps, or none when that is not set.
        """
        if not isinstance(images, Tensor) or images.dim() not in (4, 5):
            raise ValueError(f"images must be a [B, C, H, W] tensor (or clips [B, C, T, H, W]), got "
                             f"{getattr(images, 'shape', type(images))}")  # fmt: skip
        cfg, s = self.config, self.step_count
        if progress is None and cfg.total_steps is not None:
            progress = min(1.0, s / cfg.total_steps)
        due = self.masker_due(s)
        learning = due and self.masker_learning(s)
        if due:  # fetch labeled batches first, so a missing one fails before any update
            train_batch = self._batch(train_batch, self.train_batches, "train_batch")
            val_batch = self._batch(val_batch, self.val_batches, "val_batch")

        stats: dict[str, float] = {"step": float(s)}
        try:
            record = self.hypergradient.pretrain(self, images, learning=learning, progress=progress)
        except Exception as err:
            raise HYPERGRADS.plugin_error(self.hypergradient, "pretrain", err)  # noqa: B904 (chained by plugin_error)
        loss, plan, per_patch = record.loss, record.plan, record.per_patch
        self._scheduler_step("mae")
        stats["pretrain_loss"] = float(loss)
        stats.update(_mask_stats(_probs(plan).detach()))
        stats.update(plan_diagnostics(self.masker, plan, per_patch))
        extra = self._level3_extra(plan, per_patch, stats) if learning else None

        if due:
            if learning:
                grads, ft = self._masker_grads(record, train_batch, val_batch)
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

    def pretrain(self, images: Tensor, *, keep_params: bool = False, progress: float | None = None) -> PretrainStep:
        """One real pretrain step with the engine's settings (ratio, generator, clipping, amp).

        keep_params: keep W before the step and the masker's graph (darts' finite difference)."""
        cfg = self.config
        return pretrain_step(self.mae, self.masker, self.mae_optimizer, images, ratio=cfg.ratio,
                             generator=self.generator, grad_clip=cfg.grad_clip, keep_params=keep_params,
                             autocast_dtype=torch.bfloat16 if cfg.amp == "bf16" else None, progress=progress)

    def _masker_grads(self, step: PretrainStep, train_batch: Batch, val_batch: Batch) -> tuple[list[Tensor], Any]:
        """The method's hypergradient and level-2 step, checked where they enter (`check_masker_grads`); an
        exception raised inside a plugin method is one line naming it."""
        method = self.hypergradient
        try:
            result = method.masker_grads(self, step, train_batch, val_batch)
        except Exception as err:
            raise HYPERGRADS.plugin_error(method, "masker_grads", err)  # noqa: B904 (chained by plugin_error)
        return check_masker_grads(method, result, trainable(self.masker))

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
        if self.hypergradient.window_open():
            raise RuntimeError(f"MLOEngine.state_dict: the {self.hypergradient.name} window is open (mid masker cycle); "
                               "checkpoint after a masker step (when engine.masker_due() was just True)")
        return {
            "step": self.step_count,
            "config": self.config.state(),
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
        self.hypergradient.reset()
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
