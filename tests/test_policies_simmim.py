"""SimMIM group masking: exact counts, whole groups, edge groups, determinism, option errors."""

from __future__ import annotations

import math

import pytest
import torch
from policy_checks import check_determinism

from maskkit.plan import num_visible
from maskkit.policies import create_policy
from maskkit.policies.random import RandomPolicy
from maskkit.policies.simmim import SimMIMPolicy

# tiny tensors: one torch thread is much faster than several contending ones on a loaded machine
pytestmark = pytest.mark.usefixtures("one_thread")


def group_hidden_counts(mask: torch.Tensor, side: int, g: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image and group: hidden patches and group sizes, [B, G] each (edge groups may be smaller)."""
    per_side = math.ceil(side / g)
    coords = torch.arange(side) // g
    group_of = (coords[:, None] * per_side + coords[None, :]).reshape(-1)  # [N]
    hidden = torch.zeros(mask.shape[0], per_side**2).index_add_(1, group_of, mask.float())
    sizes = torch.zeros(per_side**2).index_add_(0, group_of, torch.ones(side * side))
    return hidden, sizes.expand_as(hidden)


@pytest.mark.parametrize(
    "side,g,ratio", [(14, 2, 0.6), (14, 2, 0.75), (14, 4, 0.6), (8, 2, 0.75), (7, 3, 0.5), (16, 4, 0.9)]
)
def test_exact_hidden_count_and_at_most_one_partial_group(side, g, ratio):
    n = side * side
    plan = SimMIMPolicy(ratio, mask_patch_size=g)(
        torch.zeros(32, n, 1), generator=torch.Generator().manual_seed(n)
    )
    assert plan.mask.sum(dim=1).tolist() == [n - num_visible(n, ratio)] * 32
    assert plan.num_visible == num_visible(n, ratio)
    hidden, sizes = group_hidden_counts(plan.mask, side, g)
    partial = ((hidden > 0) & (hidden < sizes)).sum(dim=1)
    assert partial.max().item() <= 1


@pytest.mark.parametrize("side,g,ratio", [(8, 2, 0.75), (14, 7, 0.5), (12, 3, 0.75), (16, 4, 0.75)])
def test_hidden_set_is_a_union_of_whole_groups_when_counts_divide(side, g, ratio):
    n = side * side
    assert side % g == 0 and (n - num_visible(n, ratio)) % (g * g) == 0
    plan = SimMIMPolicy(ratio, mask_patch_size=g)(
        torch.zeros(64, n, 1), generator=torch.Generator().manual_seed(1)
    )
    hidden, sizes = group_hidden_counts(plan.mask, side, g)
    assert bool(((hidden == 0) | (hidden == sizes)).all())


def test_edge_groups_are_smaller_and_still_masked_whole():
    # 10x10 grid, 4x4 groups: group sides 4, 4, 2 -> sizes 16 (x4), 8 (x4), 4 (x1)
    side, g = 10, 4
    plan = SimMIMPolicy(0.6, mask_patch_size=g)(
        torch.zeros(200, 100, 1), generator=torch.Generator().manual_seed(0)
    )
    hidden, sizes = group_hidden_counts(plan.mask, side, g)
    assert sorted(sizes[0].tolist()) == [4.0] + [8.0] * 4 + [16.0] * 4
    full = hidden == sizes
    assert bool(full[:, sizes[0] == 4].any()) and bool(full[:, sizes[0] == 8].any())  # edge groups get hidden


def test_every_group_equally_likely():
    # 8x8 grid, 2x2 groups, 12 of 16 groups hidden: each group hidden with frequency 0.75
    plan = SimMIMPolicy(0.75, mask_patch_size=2)(
        torch.zeros(4000, 64, 1), generator=torch.Generator().manual_seed(0)
    )
    hidden, sizes = group_hidden_counts(plan.mask, 8, 2)
    freq = (hidden == sizes).float().mean(dim=0)
    assert torch.allclose(freq, torch.full_like(freq, 0.75), atol=0.035)  # binomial sd ~0.007


def test_noise_and_generator_determinism():
    tokens = torch.zeros(4, 196, 3)
    policy = SimMIMPolicy()  # ratio 0.6, 2x2 groups -> 49 groups
    noise = torch.rand(4, 49, generator=torch.Generator().manual_seed(0))
    a, c = check_determinism(policy, tokens, noise, seed=5)
    # the generator draws exactly one uniform per group
    g = policy(tokens, noise=torch.rand(4, 49, generator=torch.Generator().manual_seed(5)))
    assert torch.equal(g.ids_keep, c.ids_keep)
    # per-patch noise [B, N]: each group takes its top-left patch's value
    per_patch = torch.zeros(4, 14, 14)
    per_patch[:, ::2, ::2] = noise.reshape(4, 7, 7)
    h = policy(tokens, noise=per_patch.reshape(4, 196))
    assert torch.equal(h.mask, a.mask) and torch.equal(h.ids_keep, a.ids_keep)
    with pytest.raises(ValueError, match=r"noise must have shape \(4, 49\) .* or \(4, 196\)"):
        policy(tokens, noise=torch.rand(4, 100))


def test_group_side_one_is_random_masking():
    x = torch.randn(3, 49, 4)
    noise = torch.rand(3, 49, generator=torch.Generator().manual_seed(2))
    a = SimMIMPolicy(0.75, mask_patch_size=1)(x, noise=noise)
    b = RandomPolicy(0.75)(x, noise=noise)
    assert torch.equal(a.mask, b.mask) and torch.equal(a.ids_keep, b.ids_keep)


def test_pixel_units_and_per_call_ratio():
    policy = SimMIMPolicy(0.6, mask_patch_size=32, mask_patch_unit="pixels", patch_size=16)
    assert policy.group_side == 2
    plan = policy(torch.zeros(2, 196, 1), ratio=0.5, generator=torch.Generator().manual_seed(0))
    assert plan.mask.sum(dim=1).tolist() == [98.0, 98.0]
    assert create_policy("simmim", mask_patch_size=4).group_side == 4


def test_bad_options_and_grids():
    with pytest.raises(ValueError, match="mask_patch_size must be a positive integer"):
        SimMIMPolicy(mask_patch_size=0)
    with pytest.raises(ValueError, match="mask_patch_size must be a positive integer"):
        SimMIMPolicy(mask_patch_size=2.5)
    with pytest.raises(ValueError, match="mask_patch_unit must be one of"):
        SimMIMPolicy(mask_patch_unit="cm")
    with pytest.raises(ValueError, match="needs patch_size"):
        SimMIMPolicy(mask_patch_size=32, mask_patch_unit="pixels")
    with pytest.raises(ValueError, match="not a multiple of patch_size 16"):
        SimMIMPolicy(mask_patch_size=40, mask_patch_unit="pixels", patch_size=16)
    with pytest.raises(ValueError, match="mask ratio must lie in"):
        SimMIMPolicy(ratio=1.2)
    with pytest.raises(ValueError, match="group side 14 tokens must be smaller than the grid side 14"):
        SimMIMPolicy(mask_patch_size=14)(torch.zeros(1, 196, 1))
    with pytest.raises(ValueError, match="N = 12 is not a square"):
        SimMIMPolicy()(torch.zeros(1, 12, 1))
