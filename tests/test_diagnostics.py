"""Collapse diagnostics (maskkit.diagnostics) against direct computations and their reference values."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from maskkit import create_policy
from maskkit.diagnostics import logit_spread, mask_iou, plan_diagnostics, position_entropy
from maskkit.plan import MaskPlan


def random_masks(batch: int, n: int = 49, ratio: float = 0.75, seed: int = 0) -> torch.Tensor:
    return MaskPlan.from_scores(torch.rand(batch, n, generator=torch.Generator().manual_seed(seed)), ratio).mask


def test_mask_iou_equals_the_pairwise_definition():
    mask = random_masks(5, 16, 0.5, seed=1)
    sets = [set(torch.nonzero(row).flatten().tolist()) for row in mask]
    pairs = [len(a & b) / len(a | b) for a, b in itertools.permutations(sets, 2)]
    assert mask_iou(mask) == pytest.approx(sum(pairs) / len(pairs), rel=1e-12)
    assert mask_iou(mask[:1].expand(4, -1)) == 1.0 and math.isnan(mask_iou(mask[:1]))


def test_position_entropy_equals_its_formula_and_bounds():
    mask = random_masks(6, 16, 0.5, seed=2)
    f = mask.double().mean(0)
    r = float(f.mean())

    def h(p: float) -> float:
        return 0.0 if p in (0.0, 1.0) else -(p * math.log(p) + (1 - p) * math.log(1 - p))

    expected = sum(h(float(x)) for x in f) / len(f) / h(r)
    assert position_entropy(mask) == pytest.approx(expected, rel=1e-12)
    assert position_entropy(mask[:1].expand(8, -1)) == 0.0  # one rule for every image


def test_random_masking_gives_the_reference_values():
    mask = random_masks(2000, seed=3)
    assert mask_iou(mask) == pytest.approx(0.75 / 1.25, abs=0.01)
    assert position_entropy(mask) > 0.99


def test_logit_spread_and_plan_diagnostics_keys():
    scores = torch.tensor([[0.0, 2.0, 4.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    assert logit_spread(scores) == pytest.approx((2.0 + 0.0) / 2)
    tokens = torch.randn(4, 16, 8)
    random = create_policy("random")
    assert set(plan_diagnostics(random, random(tokens))) == {"mask_iou", "mask_pos_entropy"}
    attention = create_policy("attention")
    plan = attention(tokens, attention=torch.rand(4, 16))
    assert set(plan_diagnostics(attention, plan)) == {"mask_iou", "mask_pos_entropy"}  # not a learned scorer
    hpm = create_policy("hpm", embed_dim=8)
    plan = hpm(tokens)
    got = plan_diagnostics(hpm, plan, torch.rand(4, 16))
    assert set(got) == {"mask_iou", "mask_pos_entropy", "logit_spread", "hpm_rank_corr"}
    assert got["logit_spread"] == pytest.approx(float(plan.scores.detach().double().std(dim=1).mean()))
