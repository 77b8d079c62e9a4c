"""Seeded, label-stratified splits: `stratified_split` of any labels into disjoint named subsets (MLO-MAE's
80/20), and `make_splits` of a data source into maskkit's `train` / `val` / `test`.

    parts = stratified_split(labels, {"train": 0.8, "val": 0.2}, seed=0)
    parts["train"], parts["val"]  # int64 index arrays, disjoint, together covering every sample

Each class is shuffled with the seed and cut by the fractions, so every subset holds (close to)
the same class proportions as the whole. Rounding is done per class by largest remainder, so
subset sizes within a class differ from the exact fractions by less than one sample.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from maskkit.data.source import DataError, DataSource

#: default split fractions: pretraining/labeled train, masker validation, test.
DEFAULT_FRACTIONS = {"train": 0.7, "val": 0.1, "test": 0.2}


def make_splits(data: DataSource, seed: int, fractions: dict[str, float] | None = None) -> dict[str, np.ndarray]:
    """Disjoint `train`, `val`, `test` index arrays, stratified by label when there are labels.

    A source with its own division (`given_splits`: the official MAE layout's train and val folders)
    keeps it: see `official_splits`, which adds `pretrain` (the whole train folder).
    """
    given = DEFAULT_FRACTIONS if fractions is None else fractions
    if set(given) != set(DEFAULT_FRACTIONS):
        raise ValueError(f"split fractions must name {', '.join(DEFAULT_FRACTIONS)}, got {sorted(given)}")
    fractions = {name: given[name] for name in DEFAULT_FRACTIONS}  # a fixed order: the cut depends on it
    labels = np.zeros(len(data), dtype=np.int64) if data.labels is None else data.labels.numpy()
    official = getattr(data, "given_splits", None)
    if official is not None:
        parts = official_splits(labels, official, fractions, seed)
    else:
        parts = stratified_split(labels, fractions, seed, allow_empty=True)
    empty = [name for name, idx in parts.items() if len(idx) == 0]
    if empty:
        raise DataError(f"dataset {data.name!r} has too few images ({len(data)}) for a non-empty {empty[0]!r} "
                        f"split: {_counts(parts)}")  # fmt: skip
    return parts


def official_splits(
    labels: np.ndarray, given: Mapping[str, np.ndarray], fractions: Mapping[str, float], seed: int
) -> dict[str, np.ndarray]:
    """The official MAE layout's splits: `pretrain` is all of the given train folder, `train` and `val` are
    carved from it (seeded, stratified, in the ratio of their fractions), `test` is the given test folder."""
    pool, test = np.asarray(given["train"], dtype=np.int64), np.asarray(given["test"], dtype=np.int64)
    carve = {"train": fractions["train"], "val": fractions["val"]}
    total = sum(carve.values())
    cut = stratified_split(labels[pool], {k: v / total for k, v in carve.items()}, seed, allow_empty=True)
    return {"train": pool[cut["train"]], "val": pool[cut["val"]], "test": test, "pretrain": pool}


def split_rule(data: DataSource) -> str:
    """How `make_splits` divides `data`, in words (the banner, config.json's `dataset.split_rule`)."""
    if getattr(data, "given_splits", None) is None:
        return "seeded stratified split of all images"
    test = getattr(data, "test_folder", None) or "val"
    return f"train folder pretrains (labeled train and val carved from it); {test} folder is the test split"


def test_split_name(split_rule: str | None) -> str:
    """What the test split is, by a record's split rule: 'the val folder' (official layout) or 'the test split'."""
    if split_rule and split_rule.startswith("train folder pretrains"):
        return "the " + split_rule.rsplit("; ", 1)[1].split(" is the test split")[0]
    return "the test split"


def _counts(parts: Mapping[str, np.ndarray]) -> str:
    return ", ".join(f"{name} {len(idx)}" for name, idx in parts.items())


def stratified_split(
    labels: Any,
    fractions: Mapping[str, float] | Sequence[float],
    seed: int = 0,
    *,
    allow_empty: bool = False,
) -> dict[str, np.ndarray]:
    """Split indices 0..n-1 into disjoint subsets with the given fractions, stratified by label.

    Args:
        labels: [n] class labels (any hashable values: ints, strings; a list, array or tensor).
        fractions: {"name": fraction} (or a sequence, named "0", "1", ...); positive, summing to 1.
        seed: seed of the per-class shuffle; the same seed gives the same split.
        allow_empty: return an empty subset instead of refusing it (a DataError naming the subset
            and the counts: a run or the MLO engine needs every split it is given to hold images).

    Returns:
        {name: sorted int64 indices}, in the order of `fractions`.
    """
    names, fracs = _parse_fractions(fractions)
    labels = _as_label_array(labels)
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in names]
    classes = np.unique(labels)
    for cls in classes:
        idx = np.flatnonzero(labels == cls)
        idx = idx[rng.permutation(len(idx))]
        counts = _largest_remainder(len(idx), fracs)
        start = 0
        for part, count in zip(parts, counts, strict=False):
            part.append(idx[start : start + count])
            start += count
    result = {
        name: np.sort(np.concatenate(part)).astype(np.int64) if part else np.zeros(0, dtype=np.int64)
        for name, part in zip(names, parts, strict=False)
    }
    empty = [name for name, idx in result.items() if len(idx) == 0]
    if empty and not allow_empty:
        raise DataError(f"split {empty[0]!r} would be empty ({_counts(result)}; {len(labels)} samples in "
                        f"{len(classes)} classes); give it a larger fraction or more samples")  # fmt: skip
    return result


def _largest_remainder(n: int, fracs: np.ndarray) -> np.ndarray:
    """Integer counts summing to n, as close to n * fracs as possible (Hamilton's method)."""
    exact = n * fracs
    counts = np.floor(exact).astype(np.int64)
    short = n - int(counts.sum())
    if short:
        order = np.argsort(-(exact - counts), kind="stable")  # largest remainders first
        counts[order[:short]] += 1
    return counts


def _parse_fractions(fractions: Any) -> tuple[list[str], np.ndarray]:
    if isinstance(fractions, Mapping):
        names = [str(k) for k in fractions]
        values = list(fractions.values())
    elif isinstance(fractions, Sequence) and not isinstance(fractions, (str, bytes)):
        names = [str(i) for i in range(len(fractions))]
        values = list(fractions)
    else:
        raise TypeError(f"fractions must be a dict of name -> fraction or a sequence, got {type(fractions).__name__}")
    if not values:
        raise ValueError("fractions must name at least one subset")
    try:
        fracs = np.asarray([float(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"fractions must be numbers, got {values!r}") from None
    if not np.all(np.isfinite(fracs)) or np.any(fracs <= 0):
        raise ValueError(f"every fraction must be a positive number, got {values!r}")
    if abs(fracs.sum() - 1.0) > 1e-6:
        raise ValueError(f"fractions must sum to 1, got {values!r} (sum {fracs.sum():g})")
    return names, fracs / fracs.sum()


def _as_label_array(labels: Any) -> np.ndarray:
    if hasattr(labels, "detach"):  # torch tensor
        labels = labels.detach().cpu().numpy()
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError("labels is empty: nothing to split")
    return arr
