"""Guided fraction and ramp (ScoredPolicy, MaskPlan.from_guided_scores) for every scored policy."""

from __future__ import annotations

import math

import pytest
import torch

from maskkit import create_policy
from maskkit.plan import MaskPlan, guided_fraction_at, num_guided, num_visible
from maskkit.policies.learned import gumbel_from_uniform
from maskkit.policies.scored import ScoredPolicy

B, N, D = 6, 16, 8
H = N - num_visible(N, 0.75)  # 12 hidden

#: every built-in scored policy, with what it needs beyond tokens
SCORED = {
    "attention-high": ("attention", {"mode": "high"}),
    "attention-low": ("attention", {"mode": "low"}),
    "attention-hint": ("attention", {"mode": "hint"}),
    "learned-topk": ("learned", {"embed_dim": D}),
    "learned-gumbel": ("learned", {"embed_dim": D, "selection": "gumbel"}),
    "hpm": ("hpm", {"embed_dim": D}),
}


def make(key: str, **options) -> ScoredPolicy:
    name, base = SCORED[key]
    torch.manual_seed(0)
    return create_policy(name, **{**base, **options})


def inputs(seed: int = 0) -> tuple[torch.Tensor, dict]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(B, N, D, generator=g)
    return tokens, {"attention": torch.rand(B, N, generator=g)}


def same_plan(a: MaskPlan, b: MaskPlan) -> bool:
    return torch.equal(a.ids_keep, b.ids_keep) and torch.equal(a.ids_restore, b.ids_restore) and torch.equal(a.mask, b.mask)


@pytest.mark.parametrize("key", list(SCORED))
def test_fraction_zero_is_the_random_plan_for_the_same_noise(key):
    tokens, ctx = inputs()
    noise = torch.rand(B, N, generator=torch.Generator().manual_seed(5))
    random = create_policy("random")(tokens, noise=noise)
    plan = make(key, guided_fraction=0.0)(tokens, noise=noise, **ctx)
    assert same_plan(plan, random)
    assert plan.guided is not None and not plan.guided.any()


@pytest.mark.parametrize("key", list(SCORED))
def test_fraction_zero_is_the_random_plan_for_the_same_generator(key):
    tokens, ctx = inputs()
    random = create_policy("random")(tokens, generator=torch.Generator().manual_seed(3))
    plan = make(key, guided_fraction=0.0)(tokens, generator=torch.Generator().manual_seed(3), **ctx)
    assert same_plan(plan, random)


@pytest.mark.parametrize("key", list(SCORED))
@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 0.7, 1.0])
def test_hidden_count_and_guided_count(key, fraction):
    tokens, ctx = inputs(1)
    plan = make(key, guided_fraction=fraction)(tokens, generator=torch.Generator().manual_seed(1), **ctx)
    assert (plan.mask.sum(1) == H).all() and plan.ids_keep.shape == (B, N - H)
    expected = math.floor(fraction * H + 0.5)  # round half up
    assert (plan.guided.sum(1) == expected).all()
    assert not (plan.guided & (plan.mask == 0)).any()  # guided patches are hidden ones


@pytest.mark.parametrize("fraction", [0.25, 0.5])
def test_guided_part_is_the_top_of_the_scores(fraction):
    tokens, ctx = inputs(2)
    policy = make("attention-high", guided_fraction=fraction)
    plan = policy(tokens, generator=torch.Generator().manual_seed(0), **ctx)
    g = math.floor(fraction * H + 0.5)
    top = torch.topk(ctx["attention"], g, dim=1).indices
    assert torch.equal(plan.guided, torch.zeros(B, N, dtype=torch.bool).scatter(1, top, True))
    # the random part is exactly the random policy's rule on the rest: highest noise hidden
    noise = torch.rand(B, N, generator=torch.Generator().manual_seed(0))
    rest = noise.masked_fill(plan.guided, -1.0)
    hidden_rest = torch.topk(rest, H - g, dim=1).indices
    expected = plan.guided.clone().scatter(1, hidden_rest, True)
    assert torch.equal(plan.mask.bool(), expected)


def test_random_part_is_uniform_over_the_remaining_patches():
    """With fixed scores, each non-guided patch is hidden with probability (H - G) / (N - G)."""
    scores = torch.arange(N, dtype=torch.float32).expand(4000, N)  # the last G patches are guided
    g = 6
    noise = torch.rand(4000, N, generator=torch.Generator().manual_seed(0))
    plan = MaskPlan.from_guided_scores(scores, 0.75, g, noise)
    assert plan.guided[:, N - g :].all() and not plan.guided[:, : N - g].any()
    freq = plan.mask[:, : N - g].mean(0)
    p = (H - g) / (N - g)
    se = math.sqrt(p * (1 - p) / 4000)
    assert (freq - p).abs().max() < 4.5 * se


def test_fraction_one_keeps_the_previous_behaviour():
    tokens, ctx = inputs(3)
    plan = make("attention-high")(tokens, **ctx)  # default fraction 1.0
    assert same_plan(plan, MaskPlan.from_scores(ctx["attention"], 0.75)) and torch.equal(plan.guided, plan.mask.bool())
    masker = make("learned-gumbel", temperature=0.7)
    noise = torch.rand(B, N, generator=torch.Generator().manual_seed(4))
    key = masker.logits(tokens).detach() / 0.7 + gumbel_from_uniform(noise)  # noise feeds the Gumbel draw
    assert same_plan(masker(tokens, noise=noise), MaskPlan.from_scores(key, 0.75))


@pytest.mark.parametrize("fraction,ramp", [(0.5, 1.0), (0.8, 0.4), (0.5, 0.0)])
def test_ramp_values_per_step(fraction, ramp):
    steps = 20
    policy = make("hpm", guided_fraction=fraction, guided_ramp=ramp)
    tokens, _ = inputs(4)
    for s in range(steps + 1):
        progress = s / steps
        alpha = fraction if ramp == 0 else fraction * min(1.0, progress / ramp)  # independent schedule
        assert guided_fraction_at(fraction, ramp, progress) == pytest.approx(alpha, abs=1e-12)
        plan = policy(tokens, generator=torch.Generator().manual_seed(s), progress=progress)
        assert (plan.guided.sum(1) == math.floor(alpha * H + 0.5)).all(), s
    assert (policy(tokens).guided.sum(1) == math.floor(fraction * H + 0.5)).all()  # no progress: full alpha


def test_num_guided_rounds_half_up_and_is_capped():
    assert num_guided(147, 0.5) == 74 and num_guided(12, 0.25) == 3 and num_guided(12, 1.0) == 12
    assert num_guided(3, 0.5) == 2 and num_guided(0, 0.5) == 0


def test_learned_weights_cover_every_hidden_patch_and_carry_gradient():
    masker = make("learned-topk", guided_fraction=0.5)
    tokens, _ = inputs(5)
    plan = masker(tokens, generator=torch.Generator().manual_seed(0))
    assert (plan.loss_weights() > 0).sum() == B * H  # guided and random hidden patches alike
    (plan.loss_weights()).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in masker.parameters())


@pytest.mark.parametrize("bad", [-0.1, 1.5, "half", True])
def test_bad_fraction_or_ramp_is_a_value_error(bad):
    with pytest.raises(ValueError, match="guided_fraction"):
        create_policy("attention", guided_fraction=bad)
    with pytest.raises(ValueError, match="guided_ramp"):
        create_policy("hpm", guided_ramp=bad)


def test_partly_random_plan_needs_noise_of_the_right_shape():
    with pytest.raises(ValueError, match="noise"):
        MaskPlan.from_guided_scores(torch.rand(2, N), 0.75, 3, None)
    with pytest.raises(ValueError, match="num_guided"):
        MaskPlan.from_guided_scores(torch.rand(2, N), 0.75, H + 1, torch.rand(2, N))
    with pytest.raises(ValueError, match="noise"):
        make("attention-high", guided_fraction=0.5)(torch.randn(2, N, D), attention=torch.rand(2, N),
                                                     noise=torch.rand(2, N + 1))


def test_a_third_party_scored_policy_gets_the_mechanism():
    class Center(ScoredPolicy):
        def score(self, tokens, **context):
            b, n = self.token_grid(tokens)
            return -(torch.arange(n, dtype=torch.float32) - n / 2).abs().expand(b, n)

    tokens, _ = inputs(6)
    noise = torch.rand(B, N, generator=torch.Generator().manual_seed(8))
    assert same_plan(Center(guided_fraction=0.0)(tokens, noise=noise), create_policy("random")(tokens, noise=noise))
    plan = Center(guided_fraction=0.5)(tokens, noise=noise)
    assert (plan.guided.sum(1) == 6).all() and plan.guided[:, N // 2].all()
