"""The random policy reproduces the official MAE `random_masking` bit for bit."""

from __future__ import annotations

import pytest
import torch

from maskkit.bench import plain_random_masking
from maskkit.policies import RandomPolicy


def reference_random_masking(x, mask_ratio, noise):
    """MAE's random_masking semantics, written from the paper's description (with a repeated index)."""
    batch, length, dim = x.shape
    len_keep = int(length * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, dim))
    mask = torch.ones([batch, length])
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return x_masked, mask, ids_restore


@pytest.mark.parametrize("batch,n,dim,ratio", [(4, 16, 8, 0.75), (3, 196, 12, 0.75), (2, 49, 5, 0.6)])
def test_random_policy_equals_official_semantics(batch, n, dim, ratio):
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(batch, n, dim, generator=gen)
    noise = torch.rand(batch, n, generator=gen)
    x_masked, mask, ids_restore = reference_random_masking(x, ratio, noise)

    plan = RandomPolicy(ratio)(x, noise=noise)
    assert torch.equal(plan.gather(x), x_masked)
    assert torch.equal(plan.mask, mask) and plan.mask.dtype == mask.dtype
    assert torch.equal(plan.ids_restore, ids_restore)

    plain = plain_random_masking(x, ratio, noise)  # the benchmark's baseline agrees too
    for got, want in zip(plain, (x_masked, mask, ids_restore), strict=True):
        assert torch.equal(got, want)


def test_per_call_ratio_and_generator():
    x = torch.randn(2, 64, 4)
    policy = RandomPolicy(0.75)
    assert policy(x).num_visible == 16 and policy(x, ratio=0.5).num_visible == 32
    a = policy(x, generator=torch.Generator().manual_seed(3))
    b = policy(x, generator=torch.Generator().manual_seed(3))
    c = policy(x, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.mask, b.mask) and not torch.equal(a.mask, c.mask)
    # the generator draws exactly the noise the official code would draw
    noise = torch.rand(2, 64, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.ids_restore, reference_random_masking(x, 0.75, noise)[2])


def test_noise_shape_checked():
    with pytest.raises(ValueError, match="noise must have shape"):
        RandomPolicy()(torch.randn(2, 16, 4), noise=torch.rand(2, 15))


def test_random_is_uniform_over_patches():
    # every patch is hidden with frequency close to the ratio (binomial sd ~0.007 here)
    x = torch.zeros(4000, 16, 1)
    plan = RandomPolicy(0.75)(x, generator=torch.Generator().manual_seed(0))
    freq = plan.mask.mean(dim=0)
    assert torch.allclose(freq, torch.full((16,), 0.75), atol=0.035)


def test_tokens_without_a_width_dimension_are_refused():
    with pytest.raises(ValueError, match=r"tokens must be \[B, N, D\]"):
        RandomPolicy(0.75)(torch.rand(2, 16))
