"""AdaMAE adaptive sampling: exact counts, sampling law, determinism, REINFORCE loss and its gradient."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from policy_checks import check_determinism

from maskkit.plan import num_visible
from maskkit.policies import create_policy
from maskkit.policies.adamae import AdaMAEPolicy
from maskkit.policies.learned import position_code

# tiny tensors: one torch thread is much faster than several contending ones on a loaded machine
pytestmark = pytest.mark.usefixtures("one_thread")


def skewed(policy: AdaMAEPolicy, seed: int = 0) -> AdaMAEPolicy:
    """Give the sampler's last layer large weights, so that p is far from uniform."""
    with torch.no_grad():
        last = policy.sampler.net[-1]
        last.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(seed))
    return policy


@pytest.mark.parametrize("n,ratio", [(196, 0.75), (64, 0.9), (16, 0.5), (49, 0.95)])
def test_exact_hidden_count(n, ratio):
    policy = AdaMAEPolicy(ratio, embed_dim=6)
    plan = policy(torch.randn(8, n, 6), generator=torch.Generator().manual_seed(0))
    assert plan.num_visible == num_visible(n, ratio)
    assert plan.mask.sum(dim=1).tolist() == [float(n - num_visible(n, ratio))] * 8
    assert plan.scores.shape == (8, n) and plan.scores.requires_grad  # log p, attached
    assert torch.allclose(plan.scores.exp().sum(dim=1), torch.ones(8))


def test_noise_and_generator_determinism():
    torch.manual_seed(0)
    policy = skewed(AdaMAEPolicy(embed_dim=8))
    tokens = torch.randn(4, 64, 8)
    noise = torch.rand(4, 64, generator=torch.Generator().manual_seed(1))
    a, _ = check_determinism(policy, tokens, noise, seed=2)
    # the K largest log p + Gumbel(noise) are the visible tokens
    gumbel = -torch.log(-torch.log(noise))
    top = torch.topk(a.scores.detach() + gumbel, k=16, dim=1).indices
    assert torch.equal(top.sort(dim=1).values, a.ids_keep.sort(dim=1).values)
    with pytest.raises(ValueError, match=r"noise must have shape \(4, 64\)"):
        policy(tokens, noise=torch.rand(4, 16))


def test_single_visible_token_is_drawn_with_probability_p():
    # N = 16, ratio 15/16: K = 1, so the visible token is one categorical draw from p
    torch.manual_seed(0)
    policy = skewed(AdaMAEPolicy(0.9375, embed_dim=4, hidden_dim=16))
    draws = 20000
    token = torch.randn(1, 16, 4).expand(draws, -1, -1)
    plan = policy(token, generator=torch.Generator().manual_seed(0))
    assert plan.num_visible == 1
    p = plan.scores[0].detach().exp().double()  # [16]
    assert p.max() > 3 * p.min()  # a non-uniform law
    freq = torch.bincount(plan.ids_keep[:, 0], minlength=16).double() / draws
    se = (p * (1 - p) / draws).sqrt()
    assert bool(((freq - p).abs() < 4 * se).all())


def test_two_visible_tokens_follow_sampling_without_replacement():
    # K = 2 of N = 8: P(i visible) = p_i + sum_{j != i} p_j p_i / (1 - p_j) (successive draws)
    torch.manual_seed(1)
    policy = skewed(AdaMAEPolicy(0.75, embed_dim=4, hidden_dim=16, pos_dim=0), seed=1)
    draws = 20000
    plan = policy(torch.randn(1, 8, 4).expand(draws, -1, -1), generator=torch.Generator().manual_seed(1))
    p = plan.scores[0].detach().exp().double()
    inclusion = p.clone()
    for i, j in itertools.permutations(range(8), 2):
        inclusion[i] += p[j] * p[i] / (1 - p[j])
    freq = (1 - plan.mask).double().mean(dim=0)
    se = (inclusion * (1 - inclusion) / draws).sqrt()
    assert torch.allclose(inclusion.sum(), torch.tensor(2.0, dtype=torch.float64))
    assert bool(((freq - inclusion).abs() < 4 * se).all())


def test_aux_loss_gradient_matches_a_direct_computation():
    torch.manual_seed(0)
    policy = skewed(AdaMAEPolicy(0.75, embed_dim=6, hidden_dim=12, pos_dim=8, loss_weight=0.3)).double()
    tokens = torch.randn(3, 16, 6, dtype=torch.float64, requires_grad=True)
    per_patch = torch.rand(3, 16, dtype=torch.float64)
    plan = policy(tokens, noise=torch.rand(3, 16, dtype=torch.float64))
    loss = policy.aux_loss(plan, per_patch)
    params = list(policy.parameters())
    got = torch.autograd.grad(loss, params)

    # by hand: LayerNorm without affine, sin-cos code, MLP, log-softmax over tokens
    first, last = policy.sampler.net[0], policy.sampler.net[2]
    x = F.layer_norm(tokens.detach(), (6,))
    x = torch.cat([x, position_code(4, 8, dtype=torch.float64).expand(3, -1, -1)], dim=-1)
    logits = F.linear(F.gelu(F.linear(x, first.weight, first.bias)), last.weight, last.bias).squeeze(-1)
    log_p = torch.log_softmax(logits, dim=-1)
    hidden = plan.mask.bool()
    direct = -0.3 * (log_p[hidden] * per_patch[hidden]).sum() / hidden.sum()
    want = torch.autograd.grad(direct, params)
    assert torch.allclose(loss, direct, rtol=1e-12, atol=0)
    for g, w in zip(got, want, strict=True):
        assert torch.allclose(g, w, rtol=1e-10, atol=1e-14)
    assert tokens.grad is None  # tokens are detached before the sampler


def test_sampling_loss_makes_high_error_tokens_more_likely_visible():
    torch.manual_seed(0)
    policy = AdaMAEPolicy(0.75, embed_dim=4, hidden_dim=16, loss_weight=1.0)
    tokens = torch.randn(32, 16, 4)
    per_patch = torch.full((32, 16), 0.1)
    per_patch[:, 5] = 5.0  # token 5 is hard to reconstruct
    before = policy(tokens, generator=torch.Generator().manual_seed(0)).scores.detach().exp()[:, 5].mean()
    for step in range(20):
        plan = policy(tokens, generator=torch.Generator().manual_seed(step))
        grads = torch.autograd.grad(policy.aux_loss(plan, per_patch), list(policy.parameters()))
        with torch.no_grad():  # plain SGD, lr 2
            for param, grad in zip(policy.parameters(), grads, strict=True):
                param -= 2.0 * grad
    after = policy(tokens, generator=torch.Generator().manual_seed(0)).scores.detach().exp().mean(dim=0)
    assert after[5] > 2 * before and after.argmax() == 5


def test_network_built_by_bind_or_lazily():
    policy = create_policy("adamae")
    assert isinstance(policy, AdaMAEPolicy) and policy.sampler.net is None and list(policy.parameters()) == []
    assert policy.has_aux_loss and not policy.learnable
    policy.bind(embed_dim=10, num_patches=64)
    assert policy.sampler.net[0].in_features == 10 + 32
    policy.bind(embed_dim=10, num_patches=64)  # again: a no-op
    with pytest.raises(ValueError, match="built for embed_dim=10, the MAE has 12"):
        policy.bind(embed_dim=12, num_patches=64)
    with pytest.raises(ValueError, match="built for embed_dim=10, got tokens of width 6"):
        policy(torch.randn(1, 64, 6))
    lazy = AdaMAEPolicy()
    plan = lazy(torch.randn(2, 16, 5))
    assert lazy.sampler.embed_dim == 5 and plan.num_visible == 4
    assert 0.99 < lazy.diagnostics(plan, torch.zeros(2, 16))["adamae_entropy"] <= 1.0  # starts near uniform


def test_aux_loss_and_option_errors():
    policy = AdaMAEPolicy(embed_dim=4)
    plan = policy(torch.randn(2, 16, 4))
    with pytest.raises(ValueError, match="per_patch loss must have the plan's shape"):
        policy.aux_loss(plan, torch.zeros(2, 15))
    with pytest.raises(ValueError, match="needs the plan's log-probabilities"):
        policy.aux_loss(
            plan.detach().__class__(plan.ids_keep, plan.ids_restore, plan.mask), torch.zeros(2, 16)
        )
    with pytest.raises(ValueError, match="embed_dim must be a positive integer"):
        AdaMAEPolicy(embed_dim=0)
    with pytest.raises(ValueError, match="hidden_dim must be a positive integer"):
        AdaMAEPolicy(hidden_dim=-1)
    with pytest.raises(ValueError, match="pos_dim must be a non-negative multiple of 4"):
        AdaMAEPolicy(pos_dim=6)
    with pytest.raises(ValueError, match="loss_weight must be a non-negative number"):
        AdaMAEPolicy(loss_weight=-1.0)
    with pytest.raises(ValueError, match="N = 12 is not a square"):
        AdaMAEPolicy(embed_dim=4)(torch.randn(1, 12, 4))
