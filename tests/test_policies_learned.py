"""The learned masker: selection rules, gradients through plan.weights, architectures."""

from __future__ import annotations

import pytest
import torch

from maskkit.bench import count_parameters
from maskkit.plan import num_visible
from maskkit.policies import LearnedMasker
from maskkit.policies.learned import gumbel_from_uniform, position_code, weights_from_probs

SMALL = {
    "token": dict(embed_dim=6, hidden_dim=8, pos_dim=4),
    "paper": dict(embed_dim=6, hidden_dim=8, num_patches=16),
}


def tokens_for(batch=2, n=16, dim=6, seed=0, dtype=torch.float32):
    return torch.randn(batch, n, dim, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def spread(masker, std=1.0):
    """Give the last layer large weights so probabilities differ clearly between patches."""
    torch.manual_seed(0)
    torch.nn.init.normal_(masker.net[-1].weight, std=std)
    return masker


@pytest.mark.parametrize("arch", ["token", "paper"])
def test_gradients_reach_masker_through_weights(arch):
    torch.manual_seed(0)
    masker = LearnedMasker(arch=arch, **SMALL[arch])
    tokens = tokens_for().requires_grad_(True)
    plan = masker(tokens)
    assert plan.weights.requires_grad and torch.equal(plan.weights, masker.probabilities(tokens))
    (plan.weights * plan.mask).sum().backward()
    for name, param in masker.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert tokens.grad is None  # detach_input: no gradient into the MAE through the masker


def test_detach_input_false_lets_gradient_reach_tokens():
    masker = LearnedMasker(detach_input=False, **SMALL["token"])
    tokens = tokens_for().requires_grad_(True)
    plan = masker(tokens)
    (plan.weights * plan.mask).sum().backward()
    assert tokens.grad is not None and tokens.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", ["token", "paper"])
def test_gradient_matches_finite_differences(arch):
    torch.manual_seed(1)
    masker = LearnedMasker(arch=arch, **SMALL[arch]).double()
    spread(masker, std=0.3).double()
    tokens = tokens_for(dtype=torch.float64, seed=1)
    plan = masker(tokens)
    mask = plan.mask.detach()
    (plan.weights * mask).sum().backward()

    def loss() -> float:
        with torch.no_grad():
            again = masker(tokens)
            assert torch.equal(again.mask, mask)  # the selection does not move for tiny steps
            return (again.weights * mask).sum().item()

    eps = 1e-6
    first, last = masker.net[-3] if arch == "token" else masker.net[1], masker.net[-1]
    for param, index in [
        (first.weight, (3, 2)),
        (first.bias, (5,)),
        (last.weight, (0, 4)),
        (last.bias, (0,)),
    ]:
        saved = param.data[index].item()
        param.data[index] = saved + eps
        up = loss()
        param.data[index] = saved - eps
        down = loss()
        param.data[index] = saved
        numeric = (up - down) / (2 * eps)
        assert param.grad[index].item() == pytest.approx(numeric, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("arch", ["token", "paper"])
def test_topk_hides_highest_probabilities(arch):
    masker = spread(LearnedMasker(0.75, arch=arch, **SMALL[arch]))
    tokens = tokens_for(batch=5)
    plan = masker(tokens)
    probs = masker.probabilities(tokens)
    hidden = 16 - num_visible(16, 0.75)
    expected = torch.zeros_like(probs).scatter(1, torch.topk(probs, hidden).indices, 1.0)
    assert torch.equal(plan.mask, expected)


def test_gumbel_selection_matches_direct_computation_and_is_reproducible():
    masker = spread(LearnedMasker(0.5, selection="gumbel", temperature=0.7, **SMALL["token"]))
    tokens = tokens_for(batch=4)
    noise = torch.rand(4, 16, generator=torch.Generator().manual_seed(9))
    plan = masker(tokens, noise=noise)
    with torch.no_grad():
        perturbed = masker.logits(tokens) / 0.7 + -torch.log(-torch.log(noise))
    expected = torch.zeros(4, 16).scatter(1, torch.topk(perturbed, 8).indices, 1.0)
    assert torch.equal(plan.mask, expected)
    assert torch.equal(masker(tokens, noise=noise).mask, plan.mask)
    a = masker(tokens, generator=torch.Generator().manual_seed(5))
    b = masker(tokens, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.mask, b.mask)
    assert torch.equal(a.weights, plan.weights)  # weights are the probabilities, whatever the draw


def test_gumbel_at_low_temperature_equals_topk():
    tokens = tokens_for(batch=6)
    topk = spread(LearnedMasker(0.75, **SMALL["token"]))
    gumbel = LearnedMasker(0.75, selection="gumbel", temperature=1e-8, **SMALL["token"])
    gumbel.load_state_dict(topk.state_dict())
    noise = torch.rand(6, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(gumbel(tokens, noise=noise).mask, topk(tokens).mask)


def test_gumbel_hides_one_patch_with_softmax_probabilities():
    # Gumbel-top-1 samples patch i with probability softmax(logits / T)_i
    masker = spread(
        LearnedMasker(0.25, selection="gumbel", temperature=2.0, embed_dim=6, hidden_dim=8, pos_dim=4)
    )
    tokens = tokens_for(batch=1, n=4).expand(20000, 4, 6)  # 2x2 grid, N - K = 1
    plan = masker(tokens, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = torch.softmax(masker.logits(tokens[:1])[0] / 2.0, dim=0)
    assert expected.max() - expected.min() > 0.1  # the test can tell the patches apart
    assert torch.allclose(plan.mask.mean(dim=0), expected, atol=0.02)


def test_initial_probabilities_near_half_but_not_tied():
    torch.manual_seed(0)
    masker = LearnedMasker(embed_dim=32)
    probs = masker.probabilities(tokens_for(batch=3, n=64, dim=32))
    assert ((probs - 0.5).abs() < 0.05).all()
    assert torch.unique(probs).numel() == probs.numel()


def test_token_arch_works_at_any_square_resolution_with_fixed_params():
    masker = LearnedMasker(embed_dim=6, hidden_dim=8, pos_dim=4)
    d, p, h = 6, 4, 8
    assert count_parameters(masker) == (d + p) * h + h + h + 1
    for n in (4, 16, 196):
        assert masker(tokens_for(n=n)).mask.shape == (2, n)
    with pytest.raises(ValueError, match="N = 15 is not a square"):
        masker(tokens_for(n=15))
    with pytest.raises(ValueError, match="embed_dim=6"):
        masker(tokens_for(dim=5))


def test_position_code_distinguishes_patches():
    pos = position_code(3, 8)  # [9, 8]
    assert pos.shape == (9, 8)
    assert torch.cdist(pos, pos).add(torch.eye(9)).min() > 0.1  # no two patches share a code
    assert torch.allclose(pos[0], torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0]))  # row 0, col 0


def test_paper_arch_param_count_and_fixed_resolution():
    n, d, h = 16, 6, 8
    masker = LearnedMasker(arch="paper", embed_dim=d, num_patches=n, hidden_dim=h)
    assert count_parameters(masker) == n * d * h + h + h * n + n
    with pytest.raises(ValueError, match="num_patches=16, got N = 64"):
        masker(tokens_for(n=64))


def test_paper_arch_is_about_100m_at_vit_base():
    with torch.device("meta"):  # count without allocating 400 MB
        masker = LearnedMasker(arch="paper", embed_dim=768, num_patches=256)
    n, d, h = 256, 768, 512
    assert masker.hidden_dim == 512
    assert count_parameters(masker) == n * d * h + h + h * n + n == 100_795_136


def test_gumbel_noise_helper_is_finite_at_edges():
    g = gumbel_from_uniform(torch.tensor([0.0, 0.5, 1.0]))
    assert torch.isfinite(g).all()
    assert g[1].item() == pytest.approx(-torch.log(torch.log(torch.tensor(2.0))).item())


def test_masker_is_learnable_and_saves_state():
    masker = LearnedMasker(**SMALL["token"])
    assert masker.learnable
    clone = LearnedMasker(**SMALL["token"])
    clone.load_state_dict(masker.state_dict())
    tokens = tokens_for()
    assert torch.equal(clone.probabilities(tokens), masker.probabilities(tokens))


def test_weightings_against_a_direct_computation():
    """prob: p; normalized: p / mean(p over the image's hidden patches); straight: 1 with p's gradient."""
    masker = spread(LearnedMasker(**SMALL["token"]), std=0.5).double()
    tokens = tokens_for(batch=3, dtype=torch.float64, seed=4)
    p = masker.probabilities(tokens).detach()
    plans = {}
    for weighting in ("prob", "normalized", "straight"):
        masker.weighting = weighting
        plans[weighting] = masker(tokens)
        assert torch.equal(plans[weighting].probs, masker.probabilities(tokens))  # probs kept for inspection
        assert torch.equal(plans[weighting].mask, plans["prob"].mask)  # weighting never changes selection
    mask = plans["prob"].mask
    torch.testing.assert_close(plans["prob"].weights, p, rtol=0, atol=0)
    for b in range(3):
        hidden = mask[b].bool()
        expected = p[b] / p[b][hidden].mean()
        torch.testing.assert_close(plans["normalized"].weights[b], expected, rtol=1e-12, atol=0)
        assert float(plans["normalized"].weights[b][hidden].mean().detach()) == pytest.approx(1.0, abs=1e-12)
    assert torch.equal(plans["straight"].weights, torch.ones_like(p))


def test_straight_through_has_the_gradient_of_prob_weighting():
    masker = spread(LearnedMasker(**SMALL["token"]), std=0.5).double()
    tokens = tokens_for(dtype=torch.float64, seed=2)
    per_patch = torch.rand(2, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grads = {}
    for weighting in ("prob", "straight"):
        masker.weighting = weighting
        masker.zero_grad()
        plan = masker(tokens)
        (per_patch * plan.mask * plan.weights).sum().backward()
        grads[weighting] = [p.grad.clone() for p in masker.parameters()]
    for a, b in zip(grads["prob"], grads["straight"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


def test_normalized_weights_gradient_matches_finite_differences():
    p = torch.rand(2, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.8 + 0.1
    mask = (torch.arange(8) % 3 != 0).double().expand(2, 8)
    loss = torch.rand(2, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    f = lambda q: (loss * mask * weights_from_probs(q, mask, "normalized")).sum()  # noqa: E731
    assert torch.autograd.gradcheck(f, (p.clone().requires_grad_(True),))
    with pytest.raises(ValueError, match="weighting"):
        weights_from_probs(p, mask, "softmax")
    with pytest.raises(ValueError, match="weighting"):
        LearnedMasker(weighting="softmax")
