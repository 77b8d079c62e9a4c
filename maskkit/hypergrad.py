r"""The masker's hypergradient: how the validation loss changes with the masker's parameters.

Levels (MLO-MAE): masker T, MAE W, head C. One MLO iteration, with U the pretrain optimizer's
update and U_C the head optimizer's:

    L1(W, T)  = sum(l(W) * m * p_T) / sum(m)          pretrain loss, l [B, N] per-patch MSE,
                                                     m the mask, p_T = plan.weights
    W'        = W - U(g),  g = grad_W L1(W, T)       (K such steps for `unroll`)
    L2(W', C) = CE(head_C(features_W'(x_tr)), y_tr)  finetune loss
    C'        = C - U_C(h),  h = grad_C L2(W', C)
    L3        = CE(head_C'(features_W'(x_va)), y_va) validation loss; the masker minimises it.

Selection (which patches are hidden) is not differentiable; T reaches L1 only through p_T.

**unroll** (`UnrollWindow`): exact reverse mode. The K pretrain steps and the head step run
differentiably through `maskkit.unroll` (higher), then dL3/dT = autograd.grad(L3, T); the
unrolled weights are written back, so the unrolled steps are the real steps.

**darts** (`darts_masker_grad`, betty's "darts", DARTS eq. 7 generalised): with D = dU/dg and
D_C = dU_C/dh the per-element (diagonal) derivatives of the updates w.r.t. the gradients,

    dL3/dT = -(d^2 L1 / dT dW) u,   u = D * v,
    v      = dL3/dW' - d/dW' <h(W', C), D_C * dL3/dC'>        (paths="both")
    v      = dL3/dW'                                          (paths="direct")

The first term of v is masker -> pretrain -> validation, the second masker -> pretrain ->
finetune -> validation. `finetune_step` computes v exactly while taking the real head step:
one forward of the encoder on [x_tr; x_va], a double backward through the (small) head only
(h with create_graph on a copy of C), and one first-order backward through the encoder
("direct": train features without graph, one backward from x_va). The mixed second
derivative is a finite difference at the weights W *before* the step, as DARTS and betty:

    (d^2 L1 / dT dW) u ~= [grad_T L1(W + eps u, T) - grad_T L1(W - eps u, T)] / (2 eps),
    eps = r / ||u||, r = 0.01 (`darts_r`).

Since grad_T L1(W*, T) = grad_T sum(l(W*) * m * p_T) / sum(m), the difference needs only the
per-patch losses l(W +- eps u) [B, N]: two no-grad MAE forwards with the same plan, then one
backward through the masker alone; no double backward through the MAE. `fd="forward"` uses
[grad_T L1(W + eps u) - grad_T L1(W)] / eps with l(W) from the step's own forward: one MAE
forward instead of two, error O(eps) instead of O(eps^2).

Scaling (`scale`): "lr" uses D = lr (betty, exact for plain SGD). "optimizer" uses the exact
diagonal derivative of the step just taken, read from the real optimizer's state after it:
SGD: lr (times 1 + momentum for Nesterov, times 1 - dampening with momentum); Adam/AdamW with
m_hat = m / (1 - b1^t), v_hat = v / (1 - b2^t), s = sqrt(v_hat):

    D = lr / (s + eps_adam) * [(1 - b1) / (1 - b1^t) - m_hat * g * (1 - b2) / ((1 - b2^t) * s * (s + eps_adam))]

(g the gradient the step used, with the coupled L2 term for Adam; AdamW's decoupled decay does
not depend on g). With Adam the bare lr is far off (the update is ~ sign(g), nearly flat in g).
Gradient clipping is treated as a constant factor c (D becomes c * D; the derivative of c
itself is ignored); `unroll` differentiates the clipping exactly.

Not differentiated (by either method): the masker reads the MAE's patch tokens detached, so
for K >= 2 the higher-order path T -> W_k -> tokens -> masker input -> p is left out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from maskkit.mae import MAEOutput, mae_forward, policy_context
from maskkit.plan import MaskPlan

HYPERGRADS = ("darts", "unroll")
_FUSED_AND_MATH = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                   SDPBackend.MATH]
DARTS_PATHS = ("both", "direct")
DARTS_SCALES = ("optimizer", "lr")
DARTS_FDS = ("central", "forward")


# --------------------------------------------------------------------------- small helpers


def optimizer_params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """Every parameter the optimizer updates, in group order."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def trainable(module: nn.Module) -> list[Tensor]:
    return [p for p in module.parameters() if p.requires_grad]


def zeros_for_none(grads: Sequence[Tensor | None], params: Sequence[Tensor]) -> list[Tensor]:
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=False)]


def _as_batch(batch: Any, what: str) -> tuple[Tensor, Tensor]:
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise TypeError(f"{what} must be a pair (images, labels), got {type(batch).__name__}")
    x, y = batch[0], batch[1]
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise TypeError(f"{what} must hold tensors (images [B, C, H, W], labels [B])")
    return x, y


# --------------------------------------------------------------------------- D = dU/dg


def update_derivative(
    optimizer: torch.optim.Optimizer,
    params: Sequence[Tensor] | None = None,
    *,
    previous: Sequence[Tensor] | None = None,
    scale: str = "optimizer",
) -> list[Tensor]:
    """Per-element derivative of the step `optimizer` just took w.r.t. the gradient it used.

    Call after `optimizer.step()` with `p.grad` still holding that gradient. previous: the
    parameters before the step (for Adam's coupled weight decay; default the current ones).
    scale "lr" gives the bare learning rate (betty), "optimizer" the exact diagonal Jacobian.
    """
    if scale not in DARTS_SCALES:
        raise ValueError(f"darts scale must be one of {DARTS_SCALES}, got {scale!r}")
    params = optimizer_params(optimizer) if params is None else list(params)
    previous = list(params) if previous is None else list(previous)
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    out = []
    for p, prev in zip(params, previous, strict=False):
        group = group_of.get(id(p))
        if group is None:
            raise ValueError("update_derivative: a parameter is not held by the optimizer")
        lr = float(group["lr"])
        if scale == "optimizer" and p.grad is None:  # torch skipped it: no update, no derivative
            out.append(torch.zeros_like(p))
        elif scale == "lr":
            out.append(torch.full_like(p, lr))
        elif isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            out.append(_adam_derivative(optimizer, group, p, prev, lr))
        elif isinstance(optimizer, torch.optim.SGD):
            out.append(torch.full_like(p, lr * _sgd_factor(group)))
        else:
            raise ValueError(
                f"darts scale='optimizer' supports SGD, Adam and AdamW, not {type(optimizer).__name__}; "
                "use scale='lr' or the 'unroll' hypergradient"
            )
    return out


def _sgd_factor(group: dict[str, Any]) -> float:
    if group.get("maximize", False):
        raise ValueError("update_derivative: SGD with maximize=True is not supported")
    mu, damp = float(group.get("momentum", 0.0)), float(group.get("dampening", 0.0))
    if mu == 0:
        return 1.0
    # buf = mu * buf + (1 - dampening) * g (PyTorch's first step uses buf = g: factor 1)
    return 1.0 + mu * (1.0 - damp) if group.get("nesterov", False) else 1.0 - damp


def _adam_derivative(optimizer: torch.optim.Optimizer, group: dict[str, Any], p: Tensor, prev: Tensor, lr: float) -> Tensor:
    if group.get("amsgrad", False) or group.get("maximize", False):
        raise ValueError("update_derivative: Adam/AdamW with amsgrad or maximize is not supported")
    state = optimizer.state.get(p, {})
    if "exp_avg" not in state or p.grad is None:
        raise ValueError("update_derivative needs the state and gradient of a step just taken")
    b1, b2 = (float(b) for b in group["betas"])
    eps = float(group["eps"])
    t = float(state["step"])
    g = p.grad.detach()
    decoupled = isinstance(optimizer, torch.optim.AdamW) or group.get("decoupled_weight_decay", False)
    wd = float(group.get("weight_decay", 0.0))
    if wd and not decoupled:
        g = g + wd * prev.detach()
    bc1, bc2 = 1 - b1**t, 1 - b2**t
    # written as products of O(1) ratios (m_hat / denom, g / s): products of two tiny numbers
    # would be denormal floats, which are very slow on CPUs
    s = (state["exp_avg_sq"] / bc2).sqrt_()  # sqrt(v_hat)
    denom = s + eps
    ratio = (state["exp_avg"] / bc1).div_(denom)  # m_hat / denom
    # where s == 0 every gradient so far was 0, so g == 0 and the term vanishes
    second = ratio.mul_(g / s.clamp_min_(torch.finfo(s.dtype).tiny)).mul_((1 - b2) / bc2)
    return second.neg_().add_((1 - b1) / bc1).div_(denom).mul_(lr)


def _clip(params: Sequence[Tensor], max_norm: float | None) -> float:
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
    coef = _clip(params, grad_clip)
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
    x_tr, y_tr = _as_batch(train_batch, "train_batch")
    x_va, y_va = _as_batch(val_batch, "val_batch")
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
    coef = _clip(head_params, grad_clip)
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
    x_tr, y_tr = _as_batch(train_batch, "train_batch")
    x_va, y_va = _as_batch(val_batch, "val_batch")
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


# --------------------------------------------------------------------------- darts


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


# --------------------------------------------------------------------------- unroll


GradMap = Any  # Callable[[list[Tensor | None]], list[Tensor | None]]


def _then(first: GradMap | None, second: GradMap | None) -> GradMap | None:
    """The composition second(first(grads)) of two optional gradient maps."""
    if first is None or second is None:
        return first or second
    return lambda grads: second(first(grads))


def _clipper(max_norm: float):
    """clip_grad_norm_ as a differentiable map of the gradient list (None entries kept)."""

    def clip(grads: list[Tensor | None]) -> list[Tensor | None]:
        present = [g for g in grads if g is not None]
        if not present:
            return grads
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in present]))
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        return [None if g is None else g * coef for g in grads]

    return clip


class UnrollWindow:
    """Exact hypergradient: K differentiable pretrain steps, then the head step, then dL3/dT.

    window = UnrollWindow(mae, masker, mae_optimizer)
    window.pretrain_step(images)        # K times (each a real step once written back)
    grads, result = window.finish(head, head_optimizer, train_batch, val_batch)
    """

    def __init__(self, mae: nn.Module, masker: nn.Module, mae_optimizer: torch.optim.Optimizer, *,
                 first_order: bool = False, grad_sync: GradMap | None = None) -> None:
        """grad_sync: a differentiable map applied to every unrolled step's gradients after
        clipping, before the update (e.g. the mean across data-parallel ranks, as the real steps'
        optimizer pre-hooks do)."""
        from maskkit.unroll import unroll

        self.mae, self.masker, self.first_order, self.grad_sync = mae, masker, first_order, grad_sync
        self._ctx = unroll(mae, mae_optimizer, first_order=first_order)
        self.u = self._ctx.__enter__()
        self.steps = 0
        self._open = True

    def pretrain_step(self, images: Tensor, *, ratio: float | None = None,
                      generator: torch.Generator | None = None, grad_clip: float | None = None,
                      progress: float | None = None) -> MAEOutput:
        """One differentiable step of the fast MAE weights; the loss keeps its graph to the masker.

        grad_clip: clip the total gradient norm as `clip_grad_norm_` does (differentiably).
        progress: how far training has come, in [0, 1], for the masker's schedules.
        """
        self._check_open()
        tokens, plan = masker_plan(self.u.fmodel, self.masker, images, ratio=ratio, generator=generator,
                                   progress=progress)
        out = mae_forward(self.u.fmodel, images, plan, tokens=tokens)
        self.u.step(out.loss, grad_callback=_then(None if grad_clip is None else _clipper(grad_clip), self.grad_sync))
        self.steps += 1
        return out

    def finish(self, head: nn.Module, head_optimizer: torch.optim.Optimizer, train_batch: Any,
               val_batch: Any, *, head_grad_clip: float | None = None) -> tuple[list[Tensor], FinetuneStep]:
        """Unrolled head step and validation loss; returns dL3/dT and writes both levels back."""
        from maskkit.unroll import unroll

        self._check_open()
        x_tr, y_tr = _as_batch(train_batch, "train_batch")
        x_va, y_va = _as_batch(val_batch, "val_batch")
        n_tr = x_tr.shape[0]
        masker_params = trainable(self.masker)
        try:
            # the features' graph is differentiated only once (L3 -> W'), so the fused attention
            # kernels may run here; only the unrolled steps' gradients need the math kernel
            with sdpa_kernel(_FUSED_AND_MATH):
                feats = self.u.fmodel.features(torch.cat([x_tr, x_va]))  # [B_tr + B_va, D] at W'
            with unroll(head, head_optimizer, first_order=self.first_order, math_sdpa=False) as uh:
                head_loss = F.cross_entropy(uh.fmodel(feats[:n_tr]), y_tr)
                uh.step(head_loss, grad_callback=_then(
                    None if head_grad_clip is None else _clipper(head_grad_clip), self.grad_sync))
                logits_va = uh.fmodel(feats[n_tr:])  # at C'
                val_loss = F.cross_entropy(logits_va, y_va)
                grads = zeros_for_none(
                    torch.autograd.grad(val_loss, masker_params, allow_unused=True), masker_params
                )
                uh.write_back()
            self.u.write_back()
        finally:
            self.close()
        result = FinetuneStep(
            head_loss=head_loss.detach(),
            val_loss=val_loss.detach(),
            val_acc=(logits_va.argmax(-1) == y_va).float().mean().detach(),
            vector=None,
        )
        return grads, result

    def close(self) -> None:
        """Leave the unroll context (without writing back if `finish` was not reached)."""
        if self._open:
            self._open = False
            self._ctx.__exit__(None, None, None)

    def _check_open(self) -> None:
        if not self._open:
            raise RuntimeError("this UnrollWindow is finished; open a new one")
