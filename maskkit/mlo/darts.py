r"""The `darts` hypergradient: finite differences instead of a double backward through the MAE.

betty's "darts" (DARTS eq. 7, Liu et al., ICLR 2019), generalised as in MLO-MAE. With the levels
of maskkit.mlo.steps and D = dU/dg, D_C = dU_C/dh the per-element (diagonal) derivatives of the
updates w.r.t. the gradients (maskkit.mlo.derivative):

    dL3/dT = -(d^2 L1 / dT dW) u,   u = D * v,
    v      = dL3/dW' - d/dW' <h(W', C), D_C * dL3/dC'>        (paths="both")
    v      = dL3/dW'                                          (paths="direct")

The first term of v is masker -> pretrain -> validation, the second masker -> pretrain ->
finetune -> validation; `finetune_step` computes v exactly while taking the real head step. The
mixed second derivative is a finite difference at the weights W *before* the step, as DARTS and
betty:

    (d^2 L1 / dT dW) u ~= [grad_T L1(W + eps u, T) - grad_T L1(W - eps u, T)] / (2 eps),
    eps = r / ||u||, r = 0.01.

Since grad_T L1(W*, T) = grad_T sum(l(W*) * m * p_T) / sum(m), the difference needs only the
per-patch losses l(W +- eps u) [B, N]: two no-grad MAE forwards with the same plan, then one
backward through the masker alone; no double backward through the MAE. `fd="forward"` uses
[grad_T L1(W + eps u) - grad_T L1(W)] / eps with l(W) from the step's own forward: one MAE
forward instead of two, error O(eps) instead of O(eps^2). With level2="ridge" v comes from the
closed-form probe (`ridge_step`) instead of the head step.

Not differentiated: the masker reads the MAE's patch tokens detached (so, as in `unroll`, the
path T -> W -> tokens -> masker input -> p is left out).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from maskkit.mae import mae_forward
from maskkit.mlo.base import Batch, Hypergradient, register_hypergrad
from maskkit.mlo.derivative import DIFFERENTIABLE_OPTIMIZERS, SCALES, optimizer_params, update_derivative
from maskkit.mlo.steps import (
    DARTS_PATHS,
    FinetuneStep,
    PretrainStep,
    finetune_step,
    ridge_step,
    trainable,
    zeros_for_none,
)
from maskkit.registry import Card

if TYPE_CHECKING:
    from maskkit.mlo.engine import MLOEngine

DARTS_SCALES = SCALES
DARTS_FDS = ("central", "forward")


@register_hypergrad("darts", card=Card(
    idea="finite-difference hypergradient at the pre-step weights: no double backward through the MAE",
    paper="Liu et al., ICLR 2019 (DARTS); Guo et al., TMLR 2025 (MLO-MAE)",
    allowed={"paths": " | ".join(DARTS_PATHS), "fd": " | ".join(DARTS_FDS), "scale": " | ".join(DARTS_SCALES),
             "r": "> 0"},
))  # fmt: skip
class DartsHypergradient(Hypergradient):
    """darts: dL3/dT ~= -(d^2 L1/dT dW)(D * v) by a finite difference of the per-patch losses.

    Args:
        paths: "both" (masker -> pretrain -> validation and masker -> pretrain -> finetune ->
            validation, as the reference) or "direct" (the first only). Default "both".
        fd: "central" (two MAE forwards, as DARTS/betty) or "forward" (one forward, reusing the
            pretrain step's per-patch losses; error O(eps)). Default "central".
        scale: "optimizer" (exact per-element derivative of the pretrain/head optimizer's update)
            or "lr" (the bare learning rate, as betty). Default "optimizer".
        r: finite-difference radius; eps = r / ||direction||. Default 0.01 (DARTS, betty).
    """

    config_fields = {"paths": "darts_paths", "fd": "darts_fd", "scale": "darts_scale", "r": "darts_r"}
    level2s = ("head", "ridge")

    def __init__(self, paths: str = "both", fd: str = "central", scale: str = "optimizer", r: float = 0.01) -> None:
        for option, value, allowed in (("paths", paths, DARTS_PATHS), ("scale", scale, DARTS_SCALES),
                                       ("fd", fd, DARTS_FDS)):  # fmt: skip
            if value not in allowed:
                raise ValueError(f"{self.label(option)} must be one of {allowed}, got {value!r}")
        if not (isinstance(r, (int, float)) and r > 0):
            raise ValueError(f"{self.label('r')} must be a positive number, got {r!r}")
        self.paths, self.fd, self.scale, self.r = paths, fd, scale, r

    def check_optimizers(self, mae_optimizer: torch.optim.Optimizer, head_optimizer: torch.optim.Optimizer) -> None:
        for level, opt in (("MAE", mae_optimizer), ("head", head_optimizer)):
            if self.scale == "optimizer" and not isinstance(opt, DIFFERENTIABLE_OPTIMIZERS):
                raise ValueError(
                    f"the darts hypergradient needs the derivative of the {level} optimizer's update, known for "
                    f"SGD, Adam and AdamW, not {type(opt).__name__}: use one of those, or darts_scale='lr'"
                )

    def pretrain(self, engine: MLOEngine, images: Tensor, *, learning: bool,
                 progress: float | None) -> PretrainStep:
        """The real step; before a masker update it keeps W and the masker's graph for the difference."""
        return engine.pretrain(images, keep_params=learning, progress=progress)

    def masker_grads(self, engine: MLOEngine, step: PretrainStep, train_batch: Batch,
                     val_batch: Batch) -> tuple[list[Tensor], FinetuneStep]:
        cfg, mae_params = engine.config, optimizer_params(engine.mae_optimizer)
        if cfg.level2 == "ridge":
            ft = ridge_step(engine.mae, train_batch, val_batch, ridge=cfg.ridge, mae_params=mae_params)
        else:
            ft = finetune_step(engine.mae, engine.head, engine.head_optimizer, train_batch, val_batch,
                               mae_params=mae_params, paths=self.paths, scale=self.scale, grad_clip=cfg.head_grad_clip)
        grads = darts_masker_grad(engine.mae, engine.masker, step, ft.vector, engine.mae_optimizer,
                                  scale=self.scale, r=self.r, fd=self.fd)
        return grads, ft


def darts_masker_grad(
    mae: nn.Module,
    masker: nn.Module,
    step: PretrainStep,
    vector: Sequence[Tensor],
    optimizer: torch.optim.Optimizer,
    *,
    scale: str = "optimizer",
    r: float = 0.01,
    fd: str = "central",
) -> list[Tensor]:
    """dL3/dT ~= -(d^2 L1/dT dW)(D * v) by a finite difference at the pre-step weights (see module doc).

    fd "central": l(W + eps u) - l(W - eps u), two MAE forwards (DARTS, betty). "forward":
    l(W + eps u) - l(W) with l(W) from the pretrain step's own forward: one MAE forward, error O(eps).
    """
    if fd not in DARTS_FDS:
        raise ValueError(f"darts fd must be one of {DARTS_FDS}, got {fd!r}")
    if step.params_before is None:
        raise ValueError("darts needs the pretrain step's weights before the step (keep_params=True)")
    if not r > 0:
        raise ValueError(f"darts_r must be positive, got {r!r}")
    params = optimizer_params(optimizer)
    if len(vector) != len(params):
        raise ValueError(f"darts: the vector has {len(vector)} tensors but the optimizer holds {len(params)} "
                         "parameters; pass mae_params=optimizer_params(mae_optimizer) to finetune_step")
    masker_params = trainable(masker)
    d = update_derivative(optimizer, params, previous=step.params_before, scale=scale)
    u = [di.mul_(vi).mul_(step.clip_coef) for di, vi in zip(d, vector, strict=False)]  # the direction D * v in W space
    norm = math.sqrt(sum(float((ui.double() ** 2).sum()) for ui in u))
    if norm == 0.0 or not math.isfinite(norm):
        return [torch.zeros_like(p) for p in masker_params]
    eps = r / norm
    plan = step.plan.detach()
    signs = (1.0, -1.0) if fd == "central" else (1.0,)
    with torch.no_grad():
        after = [p.detach().clone() for p in params]
        losses = []
        for sign in signs:
            for p, w0, ui in zip(params, step.params_before, u, strict=False):
                p.copy_(w0).add_(ui, alpha=sign * eps)
            losses.append(mae_forward(mae, step.images, plan).per_patch)  # [B, N]
        for p, w1 in zip(params, after, strict=False):
            p.copy_(w1)
    if fd == "central":
        delta = (losses[0] - losses[1]) / (2 * eps)  # [B, N] d l / d eps along u
    else:
        if step.per_patch is None:
            raise ValueError("darts fd='forward' needs the pretrain step's per-patch losses (keep_params=True)")
        delta = (losses[0] - step.per_patch) / eps
    mask, probs = step.plan.mask, step.plan.weights
    objective = -(delta * mask * probs).sum() / mask.sum()
    return zeros_for_none(torch.autograd.grad(objective, masker_params, allow_unused=True), masker_params)


