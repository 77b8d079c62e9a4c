"""Frame masking (VideoMAE's ablation): whole time slices of the token grid hidden."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from maskkit.plan import MaskPlan, is_space_time
from maskkit.policies.base import MaskPolicy
from maskkit.policies.card import CardInfo
from maskkit.policies.registry import register_policy
from maskkit.policies.tube import top_positions


def frame_counts(grid: tuple[int, ...], ratio: float, who: str) -> tuple[int, int, int]:
    """(T', S, f): time slices, tokens per slice and the f = int(ratio x T') hidden slices; one-line ValueError
    on an image grid or when f hides no slice or every one."""
    if not is_space_time(grid):
        raise ValueError(f"{who} hides time slices of a clip's (T', H', W') token grid; got the image grid "
                         f"{'x'.join(map(str, grid))}")  # fmt: skip
    frames, space = grid[0], grid[1] * grid[2]
    hidden = int(ratio * frames)
    if not 1 <= hidden <= frames - 1:
        raise ValueError(f"mask ratio {ratio} hides {hidden} of {frames} time slices; frame masking needs at least "
                         "one hidden and one visible")  # fmt: skip
    return frames, space, hidden


@register_policy("frame")
class FramePolicy(MaskPolicy):
    """Frame masking (VideoMAE's ablation, Tong et al. 2022, table 1c): f = int(ratio x T') whole time slices of
    each clip are hidden, chosen uniformly (from `generator`, or the f highest of a given `noise` [B, N] read at
    the first token of every slice); K = (T' - f) x H'W'. Visible tokens are kept in patch order."""

    card_info = CardInfo(
        paper="Tong et al., NeurIPS 2022 (VideoMAE ablation)",
        idea="hide whole time slices of the clip (frame masking)",
        learns="nothing",
    )

    def __init__(self, ratio: float = 0.75) -> None:
        super().__init__(ratio)

    def num_visible(self, num_patches: int, ratio: float | None = None, grid: tuple[int, ...] | None = None) -> int:
        """K = (T' - int(ratio x T')) x H'W'."""
        ratio = self.resolve_ratio(ratio, num_patches)
        frames, space, hidden = frame_counts(self.grid_of(num_patches, {"grid": grid}), ratio, "policy 'frame'")
        return (frames - hidden) * space

    def make_plan(self, tokens: Tensor, ratio: float, *, noise: Tensor | None = None,
                  generator: torch.Generator | None = None, **context: Any) -> MaskPlan:
        batch, n = tokens.shape[:2]  # tokens: [B, N, D]
        frames, space, hidden = frame_counts(self.grid_of(n, context), ratio, "policy 'frame'")
        if noise is None:
            slice_noise = torch.rand(batch, frames, device=tokens.device, generator=generator)  # [B, T']
        elif tuple(noise.shape) != (batch, n):
            raise ValueError(f"noise must have shape {(batch, n)}, got {tuple(noise.shape)}")
        else:
            slice_noise = noise[:, ::space].to(tokens.device)  # [B, T'] the first token of each slice
        hide = top_positions(slice_noise, hidden).repeat_interleave(space, dim=1).to(torch.float64)  # [B, N]
        order = torch.arange(n, dtype=torch.float64, device=tokens.device) / n  # [N] patch order
        keep = (frames - hidden) * space
        plan = MaskPlan.from_scores(2.0 * hide + order, 1.0 - (keep + 0.5) / n)
        return MaskPlan(plan.ids_keep, plan.ids_restore, plan.mask.to(torch.get_default_dtype()), scores=plan.scores)
