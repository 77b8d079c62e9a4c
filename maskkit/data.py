"""Image data for the CLI: loading by name, seeded stratified splits, batches, MAE augmentation.

A dataset is held in memory as one `ImageData` (images [N, C, H, W] uint8 or float in [0, 1],
labels [N] or None). Splits (`make_splits`) are disjoint: `train` (MAE pretraining and the
labeled train set), `val` (the learned masker's validation) and `test` (evaluation only).
Batches come from `BatchStream`, a seeded endless sampler whose position is a small state dict,
so a run can resume exactly where it stopped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from maskkit.splits import stratified_split

BUILTIN = ("digits", "mnist", "fashion-mnist", "cifar10", "cifar100")
PREFIXED = ("imagefolder", "npz")
#: sub-folders that make an image folder a split layout (the official MAE's DIR/train + DIR/val)
SPLIT_FOLDERS = ("train", "val", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

#: default split fractions: pretraining/labeled train, masker validation, test.
DEFAULT_FRACTIONS = {"train": 0.7, "val": 0.1, "test": 0.2}


class DataError(ValueError):
    """Unusable data: unknown name, missing files, wrong arrays."""


@dataclass
class ImageData:
    """A whole dataset in memory.

    images: [N, C, H, W], uint8 (0..255) or float32 in [0, 1]; labels: [N] int64 in 0..K-1, or None.
    layout: how an image folder was read ("train/val folders", "class folders", "loose images"), else None.
    """

    name: str
    images: Tensor
    labels: Tensor | None
    classes: list[str] | None = None
    layout: str | None = None

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def in_chans(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> tuple[int, int]:
        return (self.images.shape[2], self.images.shape[3])

    @property
    def num_classes(self) -> int:
        if self.labels is None:
            return 0
        return len(self.classes) if self.classes else int(self.labels.max()) + 1

    def floats(self, index: Tensor | np.ndarray | slice) -> Tensor:
        """Images at `index` as float32 in [0, 1]: [B, C, H, W]."""
        if isinstance(index, np.ndarray):
            index = torch.from_numpy(index)
        x = self.images[index]
        return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


# ---- loading ----------------------------------------------------------------------------------


def parse_dataset(name: str) -> tuple[str, str | None]:
    """'digits' -> ('digits', None); 'npz:PATH' -> ('npz', 'PATH'); else DataError."""
    kind, sep, rest = name.partition(":")
    if sep:
        if kind not in PREFIXED:
            raise DataError(f"unknown dataset {name!r}; use one of {', '.join(BUILTIN)}, imagefolder:PATH, npz:PATH")
        if not rest:
            raise DataError(f"dataset {name!r} needs a path after '{kind}:'")
        return kind, rest
    if name not in BUILTIN:
        raise DataError(f"unknown dataset {name!r}; use one of {', '.join(BUILTIN)}, imagefolder:PATH, npz:PATH")
    return name, None


def load_dataset(
    name: str, data_dir: str | Path | None = None, *, download: bool = False, img_size: int | None = None
) -> ImageData:
    """Load a dataset by name into memory (train and test files of torchvision sets together).

    `img_size` resizes every image to img_size x img_size (bilinear); None keeps the size.
    """
    kind, path = parse_dataset(name)
    if kind == "digits":
        data = _load_digits()
    elif kind == "npz":
        data = load_npz(path)
    elif kind == "imagefolder":
        data = load_imagefolder(path, img_size)
    else:
        data = _load_torchvision(kind, data_dir, download)
    if len(data) == 0:
        raise DataError(f"dataset {name!r} holds no images")
    if img_size is not None and data.image_size != (img_size, img_size):
        data = replace(data, images=resize(data.floats(slice(None)), img_size))
    return data


def _load_digits() -> ImageData:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images / 16.0).float().unsqueeze(1)  # [1797, 1, 8, 8] in [0, 1]
    labels = torch.from_numpy(bunch.target).long()
    return ImageData("digits", images, labels, [str(c) for c in bunch.target_names])


_TORCHVISION = {
    "mnist": "MNIST",
    "fashion-mnist": "FashionMNIST",
    "cifar10": "CIFAR10",
    "cifar100": "CIFAR100",
}


def _check_dir(data_dir: str | Path | None, what: str, must_have_files: bool = True) -> Path:
    if data_dir is None:
        raise DataError(f"{what} needs --data-dir")
    path = Path(data_dir)
    if not path.exists():
        raise DataError(f"data directory {path} does not exist")
    if not path.is_dir():
        raise DataError(f"data directory {path} is not a directory")
    if must_have_files and not any(path.iterdir()):
        raise DataError(f"data directory {path} is empty")
    return path


def _load_torchvision(kind: str, data_dir: str | Path | None, download: bool) -> ImageData:
    from torchvision import datasets

    if download:
        if data_dir is None:
            raise DataError(f"dataset {kind!r} needs --data-dir (where to download it)")
        Path(data_dir).mkdir(parents=True, exist_ok=True)
    else:
        _check_dir(data_dir, f"dataset {kind!r}")
    cls = getattr(datasets, _TORCHVISION[kind])
    parts = []
    for train in (True, False):
        try:
            parts.append(cls(root=str(data_dir), train=train, download=download))
        except RuntimeError as err:
            hint = "" if download else " (pass --download to fetch it)"
            raise DataError(f"dataset {kind!r} not found in {data_dir}{hint}: {str(err).splitlines()[0]}") from None
    images, labels = [], []
    for ds in parts:
        arr = torch.as_tensor(np.asarray(ds.data))
        arr = arr.unsqueeze(1) if arr.dim() == 3 else arr.permute(0, 3, 1, 2)  # [N, C, H, W]
        images.append(arr.to(torch.uint8).contiguous())
        labels.append(torch.as_tensor(np.asarray(ds.targets), dtype=torch.long))
    return ImageData(kind, torch.cat(images), torch.cat(labels), [str(c) for c in parts[0].classes])


def load_npz(path: str | Path) -> ImageData:
    """Arrays `images` ([N,H,W], [N,H,W,C] or [N,C,H,W]; uint8, or float in [0, 1]) and optional `labels` [N]."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"npz file {path} does not exist")
    try:
        archive = np.load(path, allow_pickle=False)
    except ValueError as err:
        raise DataError(f"cannot read npz file {path}: {err}") from None
    except OSError as err:
        raise DataError(f"cannot read npz file {path}: {err}") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{path} is a single .npy array, not an .npz archive with 'images' and 'labels'")
    with archive:
        keys = set(archive.files)
        if "images" not in keys:
            raise DataError(f"npz file {path} has no array 'images' (found: {', '.join(sorted(keys)) or 'none'})")
        try:
            raw = archive["images"]
            raw_labels = archive["labels"] if "labels" in keys else None
        except ValueError as err:
            raise DataError(f"cannot read npz file {path}: {err}") from None
    images = _npz_images(raw, path)
    labels = classes = None
    if raw_labels is not None:
        labels, classes = _npz_labels(raw_labels, len(images), path)
    return ImageData(f"npz:{path}", images, labels, classes)


def _npz_images(raw: np.ndarray, path: Path) -> Tensor:
    if raw.ndim == 3:
        arr = raw[:, None]  # [N, 1, H, W]
    elif raw.ndim == 4:
        channels_last = raw.shape[-1] in (1, 3, 4) and raw.shape[1] not in (1, 3, 4)
        arr = np.moveaxis(raw, -1, 1) if channels_last else raw
        if arr.shape[1] not in (1, 3, 4):
            raise DataError(f"npz 'images' of shape {raw.shape} has no channel axis of size 1, 3 or 4")
    else:
        raise DataError(f"npz 'images' must be [N,H,W], [N,H,W,C] or [N,C,H,W], got shape {raw.shape}")
    if arr.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(arr))
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or arr.min(initial=0.0) < 0.0 or arr.max(initial=0.0) > 1.0:
            raise DataError(f"npz 'images' of dtype {arr.dtype} must lie in [0, 1]")
        return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    raise DataError(f"npz 'images' must be uint8 or float in [0, 1], got dtype {arr.dtype}")


def _npz_labels(raw: np.ndarray, n: int, path: Path) -> tuple[Tensor, list[str]]:
    if raw.ndim != 1:
        raise DataError(f"npz 'labels' must be one-dimensional [N], got shape {raw.shape}")
    if len(raw) != n:
        raise DataError(f"npz file {path} has {n} images but {len(raw)} labels")
    if not (np.issubdtype(raw.dtype, np.integer) or np.issubdtype(raw.dtype, np.str_)):
        if not (np.issubdtype(raw.dtype, np.floating) and np.all(raw == np.round(raw))):
            raise DataError(f"npz 'labels' must be integers or strings, got dtype {raw.dtype}")
    values, inverse = np.unique(raw, return_inverse=True)
    return torch.from_numpy(inverse.astype(np.int64)), [str(v) for v in values]


def _subfolders(directory: Path) -> list[Path]:
    return sorted(d for d in directory.iterdir() if d.is_dir() and not d.name.startswith("."))


def imagefolder_layout(root: Path) -> tuple[str, list[Path]]:
    """How an image folder is organised, and the folders that hold its classes or loose images.

    - split folders: the sub-folders are `train` plus `val` and/or `test` (or `train` alone), as in
      the official MAE's DIR/train/<class>/... + DIR/val/<class>/...: ("train/val folders", [train, val]);
    - class folders: any other sub-folders, one per class: ("class folders", [root]);
    - no sub-folders: ("loose images", [root]).
    """
    subdirs = _subfolders(root)
    names = {d.name for d in subdirs}
    if "train" in names and names <= set(SPLIT_FOLDERS):
        found = [n for n in SPLIT_FOLDERS if n in names]
        return f"{'/'.join(found)} folders", [root / n for n in found]
    return ("class folders" if subdirs else "loose images"), [root]


def load_imagefolder(path: str | Path, img_size: int | None = None) -> ImageData:
    """Images under `path`: class sub-folders give labels (sorted names); loose images are unlabeled.

    The official MAE layout, `path/train/<class>/...` + `path/val/<class>/...` (see
    `imagefolder_layout`), is read as ONE pool: the images of every split folder together, labelled
    by class name, which `make_splits` then cuts into maskkit's own train/val/test like any other
    data set (the folders' own division is not kept). Every image is converted to RGB (or L when
    all are greyscale) and, if `img_size` is given, resized to img_size x img_size; otherwise all
    images must have the same size.
    """
    from PIL import Image

    root = _check_dir(path, "imagefolder")
    layout, parts = imagefolder_layout(root)
    found: list[tuple[Path, str | None]] = []  # (file, class name or None)
    kinds = {}
    for part in parts:
        class_dirs = _subfolders(part)
        kinds[part.name] = bool(class_dirs)
        if class_dirs:
            for d in class_dirs:
                found += [(f, d.name) for f in sorted(d.rglob("*")) if f.suffix.lower() in IMAGE_SUFFIXES]
        else:
            found += [(f, None) for f in sorted(part.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    if len(set(kinds.values())) > 1:
        with_classes = ", ".join(n for n, k in kinds.items() if k)
        loose = ", ".join(n for n, k in kinds.items() if not k)
        raise DataError(f"in {root}, {with_classes} holds class folders but {loose} holds loose images; use one kind")
    classes: list[str] | None = None
    if any(kinds.values()):
        classes = sorted({d.name for part in parts for d in _subfolders(part)})
    elif len(parts) > 1:
        layout += ", loose images"
    index = {name: i for i, name in enumerate(classes or [])}
    files = [(f, None if name is None else index[name]) for f, name in found]
    if not files:
        raise DataError(f"data directory {root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    pictures = []
    for f, _ in files:
        try:
            with Image.open(f) as im:
                pictures.append(im.copy())
        except OSError as err:
            raise DataError(f"cannot read image {f}: {err}") from None
    mode = "L" if all(p.mode in ("L", "1", "I;16", "I") for p in pictures) else "RGB"
    arrays = []
    for pic in pictures:
        pic = pic.convert(mode)
        if img_size is not None:
            pic = pic.resize((img_size, img_size), Image.BILINEAR)
        arrays.append(np.asarray(pic, dtype=np.uint8))
    sizes = {a.shape[:2] for a in arrays}
    if len(sizes) > 1:
        raise DataError(f"images in {root} have different sizes {sorted(sizes)[:3]}...; pass --img-size to resize")
    stack = np.stack(arrays)  # [N, H, W] or [N, H, W, 3]
    images = torch.from_numpy(stack[:, None] if stack.ndim == 3 else stack.transpose(0, 3, 1, 2).copy())
    labels = None if classes is None else torch.tensor([lab for _, lab in files], dtype=torch.long)
    return ImageData(f"imagefolder:{root}", images.contiguous(), labels, classes, layout)


#: fewest classes a classifier can be trained on: evaluation and the learned masker's head need this many
MIN_CLASSES = 2


def check_classes(data: ImageData, purpose: str) -> None:
    """DataError unless `data` has labels of at least MIN_CLASSES classes that hold images.

    `purpose` begins the message, e.g. "evaluation" -> "evaluation needs labels of at least 2 classes,
    but dataset 'x' has 1 (cats)".
    """
    if data.labels is None:
        found = "none"
    else:
        present = torch.unique(data.labels).tolist()
        if len(present) >= MIN_CLASSES:
            return
        names = [data.classes[i] if data.classes and i < len(data.classes) else str(i) for i in present]
        found = f"{len(present)} ({', '.join(names)})" if names else "0"
    raise DataError(f"{purpose} needs labels of at least {MIN_CLASSES} classes, but dataset {data.name!r} has {found}")


def resize(images: Tensor, size: int) -> Tensor:
    """Bilinear (antialiased) resize of float images [B, C, H, W] -> [B, C, size, size], kept in [0, 1]."""
    out = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return out.clamp_(0.0, 1.0)


# ---- splits and statistics ----------------------------------------------------------------------


def make_splits(data: ImageData, seed: int, fractions: dict[str, float] | None = None) -> dict[str, np.ndarray]:
    """Disjoint `train`, `val`, `test` index arrays, stratified by label when there are labels."""
    given = DEFAULT_FRACTIONS if fractions is None else fractions
    if set(given) != set(DEFAULT_FRACTIONS):
        raise ValueError(f"split fractions must name {', '.join(DEFAULT_FRACTIONS)}, got {sorted(given)}")
    fractions = {name: given[name] for name in DEFAULT_FRACTIONS}  # a fixed order: the cut depends on it
    labels = np.zeros(len(data), dtype=np.int64) if data.labels is None else data.labels.numpy()
    parts = stratified_split(labels, fractions, seed)
    for name, idx in parts.items():
        if len(idx) == 0:
            raise DataError(f"dataset {data.name!r} has too few images ({len(data)}) for a non-empty {name!r} split")
    return parts


def channel_stats(data: ImageData, index: np.ndarray, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of the images at `index` (float64 accumulation)."""
    total = torch.zeros(data.in_chans, dtype=torch.float64)
    total_sq = torch.zeros(data.in_chans, dtype=torch.float64)
    count = 0
    for start in range(0, len(index), chunk):
        x = data.floats(index[start : start + chunk]).double()  # [b, C, H, W]
        total += x.sum(dim=(0, 2, 3))
        total_sq += (x * x).sum(dim=(0, 2, 3))
        count += x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(1e-12).sqrt()
    return mean.tolist(), std.clamp_min(1e-3).tolist()


def normalize(images: Tensor, mean: list[float], std: list[float]) -> Tensor:
    """(x - mean) / std per channel: [B, C, H, W]."""
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - m) / s


def denormalize(images: Tensor, mean: list[float], std: list[float]) -> Tensor:
    """Inverse of `normalize`."""
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return images * s + m


# ---- augmentation -----------------------------------------------------------------------------

#: smallest image side for which `auto` augmentation uses MAE's crop and flip.
AUGMENT_MIN_SIDE = 32


def resolve_augment(augment: str, image_size: tuple[int, int]) -> str:
    """'auto' -> 'crop-flip' for images of side >= 32 (CIFAR, ImageNet-like), else 'none'.

    Tiny images (8x8 digits, 28x28 MNIST) lose too much to a 0.2-scale crop, and flips change
    what a digit is, so they are used as they are.
    """
    if augment not in ("auto", "none", "crop-flip"):
        raise ValueError(f"augment must be auto, none or crop-flip, got {augment!r}")
    if augment == "auto":
        return "crop-flip" if min(image_size) >= AUGMENT_MIN_SIDE else "none"
    return augment


def random_resized_crop_flip(
    images: Tensor,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Tensor:
    """MAE's pretraining augmentation per image: random resized crop (area `scale`, aspect `ratio`,
    bicubic back to the input size) then a horizontal flip with probability 1/2: [B, C, H, W].

    The crop box is drawn as torchvision's RandomResizedCrop does (10 tries, then the central
    crop of the clamped aspect ratio), from `generator` so that runs are reproducible.
    """
    batch, _, height, width = images.shape
    out = torch.empty_like(images)
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for b in range(batch):
        u = torch.rand(41, generator=generator).tolist()  # 10 tries x (area, aspect, top, left) + flip
        box = None
        for t in range(10):
            area = height * width * (scale[0] + (scale[1] - scale[0]) * u[4 * t])
            aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[4 * t + 1])
            w = int(round(math.sqrt(area * aspect)))
            h = int(round(math.sqrt(area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(u[4 * t + 2] * (height - h + 1))
                left = int(u[4 * t + 3] * (width - w + 1))
                box = (top, left, h, w)
                break
        if box is None:  # central crop with the aspect ratio clamped into range
            in_ratio = width / height
            if in_ratio < ratio[0]:
                w, h = width, int(round(width / ratio[0]))
            elif in_ratio > ratio[1]:
                h, w = height, int(round(height * ratio[1]))
            else:
                w, h = width, height
            box = ((height - h) // 2, (width - w) // 2, h, w)
        top, left, h, w = box
        crop = images[b : b + 1, :, top : top + h, left : left + w]
        crop = F.interpolate(crop, size=(height, width), mode="bicubic", align_corners=False)
        if u[40] < 0.5:
            crop = crop.flip(-1)
        out[b] = crop[0]
    return out


# ---- batches ----------------------------------------------------------------------------------


class BatchStream:
    """An endless, seeded sequence of index batches over `indices` (an epoch is a fresh permutation).

    Epoch e uses the permutation drawn from numpy's Generator seeded with (seed, e), so the
    position (epoch, cursor) is the whole state: `state_dict()` / `load_state_dict()` resume
    exactly. Incomplete last batches are dropped; the batch size is capped at len(indices).
    """

    def __init__(self, indices: np.ndarray, batch_size: int, seed: int) -> None:
        if len(indices) == 0:
            raise ValueError("BatchStream needs at least one index")
        if batch_size < 1:
            raise ValueError(f"batch size must be a positive integer, got {batch_size!r}")
        self.indices = np.asarray(indices, dtype=np.int64)
        self.batch_size = min(int(batch_size), len(self.indices))
        self.seed = int(seed)
        self.epoch = 0
        self.cursor = 0
        self._order: np.ndarray | None = None

    @property
    def batches_per_epoch(self) -> int:
        return len(self.indices) // self.batch_size

    def _permutation(self) -> np.ndarray:
        if self._order is None:
            rng = np.random.default_rng([self.seed, self.epoch])
            self._order = self.indices[rng.permutation(len(self.indices))]
        return self._order

    def next(self) -> np.ndarray:
        """The next batch of indices, [batch_size]."""
        if self.cursor + self.batch_size > len(self.indices):
            self.epoch += 1
            self.cursor = 0
            self._order = None
        batch = self._permutation()[self.cursor : self.cursor + self.batch_size]
        self.cursor += self.batch_size
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["batch_size"]) != self.batch_size or int(state["seed"]) != self.seed:
            raise ValueError("batch stream state is from a different batch size or seed")
        self.epoch = int(state["epoch"])
        self.cursor = int(state["cursor"])
        self._order = None


@dataclass
class Batcher:
    """Turns index batches into normalised tensors on a device, with optional MAE augmentation."""

    data: ImageData
    mean: list[float]
    std: list[float]
    device: torch.device
    augment: str = "none"  # resolved: "none" or "crop-flip"

    def images(self, index: np.ndarray, generator: torch.Generator | None = None) -> Tensor:
        """Normalised images [B, C, H, W] on the device; augmented when `generator` is given."""
        x = self.data.floats(index)
        if self.augment == "crop-flip" and generator is not None:
            x = random_resized_crop_flip(x, generator)
        return normalize(x, self.mean, self.std).to(self.device)

    def labels(self, index: np.ndarray) -> Tensor:
        if self.data.labels is None:
            raise DataError(f"dataset {self.data.name!r} has no labels")
        return self.data.labels[torch.from_numpy(np.asarray(index))].to(self.device)
