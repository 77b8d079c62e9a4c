"""Choosing a grid value on the validation split: the highest mean score over the selection seeds.

`choose` asks its `score(value, seed, split)` for validation scores only; it never names the test
split, so no test score can steer a choice (tests/test_ablate_select.py holds it to that with a scorer
that raises on "test"). Ties go to the value listed first.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from .study import Selection

__all__ = ["Choice", "choose"]

#: the only split a selection reads
SPLIT = "val"


@dataclass(frozen=True)
class Choice:
    """A grid's validation scores, value -> {seed: score}, and the value chosen."""

    option: str
    by: str
    scores: dict[str, dict[int, float]]
    chosen: str

    def to_dict(self) -> dict:
        return {"option": self.option, "by": self.by, "chosen": self.chosen, "split": SPLIT,
                "scores": {v: {str(s): x for s, x in per.items()} for v, per in self.scores.items()}}  # fmt: skip


def choose(selection: Selection, score: Callable[[str, int, str], float]) -> Choice:
    """The value of `selection` with the highest mean validation score over its seeds."""
    scores = {value: {seed: float(score(value, seed, SPLIT)) for seed in selection.seeds} for value in selection.values}
    for value, per in scores.items():
        if not all(math.isfinite(x) for x in per.values()):
            raise ValueError(f"grid value {selection.option} {value} has a non-finite validation score")
    means = {value: math.fsum(per.values()) / len(per) for value, per in scores.items()}
    best = max(selection.values, key=lambda v: (means[v], -selection.values.index(v)))
    return Choice(selection.option, selection.by, scores, best)
