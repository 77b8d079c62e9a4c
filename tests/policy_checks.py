"""Checks every policy's tests share: the same noise or generator seed gives the same plan."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from maskkit import MaskPlan


def check_determinism(policy: nn.Module, tokens: Tensor, noise: Tensor, seed: int) -> tuple[MaskPlan, MaskPlan]:
    """Same `noise` -> the same plan; the same generator seed -> the same plan; seed + 1 -> another mask.

    Returns the plan drawn from `noise` and the one drawn from `seed`, for the test's own checks.
    """
    a, b = policy(tokens, noise=noise), policy(tokens, noise=noise.clone())
    assert torch.equal(a.mask, b.mask) and torch.equal(a.ids_keep, b.ids_keep)
    assert torch.equal(a.ids_restore, b.ids_restore)
    c, d, e = (policy(tokens, generator=torch.Generator().manual_seed(s)) for s in (seed, seed, seed + 1))
    assert torch.equal(c.mask, d.mask) and torch.equal(c.ids_restore, d.ids_restore)
    assert not torch.equal(c.mask, e.mask)
    return a, c
