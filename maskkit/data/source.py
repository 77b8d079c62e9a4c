"""The data source protocol: what every data set looks like to splits, statistics and the loader.

A source is a sized, indexable set of images (or clips) with optional labels:

    len(src), src.labels ([N] int64 or None), src.classes, src.in_chans, src.image_size (H, W),
    src.num_classes, src.layout, src.read(i) -> [C, H, W] float32 in [0, 1], src.floats(index) -> [B, C, H, W]

A source of clips also has `num_frames` = T (an int; None, or no such attribute, means images): its
samples are [C, T, H, W] and its batches [B, C, T, H, W], with the same dtype and range (`frames_of`).

`read(i)` reads one sample by index (what a worker process calls); `floats(index)` reads a batch
(what the in-memory path calls, and what `read` must agree with bit for bit). `ImageData` holds a
whole data set in memory (images [N, C, H, W] or clips [N, C, T, H, W]); `Source` is a base class for
other sources that only need `__len__`, `read`, `labels` and `in_chans` / `image_size` (a batched
`floats` comes from `read`), and `num_frames` for clips.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

#: an index into a source's batched path: integer indices (array, tensor, list) or a slice
Index = Tensor | np.ndarray | slice | list


class DataError(ValueError):
    """Unusable data: unknown name, missing files, wrong arrays."""


class DataChangedError(DataError):
    """Data that is no longer what was listed or recorded (a run's file index against its folder)."""


class DataWarning(UserWarning):
    """Data passed over with a word: a file the loader skipped (--skip-bad-images), entries an image folder's
    listing ignores; the CLI prints one line."""


@runtime_checkable
class DataSource(Protocol):
    """What a data set offers: length, labels, channels, image size, and reading samples by index.

    A source of clips adds `num_frames: int` (not a protocol member, so that every image source written
    before clips still is one: read it with `frames_of`); its `read` gives [C, T, H, W], `floats` [B, C, T, H, W].
    """

    name: str
    labels: Tensor | None  # [N] int64 in 0..K-1, or None
    classes: list[str] | None
    layout: str | None  # how a folder was read ("class folders", ...), else None

    def __len__(self) -> int: ...

    @property
    def in_chans(self) -> int: ...

    @property
    def image_size(self) -> tuple[int, int]: ...

    @property
    def num_classes(self) -> int: ...

    def read(self, i: int) -> Tensor:
        """Sample i as float32 in [0, 1]: [C, H, W]."""
        ...

    def floats(self, index: Index) -> Tensor:
        """Samples at `index` as float32 in [0, 1]: [B, C, H, W]."""
        ...


def frames_of(data: object) -> int | None:
    """The frames T of a source of clips (its `num_frames`), or None for a source of images."""
    return getattr(data, "num_frames", None)


def sample_dims(data: object) -> int:
    """How many dimensions one sample of `data` has: 3 for images [C, H, W], 4 for clips [C, T, H, W]."""
    return 3 if frames_of(data) is None else 4


def _num_classes(labels: Tensor | None, classes: list[str] | None) -> int:
    if labels is None:
        return 0
    return len(classes) if classes else int(labels.max()) + 1


@dataclass
class ImageData:
    """A whole dataset in memory.

    images: [N, C, H, W] (or clips [N, C, T, H, W]: then `num_frames` is T), uint8 (0..255) or float32 in
    [0, 1]; labels: [N] int64 in 0..K-1, or None.
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
        return (self.images.shape[-2], self.images.shape[-1])

    @property
    def num_frames(self) -> int | None:
        """T for clips [N, C, T, H, W]; None for images [N, C, H, W]."""
        return self.images.shape[2] if self.images.dim() == 5 else None

    @property
    def num_classes(self) -> int:
        return _num_classes(self.labels, self.classes)

    def floats(self, index: Index) -> Tensor:
        """Images at `index` as float32 in [0, 1]: [B, C, H, W] (clips: [B, C, T, H, W])."""
        if isinstance(index, np.ndarray):
            index = torch.from_numpy(index)
        x = self.images[index]
        return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()

    def read(self, i: int) -> Tensor:
        """Image i as float32 in [0, 1]: [C, H, W] (clips: [C, T, H, W]; the same values as `floats`)."""
        x = self.images[int(i)]
        return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


def as_positions(index: Index, n: int) -> list[int]:
    """Integer positions 0..n-1 of any `Index` (negative ones counted from the end)."""
    if isinstance(index, slice):
        return list(range(n))[index]
    if isinstance(index, Tensor):
        index = index.tolist()
    return [int(i) % n if int(i) < 0 else int(i) for i in np.asarray(index).reshape(-1).tolist()]


class Source:
    """A base for sources that read one sample at a time: subclasses set `name`, `labels`, `classes`
    (and optionally `layout`, and `num_frames` for clips) and define `__len__`, `read(i)` and
    `image_size` / `in_chans` (by default read from sample 0); `floats` stacks `read`."""

    name: str = "source"
    labels: Tensor | None = None
    classes: list[str] | None = None
    layout: str | None = None
    num_frames: int | None = None  # T of a source of clips ([C, T, H, W] samples); None: images

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, i: int) -> Tensor:
        raise NotImplementedError

    @property
    def image_size(self) -> tuple[int, int]:
        shape = self.read(0).shape  # [C, H, W] or [C, T, H, W]
        return (int(shape[-2]), int(shape[-1]))

    @property
    def in_chans(self) -> int:
        return int(self.read(0).shape[0])

    @property
    def num_classes(self) -> int:
        return _num_classes(self.labels, self.classes)

    def floats(self, index: Index) -> Tensor:
        """Samples at `index` stacked: [B, C, H, W] float32 (clips: [B, C, T, H, W])."""
        return torch.stack([self.read(i) for i in as_positions(index, len(self))])


class Resized(Source):
    """A view of `source` with every image (every frame of a clip) resized to size x size (bilinear,
    antialiased): [C, size, size] (clips: [C, T, size, size])."""

    def __init__(self, source: DataSource, size: int) -> None:
        self.source = source
        self.size = int(size)
        self.name, self.labels, self.classes = source.name, source.labels, source.classes
        self.layout = source.layout
        self.num_frames = frames_of(source)

    def __len__(self) -> int:
        return len(self.source)

    @property
    def image_size(self) -> tuple[int, int]:
        return (self.size, self.size)

    @property
    def in_chans(self) -> int:
        return self.source.in_chans

    def read(self, i: int) -> Tensor:
        return resize(self.source.read(i)[None], self.size)[0]

    def floats(self, index: Index) -> Tensor:
        return resize(self.source.floats(index), self.size)


def resize(images: Tensor, size: int) -> Tensor:
    """Bilinear (antialiased) resize of float images [B, C, H, W] -> [B, C, size, size], kept in [0, 1];
    clips [B, C, T, H, W] -> [B, C, T, size, size], every frame as an image."""
    if images.dim() == 5:
        b, c, t, h, w = images.shape
        frames = images.transpose(1, 2).reshape(b * t, c, h, w)  # [B*T, C, H, W]
        out = resize(frames, size).reshape(b, t, c, size, size)  # [B, T, C, size, size]
        return out.transpose(1, 2).contiguous()  # [B, C, T, size, size]
    out = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return out.clamp_(0.0, 1.0)


def check_dir(data_dir: str | Path | None, what: str, must_have_files: bool = True) -> Path:
    """`data_dir` as a Path if it is an existing (non-empty) directory, else a DataError naming `what`."""
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


#: fewest classes a classifier can be trained on: evaluation and the learned masker's head need this many
MIN_CLASSES = 2


def check_classes(data: DataSource, purpose: str) -> None:
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
