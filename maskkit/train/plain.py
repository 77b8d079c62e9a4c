"""`PlainStep`: one MAE step (policy -> plan -> weighted loss -> backward -> optimizer step), plus the
auxiliary loss of a policy that learns from reconstruction (hpm's scorer, adamae's sampler), in the
same optimizer. Also the step of the learned masker frozen at its initialisation (--freeze-masker)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from maskkit.diagnostics import plan_diagnostics
from maskkit.mae import mae_step_loss
from maskkit.optim import create_optimizer, warmup_cosine
from maskkit.train.config import TrainConfig
from maskkit.train.decoding import DecoderMasking
from maskkit.train.guard import nonfinite_grads
from maskkit.train.step import Agree, StepParts


def mae_optimizer(
    trained: nn.Module, config: TrainConfig
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The MAE's optimizer (`--optimizer`, the resolved peak lr of --lr / --blr, `--weight-decay`) and its
    warm-up + cosine schedule down to `--min-lr` (the factor min_lr / lr: the official MAE's
    lr = min_lr + (lr - min_lr) x 0.5 (1 + cos); with min-lr 0 exactly the plain cosine)."""
    t, r = config.train, config.resolved
    if t.min_lr > r.lr:
        raise ValueError(f"--min-lr {t.min_lr} is above the peak learning rate {r.lr}")
    optimizer = create_optimizer(t.optimizer, trained, lr=r.lr, weight_decay=t.weight_decay)
    schedule = warmup_cosine(r.steps, r.warmup_steps, t.min_lr / r.lr)  # min_factor 0.0: today's cosine, exactly
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


class PlainStep:
    """The MAE step; with `trains_aux` the policy's own loss is added and its parameters train too.

    Args:
        mae, policy: the models (the MAE protocol; a MaskPolicy).
        optimizer: over the MAE (and the policy with `trains_aux`); scheduler: stepped after it, or None.
        trains_aux: add the policy's `aux_loss` (a policy that learns from reconstruction).
        mask_ratio: the plan's ratio (None: the policy's own); amp: "none" | "bf16" (forward autocast).
    """

    state_keys = ("mae", "policy", "optimizer", "scheduler")
    head = None

    def __init__(
        self,
        mae: nn.Module,
        policy: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any = None,
        *,
        trains_aux: bool,
        mask_ratio: float | None = None,
        amp: str = "none",
    ) -> None:
        self.mae, self.policy, self.optimizer, self.scheduler = mae, policy, optimizer, scheduler
        self.trains_aux, self.mask_ratio, self.amp = trains_aux, mask_ratio, amp
        self.last_loss: Tensor | None = None  # what was backpropagated last (inspection, tests)
        self.decoder: DecoderMasking | None = None  # --decoder-ratio: the decoder's subset of every plan

    @classmethod
    def build(cls, parts: StepParts) -> PlainStep:
        """The run's plain step: a policy that learns from reconstruction trains beside the MAE, in one optimizer."""
        trains_aux = parts.learns == "reconstruction"
        if parts.learns == "labels":  # --freeze-masker: same selection and weighting, no feedback
            parts.policy.requires_grad_(False)
        trained = nn.ModuleDict({"mae": parts.mae, "policy": parts.policy}) if trains_aux else parts.mae
        optimizer, scheduler = mae_optimizer(trained, parts.config)
        cfg = parts.config
        step = cls(parts.mae, parts.policy, optimizer, scheduler, trains_aux=trains_aux,
                   mask_ratio=cfg.resolved.mask_ratio, amp=cfg.train.amp)  # fmt: skip
        step.decoder = DecoderMasking.from_settings(cfg.train)
        return step

    def modules(self) -> dict[str, nn.Module | None]:
        return {"MAE": self.mae, "masker": self.policy}

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.optimizer]

    def run(
        self, images: Tensor, context: dict[str, Any], *, agree: Agree, undoable: bool = False,
        micro: tuple[int, int] = (0, 1),
    ) -> tuple[dict[str, float], str | None]:
        """Forward and backward; the optimizer steps in `commit` once every rank found its numbers finite.

        micro: (m, K), micro-batch m of the K of one accumulated step (--accum-iter K). The first
        clears the gradients, each adds those of its loss / K, the last checks them. K micro-batches
        of b images then give the gradient of one batch of K x b up to float rounding, exactly when
        every micro-batch hides the same number of patches (the random policy and every plan of a
        fixed count per image): the MAE loss is the mean over ALL hidden patches of a batch
        (`masked_loss`), so the mean of K equal-count means is the big batch's mean. With unequal
        counts it is the mean of the micro-batches' means (each weighs 1/K, as the official MAE's
        accumulation); a policy's own loss (`policy_loss`) is averaged the same way.
        """
        m, k = micro
        bf16 = self.amp == "bf16"
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bf16):
            out = mae_step_loss(self.mae, self.policy, images, ratio=self.mask_ratio, decoder=self.decoder, **context)
        loss = out.loss.float() if bf16 else out.loss
        metrics = {"loss": loss.item(), **plan_diagnostics(self.policy, out.plan, out.per_patch)}
        if out.aux_loss is not None and self.trains_aux:
            metrics["policy_loss"] = float(out.aux_loss.detach())
            loss = loss + out.aux_loss.float()
        self.last_loss = loss.detach()
        if m == 0:
            self.optimizer.zero_grad(set_to_none=True)
        finite = math.isfinite(metrics["loss"]) and math.isfinite(metrics.get("policy_loss", 0.0))
        bad = None if finite else "pretrain loss"
        if not agree(bad):
            (loss / k if k > 1 else loss).backward()
            bad = nonfinite_grads(self.optimizer) if m == k - 1 else None
        return metrics, bad

    def commit(self) -> None:
        self.optimizer.step()  # (under torchrun, a pre-hook first averages the gradients)
        if self.scheduler is not None:
            self.scheduler.step()

    def undo(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)  # checked before the step (and every micro-batch): nothing else

    def can_checkpoint(self) -> bool:
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"mae": self.mae.state_dict(), "policy": self.policy.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mae.load_state_dict(state["mae"])
        self.policy.load_state_dict(state["policy"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
