"""The file index of an image folder: which files, with which labels, in which split folder, listed once.

`FolderIndex.scan(root)` walks the folder once (names and sizes only: no image is opened but a
small seeded sample of headers, for the channel count and the default size); `save` / `load` keep
it as gzip'd JSON in the run directory, so a resume, `evaluate` or `visualize` reads the list
instead of building it again. `fingerprint()` is the data's identity (file count and a SHA-256 of
every relative name and size); `changes(root)` compares the index with the folder as it is now and
names what differs (missing, new or resized files).

Three layouts (`folder_layout`): class folders, loose images, or the official MAE's split folders
(`train/<class>/...` + `val/<class>/...`).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from maskkit.data.decode import GREY_MODES
from maskkit.data.source import DataError, check_dir

__all__ = [
    "HEADER_SAMPLE", "IMAGE_SUFFIXES", "INDEX_FILE", "INDEX_FORMAT", "SPLIT_FOLDERS", "FolderIndex",
    "folder_layout",
]  # fmt: skip

#: sub-folders that make an image folder a split layout (the official MAE's DIR/train + DIR/val)
SPLIT_FOLDERS = ("train", "val", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
#: the index's file name in a run directory
INDEX_FILE = "data-index.json.gz"
INDEX_FORMAT = 1
#: headers read (seeded sample) to choose the channel count and the default image size
HEADER_SAMPLE = 64


def _subfolders(directory: Path) -> list[Path]:
    return sorted(d for d in directory.iterdir() if d.is_dir() and not d.name.startswith("."))


def folder_layout(root: Path) -> tuple[str, list[Path]]:
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


def _images_under(folder: Path, recursive: bool) -> list[tuple[str, int]]:
    """(path relative to `folder`, size in bytes) of every image file, sorted by path."""
    found: list[tuple[str, int]] = []
    stack = [folder]
    while stack:
        current = stack.pop()
        with os.scandir(current) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir():
                    if recursive:
                        stack.append(Path(entry.path))
                elif Path(entry.name).suffix.lower() in IMAGE_SUFFIXES:
                    found.append((os.path.relpath(entry.path, folder), entry.stat().st_size))
    return sorted(found)


def _scan(root: Path) -> dict[str, Any]:
    """The listing of `root`: layout, parts, classes, files (relative to root), sizes, labels, part of each."""
    layout, parts = folder_layout(root)
    files: list[str] = []
    sizes: list[int] = []
    names: list[str | None] = []
    part_of: list[int] = []
    kinds: dict[str, bool] = {}
    for p, part in enumerate(parts):
        class_dirs = _subfolders(part)
        kinds[part.name] = bool(class_dirs)
        groups = [(d, d.name, True) for d in class_dirs] if class_dirs else [(part, None, False)]
        for folder, name, recursive in groups:
            for rel, size in _images_under(folder, recursive):
                files.append(os.path.relpath(folder / rel, root))
                sizes.append(size)
                names.append(name)
                part_of.append(p)
    if len(set(kinds.values())) > 1:
        with_classes = ", ".join(n for n, k in kinds.items() if k)
        loose = ", ".join(n for n, k in kinds.items() if not k)
        raise DataError(f"in {root}, {with_classes} holds class folders but {loose} holds loose images; use one kind")
    classes = sorted({n for n in names if n is not None}) if any(kinds.values()) else None
    if classes is None and len(parts) > 1:
        layout += ", loose images"
    return {"layout": layout, "parts": [p.name if p != root else "" for p in parts], "classes": classes,
            "files": files, "sizes": sizes, "names": names, "part_of": part_of}  # fmt: skip


@dataclass
class FolderIndex:
    """An image folder listed once: relative file names, sizes, labels, split folder, and what the headers said.

    files: [n] paths relative to `root`; sizes: [n] bytes; labels: [n] int64 (None for loose images);
    parts: the split folder names ("train", "val", ...; "" when the folder has none); part_of: [n] into parts;
    mode: "L" or "RGB" (from a seeded sample of headers); sample_sizes: the (width, height) of those headers.
    """

    root: Path
    layout: str
    parts: list[str]
    classes: list[str] | None
    files: list[str]
    sizes: np.ndarray
    labels: np.ndarray | None
    part_of: np.ndarray
    mode: str
    sample_sizes: list[tuple[int, int]]

    def __len__(self) -> int:
        return len(self.files)

    @classmethod
    def scan(cls, path: str | Path) -> FolderIndex:
        """List the folder `path` (no image decoded; HEADER_SAMPLE headers opened); DataError if it holds none."""
        root = check_dir(path, "imagefolder").resolve()
        listing = _scan(root)
        if not listing["files"]:
            raise DataError(f"data directory {root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        classes = listing["classes"]
        index = {name: i for i, name in enumerate(classes or [])}
        labels = None if classes is None else np.array([index[n] for n in listing["names"]], dtype=np.int64)
        mode, sample_sizes = _read_headers(root, listing["files"])
        return cls(root, listing["layout"], listing["parts"], classes, listing["files"],
                   np.asarray(listing["sizes"], dtype=np.int64), labels,
                   np.asarray(listing["part_of"], dtype=np.int64), mode, sample_sizes)  # fmt: skip

    def path(self, i: int) -> Path:
        return self.root / self.files[i]

    def fingerprint(self) -> dict[str, Any]:
        """{"kind": "files", "count": n, "digest": SHA-256 of every "relative name <tab> size" line}."""
        digest = hashlib.sha256()
        for name, size in zip(self.files, self.sizes.tolist(), strict=True):
            digest.update(f"{name}\t{size}\n".encode())
        return {"kind": "files", "count": len(self.files), "digest": digest.hexdigest()}

    def changes(self) -> str | None:
        """What differs between the index and the folder on disk now (None if nothing): missing, new, resized files."""
        try:
            now = _scan(self.root)
        except (OSError, DataError) as err:
            return f"it can no longer be listed ({err})"
        before = dict(zip(self.files, self.sizes.tolist(), strict=True))
        after = dict(zip(now["files"], now["sizes"], strict=True))
        missing = sorted(set(before) - set(after))
        new = sorted(set(after) - set(before))
        resized = sorted(f for f in set(before) & set(after) if before[f] != after[f])
        what = []
        for label, names in (("missing", missing), ("new", new), ("changed size", resized)):
            if names:
                shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
                what.append(f"{len(names)} file(s) {label} ({shown})")
        return "; ".join(what) or None

    # ---- the index file ------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": INDEX_FORMAT, "root": str(self.root), "layout": self.layout, "parts": self.parts,
            "classes": self.classes, "files": self.files, "sizes": self.sizes.tolist(),
            "labels": None if self.labels is None else self.labels.tolist(), "part_of": self.part_of.tolist(),
            "mode": self.mode, "sample_sizes": [list(s) for s in self.sample_sizes],
            "fingerprint": self.fingerprint(),
        }  # fmt: skip

    def save(self, path: str | Path) -> None:
        """Write the index as gzip'd JSON at `path` (atomically: a temporary file, then a rename)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        with gzip.open(tmp, "wt", encoding="utf-8", compresslevel=6) as f:
            json.dump(self.to_dict(), f)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> FolderIndex:
        """The index saved at `path`; DataError naming the file if it is unreadable or its fingerprint is wrong."""
        try:
            with gzip.open(path, "rt", encoding="utf-8") as f:
                raw = json.load(f)
            index = cls(Path(raw["root"]), raw["layout"], list(raw["parts"]), raw["classes"], list(raw["files"]),
                        np.asarray(raw["sizes"], dtype=np.int64),
                        None if raw["labels"] is None else np.asarray(raw["labels"], dtype=np.int64),
                        np.asarray(raw["part_of"], dtype=np.int64), raw["mode"],
                        [tuple(s) for s in raw["sample_sizes"]])  # fmt: skip
            recorded = raw["fingerprint"]
        except (OSError, EOFError, ValueError, KeyError, TypeError) as err:
            raise DataError(f"cannot read the data index {path}: {err}") from None
        if raw.get("format") != INDEX_FORMAT or index.fingerprint() != recorded:
            raise DataError(f"the data index {path} is damaged (its fingerprint does not match its list)")
        return index


def _read_headers(root: Path, files: list[str]) -> tuple[str, list[tuple[int, int]]]:
    """("L" if every sampled header is grey else "RGB", their (width, height)): HEADER_SAMPLE files, seeded.

    A header that cannot be read is skipped here (the file is reported when a batch reads it).
    """
    from PIL import Image

    rng = np.random.default_rng(0)
    picks = [0] + sorted(rng.choice(len(files), size=min(HEADER_SAMPLE, len(files)), replace=False).tolist())
    modes, sizes = [], []
    for i in dict.fromkeys(picks):
        try:
            with Image.open(root / files[i]) as im:
                modes.append(im.mode)
                sizes.append(tuple(int(v) for v in im.size))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            continue
    mode = "L" if modes and all(m in GREY_MODES for m in modes) else "RGB"
    return mode, sizes or [(0, 0)]
