"""Uniform random masking: the MAE baseline."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from maskkit.plan import MaskPlan
from maskkit.policies.base import MaskPolicy
from maskkit.policies.card import CardInfo
from maskkit.policies.registry import register_policy
from maskkit.policies.scored import uniform_noise


@register_policy("random")
class RandomPolicy(MaskPolicy):
    """Uniform random masking, as the official MAE `random_masking` (the baseline).

    Given the same `noise` [B, N] it yields exactly the official plan: the K patches with the
    lowest noise stay visible.
    """

    card_info = CardInfo(
        paper="He et al., CVPR 2022",
        idea="MAE's baseline: hide a uniformly random N - K of the patches",
        learns="nothing",
    )

    def __init__(self, ratio: float = 0.75) -> None:
        super().__init__(ratio)

    def make_plan(self, tokens: Tensor, ratio: float, *, noise: Tensor | None = None,
                  generator: torch.Generator | None = None, **context: Any) -> MaskPlan:
        batch, n = tokens.shape[:2]  # tokens: [B, N, D]
        return MaskPlan.from_scores(uniform_noise(noise, batch, n, tokens.device, generator), ratio)  # [B, N] noise
