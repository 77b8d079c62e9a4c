"""Optimizers by name (torch.optim and torch-optimizer) with MAE-style weight-decay groups.

MAE (and timm's `param_groups_weight_decay`) apply no weight decay to biases, norm weights,
positional embeddings and the CLS/mask tokens; `param_groups` reproduces that split.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

__all__ = [
    "create_optimizer",
    "list_optimizers",
    "no_weight_decay",
    "optimizer_class",
    "param_groups",
    "warmup_cosine",
]

#: optimizers from torch.optim, by CLI name.
TORCH_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adamw": torch.optim.AdamW,
    "adam": torch.optim.Adam,
    "sgd": torch.optim.SGD,
}

#: parameter-name fragments that never get weight decay (besides every 0-d/1-d tensor).
NO_DECAY_NAMES: tuple[str, ...] = ("pos_embed", "cls_token", "mask_token", "dist_token", "reg_token")


def _torch_optimizer_names() -> list[str]:
    import torch_optimizer

    names = getattr(torch_optimizer, "_NAME_OPTIM_MAP", {})
    return sorted(n for n in names if n not in TORCH_OPTIMIZERS)


def list_optimizers() -> list[str]:
    """Every name `create_optimizer` accepts: torch.optim's first, then torch-optimizer's."""
    return list(TORCH_OPTIMIZERS) + _torch_optimizer_names()


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The optimizer class called `name` (case-insensitive), else ValueError listing the choices."""
    key = name.lower()
    if key in TORCH_OPTIMIZERS:
        return TORCH_OPTIMIZERS[key]
    import torch_optimizer

    try:
        return torch_optimizer.get(key)
    except ValueError:
        raise ValueError(f"unknown optimizer {name!r}; choose one of: {', '.join(list_optimizers())}") from None


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Whether parameter `name` is exempt from weight decay: biases, norms (ndim <= 1), embeddings/tokens."""
    return param.ndim <= 1 or name.endswith(".bias") or any(key in name for key in NO_DECAY_NAMES)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups as MAE builds them: decayed weights, and the rest with weight_decay 0.

    Frozen parameters (requires_grad False) are left out; empty groups are dropped.
    """
    decay, skip = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (skip if no_weight_decay(name, param) else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": skip, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def create_optimizer(
    name: str,
    params: nn.Module | Iterable[Any],
    *,
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    betas: tuple[float, float] = (0.9, 0.95),
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """Optimizer `name` over `params`; a module gets MAE's no-decay groups.

    `momentum` is passed to optimizers that take it (sgd, lars, ...), `betas` to those that
    take betas (adamw, lamb, ...); the MAE defaults are betas (0.9, 0.95). Extra `kwargs` go
    to the constructor unchanged.
    """
    cls = optimizer_class(name)
    if lr <= 0:
        raise ValueError(f"learning rate must be positive, got {lr!r}")
    if weight_decay < 0:
        raise ValueError(f"weight decay must be non-negative, got {weight_decay!r}")
    if isinstance(params, nn.Module):
        groups: Any = param_groups(params, weight_decay)
    else:
        groups = [{"params": list(params), "weight_decay": weight_decay}]
    accepted = inspect.signature(cls.__init__).parameters
    options = dict(kwargs)
    if "momentum" in accepted and "momentum" not in options:
        options["momentum"] = momentum
    if "betas" in accepted and "betas" not in options:
        options["betas"] = betas
    unknown = [k for k in options if k not in accepted]
    if unknown:
        raise ValueError(f"optimizer {name!r} takes no option(s) {', '.join(unknown)}")
    return cls(groups, lr=lr, **options)


def warmup_cosine(total_steps: int, warmup_steps: int, min_factor: float = 0.0) -> Any:
    """LR factor of step s: linear warm-up to 1 over `warmup_steps`, then half-cosine to `min_factor`.

    The schedule MAE uses (per iteration); returns a function for `torch.optim.lr_scheduler.LambdaLR`.
    """
    import math

    total = max(int(total_steps), 1)
    warm = max(int(warmup_steps), 0)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min((step - warm) / max(total - warm, 1), 1.0)
        return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
