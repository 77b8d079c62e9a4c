"""Motion-guided tube masking: hide where the clip moves, scored from its pixels."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from maskkit.plan import MaskPlan, guided_fraction_at, num_guided
from maskkit.policies.base import MaskPolicy, check_fraction
from maskkit.policies.card import CardInfo
from maskkit.policies.registry import register_policy
from maskkit.policies.tube import slice_noise, top_positions, tube_counts, tube_plan


def motion_energy(clips: Tensor, space_grid: tuple[int, int]) -> Tensor:
    """Per spatial position, the clip's mean absolute frame difference over all frames and channels, pooled over
    each p x p patch: clips [B, C, T, H, W] -> [B, H'W'] (row-major)."""
    if clips.dim() != 5 or clips.shape[2] < 2:
        raise ValueError(f"motion scores need clips [B, C, T, H, W] with T >= 2, got shape {tuple(clips.shape)}")
    rows, cols = space_grid
    height, width = clips.shape[-2:]
    if height % rows or width % cols:
        raise ValueError(f"clips of {height}x{width} pixels do not divide into the token grid's {rows}x{cols} patches")
    change = (clips[:, :, 1:] - clips[:, :, :-1]).abs().float().mean(dim=(1, 2))  # [B, H, W]
    pooled = F.avg_pool2d(change[:, None], (height // rows, width // cols))  # [B, 1, H', W']
    return pooled.flatten(1)  # [B, H'W']


@register_policy("motion")
class MotionPolicy(MaskPolicy):
    """Tube masking whose spatial mask prefers the positions where the clip moves.

    Per clip, the motion energy of each spatial position (mean |frame difference| over the whole clip, pooled
    over the patch: `motion_energy` of the context's `images` [B, C, T, H, W]) ranks the positions. Of the h =
    int(ratio x H'W') positions hidden in every time slice (as `tube`), round(alpha h) (half up; alpha =
    `guided_fraction`, ramped over the first `guided_ramp` of training by the context's `progress`) are the
    highest-energy ones; the rest are drawn exactly as `tube` draws its mask (from `noise` / `generator`), so
    `guided_fraction=0` is `tube` bit for bit for the same noise. `plan.guided` marks the guided tokens and
    `plan.scores` holds every token's energy.

    Follows MGM (Fan et al., ICCV 2023: mask where the codec's motion vectors are large) with frame differences
    of the decoded pixels in place of motion vectors, and MGMAE (Huang et al., ICCV 2023) in hiding the moving
    content; unlike both, the mask is a tube (one spatial mask for the whole clip) rather than following the
    motion frame by frame, and part of it stays random (the guided fraction), as HPM's schedule does for images.
    """

    card_info = CardInfo(
        paper="after MGM (Fan et al., ICCV 2023) and MGMAE (Huang et al., ICCV 2023)",
        idea="tube masking that hides where the clip moves (frame-difference energy per patch), part random",
        learns="nothing",
    )

    def __init__(self, ratio: float = 0.9, guided_fraction: float = 0.5, guided_ramp: float = 0.0) -> None:
        super().__init__(ratio)
        self.guided_fraction = check_fraction("guided_fraction", guided_fraction)
        self.guided_ramp = check_fraction("guided_ramp", guided_ramp)

    def num_visible(self, num_patches: int, ratio: float | None = None, grid: tuple[int, ...] | None = None) -> int:
        """K = T' x (H'W' - int(ratio x H'W')), as `tube`."""
        ratio = self.resolve_ratio(ratio, num_patches)
        frames, space, hidden = tube_counts(self.grid_of(num_patches, {"grid": grid}), ratio)
        return frames * (space - hidden)

    def make_plan(self, tokens: Tensor, ratio: float, *, noise: Tensor | None = None,
                  generator: torch.Generator | None = None, progress: float | None = None,
                  **context: Any) -> MaskPlan:
        batch, n = tokens.shape[:2]  # tokens: [B, N, D]
        grid = self.grid_of(n, context)
        frames, space, hidden = tube_counts(grid, ratio)
        clips = context.get("images")
        if not isinstance(clips, Tensor):
            raise ValueError("policy 'motion' scores the clip's pixels: pass images=[B, C, T, H, W] in the context")
        energy = motion_energy(clips, grid[-2:]).to(tokens.device)  # [B, S]
        uniforms = slice_noise(noise, batch, n, space, tokens.device, generator)  # [B, S] tube's own draw
        guided_count = num_guided(hidden, guided_fraction_at(self.guided_fraction, self.guided_ramp, progress))
        guided = top_positions(energy, guided_count) if guided_count else torch.zeros_like(uniforms, dtype=torch.bool)
        hide = top_positions(uniforms.masked_fill(guided, 2.0), hidden)  # guided first (above any uniform), then random
        plan = tube_plan(hide, frames)
        plan.guided = guided.repeat(1, frames)  # [B, N]
        plan.scores = energy.repeat(1, frames)  # [B, N] every token's energy, for inspection
        return plan

    def extra_repr(self) -> str:
        return f"ratio={self.ratio}, guided_fraction={self.guided_fraction}, guided_ramp={self.guided_ramp}"
