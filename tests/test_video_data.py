"""Clips in the data layer: the movingdigits default (seeded, balanced, its label only in the motion), clips
through the loader (any number of workers, exact mid-epoch resume, one crop per clip), statistics and
normalisation over [B, C, T, H, W], and bad clips from a plug-in source in one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from maskkit.data import (
    CLIP_AUGMENT_MIN_SIDE,
    DATASETS,
    Batcher,
    BatchStream,
    DataError,
    ImageData,
    Loader,
    Source,
    channel_stats,
    crop_flip,
    data_fingerprint,
    denormalize,
    frames_of,
    load_dataset,
    make_splits,
    moving_digits,
    normalize,
    register_dataset,
    resize,
    resolve_augment,
)
from maskkit.data.augment import key_draws

CPU = torch.device("cpu")


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


# ---- movingdigits ---------------------------------------------------------------------------------------


def test_movingdigits_is_seeded_balanced_and_shaped_as_its_options_say():
    a, la = moving_digits(count=42, frames=5, side=12, seed=3)
    b, lb = moving_digits(count=42, frames=5, side=12, seed=3)
    c, lc = moving_digits(count=42, frames=5, side=12, seed=4)
    assert a.dtype == torch.uint8 and tuple(a.shape) == (42, 1, 5, 12, 12)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(a, c) and not torch.equal(la, lc)
    assert sorted(torch.bincount(la, minlength=4).tolist()) == [10, 10, 11, 11]  # 42 = 4 x 10 + 2
    data = load_dataset("movingdigits,count=42,side=12,seed=3", num_frames=5)
    assert torch.equal(data.images, a) and torch.equal(data.labels, la)
    assert frames_of(data) == 5 and data.image_size == (12, 12) and data.classes == ["left", "right", "up", "down"]
    assert frames_of(load_dataset("digits")) is None
    small = load_dataset("movingdigits,count=42,side=12,seed=3", img_size=6, num_frames=5)  # every frame resized
    assert tuple(small.images.shape) == (42, 1, 5, 6, 6) and frames_of(small) == 5
    assert torch.equal(small.images[:, :, 2], resize(data.floats(slice(None))[:, :, 2].contiguous(), 6))


def test_movingdigits_splits_are_balanced_and_auto_augment_leaves_its_clips_alone():
    data = load_dataset("movingdigits,count=400,side=16", num_frames=2)
    for name, idx in make_splits(data, seed=0).items():
        counts = torch.bincount(data.labels[idx], minlength=4)
        assert int(counts.max() - counts.min()) <= 1, name
    assert resolve_augment("auto", data.image_size, frames_of(data)) == "none"
    assert resolve_augment("auto", (CLIP_AUGMENT_MIN_SIDE,) * 2, 16) == "crop-flip"
    assert resolve_augment("auto", (32, 32)) == "crop-flip"  # images: as before


def _shift_products(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[N, 25]: sum over pixels of a * b shifted by each (dr, dc) in [-2, 2]^2: features that do not depend
    on where the digits are (a linear model on raw pixels cannot see a motion at a uniform position)."""
    shifts = [(r, c) for r in range(-2, 3) for c in range(-2, 3)]
    return np.stack([(a * np.roll(b, s, axis=(-2, -1))).sum(axis=(-2, -1)) for s in shifts], axis=1)


def test_one_frame_does_not_tell_the_label_but_two_frames_do():
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    clips, labels = moving_digits(count=400, frames=2, side=16, seed=1)
    x = clips[:, 0].numpy() / 255.0  # [N, T, S, S]
    y = labels.numpy()

    def accuracy(features: np.ndarray) -> float:
        a, b, ya, yb = train_test_split(features, y, test_size=0.5, stratify=y, random_state=0)
        return LogisticRegression(max_iter=5000).fit(a, ya).score(b, yb)

    first, second = x[:, 0], x[:, 1]
    assert accuracy(first.reshape(len(x), -1)) < 0.4  # chance is 0.25: the pixels of one frame
    assert accuracy(_shift_products(first, first)) < 0.4  # the same position-free features, on one frame
    assert accuracy(_shift_products(second, first)) > 0.9  # ... across two frames: the motion


def test_the_sampling_rate_shows_every_rate_th_step_of_the_same_motion():
    every, _ = moving_digits(count=8, frames=9, side=12, seed=2)
    strided, _ = moving_digits(count=8, frames=5, side=12, seed=2, rate=2)
    assert torch.equal(strided, every[:, :, ::2])
    assert torch.equal(load_dataset("movingdigits,count=8,side=12,seed=2", num_frames=5, sampling_rate=2).images,
                       strided)  # fmt: skip


def test_a_bad_movingdigits_setting_is_one_line():
    for spec, settings, message in [
        ("movingdigits", {"num_frames": 1}, "--num-frames must be an integer >= 2, got 1"),
        ("movingdigits", {"sampling_rate": 0}, "--sampling-rate must be an integer >= 1, got 0"),
        ("movingdigits,side=many", {}, "option side must be an integer >= 8, got 'many'"),
        ("movingdigits,count=3", {}, "option count must be an integer >= 4, got '3'"),
    ]:
        with pytest.raises(DataError) as err:
            load_dataset(spec, **settings)
        assert one_line(err) == f"dataset 'movingdigits': {message}"


# ---- statistics, normalisation, resizing and crops on clips ---------------------------------------------


def random_clips(n: int = 6, c: int = 3, t: int = 4, side: int = 10, seed: int = 0) -> ImageData:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, c, t, side, side), generator=gen, dtype=torch.uint8)  # [N, C, T, H, W]
    return ImageData("clips", images, torch.arange(n) % 2, ["a", "b"])


def test_channel_stats_and_normalize_on_clips_match_numpy():
    data = random_clips()
    index = np.array([0, 2, 3, 5])
    mean, std = channel_stats(data, index, chunk=3)
    x = (data.images.numpy()[index] / np.float32(255.0)).astype(np.float64)  # [4, C, T, H, W], float32 as read
    np.testing.assert_allclose(mean, x.mean(axis=(0, 2, 3, 4)), rtol=1e-12)
    np.testing.assert_allclose(std, x.std(axis=(0, 2, 3, 4)), rtol=1e-9)
    z = normalize(data.floats(index), mean, std)
    want = (x - np.array(mean)[None, :, None, None, None]) / np.array(std)[None, :, None, None, None]
    np.testing.assert_allclose(z.numpy(), want, rtol=0, atol=1e-5)
    torch.testing.assert_close(denormalize(z, mean, std), data.floats(index))
    batcher = Batcher(data, mean, std, CPU)
    torch.testing.assert_close(batcher.images(index), z)


def test_a_clip_is_resized_and_cropped_frame_by_frame_with_one_box():
    clips = random_clips(n=3, c=2, t=5, side=12).floats(slice(None))  # [3, 2, 5, 12, 12]
    resized = resize(clips, 7)
    for t in range(5):
        assert torch.equal(resized[:, :, t], resize(clips[:, :, t].contiguous(), 7))
    keys = [(9, 0, p) for p in range(3)]
    cropped = crop_flip(clips, keys)  # one box and flip per clip ...
    assert cropped.shape == clips.shape and not torch.equal(cropped, clips)
    for t in range(5):  # ... the box and flip each frame gets as an image with the clip's key
        torch.testing.assert_close(cropped[:, :, t], crop_flip(clips[:, :, t].contiguous(), keys), rtol=0, atol=1e-6)


# ---- the loader on clips ----------------------------------------------------------------------------------


class ClipFiles(Source):
    """A clip source read one sample at a time through `pixels(i, draws)`, as a decoding source is: uint8
    [1, 3, 6, 6] clips whose pixels encode (i, draws[0]), so the test sees what the Batcher passed."""

    name, classes, num_frames = "clipfiles", ["a", "b"], 3

    def __init__(self, **_):
        self.labels = torch.arange(20) % 2

    def __len__(self):
        return 20

    def pixels(self, i, draws=None):
        base = torch.arange(3 * 36, dtype=torch.int64).reshape(1, 3, 6, 6)  # [C, T, H, W]
        shift = 0 if draws is None else int(draws[0] * 50)
        return ((base + 7 * i + shift) % 256).to(torch.uint8)

    def read(self, i):
        return self.pixels(i).float() / 255.0


def batches(data, workers: int, n: int, *, augment: str, state=None):
    batcher = Batcher(data, [0.5] * data.in_chans, [0.25] * data.in_chans, CPU, augment, num_workers=workers)
    loader = Loader(batcher, np.arange(len(data)), 4, seed=3)
    if state is not None:
        loader.load_state_dict(state)
    got = [loader.next() for _ in range(n)]
    out = loader.state_dict()
    loader.close()
    return got, out


@pytest.mark.parametrize("source", ["memory", "files"])
def test_clip_batches_are_the_same_for_any_number_of_workers_and_after_a_resume(source):
    data = random_clips(n=14, c=1, t=3, side=8) if source == "memory" else ClipFiles()
    whole, _ = batches(data, 0, 7, augment="crop-flip")  # 3 batches an epoch: crosses two epochs
    assert tuple(whole[0].images.shape) == ((4, 1, 3, 8, 8) if source == "memory" else (4, 1, 3, 6, 6))
    with_workers, _ = batches(data, 2, 7, augment="crop-flip")
    head, state = batches(data, 0, 4, augment="crop-flip")  # mid-epoch (batch 2 of the second epoch)
    tail, _ = batches(data, 2, 3, augment="crop-flip", state=state)
    for a, b, c in zip(whole, with_workers, head + tail, strict=True):
        assert np.array_equal(a.index, b.index) and np.array_equal(a.index, c.index)
        assert torch.equal(a.images, b.images) and torch.equal(a.images, c.images)
        assert torch.equal(a.labels, b.labels) and torch.equal(a.labels, c.labels)


def test_a_file_source_clip_passes_the_batcher_as_it_decodes_it():
    data = ClipFiles()
    index = np.array([4, 1])
    keys = [(1, 2, 0), (1, 2, 1)]
    for augment, draws in (("none", [None, None]), ("crop-flip", [key_draws(k) for k in keys])):
        got = Batcher(data, [0.5], [0.25], CPU, augment).images(index, keys=keys)  # [2, 1, 3, 6, 6]
        want = torch.stack([data.pixels(int(i), d) for i, d in zip(index, draws, strict=True)]).float() / 255.0
        assert torch.equal(got, (want - 0.5) / 0.25)


def test_fingerprints_of_clips_name_their_frames_and_images_keep_theirs():
    clips = load_dataset("movingdigits,count=8,side=8", num_frames=3)
    assert data_fingerprint(clips)["shape"] == [1, 3, 8, 8]
    assert data_fingerprint(ClipFiles())["num_frames"] == 3
    image_source = ClipFiles()
    image_source.num_frames = None
    assert "num_frames" not in data_fingerprint(image_source)


# ---- bad clips from a plug-in source: one line ------------------------------------------------------------


@pytest.fixture
def badclip():
    """`BadClip` registered as the plug-in source `badclip` for one test (the data-source suite wants a case
    for every registered source)."""
    register_dataset("badclip", arg="value")(BadClip)
    yield
    DATASETS.unregister("badclip")


class BadClip(Source):
    """8 grey clips of 4 frames 8x8 (2 classes), broken as ARG says."""

    classes = ["a", "b"]

    def __init__(self, *, arg, **_):
        self.fault, self.name = arg, f"badclip:{arg}"
        self.labels = torch.arange(8) % 2
        self.num_frames = {"zero-frames": 0, "text-frames": "4"}.get(arg, 4)

    def __len__(self):
        return 8

    @property
    def image_size(self):
        return (8, 8)

    @property
    def in_chans(self):
        return 1

    def read(self, i):
        if self.fault == "frames" and i == 5:
            return torch.zeros(1, 3, 8, 8)  # [C, T - 1, H, W]
        if self.fault == "image":
            return torch.zeros(1, 8, 8)  # [C, H, W]: an image, not a clip
        return torch.full((1, 4, 8, 8), i / 8)


@pytest.mark.parametrize("fault, message", [
    ("frames", "dataset 'badclip:frames': sample 5 has 3 frames, but the source's num_frames is 4"),
    ("image", "dataset 'badclip:image': sample {i} has shape (1, 8, 8), expected [C, T, H, W] = (1, 4, 8, 8) "
              "(in_chans, num_frames, image_size)"),
])  # fmt: skip
def test_a_plugin_clip_of_the_wrong_shape_is_one_line_where_it_is_read(badclip, fault, message):
    data = load_dataset(f"badclip:{fault}")
    assert frames_of(data) == 4
    with pytest.raises(DataError) as err:
        data.read(5)
    assert one_line(err) == message.format(i=5)
    order = BatchStream(np.arange(8), 8, 0).next()  # the batch the loader reads first
    first = 5 if fault == "frames" else int(order[0])  # its first bad sample
    loader = Loader(Batcher(data, [0.5], [0.25], CPU), np.arange(8), 8, seed=0, augment=False)
    with pytest.raises(DataError) as err:
        loader.next()
    assert one_line(err) == message.format(i=first)
    assert torch.equal(load_dataset("badclip:none").floats(np.array([2, 6]))[:, 0, :, 0, 0],
                       torch.tensor([[0.25] * 4, [0.75] * 4]))  # fmt: skip


@pytest.mark.parametrize("fault, bad", [("zero-frames", "0"), ("text-frames", "'4'")])
def test_a_plugin_source_num_frames_that_is_not_a_positive_integer_is_refused_at_load(badclip, fault, bad):
    with pytest.raises(DataError) as err:
        load_dataset(f"badclip:{fault}")
    assert one_line(err) == (f"dataset 'badclip:{fault}': num_frames must be None (images) or a positive "
                             f"integer (clips), got {bad}")  # fmt: skip


def test_clips_in_memory_of_the_wrong_rank_are_refused_at_load():
    register_dataset("sixd-test")(lambda **_: ImageData("sixd", torch.zeros(2, 1, 1, 2, 4, 4), None))
    try:
        with pytest.raises(DataError) as err:
            load_dataset("sixd-test")
        assert one_line(err) == ("dataset 'sixd-test': images must be [N, C, H, W] (clips [N, C, T, H, W]) uint8 or "
                                 "float32, got (2, 1, 1, 2, 4, 4) torch.float32")  # fmt: skip
    finally:
        DATASETS.unregister("sixd-test")

