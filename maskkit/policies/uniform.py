"""UM-MAE uniform masking: one visible patch per 2x2 block (Li et al., 2022)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from maskkit.plan import MaskPlan, check_ratio
from maskkit.policies.base import MaskPolicy, check_fraction
from maskkit.policies.card import CardInfo
from maskkit.policies.learned import grid_side
from maskkit.policies.registry import register_policy
from maskkit.policies.scored import uniform_noise

#: the hiding fraction uniform sampling implies: 3 of every 2x2 block.
UNIFORM_RATIO = 0.75


@register_policy("uniform")
class UniformPolicy(MaskPolicy):
    """UM-MAE uniform masking: one randomly chosen visible patch per 2x2 block, ratio 0.75.

    Li et al., "Uniform Masking: Enabling MAE Pre-training for Pyramid-based Vision Transformers
    with Locality", arXiv 2022.

    Uniform sampling: the square grid (even side S) is cut into 2x2 blocks and exactly one patch
    of each block, chosen uniformly at random and independently per block, stays visible: N / 4
    visible, ratio 0.75. (The reference code deals the positions from a shuffled list holding each
    of the 4 about equally often; here each block draws its own.) With `noise` [B, N] (uniforms,
    one per patch) the visible patch of a block is the one with the lowest noise, so the same
    noise gives the same plan.

    Secondary masking (`secondary_ratio` s > 0): of the N / 4 uniformly sampled patches,
    K = int(N / 4 * (1 - s)) stay visible (UM-MAE's `vis_final_cnt`) and the other N / 4 - K,
    drawn uniformly (the lowest block noise stays visible), are hidden too. UM-MAE keeps those
    in the encoder as a shared learnable mask token (so that pyramid ViTs keep their regular
    layout) and does not reconstruct them. A MaskPlan has no such third state: here they are
    counted as hidden (`plan.mask` = 1, so they are absent from the encoder and the plan hides
    N - K > 3N/4 patches). By default (`secondary_in_loss=False`) they still get no reconstruction
    loss, as in UM-MAE: `plan.weights` is 0 on them and H / H1 on the primary-hidden patches
    (H = N - K hidden in all, H1 = 3N/4 primary), so the masked loss sum(l * mask * w) / sum(mask)
    is exactly UM-MAE's mean over the primary-hidden patches (only a trainer that applies
    `plan.weights` honours this). With `secondary_in_loss=True` they are reconstructed like any
    hidden patch and `plan.weights` is None. With s = 0 (default) `plan.weights` is None.

    The ratio is not free: uniform sampling fixes it at 0.75, so `ratio` (here and per call)
    must be 0.75 (ValueError otherwise); the hidden fraction grows only through `secondary_ratio`.
    An odd grid side, or a grid that is not square, is a ValueError (a 2x2 partition needs an
    even side; no fallback is attempted).

    Args:
        ratio: the primary masking ratio; must be 0.75. Default 0.75.
        secondary_ratio: fraction of the uniformly sampled visible patches hidden as well, in [0, 1).
            Default 0.0 (UM-MAE uses 0.25).
        secondary_in_loss: whether secondary-hidden patches are reconstruction targets. Default False.
    """

    card_info = CardInfo(
        paper="Li et al., arXiv 2022",
        idea="UM-MAE: one random patch of every 2x2 block stays visible (ratio fixed at 0.75)",
        learns="nothing",
        allowed={"ratio": "0.75", "secondary_ratio": "[0, 1)", "secondary_in_loss": "bool"},
    )

    def __init__(
        self, ratio: float = 0.75, secondary_ratio: float = 0.0, secondary_in_loss: bool = False
    ) -> None:
        super().__init__(_check_uniform_ratio(ratio))
        self.secondary_ratio = check_fraction("secondary_ratio", secondary_ratio, include_one=False)
        self.secondary_in_loss = bool(secondary_in_loss)

    def num_visible(self, num_patches: int, ratio: float | None = None, grid: tuple[int, ...] | None = None) -> int:
        """K = int(N / 4 * (1 - secondary_ratio)) visible patches of N (`ratio`, if given, must be 0.75)."""
        self.resolve_ratio(ratio, num_patches)
        return int(num_patches // 4 * (1.0 - self.secondary_ratio))

    def resolve_ratio(self, ratio: float | None, num_patches: int) -> float:
        """Always 0.75 (a per-call ratio must be 0.75 too): one visible patch per 2x2 block."""
        return self.ratio if ratio is None else _check_uniform_ratio(ratio)

    def make_plan(self, tokens: Tensor, ratio: float, *, noise: Tensor | None = None,
                  generator: torch.Generator | None = None, **context: Any) -> MaskPlan:
        batch, n = tokens.shape[:2]  # tokens: [B, N, D]
        self.refuse_space_time(context.get("grid"))
        side = grid_side(n)
        if side % 2:
            raise ValueError(f"uniform masking needs an even grid side, got a {side}x{side} grid (N = {n})")
        keep = self.num_visible(n)
        if keep < 1:
            raise ValueError(
                f"secondary_ratio {self.secondary_ratio} leaves no visible patch of the {n // 4} sampled "
                f"(N = {n})"
            )
        noise = uniform_noise(noise, batch, n, tokens.device, generator).to(tokens.device)  # [B, N]
        if not noise.is_floating_point():
            noise = noise.to(torch.get_default_dtype())

        half = side // 2
        blocks = noise.reshape(batch, half, 2, half, 2).permute(0, 1, 3, 2, 4).reshape(batch, half * half, 4)
        chosen = blocks.argmin(dim=-1)  # [B, N/4] position (row-major in the block) of the visible patch
        primary = torch.ones_like(blocks)  # [B, N/4, 4] 1 = hidden
        primary.scatter_(-1, chosen.unsqueeze(-1), 0.0)
        primary = primary.reshape(batch, half, half, 2, 2).permute(0, 1, 3, 2, 4).reshape(batch, n)  # [B, N]

        # primary-visible patches sort first, by noise (the lowest stay visible under secondary
        # masking: block minima are i.i.d., so that subset is uniform); primary-hidden ones last
        scores = noise + 2.0 * primary  # [B, N], noise in [0, 1)
        plan = MaskPlan.from_scores(scores, 1.0 - (keep + 0.5) / n)  # exactly `keep` visible
        if keep < n // 4 and not self.secondary_in_loss:
            hidden = n - keep
            weights = primary * (hidden / (n - n // 4))  # [B, N] 0 on secondary-hidden patches
            plan.weights = weights.to(plan.mask.dtype)
        return plan

    def extra_repr(self) -> str:
        return (
            f"ratio={self.ratio}, secondary_ratio={self.secondary_ratio}, "
            f"secondary_in_loss={self.secondary_in_loss}"
        )


def _check_uniform_ratio(ratio: Any) -> float:
    value = check_ratio(ratio)
    if not math.isclose(value, UNIFORM_RATIO, abs_tol=1e-9):
        raise ValueError(
            f"uniform masking hides exactly 3 of every 2x2 patches (ratio 0.75), got ratio {ratio!r}; "
            "use secondary_ratio to hide more"
        )
    return UNIFORM_RATIO
