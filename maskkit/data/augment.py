"""MAE's pretraining augmentation (random resized crop + horizontal flip) as pure functions.

Two ways to draw the random numbers, with the same crop rule (`crop_box`, torchvision's
RandomResizedCrop) and the same 41 uniform draws per image:
- `crop_flip(images, keys)`: each image's draws come from a generator seeded by a hash of its own
  key (e.g. (seed, step, global sample position)), the way masking noise is keyed in training, so
  a sample's crop depends on nothing but its key: any batch composition, order, or number of
  worker processes gives the same tensors;
- `random_resized_crop_flip(images, generator)`: the draws of image after image from one generator
  (today's trainer; its result depends on the batch's order and on the generator's history).

Clips [B, C, T, H, W] held in memory take the same functions: ONE crop box and flip per clip, drawn as
for one image, applied to every frame (a box that moved between frames would add motion the clip does
not have). A source that decodes clip files crops them itself (`pixels(i, draws)`).
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

#: smallest image side for which `auto` augmentation uses MAE's crop and flip.
AUGMENT_MIN_SIDE = 32
#: smallest clip side for which `auto` augmentation crops and flips: VideoMAE's clips are 112 or 224 px; a
#: small synthetic clip (movingdigits, 32 px) would lose its digits to a 0.2-scale crop
CLIP_AUGMENT_MIN_SIDE = 64
#: uniform draws per image: 10 tries x (area, aspect, top, left) + flip
DRAWS = 41
SCALE = (0.2, 1.0)
RATIO = (3 / 4, 4 / 3)


def resolve_augment(augment: str, image_size: tuple[int, int], num_frames: int | None = None) -> str:
    """'auto' -> 'crop-flip' for images of side >= 32 (CIFAR, ImageNet-like), else 'none'; for clips
    (`num_frames` given) of side >= CLIP_AUGMENT_MIN_SIDE (64), else 'none'.

    Tiny images (8x8 digits, 28x28 MNIST) lose too much to a 0.2-scale crop, and flips change
    what a digit is, so they are used as they are; so are small clips (movingdigits).
    """
    if augment not in ("auto", "none", "crop-flip"):
        raise ValueError(f"augment must be auto, none or crop-flip, got {augment!r}")
    if augment == "auto":
        least = AUGMENT_MIN_SIDE if num_frames is None else CLIP_AUGMENT_MIN_SIDE
        return "crop-flip" if min(image_size) >= least else "none"
    return augment


def key_seed(key: Sequence[int]) -> int:
    """A 63-bit generator seed from a tuple of integers (BLAKE2b of their 64-bit encoding; stable across
    processes and Python versions, unlike `hash`)."""
    data = struct.pack(f"<{len(key)}q", *(int(k) for k in key))
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") & (2**63 - 1)


def key_draws(key: Sequence[int]) -> list[float]:
    """The DRAWS uniform numbers in [0, 1) of one key."""
    return torch.rand(DRAWS, generator=torch.Generator().manual_seed(key_seed(key))).tolist()


def crop_box(
    u: Sequence[float], height: int, width: int, scale: tuple[float, float] = SCALE, ratio: tuple[float, float] = RATIO
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of RandomResizedCrop's rule for the draws `u` (at least 40 numbers in [0, 1)).

    Up to 10 tries: area ~ U(scale) x H x W, log-aspect ~ U(log ratio), the box kept if it fits,
    placed at a uniform top / left; else the central crop with the aspect ratio clamped into range.
    """
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for t in range(10):
        area = height * width * (scale[0] + (scale[1] - scale[0]) * u[4 * t])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[4 * t + 1])
        w = int(round(math.sqrt(area * aspect)))
        h = int(round(math.sqrt(area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(u[4 * t + 2] * (height - h + 1))
            left = int(u[4 * t + 3] * (width - w + 1))
            return (top, left, h, w)
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return ((height - h) // 2, (width - w) // 2, h, w)


def apply_crop_flip(image: Tensor, box: tuple[int, int, int, int], flip: bool) -> Tensor:
    """Crop `box` of one image [C, H, W], bicubic back to H x W, flipped left-right if `flip`: [C, H, W].
    A clip [C, T, H, W]: the same box and flip on every frame: [C, T, H, W]."""
    height, width = image.shape[-2:]
    top, left, h, w = box
    if image.dim() == 4:
        frames = image[:, :, top : top + h, left : left + w].transpose(0, 1)  # [T, C, h, w]
        frames = F.interpolate(frames, size=(height, width), mode="bicubic", align_corners=False)
        return (frames.flip(-1) if flip else frames).transpose(0, 1)  # [C, T, H, W]
    crop = image[None, :, top : top + h, left : left + w]
    crop = F.interpolate(crop, size=(height, width), mode="bicubic", align_corners=False)
    return (crop.flip(-1) if flip else crop)[0]


def _crop_flip_draws(images: Tensor, draws: Sequence[Sequence[float]], scale, ratio) -> Tensor:
    height, width = images.shape[-2:]
    out = torch.empty_like(images)  # [B, C, H, W] or [B, C, T, H, W]
    for b, u in enumerate(draws):
        out[b] = apply_crop_flip(images[b], crop_box(u, height, width, scale, ratio), u[40] < 0.5)
    return out


def crop_flip(
    images: Tensor, keys: Sequence[Sequence[int]], scale: tuple[float, float] = SCALE,
    ratio: tuple[float, float] = RATIO,
) -> Tensor:
    """Keyed crop + flip of images [B, C, H, W] -> [B, C, H, W]: image b's draws come from `keys[b]` alone.
    Clips [B, C, T, H, W]: one crop and flip per clip, on all its frames."""
    if len(keys) != images.shape[0]:
        raise ValueError(f"crop_flip needs one key per image: {images.shape[0]} images, {len(keys)} keys")
    return _crop_flip_draws(images, [key_draws(k) for k in keys], scale, ratio)


def random_resized_crop_flip(
    images: Tensor, generator: torch.Generator, scale: tuple[float, float] = SCALE, ratio: tuple[float, float] = RATIO,
) -> Tensor:
    """MAE's pretraining augmentation per image: random resized crop (area `scale`, aspect `ratio`,
    bicubic back to the input size) then a horizontal flip with probability 1/2: [B, C, H, W].

    The crop box is drawn as torchvision's RandomResizedCrop does (10 tries, then the central
    crop of the clamped aspect ratio), from `generator` so that runs are reproducible.
    """
    draws = [torch.rand(DRAWS, generator=generator).tolist() for _ in range(images.shape[0])]
    return _crop_flip_draws(images, draws, scale, ratio)


# ---- the same crop on decoded 8-bit pictures (a lazy image folder, in the loader's workers) -------------

#: evaluation's crop fraction: resize so the crop covers this much of the short side (MAE: 224 of 256)
EVAL_CROP = 0.875


def picture_crop_flip(picture, draws: Sequence[float], size: tuple[int, int]):  # noqa: ANN001, ANN201
    """RandomResizedCrop + flip of a PIL picture at its own resolution, to size (H, W), bicubic: a PIL picture.

    The box comes from `crop_box` on the picture's own height and width (the draws of `key_draws`),
    as torchvision's RandomResizedCrop does on a PIL image (crop, then resize).
    """
    from PIL import Image

    width, height = picture.size
    top, left, h, w = crop_box(draws, height, width)
    out = picture.crop((left, top, left + w, top + h)).resize((size[1], size[0]), Image.BICUBIC)
    return out.transpose(Image.FLIP_LEFT_RIGHT) if draws[40] < 0.5 else out


def picture_center(picture, size: tuple[int, int]):  # noqa: ANN001, ANN201
    """Evaluation's view of a PIL picture at size (H, W): itself if it has that size, else MAE's resize
    (the crop covers EVAL_CROP of the limiting side: 224 of 256) and centre crop."""
    from PIL import Image

    width, height = picture.size
    if (height, width) == tuple(size):
        return picture
    scale = max(size[0] / height, size[1] / width) / EVAL_CROP
    new_w, new_h = max(size[1], round(width * scale)), max(size[0], round(height * scale))
    picture = picture.resize((new_w, new_h), Image.BICUBIC)
    top, left = int(round((new_h - size[0]) / 2.0)), int(round((new_w - size[1]) / 2.0))
    return picture.crop((left, top, left + size[1], top + size[0]))
