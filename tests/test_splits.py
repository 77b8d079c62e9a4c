import numpy as np
import pytest
import torch

from maskkit.data.splits import stratified_split


def _labels(seed=0):
    rng = np.random.default_rng(seed)
    return rng.choice([0, 1, 2, 3], size=1003, p=[0.5, 0.3, 0.15, 0.05])


def test_disjoint_covering_and_sizes():
    labels = _labels()
    parts = stratified_split(labels, {"pretrain": 0.5, "train": 0.3, "val": 0.2}, seed=1)
    assert list(parts) == ["pretrain", "train", "val"]
    allidx = np.concatenate(list(parts.values()))
    assert len(allidx) == len(labels)
    assert np.array_equal(np.sort(allidx), np.arange(len(labels)))  # disjoint and covering
    for name, frac in [("pretrain", 0.5), ("train", 0.3), ("val", 0.2)]:
        assert parts[name].dtype == np.int64
        # per class rounding is off by < 1 sample per class (4 classes)
        assert abs(len(parts[name]) - frac * len(labels)) < 4


def test_stratified_per_class():
    labels = _labels()
    parts = stratified_split(labels, {"train": 0.8, "val": 0.2}, seed=0)
    for cls in range(4):
        n_cls = int((labels == cls).sum())
        for name, frac in [("train", 0.8), ("val", 0.2)]:
            got = int((labels[parts[name]] == cls).sum())
            assert abs(got - frac * n_cls) < 1.0, (cls, name, got, frac * n_cls)


def test_deterministic_and_seed_dependent():
    labels = torch.as_tensor(_labels())
    a = stratified_split(labels, [0.8, 0.2], seed=3)
    b = stratified_split(labels, [0.8, 0.2], seed=3)
    c = stratified_split(labels, [0.8, 0.2], seed=4)
    assert list(a) == ["0", "1"]
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["1"], c["1"])


def test_string_labels():
    labels = ["cat"] * 10 + ["dog"] * 20
    parts = stratified_split(labels, {"a": 0.5, "b": 0.5}, seed=0)
    arr = np.asarray(labels)
    assert (arr[parts["a"]] == "cat").sum() == 5 and (arr[parts["a"]] == "dog").sum() == 10


@pytest.mark.parametrize(
    "fractions, match",
    [
        ({"a": 0.5, "b": 0.4}, "sum to 1"),
        ({"a": 1.2, "b": -0.2}, "positive"),
        ({}, "at least one"),
        ({"a": "x"}, "numbers"),
    ],
)
def test_bad_fractions(fractions, match):
    with pytest.raises(ValueError, match=match):
        stratified_split([0, 1, 0, 1], fractions, seed=0)


def test_bad_labels():
    with pytest.raises(ValueError, match="one-dimensional"):
        stratified_split(np.zeros((2, 2)), [0.5, 0.5])
    with pytest.raises(ValueError, match="empty"):
        stratified_split([], [0.5, 0.5])
    with pytest.raises(TypeError, match="fractions"):
        stratified_split([0, 1], 0.5)
