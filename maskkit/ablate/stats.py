"""The statistics of a paired study: per-arm mean ± sd over seeds, and paired differences with a 95% interval.

Differences are paired by seed (arm minus baseline on the same seed), because seed-to-seed variation is
shared by the arms of one seed (the same splits, initialisation and batches). The interval is the paired
t interval, mean ± t(0.975, n - 1) · sd / √n, with scipy's Student t quantile: with the 3-5 seeds a CPU
study affords, a bootstrap over so few points cannot reach the tails and understates the width.

A comparison's verdict reads the interval: "beats" when it lies above zero, "loses" below, otherwise
"ties within noise" (also for a single seed, which has no interval).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

#: the interval's coverage
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Summary:
    """Mean and sample standard deviation (n - 1) of some numbers; sd is None for one number."""

    n: int
    mean: float
    sd: float | None


@dataclass(frozen=True)
class Comparison:
    """An arm against its reference, paired by seed: the per-seed differences, their summary and interval."""

    arm: str
    reference: str
    seeds: tuple[int, ...]
    differences: tuple[float, ...]
    mean: float
    sd: float | None
    low: float | None
    high: float | None
    basis: str = "equal steps"

    @property
    def n(self) -> int:
        return len(self.differences)

    @property
    def verdict(self) -> str:
        """"beats", "loses" or "ties within noise", from the 95% interval of the paired differences."""
        if self.low is not None and self.low > 0:
            return "beats"
        if self.high is not None and self.high < 0:
            return "loses"
        return "ties within noise"

    def sentence(self, metric: str = "score") -> str:
        """The verdict as a line of plain words, with the numbers behind it."""
        spread = "" if self.sd is None else f" ± {self.sd:.2f}"
        interval = "no interval from one seed" if self.low is None else f"95% CI [{self.low:+.2f}, {self.high:+.2f}]"
        return (f"{self.arm} against {self.reference}, {metric} ({self.basis}): {self.verdict}, "
                f"{self.mean:+.2f}{spread} over {self.n} paired seed(s), {interval}")


def describe(values: Sequence[float]) -> Summary:
    """n, mean and sample sd (None for n = 1); ValueError for no values or a non-finite one."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("no values to summarise")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"non-finite value among {values}")
    n = len(values)
    mean = math.fsum(values) / n
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return Summary(n, mean, sd)


def paired_interval(differences: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float | None, float | None]:
    """The paired t interval of the mean difference: mean ± t(1 - α/2, n - 1) · sd / √n; (None, None) for n = 1."""
    from scipy.stats import t

    summary = describe(differences)
    if summary.sd is None:
        return None, None
    half = float(t.ppf(0.5 + confidence / 2, summary.n - 1)) * summary.sd / math.sqrt(summary.n)
    return summary.mean - half, summary.mean + half


def compare(
    arm: str, reference: str, arm_scores: Mapping[int, float], reference_scores: Mapping[int, float],
    *, basis: str = "equal steps",
) -> Comparison:
    """`arm` minus `reference` on every seed both have (sorted); ValueError when they share none."""
    seeds = tuple(sorted(set(arm_scores) & set(reference_scores)))
    if not seeds:
        raise ValueError(f"arms {arm!r} and {reference!r} share no seed to pair")
    diffs = tuple(float(arm_scores[s]) - float(reference_scores[s]) for s in seeds)
    summary = describe(diffs)
    low, high = paired_interval(diffs)
    return Comparison(arm, reference, seeds, diffs, summary.mean, summary.sd, low, high, basis)
