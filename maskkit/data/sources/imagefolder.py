"""`imagefolder:PATH`: image files under a folder, read lazily (a file is decoded when a batch needs it).

The folder is listed once (`maskkit.data.folder_index.FolderIndex`: names, sizes, labels from class
sub-folders); a run keeps that index in its directory, so resuming, evaluating or picturing the run
reads the list instead of building it, and checks it against the folder. Images of different sizes
are the normal case: each sample is brought to the run's size by the crop (pretraining: MAE's
RandomResizedCrop + flip, at the file's own resolution) or by MAE's resize and centre crop
(evaluation, probes, statistics). Every depth PIL reads is converted to 8-bit (`maskkit.data.decode`).

The official MAE layout, `PATH/train/<class>/...` + `PATH/val/<class>/...`, keeps its meaning:
`train` is the pretraining set (maskkit's labeled train and val splits are carved from it) and
`val` is the test split (`given_splits`, used by `make_splits`). Which layout a folder has, what is
ignored beside `train/` and `val/` (named in a warning), what is refused (image files beside class
folders, a class folder without images), and how FIFOs and symlinks are treated: `folder_layout`
and the `maskkit.data.folder_index` docstring.

The source option `hash` (`--dataset imagefolder,hash=content:PATH`) chooses what the run's
fingerprint covers: `mtime` (default) every file's name, size and modification time (stat calls
only, cheap at ImageNet scale); `content` also a SHA-256 of every file's bytes, read at listing and
again at each check (`--resume`, `evaluate`, `visualize`): a file replaced with the same size and
mtime is seen.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from maskkit.data.augment import picture_center, picture_crop_flip
from maskkit.data.decode import open_image, to_8bit
from maskkit.data.folder_index import IMAGE_SUFFIXES, INDEX_FILE, SPLIT_FOLDERS, FolderIndex, folder_layout
from maskkit.data.load import register_dataset
from maskkit.data.source import DataChangedError, DataError, Source
from maskkit.options import shown_path
from maskkit.registry import Card

__all__ = [
    "DEFAULT_SIDE", "HASHES", "IMAGE_SUFFIXES", "SPLIT_FOLDERS", "ImageFolder", "imagefolder_layout", "load_imagefolder",
]  # fmt: skip

#: the side a folder of images of different sizes is brought to without --img-size (MAE's --input_size)
DEFAULT_SIDE = 224

#: the `hash` option: what the fingerprint covers besides names and sizes
HASHES = ("mtime", "content")

CARD = Card(
    idea="image files under a folder, read lazily: class sub-folders, loose images, or MAE's train/val folders "
         "(train/ beside val/ wins; the rule: docs/cli.md)",
    allowed={"arg": "PATH of a folder", "img_size": "int >= 1 | None (default: the images' own size if they "
             f"share one of side <= {DEFAULT_SIDE}, else {DEFAULT_SIDE})",
             "hash": "mtime (default: the fingerprint covers names, sizes, mtimes; stat calls only) | content "
             "(names, sizes and a SHA-256 of every file's bytes, read at listing and at each check), given as "
             "imagefolder,hash=content:PATH"},
)  # fmt: skip

imagefolder_layout = folder_layout


def default_size(index: FolderIndex, img_size: int | None) -> tuple[int, int]:
    """(H, W) the samples are brought to: img_size square if given; else the sampled headers' common size
    when they share one with sides <= DEFAULT_SIDE; else a square of DEFAULT_SIDE (or the smallest short side)."""
    if img_size is not None:
        return (int(img_size), int(img_size))
    sizes = {s for s in index.sample_sizes if min(s) > 0}
    if len(sizes) == 1:
        width, height = next(iter(sizes))
        if max(width, height) <= DEFAULT_SIDE:
            return (height, width)
    side = min([DEFAULT_SIDE] + [min(s) for s in sizes])
    return (side, side)


class ImageFolder(Source):
    """The images of a `FolderIndex`, decoded one at a time and brought to `size` (H, W).

    `pixels(i, draws)`: 8-bit pixels [C, H, W] (uint8) of file i, MAE's crop + flip with `draws`
    (`maskkit.data.augment.key_draws`), else the evaluation view; `read(i)`: the same as floats in [0, 1].
    A file whose size differs from the index's is refused (it changed since the folder was listed).
    """

    def __init__(self, index: FolderIndex, size: tuple[int, int]) -> None:
        self.index = index
        self.size = (int(size[0]), int(size[1]))
        self.name = f"imagefolder:{index.root}"
        self.layout = index.layout
        self.classes = index.classes
        self.labels = None if index.labels is None else torch.from_numpy(index.labels.copy())
        self.mode = index.mode

    def __len__(self) -> int:
        return len(self.index)

    @property
    def image_size(self) -> tuple[int, int]:
        return self.size

    @property
    def in_chans(self) -> int:
        return 1 if self.mode == "L" else 3

    @property
    def test_folder(self) -> str | None:
        """The split folder that is the test split: `val` (else `test`) beside `train`; None in other layouts."""
        parts = self.index.parts
        if "train" not in parts:
            return None
        return "val" if "val" in parts else "test" if "test" in parts else None

    @property
    def given_splits(self) -> dict[str, np.ndarray] | None:
        """The official layout's own division: {"train": DIR/train, "test": DIR/val (else DIR/test)}; None otherwise."""
        parts, test = self.index.parts, self.test_folder
        if test is None:
            return None
        part_of = self.index.part_of
        return {"train": np.flatnonzero(part_of == parts.index("train")).astype(np.int64),
                "test": np.flatnonzero(part_of == parts.index(test)).astype(np.int64)}  # fmt: skip

    def fingerprint(self) -> dict[str, Any]:
        return self.index.fingerprint()

    def save_index(self, run_dir: str | Path) -> Path:
        """Keep the file list in `run_dir` (INDEX_FILE), for the run's resume, evaluation and pictures."""
        path = Path(run_dir) / INDEX_FILE
        self.index.save(path)
        return path

    def picture(self, i: int) -> Any:
        """File i decoded as an 8-bit PIL picture of the folder's mode; DataError naming the file if it cannot be
        (`DataChangedError` if its size is not the index's: it changed since the folder was listed)."""
        path = self.index.path(i)
        return to_8bit(open_image(path, int(self.index.sizes[i])), self.mode, path)

    def pixels(self, i: int, draws: list[float] | None = None) -> Tensor:
        """File i at the folder's size as uint8 [C, H, W]: cropped and flipped with `draws`, else centred."""
        picture = self.picture(int(i))
        picture = picture_center(picture, self.size) if draws is None else picture_crop_flip(picture, draws, self.size)
        array = np.asarray(picture, dtype=np.uint8)
        if array.ndim == 2:
            return torch.from_numpy(array.copy())[None]
        return torch.from_numpy(array.transpose(2, 0, 1).copy())

    def read(self, i: int) -> Tensor:
        return self.pixels(i).float() / 255.0


def open_folder(path: str | Path, img_size: int | None = None, cache_dir: str | Path | None = None,
                check: bool = True, hash: str = "mtime") -> ImageFolder:  # fmt: skip
    """The folder `path` as an `ImageFolder`: from the index in `cache_dir` when there is one (checked
    against the folder unless `check` is False: DataError naming what changed; the index covers what it
    covered when it was made), else listed now (`hash`: "mtime", or "content" to hash every file)."""
    if hash not in HASHES:
        raise DataError(f"imagefolder option hash must be one of {', '.join(HASHES)}, got {hash!r}")
    saved = None if cache_dir is None else Path(cache_dir) / INDEX_FILE
    if saved is not None and saved.is_file():
        index = FolderIndex.load(saved)
        if index.root != Path(path).resolve():
            raise DataError(f"the data index {shown_path(saved)} lists {shown_path(index.root)}, "
                            f"not {shown_path(Path(path).resolve())}")  # fmt: skip
        if check:
            changed = index.changes()
            if changed:
                raise DataChangedError(f"data folder {shown_path(index.root)} changed since the run listed it: {changed}")
    else:
        index = FolderIndex.scan(path, content=hash == "content")
    return ImageFolder(index, default_size(index, img_size))


@register_dataset("imagefolder", card=CARD, arg="path")
def imagefolder(*, arg: str, img_size: int | None = None, cache_dir: str | Path | None = None,
                check: bool = True, hash: str = "mtime", **_: Any) -> ImageFolder:  # fmt: skip
    """The images under the folder `arg`, brought to img_size x img_size if given (see `default_size`);
    `hash` (the spec's option, `imagefolder,hash=content:PATH`): what the fingerprint covers (HASHES)."""
    return open_folder(arg, img_size, cache_dir, check, hash)


def load_imagefolder(path: str | Path, img_size: int | None = None, hash: str = "mtime") -> ImageFolder:
    """The folder `path`, listed now (see `open_folder`)."""
    return open_folder(path, img_size, hash=hash)
