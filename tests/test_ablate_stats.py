"""The study's statistics against independent computations on fixed numbers: mean, sample sd, the paired t
interval (t quantiles from printed tables) and the verdict's three words."""

from __future__ import annotations

import math
import statistics

import pytest

from maskkit.ablate.stats import compare, describe, paired_interval

#: two-sided 95% Student t quantiles t(0.975, df) from printed tables
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776}


@pytest.mark.parametrize("values", [[1.0, 2.0, 3.0], [0.5, -0.25, 1.75, 0.0], [93.1, 91.7]])
def test_describe_is_the_mean_and_the_sample_sd(values):
    s = describe(values)
    assert s.n == len(values)
    assert s.mean == pytest.approx(statistics.fmean(values), abs=1e-12)
    assert s.sd == pytest.approx(statistics.stdev(values), abs=1e-12)


def test_one_value_has_no_sd_and_no_interval():
    assert describe([2.5]).sd is None
    assert paired_interval([2.5]) == (None, None)


@pytest.mark.parametrize("diffs", [[1.0, 2.0, 3.0], [0.4, -0.3, 0.9, 1.1], [-2.0, -1.5]])
def test_the_interval_is_the_paired_t_interval(diffs):
    n = len(diffs)
    half = T975[n - 1] * statistics.stdev(diffs) / math.sqrt(n)
    low, high = paired_interval(diffs)
    mean = statistics.fmean(diffs)
    assert low == pytest.approx(mean - half, abs=2e-3 * half)
    assert high == pytest.approx(mean + half, abs=2e-3 * half)


def test_compare_pairs_by_seed_and_reads_the_interval():
    baseline = {0: 90.0, 1: 91.0, 2: 89.0, 3: 95.0}
    better = {0: 92.0, 1: 93.5, 2: 90.5}  # seed 3 missing: pairs only 0-2
    c = compare("mlo", "random", better, baseline)
    assert c.seeds == (0, 1, 2)
    assert c.differences == (2.0, 2.5, 1.5)
    assert c.mean == pytest.approx(2.0) and c.sd == pytest.approx(0.5)
    assert c.low == pytest.approx(2.0 - T975[2] * 0.5 / math.sqrt(3), abs=1e-3)
    assert c.verdict == "beats"
    assert compare("random", "mlo", baseline, better).verdict == "loses"
    noisy = compare("x", "random", {0: 91.0, 1: 89.0, 2: 90.0}, {0: 90.0, 1: 90.0, 2: 90.0})
    assert noisy.verdict == "ties within noise"
    assert "ties within noise" in noisy.sentence("linear %") and "3 paired seed(s)" in noisy.sentence()
    assert compare("x", "random", {0: 99.0}, {0: 90.0}).verdict == "ties within noise"  # one seed: no interval


def test_no_shared_seed_or_a_non_finite_score_is_an_error():
    with pytest.raises(ValueError, match="share no seed"):
        compare("a", "b", {0: 1.0}, {1: 1.0})
    with pytest.raises(ValueError, match="non-finite"):
        describe([1.0, float("nan")])
