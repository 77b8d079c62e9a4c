r"""The three levels' real steps, shared by every hypergradient method.

Levels (MLO-MAE): masker T, MAE W, head C. One MLO iteration, with U the pretrain optimizer's
update and U_C the head optimizer's:

    L1(W, T)  = sum(l(W) * m * p_T) / sum(m)          pretrain loss, l [B, N] per-patch MSE,
                                                     m the mask, p_T = plan.weights
    W'        = W - U(g),  g = grad_W L1(W, T)       (`pretrain_step`)
    L2(W', C) = CE(head_C(features_W'(x_tr)), y_tr)  finetune loss
    C'        = C - U_C(h),  h = grad_C L2(W', C)    (`finetune_step`; `ridge_step` fits a probe instead)
    L3        = CE(head_C'(features_W'(x_va)), y_va) validation loss; the masker minimises it.

Selection (which patches are hidden) is not differentiable; T reaches L1 only through p_T.
`finetune_step` can also return v = dL3/dW' along the darts paths (maskkit.mlo.darts):

    v = dL3/dW' - d/dW' <h(W', C), D_C * dL3/dC'>        (paths="both")
    v = dL3/dW'                                          (paths="direct")

computed while taking the real head step: one forward of the encoder on [x_tr; x_va], a double
backward through the (small) head only (h with create_graph on a copy of C), and one
first-order backward through the encoder ("direct": train features without graph, one
backward from x_va). D_C is the head optimizer's update derivative (maskkit.mlo.derivative).
Gradient clipping is treated as a constant factor c (D becomes c * D; the derivative of c
itself is ignored).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskkit.mae import mae_forward, policy_context
from maskkit.mlo.derivative import optimizer_params, update_derivative
from maskkit.plan import MaskPlan

#: the paths of v = dL3/dW' that `finetune_step` follows (darts): both, or masker -> pretrain -> validation only
DARTS_PATHS = ("both", "direct")

# --------------------------------------------------------------------------- small helpers


def trainable(module: nn.Module) -> list[Tensor]:
    """The module's parameters that require grad, in order."""
    return [p for p in module.parameters() if p.requires_grad]


def zeros_for_none(grads: Sequence[Tensor | None], params: Sequence[Tensor]) -> list[Tensor]:
    """The gradients with zeros in place of None (unused parameters)."""
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=False)]


def as_batch(batch: Any, what: str) -> tuple[Tensor, Tensor]:
    """(images, labels) from a labeled batch; TypeError naming `what` for anything else."""
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise TypeError(f"{what} must be a pair (images, labels), got {type(batch).__name__}")
    x, y = batch[0], batch[1]
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise TypeError(f"{what} must hold tensors (images [B, C, H, W], labels [B])")
    return x, y


def clip_factor(params: Sequence[Tensor], max_norm: float | None) -> float:
    """clip_grad_norm_ in place; returns the factor applied (1.0 without clipping)."""
    if max_norm is None:
        return 1.0
    total = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return min(1.0, max_norm / (total + 1e-6))


# --------------------------------------------------------------------------- pretrain level


@dataclass
class PretrainStep:
    """One real pretrain step and what the darts hypergradient needs from it."""

    images: Tensor  # [B, C, H, W]
    plan: MaskPlan  # weights [B, N] still attached to the masker's graph
    loss: Tensor  # scalar, detached
    params_before: list[Tensor] | None  # W before the step (darts), else None
    clip_coef: float = 1.0  # the gradient-clipping factor the step applied (1.0: none)
    per_patch: Tensor | None = None  # [B, N] l(W) of the step's own forward, detached


def masker_plan(model: Any, masker: nn.Module, images: Tensor, *, ratio: float | None = None,
                generator: torch.Generator | None = None, progress: float | None = None) -> tuple[Tensor, MaskPlan]:
    """Patch tokens [B, N, D] and the masker's plan for them; plan.weights must be the probabilities."""
    tokens = model.patch_tokens(images)  # [B, N, D]
    return tokens, _masker(masker, model, images, tokens, ratio, generator, progress)


def _masker(masker: nn.Module, model: Any, images: Tensor, tokens: Tensor, ratio: float | None,
            generator: torch.Generator | None, progress: float | None = None) -> MaskPlan:
    context = policy_context(model, images, generator=generator)
    if progress is not None:
        context["progress"] = progress
    plan = masker(tokens, ratio=ratio, **context)
    if plan.weights is None:
        raise ValueError(
            f"the masker {type(masker).__name__} returned no plan.weights; MLO needs a learnable policy "
            "whose plan carries its masking probabilities (e.g. create_policy('learned', ...))"
        )
    return plan


def pretrain_step(
    mae: nn.Module,
    masker: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: Tensor,
    *,
    ratio: float | None = None,
    generator: torch.Generator | None = None,
    grad_clip: float | None = None,
    keep_params: bool = False,
    autocast_dtype: torch.dtype | None = None,
    progress: float | None = None,
) -> PretrainStep:
    """One real MAE step on the probability-weighted loss (weights detached from the masker).

    keep_params: keep W before the step and the masker's graph, for `darts_masker_grad`.
    autocast_dtype: e.g. torch.bfloat16 to run the MAE's encode/decode forward under autocast;
        the masker, the loss's reduction and everything the hypergradient computes stay float32.
    """
    params = optimizer_params(optimizer)
    before = [p.detach().clone() for p in params] if keep_params else None
    tokens = mae.patch_tokens(images)  # [B, N, D]
    with torch.set_grad_enabled(keep_params):  # the masker's graph only when a hypergradient follows
        plan = _masker(masker, mae, images, tokens, ratio, generator, progress)
    with torch.autocast(images.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        out = mae_forward(mae, images, plan.detach(), tokens=tokens)
    loss = out.loss if autocast_dtype is None else out.loss.float()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    coef = clip_factor(params, grad_clip)
    optimizer.step()
    return PretrainStep(images=images, plan=plan, loss=loss.detach(), params_before=before, clip_coef=coef,
                        per_patch=_as(out.per_patch.detach(), loss))


def _as(x: Tensor, like: Tensor) -> Tensor:
    return x.to(like.dtype)


# --------------------------------------------------------------------------- finetune level


@dataclass
class FinetuneStep:
    """The real head step and the validation loss after it, with v = dL3/dW' (darts)."""

    head_loss: Tensor  # L2 at (W', C), detached
    val_loss: Tensor  # L3 at (W', C'), detached
    val_acc: Tensor  # accuracy of the validation batch at (W', C')
    vector: list[Tensor] | None  # v along the chosen paths, one per MAE parameter


def finetune_step(
    mae: nn.Module,
    head: nn.Module,
    head_optimizer: torch.optim.Optimizer,
    train_batch: Any,
    val_batch: Any,
    *,
    mae_params: Sequence[Tensor] | None = None,
    paths: str | None = "both",
    scale: str = "optimizer",
    grad_clip: float | None = None,
) -> FinetuneStep:
    """Real head step on features of the (already stepped) MAE; v for darts when `paths` is set.

    paths "both": one encoder forward on [x_tr; x_va], double backward through the head only,
    one encoder backward. "direct": train features without graph, one backward from x_va.
    None: the head step and validation loss only.
    """
    if paths is not None and paths not in DARTS_PATHS:
        raise ValueError(f"darts paths must be one of {DARTS_PATHS}, got {paths!r}")
    x_tr, y_tr = as_batch(train_batch, "train_batch")
    x_va, y_va = as_batch(val_batch, "val_batch")
    n_tr = x_tr.shape[0]
    if paths == "both":
        feats = mae.features(torch.cat([x_tr, x_va]))  # [B_tr + B_va, D]
        f_tr, f_va = feats[:n_tr], feats[n_tr:]
    else:
        with torch.no_grad():
            f_tr = mae.features(x_tr)  # [B_tr, D]
        if paths is None:
            with torch.no_grad():
                f_va = mae.features(x_va)
        else:
            f_va = mae.features(x_va)  # [B_va, D]
        feats = f_va

    # head at C, on a copy of its parameters so that the real head can step in place
    names = [n for n, p in head.named_parameters() if p.requires_grad]
    head_params = trainable(head)
    c0 = {n: p.detach().clone().requires_grad_(True) for n, p in zip(names, head_params, strict=False)}
    logits_tr = torch.func.functional_call(head, c0, (f_tr,))  # [B_tr, classes]
    head_loss = F.cross_entropy(logits_tr, y_tr)
    h = torch.autograd.grad(head_loss, list(c0.values()), create_graph=paths == "both")
    for p, g in zip(head_params, h, strict=False):
        p.grad = g.detach().clone()
    coef = clip_factor(head_params, grad_clip)
    head_optimizer.step()

    logits_va = head(f_va)  # [B_va, classes] at C'
    val_loss = F.cross_entropy(logits_va, y_va)
    val_acc = (logits_va.argmax(-1) == y_va).float().mean().detach()
    vector = None
    if paths is not None:
        a = torch.autograd.grad(val_loss, [f_va, *head_params], retain_graph=True)  # head-only backward
        a_f, a_c = a[0], a[1:]
        if paths == "both":
            d_c = update_derivative(head_optimizer, head_params, previous=list(c0.values()), scale=scale)
            s = coef * sum((g * (d * ac)).sum() for g, d, ac in zip(h, d_c, a_c, strict=False))  # <h, D_C * dL3/dC'>
            (b_f,) = torch.autograd.grad(s, f_tr)  # double backward through the head only
            grad_out = torch.cat([-b_f, a_f])  # [B_tr + B_va, D]
        else:
            grad_out = a_f
        vector = _mae_vector(feats, mae, mae_params, grad_outputs=grad_out)
    return FinetuneStep(head_loss=head_loss.detach(), val_loss=val_loss.detach(), val_acc=val_acc, vector=vector)


def ridge_step(
    mae: nn.Module,
    train_batch: Any,
    val_batch: Any,
    *,
    ridge: float = 0.1,
    num_classes: int | None = None,
    mae_params: Sequence[Tensor] | None = None,
) -> FinetuneStep:
    """Level 2 in closed form: a ridge-regression probe fit on the train batch's features, scored on
    the validation batch; v = dL3/dW through both batches' features and the fit itself.

    Features F get a bias column; the fit is W = F_tr^T (F_tr F_tr^T + lam I)^-1 Y_tr (dual form,
    one B_tr x B_tr solve) with Y one-hot (num_classes columns; None: the largest label + 1) and
    lam = ridge * trace(F_tr F_tr^T) / B_tr (scale free).
    L3 is the validation mean squared error sum_k (F_va W - Y_va)^2 / B_va. A probe refit at every
    step measures the features themselves: a trained head's validation loss also rises when the
    features merely move away from what the head was fit to.
    """
    if not (isinstance(ridge, (int, float)) and ridge > 0):
        raise ValueError(f"ridge must be a positive number, got {ridge!r}")
    x_tr, y_tr = as_batch(train_batch, "train_batch")
    x_va, y_va = as_batch(val_batch, "val_batch")
    n_tr = x_tr.shape[0]
    feats = mae.features(torch.cat([x_tr, x_va]))  # [B_tr + B_va, D]
    ones = torch.ones(feats.shape[0], 1, dtype=feats.dtype, device=feats.device)
    f = torch.cat([feats, ones], dim=1)  # [B, D + 1]
    f_tr, f_va = f[:n_tr], f[n_tr:]
    labels = torch.cat([y_tr, y_va])
    classes = int(labels.max()) + 1 if num_classes is None else num_classes
    targets = F.one_hot(labels, classes).to(f.dtype)  # [B, classes]
    t_tr, t_va = targets[:n_tr], targets[n_tr:]
    gram = f_tr @ f_tr.T  # [B_tr, B_tr]
    lam = ridge * gram.diagonal().mean()
    alpha = torch.linalg.solve(gram + lam * torch.eye(n_tr, dtype=f.dtype, device=f.device), t_tr)  # [B_tr, classes]
    weights = f_tr.T @ alpha  # [D + 1, classes]
    out_tr, out_va = f_tr @ weights, f_va @ weights
    head_loss = ((out_tr - t_tr) ** 2).sum(1).mean()
    val_loss = ((out_va - t_va) ** 2).sum(1).mean()
    val_acc = (out_va.argmax(-1) == y_va).float().mean().detach()
    vector = _mae_vector(val_loss, mae, mae_params)
    return FinetuneStep(head_loss=head_loss.detach(), val_loss=val_loss.detach(), val_acc=val_acc, vector=vector)


def _mae_vector(outputs: Tensor, mae: nn.Module, mae_params: Sequence[Tensor] | None,
                grad_outputs: Tensor | None = None) -> list[Tensor]:
    """d outputs / d W for each MAE parameter (default: the trainable ones), zeros where unused or frozen."""
    params = [p for p in mae.parameters() if p.requires_grad] if mae_params is None else list(mae_params)
    live = [p for p in params if p.requires_grad]
    got = iter(torch.autograd.grad(outputs, live, grad_outputs=grad_outputs, allow_unused=True))
    return zeros_for_none([next(got) if p.requires_grad else None for p in params], params)

