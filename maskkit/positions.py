"""Fixed position codes shared by the models and the policies that score tokens.

`sinusoid_table` is VideoMAE's 1-D table over the N tokens of a clip (its encoder's and decoder's position
embedding); the learned maskers use it on space-time grids, where a 2-D row/column code has no meaning.
"""

from __future__ import annotations

import torch
from torch import Tensor


def sinusoid_table(num_positions: int, dim: int) -> Tensor:
    """VideoMAE's 1-D sinusoid table [N, D]: position i, channel j at angle i / 10000^(2 * (j // 2) / D), its sin at
    even j and its cos at odd j (computed in float64, returned float32)."""
    positions = torch.arange(num_positions, dtype=torch.float64)  # [N]
    exponents = 2 * (torch.arange(dim) // 2).to(torch.float64) / dim  # [D]
    angles = positions[:, None] / torch.pow(torch.tensor(10000.0, dtype=torch.float64), exponents)[None]  # [N, D]
    table = torch.empty_like(angles)
    table[:, 0::2] = angles[:, 0::2].sin()
    table[:, 1::2] = angles[:, 1::2].cos()
    return table.float()
