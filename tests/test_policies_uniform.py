"""UM-MAE uniform masking: one visible patch per 2x2 block, secondary masking, determinism, errors."""

from __future__ import annotations

import pytest
import torch
from policy_checks import check_determinism

from maskkit.mae import masked_loss
from maskkit.policies import create_policy
from maskkit.policies.uniform import UniformPolicy

# tiny tensors: one torch thread is much faster than several contending ones on a loaded machine
pytestmark = pytest.mark.usefixtures("one_thread")


def visible_per_block(mask: torch.Tensor, side: int) -> torch.Tensor:
    """Visible patches in each 2x2 block: [B, side/2, side/2]."""
    grid = (1 - mask).reshape(-1, side // 2, 2, side // 2, 2)
    return grid.sum(dim=(2, 4))


@pytest.mark.parametrize("side", [2, 4, 14, 16])
def test_exactly_one_visible_per_2x2_block(side):
    n = side * side
    plan = UniformPolicy()(torch.zeros(64, n, 2), generator=torch.Generator().manual_seed(side))
    assert plan.num_visible == n // 4 and plan.mask.sum(dim=1).tolist() == [n - n // 4] * 64
    assert bool((visible_per_block(plan.mask, side) == 1).all())
    assert plan.weights is None
    # the visible patches are the ones ids_keep lists
    assert bool((plan.mask.gather(1, plan.ids_keep) == 0).all())


def test_visible_position_in_a_block_is_uniform():
    plan = UniformPolicy()(torch.zeros(4000, 16, 1), generator=torch.Generator().manual_seed(0))
    freq = (1 - plan.mask).mean(dim=0)  # each patch visible with frequency 1/4
    assert torch.allclose(freq, torch.full((16,), 0.25), atol=0.03)  # binomial sd ~0.007


def test_noise_and_generator_determinism():
    tokens = torch.zeros(3, 196, 4)
    policy = UniformPolicy()
    noise = torch.rand(3, 196, generator=torch.Generator().manual_seed(1))
    a, _ = check_determinism(policy, tokens, noise, seed=4)
    # the visible patch of each block is the one of lowest noise
    blocks = noise.reshape(3, 7, 2, 7, 2).permute(0, 1, 3, 2, 4).reshape(3, 49, 4)
    expected = torch.ones(3, 49, 4).scatter_(-1, blocks.argmin(-1, keepdim=True), 0.0)
    assert torch.equal(a.mask, expected.reshape(3, 7, 7, 2, 2).permute(0, 1, 3, 2, 4).reshape(3, 196))
    with pytest.raises(ValueError, match=r"noise must have shape \(3, 196\)"):
        policy(tokens, noise=torch.rand(3, 49))


@pytest.mark.parametrize("side,secondary", [(14, 0.25), (16, 0.25), (8, 0.5)])
def test_secondary_masking_hides_a_subset_of_the_sampled_patches(side, secondary):
    n = side * side
    keep = int(n // 4 * (1 - secondary))
    tokens = torch.zeros(32, n, 1)
    noise = torch.rand(32, n, generator=torch.Generator().manual_seed(0))
    primary = UniformPolicy()(tokens, noise=noise)
    plan = UniformPolicy(secondary_ratio=secondary)(tokens, noise=noise)
    assert plan.num_visible == keep and plan.mask.sum(dim=1).tolist() == [float(n - keep)] * 32
    assert bool((plan.mask >= primary.mask).all())  # only primary-visible patches become hidden
    assert bool((visible_per_block(plan.mask, side) <= 1).all())
    # UM-MAE does not reconstruct the secondary-masked patches: zero weight, and the masked loss is
    # the mean over the primary-hidden patches
    secondary_hidden = (plan.mask == 1) & (primary.mask == 0)
    assert bool((plan.weights[secondary_hidden] == 0).all())
    per_patch = torch.rand(32, n, generator=torch.Generator().manual_seed(1))
    want = (per_patch * primary.mask).sum() / primary.mask.sum()
    assert torch.allclose(masked_loss(per_patch, plan.mask, plan.weights), want)
    # or reconstruct them like any hidden patch
    assert (
        UniformPolicy(secondary_ratio=secondary, secondary_in_loss=True)(tokens, noise=noise).weights is None
    )


def test_per_call_ratio_and_registry():
    policy = create_policy("uniform", secondary_ratio=0.25)
    assert isinstance(policy, UniformPolicy)
    assert policy(torch.zeros(2, 64, 1), ratio=0.75).num_visible == 12
    with pytest.raises(ValueError, match="ratio 0.75"):
        policy(torch.zeros(2, 64, 1), ratio=0.6)


def test_bad_input():
    with pytest.raises(ValueError, match="needs an even grid side, got a 7x7 grid"):
        UniformPolicy()(torch.zeros(1, 49, 1))
    with pytest.raises(ValueError, match="N = 12 is not a square"):
        UniformPolicy()(torch.zeros(1, 12, 1))
    with pytest.raises(ValueError, match="ratio 0.75"):
        UniformPolicy(ratio=0.6)
    with pytest.raises(ValueError, match="secondary_ratio must lie in"):
        UniformPolicy(secondary_ratio=1.0)
    with pytest.raises(ValueError, match="secondary_ratio must be a number"):
        UniformPolicy(secondary_ratio="a lot")
    with pytest.raises(ValueError, match="leaves no visible patch"):
        UniformPolicy(secondary_ratio=0.9)(torch.zeros(1, 16, 1))
