"""Keyed crop + flip (`crop_flip`): a sample's augmentation depends on its key alone (not on the batch
around it, its order, the process or the number of ranks), follows RandomResizedCrop's box rule, and the
`Loader` built on it gives every rank its exact part of the single-process batch."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from maskkit.data import Batcher, ImageData, Loader, crop_box, crop_flip, key_seed, normalize

KEYS = [(7, 3, p) for p in range(6)]


def _images(n=6, h=32, w=32):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(0))


def test_same_keys_same_crops_whatever_the_batch():
    x = _images()
    whole = crop_flip(x, KEYS)
    halves = torch.cat([crop_flip(x[:3], KEYS[:3]), crop_flip(x[3:], KEYS[3:])])
    assert torch.equal(halves, whole)
    perm = [4, 0, 5, 2, 1, 3]
    assert torch.equal(crop_flip(x[perm], [KEYS[i] for i in perm]), whole[perm])
    assert torch.equal(crop_flip(x[2:3], [KEYS[2]]), whole[2:3])  # alone
    assert not torch.equal(whole, x)


def test_different_keys_give_different_crops():
    x = _images()
    a = crop_flip(x, KEYS)
    for other in ([(8, 3, p) for p in range(6)], [(7, 4, p) for p in range(6)], [(7, 3, p + 6) for p in range(6)]):
        b = crop_flip(x, other)
        assert all(not torch.equal(a[i], b[i]) for i in range(6))
    assert len({key_seed(k) for k in KEYS}) == len(KEYS)
    with pytest.raises(ValueError, match="one key per image"):
        crop_flip(x, KEYS[:2])


def test_crop_box_by_hand():
    h = w = 32
    u = [0.5, 0.5, 0.25, 0.75] + [0.0] * 37
    # area 32*32*(0.2 + 0.8*0.5) = 614.4, aspect e^0 = 1 -> side round(24.79) = 25; top int(0.25*8), left int(0.75*8)
    assert crop_box(u, h, w) == (2, 6, 25, 25)
    # try 1: whole area at aspect 4/3 -> w = round(sqrt(1024*4/3)) = 37 > 32, rejected; try 2 is the one above
    u2 = [1.0, 1.0, 0.9, 0.9] + u[:4] + [0.0] * 33
    assert crop_box(u2, h, w) == (2, 6, 25, 25)
    # every try rejected -> central crop with the aspect clamped: 20/32 < 3/4 -> w = 20, h = round(20/0.75) = 27
    never = [1.0, 1.0, 0.0, 0.0] * 10 + [0.0]
    assert crop_box(never, 32, 20) == (2, 0, 27, 20)
    assert crop_box(never, 32, 32) == (0, 0, 32, 32)  # square input: the whole image


def _rrc_reference(u, height, width, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop.get_params with its uniform draws replaced by `u` (written apart)."""
    area = height * width
    for t in range(10):
        target_area = area * (scale[0] + u[4 * t] * (scale[1] - scale[0]))
        lo, hi = math.log(ratio[0]), math.log(ratio[1])
        aspect_ratio = math.exp(lo + u[4 * t + 1] * (hi - lo))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            return math.floor(u[4 * t + 2] * (height - h + 1)), math.floor(u[4 * t + 3] * (width - w + 1)), h, w
    raise AssertionError("the fixed draws below always fit")


@pytest.mark.parametrize("shape", [(32, 32), (40, 24)])
def test_keyed_crop_follows_random_resized_crop(shape):
    x = _images(4, *shape)
    out = crop_flip(x, KEYS[:4])
    for b, key in enumerate(KEYS[:4]):
        u = torch.rand(41, generator=torch.Generator().manual_seed(key_seed(key))).tolist()
        top, left, h, w = _rrc_reference(u, *shape)
        assert crop_box(u, *shape) == (top, left, h, w)
        want = F.interpolate(x[b : b + 1, :, top : top + h, left : left + w], size=shape, mode="bicubic",
                             align_corners=False)[0]  # fmt: skip
        want = want.flip(-1) if u[40] < 0.5 else want
        torch.testing.assert_close(out[b], want, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_keyed_crop_is_the_same_in_another_process():
    code = ("import torch; from maskkit.data import crop_flip; "
            "x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0)); "
            f"print(repr(crop_flip(x, {KEYS!r}).double().sum().item()))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={"PYTHONHASHSEED": "123", "PATH": ""})  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) == crop_flip(_images(), KEYS).double().sum().item()


def test_batcher_keys_and_generator_paths():
    data = ImageData("x", (_images(5) * 255).to(torch.uint8), None)
    batcher = Batcher(data, [0.4] * 3, [0.2] * 3, torch.device("cpu"), "crop-flip")
    idx = np.array([3, 1, 4])
    keys = [(0, 0, 0), (0, 0, 1), (0, 0, 2)]
    assert torch.equal(batcher.images(idx, keys=keys), normalize(crop_flip(data.floats(idx), keys), [0.4] * 3, [0.2] * 3))
    assert torch.equal(batcher.images(idx), normalize(data.floats(idx), [0.4] * 3, [0.2] * 3))  # neither: plain
    plain = Batcher(data, [0.4] * 3, [0.2] * 3, torch.device("cpu"), "none")
    assert torch.equal(plain.images(idx, keys=keys), batcher.images(idx))


@pytest.mark.parametrize("world", [2, 3])
def test_loader_shards_are_parts_of_the_single_process_batch(world):
    data = ImageData("x", (torch.rand(40, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8),
                     torch.arange(40) % 4)  # fmt: skip
    batcher = Batcher(data, [0.5] * 3, [0.3] * 3, torch.device("cpu"), "crop-flip")
    indices = np.arange(3, 39)
    single = Loader(batcher, indices, 4 * world, seed=2)
    ranks = [Loader(batcher, indices, 4, seed=2, rank=r, world_size=world) for r in range(world)]
    assert all(r.batch_size == 4 for r in ranks) and single.batch_size == 4 * world
    assert ranks[0].batches_per_epoch == single.batches_per_epoch
    for _ in range(2 * single.batches_per_epoch + 1):  # across epoch boundaries
        whole = single.next()
        parts = [r.next() for r in ranks]
        assert np.array_equal(np.concatenate([p.index for p in parts]), whole.index)
        assert torch.equal(torch.cat([p.images for p in parts]), whole.images)
        assert torch.equal(torch.cat([p.labels for p in parts]), whole.labels)
    assert ranks[1].state_dict() == single.state_dict()  # the stream's state: a global batch position
    with pytest.raises(ValueError, match="too small for 3 processes"):
        Loader(batcher, np.arange(2), 4, seed=0, world_size=3)


def test_loader_without_augmentation_is_todays_stream_shard_and_batcher():
    from maskkit.data import BatchStream, load_dataset, make_splits, shard

    data = load_dataset("digits")
    train = make_splits(data, seed=0)["train"]
    batcher = Batcher(data, [0.3], [0.4], torch.device("cpu"))
    stream = BatchStream(train, 16 * 2, seed=0)  # what the trainer's _stream / _shard / images do on rank 1 of 2
    loader = Loader(batcher, train, 16, seed=0, rank=1, world_size=2)
    for _ in range(5):
        index = shard(stream.next(), 1, 2)
        got = loader.next()
        assert np.array_equal(got.index, index) and torch.equal(got.images, batcher.images(index))
        assert torch.equal(got.labels, batcher.labels(index))
    flipping = Batcher(data, [0.3], [0.4], torch.device("cpu"), "crop-flip")
    plain = Loader(flipping, train, 16, seed=0, augment=False).next()
    assert torch.equal(plain.images, batcher.images(plain.index))
