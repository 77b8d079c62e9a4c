"""Decoder masking: which of a plan's hidden tokens the decoder reconstructs (`MaskPlan.decoder_ids`).

VideoMAE V2 (Wang et al., CVPR 2023) masks the decoder too ("dual masking"): the decoder reconstructs only part
of the tokens, chosen by a *running cell*, which is what let it train billion-parameter models; CrossMAE
(Fu et al., 2024) reconstructs a random part of the hidden patches of images. `ratio` is VideoMAE V2's
decoder mask ratio: the fraction of the hidden tokens NOT reconstructed; the decoder reconstructs M = (N - K) -
int((N - K) x ratio) of them, the same M for every sample.

Rules:
- `random`: a uniformly random M of each sample's hidden tokens.
- `runningcell`: VideoMAE V2's `RunningCellMaskingGenerator`. The token grid is tiled with 2x2 cells; a cell
  hides m = int(4 x ratio) of its 4 positions from the decoder, by the queue [1] * m + [0] * (4 - m) read
  cyclically from a pointer that advances by one at every time slice (slice t reads it from pointer s + t + 1,
  s drawn uniformly in 0..3 per sample), so the decoder's view runs across the cell over time. Where V2 takes
  the loss over every token the cell shows (some of them visible to the encoder, since the encoder's tube mask
  and the cell are independent), maskkit reconstructs only hidden tokens: the M hidden tokens are taken among
  those the cell shows first (in random order), then among the others, so M is constant per sample and the
  loss is MAE's (over hidden tokens only). On an image grid (H', W') the cell is one slice of it. With ratio
  below 0.25 the cell hides nothing (m = 0) and the rule is `random`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from maskkit.plan import MaskPlan, check_grid

#: the decoder rules `apply_decoder_rule` takes
DECODER_RULES = ("random", "runningcell")


def num_decoded(num_hidden: int, ratio: float) -> int:
    """M = (N - K) - int((N - K) x ratio): the hidden tokens the decoder reconstructs (at least 1)."""
    return max(1, num_hidden - int(num_hidden * ratio))


def running_cell_hidden(grid: tuple[int, ...], ratio: float, start: Tensor) -> Tensor:
    """[B, N] bool, True where VideoMAE V2's running cell hides a token from the decoder, for each sample's start
    pointer `start` [B] in 0..3 (row-major over the grid, time slowest; an image grid is one slice)."""
    frames, rows, cols = grid if len(grid) == 3 else (1, *grid)
    masked = int(4 * ratio)
    queue = torch.tensor([1] * masked + [0] * (4 - masked), dtype=torch.bool, device=start.device)  # [4]
    cell_of = ((torch.arange(rows, device=start.device) % 2)[:, None] * 2
               + (torch.arange(cols, device=start.device) % 2)[None, :]).reshape(-1)  # [H'W'] position in its cell
    t = torch.arange(frames, device=start.device)  # [T']
    pointer = start[:, None] + t[None, :] + 1  # [B, T'] the cell's pointer at each slice
    index = (cell_of[None, None, :] + pointer[:, :, None]) % 4  # [B, T', H'W']
    return queue[index].reshape(start.shape[0], -1)  # [B, N]


def apply_decoder_rule(plan: MaskPlan, rule: str, ratio: float, *, grid: tuple[int, ...] | None = None,
                       generator: torch.Generator | None = None) -> MaskPlan:
    """`plan` with `decoder_ids` [B, M] naming the hidden tokens the decoder reconstructs by `rule` (DECODER_RULES)
    at decoder mask ratio `ratio` in [0, 1); randomness from `generator`. One-line ValueError for a bad rule,
    ratio or grid."""
    if rule not in DECODER_RULES:
        raise ValueError(f"decoder rule must be one of {', '.join(DECODER_RULES)}, got {rule!r}")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise ValueError(f"decoder mask ratio must be a number in [0, 1), got {ratio!r}")
    batch, n = plan.mask.shape
    device = plan.mask.device
    visible = 1.0 - plan.mask.detach().to(torch.float64)  # [B, N] 1 = visible: never reconstructed
    key = 4.0 * visible + torch.rand(batch, n, generator=generator, dtype=torch.float64).to(device)  # [B, N]
    if rule == "runningcell":
        if grid is None:
            raise ValueError("the runningcell decoder rule needs the token grid (grid=(T', H', W') or (H', W'))")
        start = torch.randint(0, 4, (batch,), generator=generator).to(device)  # [B] V2's random cell pointer
        key = key + 2.0 * running_cell_hidden(check_grid(grid, n), ratio, start).to(torch.float64)  # shown first
    m = num_decoded(plan.num_hidden, ratio)
    ids = torch.topk(key, m, dim=1, largest=False).indices  # [B, M] hidden, the rule's preference first
    return plan.with_decoder_ids(ids)
