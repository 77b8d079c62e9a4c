r"""D = dU/dg: the per-element derivative of an optimizer's update U with respect to the gradient g.

The darts hypergradient scales its direction by D (and the finetune step scales the head's by
D_C). "lr" uses D = lr (betty, exact for plain SGD). "optimizer" uses the exact diagonal
derivative of the step just taken, read from the real optimizer's state after it:
SGD: lr (times 1 + momentum for Nesterov, times 1 - dampening with momentum); Adam/AdamW with
m_hat = m / (1 - b1^t), v_hat = v / (1 - b2^t), s = sqrt(v_hat):

    D = lr / (s + eps_adam) * [(1 - b1) / (1 - b1^t) - m_hat * g * (1 - b2) / ((1 - b2^t) * s * (s + eps_adam))]

(g the gradient the step used, with the coupled L2 term for Adam; AdamW's decoupled decay does
not depend on g). With Adam the bare lr is far off (the update is ~ sign(g), nearly flat in g).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

#: how D is taken: the exact derivative of the optimizer's update, or the bare learning rate
SCALES = ("optimizer", "lr")
#: the optimizers whose update has a known derivative (scale "optimizer")
DIFFERENTIABLE_OPTIMIZERS = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


def optimizer_params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """Every parameter the optimizer updates, in group order."""
    return [p for group in optimizer.param_groups for p in group["params"]]


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
    if scale not in SCALES:
        raise ValueError(f"darts scale must be one of {SCALES}, got {scale!r}")
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
