"""`imagefolder:PATH`: image files under a folder, read eagerly into memory (class sub-folders give labels).

Three layouts (`imagefolder_layout`): class folders, loose images, or the official MAE's split
folders (`train/<class>/...` + `val/<class>/...`, pooled into one set).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from maskkit.data.decode import GREY_MODES, open_image, to_8bit
from maskkit.data.load import register_dataset
from maskkit.data.source import DataError, ImageData, check_dir
from maskkit.registry import Card

#: sub-folders that make an image folder a split layout (the official MAE's DIR/train + DIR/val)
SPLIT_FOLDERS = ("train", "val", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

CARD = Card(
    idea="image files under a folder: class sub-folders, loose images, or train/val split folders",
    allowed={"arg": "PATH of a folder", "img_size": "int >= 1 | None (needed when the images differ in size)"},
)


@register_dataset("imagefolder", card=CARD, arg="path")
def imagefolder(*, arg: str, img_size: int | None = None, **_: Any) -> ImageData:
    """The images under the folder `arg`, resized to img_size x img_size if given."""
    return load_imagefolder(arg, img_size)


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
    data set (the folders' own division is not kept). Every image is converted to 8-bit RGB (or L when
    all are greyscale; 16-bit and float grey scaled, alpha over black: `maskkit.data.decode`) and, if `img_size` is given, resized to img_size x img_size; otherwise all
    images must have the same size.
    """
    from PIL import Image

    root = check_dir(path, "imagefolder")
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
    pictures = [open_image(f) for f, _ in files]
    mode = "L" if all(p.mode in GREY_MODES for p in pictures) else "RGB"
    arrays = []
    for pic, (f, _) in zip(pictures, files, strict=True):
        pic = to_8bit(pic, mode, f)
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
