"""BEiT-style blockwise masking: exact counts, contiguity, grids, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from maskkit.plan import num_visible
from maskkit.policies import BlockPolicy, RandomPolicy


def hidden_neighbour_fraction(mask: torch.Tensor, rows: int, cols: int) -> float:
    """Mean fraction of a hidden patch's 4-neighbours that are hidden too (0.5-ish if random at ratio 0.5)."""
    grid = mask.reshape(-1, rows, cols)
    padded = torch.nn.functional.pad(grid, (1, 1, 1, 1))
    ones = torch.nn.functional.pad(torch.ones_like(grid), (1, 1, 1, 1))
    hidden_nb = padded[:, :-2, 1:-1] + padded[:, 2:, 1:-1] + padded[:, 1:-1, :-2] + padded[:, 1:-1, 2:]
    total_nb = ones[:, :-2, 1:-1] + ones[:, 2:, 1:-1] + ones[:, 1:-1, :-2] + ones[:, 1:-1, 2:]
    frac = hidden_nb / total_nb
    return (frac * grid).sum().item() / grid.sum().item()


@pytest.mark.parametrize("n,ratio", [(196, 0.75), (196, 0.4), (16, 0.75), (64, 0.9)])
def test_exact_hidden_count(n, ratio):
    plan = BlockPolicy(ratio)(torch.zeros(16, n, 1), generator=torch.Generator().manual_seed(n))
    assert plan.mask.sum(dim=1).tolist() == [n - num_visible(n, ratio)] * 16


def test_blocks_are_spatially_clustered_unlike_random():
    tokens = torch.zeros(32, 196, 1)
    block = BlockPolicy(0.5)(tokens, generator=torch.Generator().manual_seed(0))
    rand = RandomPolicy(0.5)(tokens, generator=torch.Generator().manual_seed(0))
    assert hidden_neighbour_fraction(rand.mask, 14, 14) < 0.6
    assert hidden_neighbour_fraction(block.mask, 14, 14) > 0.7


def test_single_block_budget_hides_a_rectangle():
    # hiding exactly 4 patches with min = max = 4: either one 4-patch block, or a smaller one padded
    policy = BlockPolicy(1 - 96 / 100, min_block_patches=4, max_block_patches=4)
    rng = np.random.default_rng(0)
    rectangles = 0
    for _ in range(50):
        hidden = policy._sample(rng, 10, 10, 4)
        assert hidden.sum() == 4
        rows, cols = np.nonzero(hidden)
        rectangles += (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1) == 4
    # about half the draws are one 2x2, 1x4 or 4x1 block (the rest a 1x3 or 3x1 block plus one
    # random patch); 4 patches scattered at random almost never form a rectangle
    assert rectangles >= 15


def test_seeded_generator_is_deterministic():
    tokens = torch.zeros(4, 64, 1)
    policy = BlockPolicy(0.6)
    a = policy(tokens, generator=torch.Generator().manual_seed(7))
    b = policy(tokens, generator=torch.Generator().manual_seed(7))
    c = policy(tokens, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.mask, b.mask) and torch.equal(a.ids_keep, b.ids_keep)
    assert not torch.equal(a.mask, c.mask)


def test_rectangular_grid_and_grid_errors():
    plan = BlockPolicy(0.5, grid_size=(2, 8))(
        torch.zeros(3, 16, 1), generator=torch.Generator().manual_seed(0)
    )
    assert plan.mask.sum(dim=1).tolist() == [8, 8, 8]
    with pytest.raises(ValueError, match="grid_size 4x5 does not match N = 16"):
        BlockPolicy(grid_size=(4, 5))(torch.zeros(1, 16, 1))
    with pytest.raises(ValueError, match="N = 12 is not a square"):
        BlockPolicy()(torch.zeros(1, 12, 1))
    with pytest.raises(ValueError, match="grid_size"):
        BlockPolicy(grid_size=(0, 3))


def test_large_min_block_falls_back_to_random_fill():
    # blocks can never fit (min 50 patches > 12 to hide): the count is still exact
    plan = BlockPolicy(0.75, min_block_patches=50)(
        torch.zeros(5, 16, 1), generator=torch.Generator().manual_seed(0)
    )
    assert plan.mask.sum(dim=1).tolist() == [12] * 5
