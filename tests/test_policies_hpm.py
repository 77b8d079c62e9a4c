"""The label-free hpm policy: its losses against direct computations, binding, and learning on a synthetic task."""

from __future__ import annotations

import itertools

import pytest
import torch
from scipy.stats import spearmanr

from maskkit import create_policy
from maskkit.adapters.timm import create_mae
from maskkit.diagnostics import plan_diagnostics
from maskkit.mae import mae_step_loss
from maskkit.plan import MaskPlan
from maskkit.policies.hpm import HPMPolicy, hidden_values, rank_correlation, ranking_loss, zscore_mse_loss


def test_ranking_loss_equals_the_pairwise_sum():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 7, generator=g, dtype=torch.float64)
    loss = torch.randint(0, 4, (3, 7), generator=g).double()  # ties: pairs with equal losses do not count
    total, count = 0.0, 0
    for b, i, j in itertools.product(range(3), range(7), range(7)):
        if loss[b, j] > loss[b, i]:
            total += -float(torch.log(torch.sigmoid(s[b, j] - s[b, i])))
            count += 1
    assert float(ranking_loss(s, loss)) == pytest.approx(total / count, rel=1e-12)
    assert float(ranking_loss(s, torch.ones(3, 7, dtype=torch.float64))) == 0.0


def test_zscore_mse_equals_a_direct_computation():
    g = torch.Generator().manual_seed(1)
    s, loss = torch.randn(2, 5, generator=g, dtype=torch.float64), torch.rand(2, 5, generator=g, dtype=torch.float64)
    z = [(row - row.mean()) / (row.std() + 1e-6) for row in loss]
    expected = sum(float(((s[b] - z[b]) ** 2).sum()) for b in range(2)) / 10
    assert float(zscore_mse_loss(s, loss)) == pytest.approx(expected, rel=1e-12)


def test_rank_correlation_matches_scipy_and_hidden_values_picks_hidden_patches():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(4, 9, generator=g), torch.randn(4, 9, generator=g)
    expected = sum(spearmanr(a[i].numpy(), b[i].numpy()).statistic for i in range(4)) / 4
    assert rank_correlation(a, b) == pytest.approx(expected, abs=1e-9)
    plan = MaskPlan.from_scores(torch.rand(4, 9, generator=g), 0.5)
    values = torch.arange(36.0).view(4, 9)
    picked = hidden_values(values, plan.mask)
    for i in range(4):
        assert picked[i].tolist() == values[i][plan.mask[i].bool()].tolist()


def test_aux_loss_trains_the_scorer_only_on_hidden_patches():
    torch.manual_seed(0)
    hpm = HPMPolicy(embed_dim=8)
    tokens = torch.randn(3, 16, 8, requires_grad=True)
    plan = hpm(tokens, generator=torch.Generator().manual_seed(0))
    per_patch = torch.rand(3, 16)
    loss = hpm.aux_loss(plan, per_patch)
    expected = ranking_loss(hidden_values(plan.scores, plan.mask), hidden_values(per_patch, plan.mask))
    assert torch.equal(loss, expected)
    changed = per_patch.clone().masked_fill(plan.mask == 0, 99.0)  # visible patches' losses do not matter
    assert torch.equal(hpm.aux_loss(plan, changed), loss)
    loss.backward()
    grads = dict(hpm.named_parameters())
    assert all(p.grad is not None for p in grads.values())
    assert all(p.grad.abs().sum() > 0 for name, p in grads.items() if name != "scorer.net.2.bias")
    assert grads["scorer.net.2.bias"].grad.abs().max() < 1e-6  # a ranking loss sees only score differences
    assert tokens.grad is None  # the scorer reads detached tokens
    mse = HPMPolicy(embed_dim=8, loss="mse", loss_weight=0.5)
    mse.load_state_dict(hpm.state_dict())
    assert torch.allclose(mse.aux_loss(plan, per_patch),
                          0.5 * zscore_mse_loss(hidden_values(plan.scores, plan.mask), hidden_values(per_patch, plan.mask)))


def test_defaults_and_binding():
    hpm = create_policy("hpm")
    assert (hpm.guided_fraction, hpm.guided_ramp, hpm.loss, hpm.loss_weight) == (0.5, 1.0, "rank", 1.0)
    assert hpm.scorer.net is None and list(hpm.parameters()) == []
    hpm.bind(embed_dim=12, num_patches=16)
    assert hpm.scorer.embed_dim == 12 and sum(p.numel() for p in hpm.parameters()) == (12 + 32) * 128 + 128 + 128 + 1
    hpm.bind(embed_dim=12, num_patches=16)  # again: nothing changes
    with pytest.raises(ValueError, match="embed_dim=12"):
        hpm.bind(embed_dim=16, num_patches=16)
    with pytest.raises(ValueError, match="embed_dim=12"):
        hpm(torch.randn(2, 16, 16))
    lazy = create_policy("hpm")
    assert lazy(torch.randn(2, 16, 6)).scores.shape == (2, 16) and lazy.scorer.embed_dim == 6  # built at the first call


@pytest.mark.parametrize("kwargs,match", [({"loss": "l1"}, "loss"), ({"hidden_dim": 0}, "hidden_dim"),
                                          ({"pos_dim": 6}, "pos_dim"), ({"loss_weight": -1.0}, "loss_weight")])
def test_bad_options_are_value_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_policy("hpm", **kwargs)


def test_a_grid_that_is_not_square_is_refused_at_the_call_without_a_grid_and_taken_with_one():
    """N = 15 (e.g. a 3x5 image grid, or clips): the scorer's position code needs the token grid, given per call."""
    policy = create_policy("hpm", num_patches=15)
    with pytest.raises(ValueError, match="square"):
        policy(torch.randn(2, 15, 6))
    assert policy(torch.randn(2, 15, 6), grid=(3, 5)).scores.shape == (2, 15)


def noisy_left_half(batch: int, g: torch.Generator) -> torch.Tensor:
    """[B, 1, 16, 16]: white noise on the left half (hard to reconstruct), a smooth ramp on the right."""
    x = torch.zeros(batch, 1, 16, 16)
    x[..., :8] = torch.randn(batch, 1, 16, 8, generator=g)
    x[..., 8:] = torch.linspace(0, 1, 16)[None, None, :, None] * torch.rand(batch, 1, 1, 1, generator=g)
    return x


def test_hpm_learns_which_patches_are_hard():
    torch.manual_seed(0)
    mae = create_mae("micro", img_size=16, patch_size=4, in_chans=1, seed=0)  # 4 x 4 patches
    hpm = create_policy("hpm", embed_dim=mae.embed_dim, num_patches=mae.num_patches)
    opt = torch.optim.AdamW([*mae.parameters(), *hpm.parameters()], lr=2e-3)
    g = torch.Generator().manual_seed(0)
    steps, corr, on_noise = 40, [], []
    for s in range(steps):
        out = mae_step_loss(mae, hpm, noisy_left_half(16, g), generator=g, progress=s / steps)
        opt.zero_grad()
        out.total_loss.backward()
        opt.step()
        if s >= steps - 10:
            corr.append(plan_diagnostics(hpm, out.plan, out.per_patch)["hpm_rank_corr"])
            guided = out.plan.guided.view(-1, 4, 4)
            on_noise.append(float(guided[:, :, :2].sum() / guided.sum()))
    assert sum(corr) / len(corr) > 0.5
    assert sum(on_noise) / len(on_noise) > 0.9  # the guided (predicted hardest) patches lie on the noise
