"""MaskPlan invariants, checked for every registered policy, and ratio validation."""

from __future__ import annotations

import pytest
import torch

from maskkit.plan import MaskPlan, check_ratio, gather_tokens, num_visible
from maskkit.policies import create_policy, list_policies

POLICIES = list_policies()


def make_policy(name: str, dim: int, **kwargs):
    """A policy built with whatever its constructor needs for [B, N, dim] tokens."""
    if name == "learned":
        kwargs.setdefault("embed_dim", dim)
    return create_policy(name, **kwargs)


def make_context(batch: int, n: int, seed: int) -> dict:
    """Context every built-in policy can read: attention scores, a seeded generator."""
    gen = torch.Generator().manual_seed(seed + 1)
    return {
        "attention": torch.rand(batch, n, generator=gen).softmax(dim=1),
        "generator": torch.Generator().manual_seed(seed),
    }


def shuffle_of(plan: MaskPlan) -> torch.Tensor:
    """ids_shuffle recovered from ids_restore (its inverse permutation)."""
    return torch.argsort(plan.ids_restore, dim=1)


@pytest.mark.parametrize("name", POLICIES)
@pytest.mark.parametrize("n,ratio", [(16, 0.75), (64, 0.5), (64, 0.9)])
def test_plan_invariants(name, n, ratio):
    if name == "uniform" and ratio != 0.75:
        pytest.skip("UM-MAE's uniform masking is defined at ratio 0.75 only (one visible per 2x2 block)")
    if name in ("frame", "motion"):
        pytest.skip("a policy of clips only (time slices, frame differences): tests/test_policies_video.py")
    batch, dim = 3, 8
    tokens = torch.randn(batch, n, dim, generator=torch.Generator().manual_seed(0))
    policy = make_policy(name, dim, ratio=ratio)
    plan = policy(tokens, **make_context(batch, n, seed=0))
    keep = num_visible(n, ratio) if name != "tube" else policy.num_visible(n, ratio)  # tube: N - int(ratio N)

    assert plan.ids_keep.shape == (batch, keep) and plan.ids_restore.shape == (batch, n)
    assert plan.mask.shape == (batch, n)
    assert set(plan.mask.unique().tolist()) <= {0.0, 1.0}
    assert plan.mask.sum(dim=1).tolist() == [n - keep] * batch  # exactly N - K hidden per sample
    assert plan.num_visible == keep and plan.num_hidden == n - keep

    # ids_restore is a permutation inverting the shuffle, whose first K entries are ids_keep
    shuffle = shuffle_of(plan)
    assert torch.equal(torch.sort(plan.ids_restore, dim=1).values, torch.arange(n).expand(batch, n))
    assert torch.equal(torch.gather(shuffle, 1, plan.ids_restore), torch.arange(n).expand(batch, n))
    assert torch.equal(shuffle[:, :keep], plan.ids_keep)
    assert (torch.gather(plan.mask, 1, plan.ids_keep) == 0).all()  # kept patches are visible

    # gather and restore round-trip: shuffled order -> patch order gives back the tokens
    shuffled = gather_tokens(tokens, shuffle)
    assert torch.equal(plan.restore(shuffled), tokens)
    visible = plan.gather(tokens)
    assert torch.equal(visible, shuffled[:, :keep])
    for b in range(batch):
        assert torch.equal(visible[b], tokens[b, plan.ids_keep[b]])

    # fill puts visible tokens back in place and the mask token everywhere else
    mask_token = torch.full((1, 1, dim), 7.0)
    filled = plan.fill(visible, mask_token)
    hidden = plan.mask.bool()
    assert torch.equal(filled[~hidden], tokens[~hidden])
    assert (filled[hidden] == 7.0).all()


@pytest.mark.parametrize("name", POLICIES)
def test_plan_is_deterministic_given_seed(name):
    if name in ("frame", "motion"):
        pytest.skip("a policy of clips only: tests/test_policies_video.py checks it on a space-time grid")
    batch, n, dim = 2, 16, 8
    tokens = torch.randn(batch, n, dim, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(123)
    policy = make_policy(name, dim)
    a = policy(tokens, **make_context(batch, n, seed=5))
    b = policy(tokens, **make_context(batch, n, seed=5))
    assert torch.equal(a.ids_restore, b.ids_restore) and torch.equal(a.mask, b.mask)


BAD_RATIOS = [0, 1, -0.1, 1.5, "x", None, float("nan")]


@pytest.mark.parametrize("name", POLICIES)
@pytest.mark.parametrize("bad", BAD_RATIOS)
def test_bad_ratio_rejected_at_construction(name, bad):
    with pytest.raises(ValueError, match=repr(bad).replace("(", r"\(").replace(")", r"\)")):
        make_policy(name, 8, ratio=bad)


@pytest.mark.parametrize("name", POLICIES)
@pytest.mark.parametrize("bad", [0, 1, -0.1, 1.5, "x", 0.99, 1e-17])
def test_bad_ratio_rejected_per_call(name, bad):
    batch, n, dim = 2, 16, 8  # 0.99 leaves no visible patch of 16, 1e-17 no hidden one
    policy = make_policy(name, dim)
    with pytest.raises(ValueError, match=repr(bad)):
        policy(torch.randn(batch, n, dim), ratio=bad, **make_context(batch, n, seed=0))


def test_check_ratio_bounds():
    assert check_ratio(0.75, 196) == 0.75 and num_visible(196, 0.75) == 49
    assert check_ratio(0.9375, 16) == 0.9375  # K = 1 is allowed
    with pytest.raises(ValueError, match="0.99"):
        check_ratio(0.99, 16)


def test_from_scores_keeps_lowest_and_records_scores():
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.3], [0.2, 0.8, 0.4, 0.6]])
    plan = MaskPlan.from_scores(scores, 0.5)
    assert plan.ids_keep.tolist() == [[1, 3], [0, 2]]
    assert plan.mask.tolist() == [[1, 0, 1, 0], [0, 1, 0, 1]]
    assert plan.ids_restore.tolist() == [[3, 0, 2, 1], [0, 3, 1, 2]]
    assert plan.scores is scores and plan.weights is None


def test_loss_weights_detach_and_to():
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.3]])
    weights = torch.tensor([[0.2, 0.4, 0.6, 0.8]], requires_grad=True)
    plan = MaskPlan.from_scores(scores, 0.5, weights=weights * 1)
    assert torch.allclose(plan.loss_weights(), torch.tensor([[0.2, 0.0, 0.6, 0.0]]))
    assert plan.weights.requires_grad and not plan.detach().weights.requires_grad
    with_probs = MaskPlan.from_scores(scores, 0.5, weights=weights * 1)
    with_probs.probs = weights * 2
    assert not with_probs.detach().probs.requires_grad and torch.equal(with_probs.to("cpu").probs, weights * 2)
    moved = plan.to("cpu")
    assert torch.equal(moved.mask, plan.mask) and torch.equal(moved.ids_keep, plan.ids_keep)
    assert torch.equal(MaskPlan.from_scores(scores, 0.5).loss_weights(), plan.mask)


def test_bad_score_and_weight_shapes_are_named():
    with pytest.raises(ValueError, match=r"scores must be \[B, N\], got shape \(16,\)"):
        MaskPlan.from_scores(torch.rand(16), 0.75)
    with pytest.raises(ValueError, match="weights must have the scores' shape"):
        MaskPlan.from_scores(torch.rand(2, 16), 0.75, weights=torch.rand(2, 8))
