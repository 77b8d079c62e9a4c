"""Blockwise masking after BEiT, for ablations: hide random rectangles of patches."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from maskkit.plan import MaskPlan, check_grid, num_visible
from maskkit.policies.base import MaskPolicy
from maskkit.policies.card import CardInfo
from maskkit.policies.registry import register_policy


@register_policy("block")
class BlockPolicy(MaskPolicy):
    """Blockwise masking (BEiT): hide random rectangles until exactly N - K patches are hidden.

    Per sample, blocks are drawn as in BEiT: area uniform in [min_block_patches, budget] with
    budget = min(patches still to hide, max_block_patches), log aspect ratio uniform in
    [log(min_aspect), log(max_aspect)], a uniformly placed rectangle of that shape inside the grid;
    a block is accepted when it hides between 1 and `budget` new patches (10 tries per block).
    When no block fits (budget below `min_block_patches` or 10 failed tries), the remainder is
    filled with uniformly drawn visible patches, so the hidden count is always exactly N - K.
    Visible patches are kept in random order. Randomness comes from `generator` (or torch's global
    generator), so a seeded generator gives the same plan.

    Args:
        ratio: fraction of patches hidden, in (0, 1). Default 0.75.
        min_block_patches: smallest block area. Default 4 (BEiT).
        max_block_patches: largest block area; None means no limit (BEiT's default).
        min_aspect: smallest block aspect ratio h / w. Default 0.3 (BEiT).
        max_aspect: largest aspect ratio; None means 1 / min_aspect.
        grid_size: patch grid as (rows, cols) or one int for a square; None means the context's `grid`
            (H', W') when given, else sqrt(N) x sqrt(N).
    """

    card_info = CardInfo(
        paper="Bao et al., ICLR 2022",
        idea="BEiT blockwise: hide random rectangles of patches",
        learns="nothing",
        allowed={"min_block_patches": "int >= 1",
                 "max_block_patches": "int >= min_block_patches | None", "min_aspect": "> 0",
                 "max_aspect": ">= min_aspect | None", "grid_size": "int >= 1 | (rows, cols) | None"},
    )

    def __init__(
        self,
        ratio: float = 0.75,
        min_block_patches: int = 4,
        max_block_patches: int | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        grid_size: int | tuple[int, int] | None = None,
    ) -> None:
        super().__init__(ratio)
        if (
            isinstance(min_block_patches, bool)
            or not isinstance(min_block_patches, int)
            or min_block_patches < 1
        ):
            raise ValueError(f"min_block_patches must be a positive integer, got {min_block_patches!r}")
        if max_block_patches is not None and (
            not isinstance(max_block_patches, int) or max_block_patches < min_block_patches
        ):
            raise ValueError(
                f"max_block_patches must be an integer >= min_block_patches, got {max_block_patches!r}"
            )
        if not (isinstance(min_aspect, (int, float)) and min_aspect > 0):
            raise ValueError(f"min_aspect must be a positive number, got {min_aspect!r}")
        max_aspect = 1.0 / min_aspect if max_aspect is None else max_aspect
        if not (isinstance(max_aspect, (int, float)) and max_aspect >= min_aspect):
            raise ValueError(f"max_aspect must be a number >= min_aspect ({min_aspect}), got {max_aspect!r}")
        self.min_block_patches = min_block_patches
        self.max_block_patches = max_block_patches
        self.min_aspect = float(min_aspect)
        self.max_aspect = float(max_aspect)
        self.grid_size = None if grid_size is None else _grid(grid_size)

    def make_plan(self, tokens: Tensor, ratio: float, *, noise: Tensor | None = None,
                  generator: torch.Generator | None = None, **context: Any) -> MaskPlan:
        batch, n = tokens.shape[:2]  # tokens: [B, N, D]
        self.refuse_space_time(context.get("grid"))
        rows, cols = self._grid_for(n, context.get("grid"))
        target = n - num_visible(n, ratio)
        seeds = torch.randint(0, 2**62, (batch,), generator=generator).tolist()
        scores = np.empty((batch, n), dtype=np.float32)
        for b, seed in enumerate(seeds):
            rng = np.random.default_rng(seed)
            hidden = self._sample(rng, rows, cols, target).reshape(-1)  # [N] bool
            scores[b] = hidden + 0.5 * rng.random(n)  # hidden sort last; random order within groups
        return MaskPlan.from_scores(torch.from_numpy(scores).to(tokens.device), ratio)

    def _grid_for(self, n: int, grid: tuple[int, ...] | None = None) -> tuple[int, int]:
        """`grid_size` when set, else the context's (H', W') `grid` (a non-square image grid), else S x S."""
        if self.grid_size is None and grid is not None:
            rows, cols = check_grid(grid, n)  # 2-D here: refuse_space_time ran first
            return rows, cols
        if self.grid_size is not None:
            rows, cols = self.grid_size
            if rows * cols != n:
                raise ValueError(f"grid_size {rows}x{cols} does not match N = {n} patches")
            return rows, cols
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"block masking needs a square grid or grid_size, but N = {n} is not a square")
        return side, side

    def _sample(self, rng: np.random.Generator, rows: int, cols: int, target: int) -> np.ndarray:
        """One [rows, cols] boolean mask with exactly `target` hidden patches."""
        hidden = np.zeros((rows, cols), dtype=bool)
        count = 0
        log_aspect = (math.log(self.min_aspect), math.log(self.max_aspect))
        while count < target:
            budget = target - count
            if self.max_block_patches is not None:
                budget = min(budget, self.max_block_patches)
            if budget < self.min_block_patches:
                break
            added = 0
            for _ in range(10):
                area = rng.uniform(self.min_block_patches, budget)
                aspect = math.exp(rng.uniform(*log_aspect))
                h = int(round(math.sqrt(area * aspect)))
                w = int(round(math.sqrt(area / aspect)))
                if not (1 <= h <= rows and 1 <= w <= cols):
                    continue
                top = int(rng.integers(0, rows - h + 1))
                left = int(rng.integers(0, cols - w + 1))
                block = hidden[top : top + h, left : left + w]
                new = block.size - int(block.sum())
                if 0 < new <= budget:
                    block[...] = True
                    added = new
                    break
            if added == 0:
                break
            count += added
        if count < target:  # pad with random visible patches to hit N - K exactly
            flat = hidden.reshape(-1)
            free = np.flatnonzero(~flat)
            flat[rng.choice(free, size=target - count, replace=False)] = True
        return hidden

    def extra_repr(self) -> str:
        return (
            f"ratio={self.ratio}, min_block_patches={self.min_block_patches}, "
            f"max_block_patches={self.max_block_patches}, aspect=({self.min_aspect:.3g}, {self.max_aspect:.3g})"
        )


def _grid(size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size, size
    if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size):
        return int(size[0]), int(size[1])
    raise ValueError(f"grid_size must be a positive int or a (rows, cols) pair, got {size!r}")
