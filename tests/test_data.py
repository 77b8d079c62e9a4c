"""maskkit.data: loading (digits, npz, imagefolder), splits, statistics, augmentation, batch streams."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from maskkit.data import (
    Batcher,
    BatchStream,
    DataError,
    ImageData,
    channel_stats,
    check_classes,
    denormalize,
    imagefolder_layout,
    load_dataset,
    load_imagefolder,
    load_npz,
    make_splits,
    normalize,
    parse_dataset,
    random_resized_crop_flip,
    resolve_augment,
)


def pixels_of(folder):
    """Every image of a lazy folder source as uint8 [N, C, H, W] (what the eager loader used to hold)."""
    return torch.stack([folder.pixels(i) for i in range(len(folder))])


def test_digits_is_bundled_and_scaled():
    data = load_dataset("digits")
    assert tuple(data.images.shape) == (1797, 1, 8, 8)
    assert data.images.min() == 0 and data.images.max() == 1
    assert data.num_classes == 10 and data.labels.tolist().count(0) == 178
    from sklearn.datasets import load_digits

    np.testing.assert_allclose(data.images[5, 0].numpy(), load_digits().images[5] / 16.0, rtol=1e-6)


@pytest.mark.parametrize("name", ["imagenet", "npz", "folder:x", "npz:"])
def test_unknown_dataset_names(name):
    with pytest.raises(DataError):
        parse_dataset(name)


def test_npz_layouts_are_equivalent(tmp_path):
    rng = np.random.default_rng(0)
    nchw = rng.integers(0, 256, size=(6, 3, 5, 7), dtype=np.uint8)
    labels = np.array([3, 1, 3, 1, 2, 2])
    np.savez(tmp_path / "nchw.npz", images=nchw, labels=labels)
    np.savez(tmp_path / "nhwc.npz", images=nchw.transpose(0, 2, 3, 1), labels=labels)
    np.savez(tmp_path / "float.npz", images=nchw.astype(np.float32) / 255.0, labels=labels)
    a, b, c = (load_npz(tmp_path / f"{n}.npz") for n in ("nchw", "nhwc", "float"))
    assert a.images.dtype == torch.uint8 and tuple(a.images.shape) == (6, 3, 5, 7)
    assert torch.equal(a.images, b.images)
    torch.testing.assert_close(c.floats(slice(None)), a.floats(slice(None)))
    assert a.labels.tolist() == [2, 0, 2, 0, 1, 1] and a.classes == ["1", "2", "3"]  # remapped to 0..K-1
    grey = rng.random((4, 6, 6)).astype(np.float64)
    np.savez(tmp_path / "grey.npz", images=grey)
    d = load_npz(tmp_path / "grey.npz")
    assert tuple(d.images.shape) == (4, 1, 6, 6) and d.labels is None


@pytest.mark.parametrize(
    "arrays, message",
    [({"pixels": np.zeros((2, 4, 4), np.uint8)}, "no array 'images'"),
     ({"images": np.zeros((3, 4, 4), np.uint8), "labels": np.zeros(2)}, "3 images but 2 labels"),
     ({"images": np.full((2, 4, 4), 2.0)}, "must lie in \\[0, 1\\]"),
     ({"images": np.zeros((2, 4), np.uint8)}, "must be \\[N,H,W\\]"),
     ({"images": np.zeros((2, 4, 4), np.int32)}, "uint8 or float"),
     ({"images": np.zeros((2, 4, 4), np.uint8), "labels": np.array([0.5, 1.0])}, "integers or strings")],
)
def test_bad_npz(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=message):
        load_npz(tmp_path / "bad.npz")


def test_npz_with_pickled_objects_is_refused(tmp_path):
    np.savez(tmp_path / "obj.npz", images=np.array([{"a": 1}], dtype=object))
    with pytest.raises(DataError, match="cannot read npz"):
        load_npz(tmp_path / "obj.npz")


def test_imagefolder(tmp_path):
    for cls, value in (("cats", 10), ("dogs", 200)):
        (tmp_path / "lab" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((6, 6, 3), value + i, np.uint8)).save(tmp_path / "lab" / cls / f"{i}.png")
    data = load_imagefolder(tmp_path / "lab")
    assert tuple(pixels_of(data).shape) == (6, 3, 6, 6) and data.classes == ["cats", "dogs"]
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 1] and pixels_of(data)[4, 0, 0, 0] == 201
    (tmp_path / "flat").mkdir()
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(tmp_path / "flat" / "a.png")
    flat = load_imagefolder(tmp_path / "flat", img_size=8)
    assert flat.labels is None and tuple(pixels_of(flat).shape) == (1, 1, 8, 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is empty"):
        load_imagefolder(tmp_path / "empty")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("mnist", tmp_path / "missing")


def test_splits_are_disjoint_stratified_and_seeded():
    data = load_dataset("digits")
    parts = make_splits(data, seed=3)
    train, val, test = parts["train"], parts["val"], parts["test"]
    assert len(train) + len(val) + len(test) == len(data)
    assert not (set(train) & set(val) or set(train) & set(test) or set(val) & set(test))
    labels = data.labels.numpy()
    for cls in range(10):  # every class is split 70/10/20 within one sample
        n = (labels == cls).sum()
        assert abs((labels[test] == cls).sum() - 0.2 * n) < 1
    again = make_splits(data, seed=3, fractions={"test": 0.2, "val": 0.1, "train": 0.7})  # key order is irrelevant
    assert all(np.array_equal(parts[k], again[k]) for k in parts)
    assert not np.array_equal(parts["test"], make_splits(data, seed=4)["test"])


def test_channel_stats_and_normalisation():
    data = load_dataset("digits")
    index = np.arange(0, 1797, 3)
    mean, std = channel_stats(data, index)
    x = data.images[index].numpy().astype(np.float64)
    assert mean[0] == pytest.approx(x.mean()) and std[0] == pytest.approx(x.std())
    z = normalize(data.floats(index), mean, std)
    assert float(z.mean()) == pytest.approx(0.0, abs=1e-5) and float(z.std(unbiased=False)) == pytest.approx(1.0, abs=1e-4)
    torch.testing.assert_close(denormalize(z, mean, std), data.floats(index))


def test_batch_stream_epochs_and_exact_resume():
    stream = BatchStream(np.arange(10, 20), batch_size=3, seed=0)
    epoch = np.concatenate([stream.next() for _ in range(3)])
    assert len(set(epoch.tolist())) == 9 and set(epoch.tolist()) <= set(range(10, 20))
    state = stream.state_dict()
    ahead = [stream.next().tolist() for _ in range(5)]
    fresh = BatchStream(np.arange(10, 20), batch_size=3, seed=0)
    fresh.load_state_dict(state)
    assert [fresh.next().tolist() for _ in range(5)] == ahead
    assert BatchStream(np.arange(4), batch_size=99, seed=0).batch_size == 4
    with pytest.raises(ValueError, match="different batch size"):
        BatchStream(np.arange(10, 20), batch_size=2, seed=0).load_state_dict(state)


def test_crop_flip_is_seeded_and_full_crop_is_identity_or_flip():
    x = torch.rand(4, 3, 32, 32)
    a = random_resized_crop_flip(x, torch.Generator().manual_seed(0))
    b = random_resized_crop_flip(x, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == x.shape and not torch.equal(a, x)
    full = random_resized_crop_flip(x, torch.Generator().manual_seed(1), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    for i in range(4):
        same = torch.allclose(full[i], x[i], atol=1e-5)
        flipped = torch.allclose(full[i], x[i].flip(-1), atol=1e-5)
        assert same or flipped


def test_augment_policy_and_batcher():
    assert resolve_augment("auto", (8, 8)) == "none"
    assert resolve_augment("auto", (32, 32)) == "crop-flip"
    with pytest.raises(ValueError):
        resolve_augment("rotate", (8, 8))
    data = load_dataset("digits")
    batcher = Batcher(data, [0.5], [0.25], torch.device("cpu"))
    idx = np.array([0, 5])
    torch.testing.assert_close(batcher.images(idx), (data.floats(idx) - 0.5) / 0.25)
    assert batcher.labels(idx).tolist() == [0, 5]


def test_check_classes_wants_two_classes_that_hold_images():
    images = torch.zeros(6, 1, 4, 4)
    check_classes(ImageData("two", images, torch.tensor([0, 1, 0, 1, 0, 1]), ["a", "b"]), "evaluation")
    with pytest.raises(DataError, match=r"evaluation needs labels of at least 2 classes, but dataset 'one' has 1 \(cats\)"):
        check_classes(ImageData("one", images, torch.zeros(6, dtype=torch.long), ["cats"]), "evaluation")
    # a second class folder without images does not count
    with pytest.raises(DataError, match=r"has 1 \(dogs\)"):
        check_classes(ImageData("empty-class", images, torch.ones(6, dtype=torch.long), ["cats", "dogs"]), "x")
    with pytest.raises(DataError, match="but dataset 'none' has none"):
        check_classes(ImageData("none", images, None), "x")


def _pngs(folder, values, side=6):
    folder.mkdir(parents=True)
    for i, value in enumerate(values):
        Image.fromarray(np.full((side, side), value, np.uint8)).save(folder / f"{i}.png")


def test_imagefolder_official_mae_layout_pools_train_and_val_by_class_name(tmp_path):
    root = tmp_path / "mae"
    _pngs(root / "train" / "cats", [10, 11, 12])
    _pngs(root / "train" / "dogs", [20, 21])
    _pngs(root / "val" / "dogs", [30])
    _pngs(root / "val" / "eels", [40, 41])  # a class only the val folder has
    assert imagefolder_layout(root) == ("train/val folders", [root / "train", root / "val"])
    data = load_imagefolder(root)
    assert data.layout == "train/val folders" and data.classes == ["cats", "dogs", "eels"]  # not "train", "val"
    pixels = pixels_of(data)[:, 0, 0, 0].tolist()
    assert pixels == [10, 11, 12, 20, 21, 30, 40, 41]  # every image of both folders, in one pool
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2]  # labelled by class name across the folders
    assert load_dataset(f"imagefolder:{root}", img_size=4).layout == "train/val folders"  # kept by a resize
    # the other layouts say what they are
    _pngs(tmp_path / "classes" / "train", [1, 2])
    _pngs(tmp_path / "classes" / "other", [3])
    assert load_imagefolder(tmp_path / "classes").layout == "class folders"  # "train" among other classes
    _pngs(tmp_path / "loose", [5, 6])
    assert load_imagefolder(tmp_path / "loose").layout == "loose images"
    _pngs(tmp_path / "split-loose" / "train", [1, 2])
    _pngs(tmp_path / "split-loose" / "val", [3])
    unlabeled = load_imagefolder(tmp_path / "split-loose")
    assert unlabeled.labels is None and unlabeled.layout == "train/val folders, loose images" and len(unlabeled) == 3
    _pngs(tmp_path / "mixed" / "train" / "cats", [1])
    _pngs(tmp_path / "mixed" / "val", [2])
    with pytest.raises(DataError, match="train holds class folders but val holds loose images"):
        load_imagefolder(tmp_path / "mixed")
