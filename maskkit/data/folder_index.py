"""The file index of an image folder: which files, with which labels, in which split folder, listed once.

`FolderIndex.scan(root)` walks the folder once (one stat call per file: names, sizes, modification
times; no image is opened but a small seeded sample of headers, for the channel count and the default
size; with `content=True` every file's bytes are hashed too); `save` / `load` keep it as gzip'd JSON
in the run directory, so a resume, `evaluate` or `visualize` reads the list instead of building it
again. `fingerprint()` is the data's identity (file count and a SHA-256 of what the index `covers`:
every relative name, size and nanosecond mtime by default, or every name, size and content SHA-256);
`changes()` compares the index with the folder as it is now and names what differs (missing, new,
resized, modified files) and what the comparison covers. An index saved before mtimes were recorded
(format 1) covers names and sizes, and is still read and checked that way.

The layout rule (`folder_layout`), on the entries of the folder that are not hidden (".name") or
`__MACOSX` (macOS archive debris; both passed over quietly at every depth); files that are not images
(by suffix) are ignored everywhere:
- split folders: a `train` folder beside `val` and/or `test` (or `train` alone), as the official
  MAE's `train/<class>/...` + `val/<class>/...`; any other folder or image file beside them is
  ignored and named in one `DataWarning`;
- class folders: any other sub-folders, one class each (images in nested folders count for it);
- loose images: image files and no sub-folder.
A folder (the root, or a split folder) holding both image files and sub-folders is refused, as is a
class or split folder with no image, in one line naming it.

Entries: regular files and folders are followed through symlinks (a symlink to an image is that
image; a symlinked folder is walked, and a symlink loop is refused in one line naming it). Anything
else with an image suffix (a FIFO, a socket, a device, a broken symlink) is skipped at listing and
named in one `DataWarning`: reading a FIFO would block for ever. Names in messages are escaped
(`shown_path`: bytes that are not UTF-8, newlines).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import stat
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from maskkit.data.decode import GREY_MODES
from maskkit.data.source import DataError, DataWarning, check_dir
from maskkit.options import shown_path

__all__ = [
    "COVERS_CONTENT", "COVERS_MTIMES", "COVERS_SIZES", "HEADER_SAMPLE", "IGNORED", "IMAGE_SUFFIXES", "INDEX_FILE",
    "INDEX_FORMAT", "LIST_LAYOUT", "SPLIT_FOLDERS", "FolderIndex", "folder_layout", "stat_files",
]  # fmt: skip

#: sub-folders that make an image folder a split layout (the official MAE's DIR/train + DIR/val)
SPLIT_FOLDERS = ("train", "val", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
#: names passed over quietly at every depth, besides hidden ones (".name"): macOS archive debris
IGNORED = ("__MACOSX",)
#: the layout of an index made from a list of files (`stat_files` checks it), not by walking the folder
LIST_LAYOUT = "list file"
#: the index's file name in a run directory
INDEX_FILE = "data-index.json.gz"
#: 1: names and sizes (fingerprint without "covers"); 2: adds mtimes or content hashes and "covers"
INDEX_FORMAT = 2
#: what a fingerprint covers: an index of format 1; the default; with content hashes
COVERS_SIZES = "names, sizes"
COVERS_MTIMES = "names, sizes, mtimes"
COVERS_CONTENT = "names, sizes, content sha256"
#: headers read (seeded sample) to choose the channel count and the default image size
HEADER_SAMPLE = 64
#: how many names a message shows before "..."
SHOWN_NAMES = 3


def _passed_over(name: str) -> bool:
    return name.startswith(".") or name in IGNORED


def _names(names: list[str]) -> str:
    """Up to SHOWN_NAMES names, escaped, then '...'."""
    shown = ", ".join(shown_path(n) for n in names[:SHOWN_NAMES])
    return shown + (", ..." if len(names) > SHOWN_NAMES else "")


def _is_image(name: str, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> bool:
    return os.path.splitext(name)[1].lower() in suffixes


def _entries(directory: Path, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> tuple[list[Path], list[str], list[str]]:
    """(sub-folders, image file names, names of image-suffixed entries that are no regular file) of
    `directory`, hidden and IGNORED names left out; each list sorted. Symlinks are followed."""
    folders: list[Path] = []
    images: list[str] = []
    special: list[str] = []
    with os.scandir(directory) as entries:
        for entry in entries:
            if _passed_over(entry.name):
                continue
            if entry.is_dir():
                folders.append(Path(entry.path))
            elif entry.is_file():
                if _is_image(entry.name, suffixes):
                    images.append(entry.name)
            elif _is_image(entry.name, suffixes):
                special.append(entry.name)
    return sorted(folders), sorted(images), sorted(special)


def _subfolders(directory: Path) -> list[Path]:
    return _entries(directory)[0]


def _kind(path: str) -> str:
    """What a non-regular entry is, for a message: "FIFO", "socket", "device", "broken symlink", ..."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return "broken symlink" if os.path.islink(path) else "unreadable entry"
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    return "not a regular file"


def folder_layout(root: Path, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> tuple[str, list[Path]]:
    """How an image folder is organised, and the folders that hold its classes or loose images.

    - split folders: `train` beside `val` and/or `test` (or `train` alone), as in the official MAE's
      DIR/train/<class>/... + DIR/val/<class>/...: ("train/val folders", [train, val]); any other
      sub-folder or image file beside them is named in one DataWarning and ignored;
    - class folders: any other sub-folders, one per class: ("class folders", [root]);
    - no sub-folders: ("loose images", [root]).
    Hidden and IGNORED entries do not count; image files beside class folders are a DataError.
    """
    folders, images, _ = _entries(root, suffixes)
    names = {d.name for d in folders}
    if "train" in names and (names & {"val", "test"} or names == {"train"}):
        found = [n for n in SPLIT_FOLDERS if n in names]
        extra = sorted(names - set(found)) + images
        if extra:
            warnings.warn(DataWarning(
                f"image folder {shown_path(root)}: ignoring {len(extra)} entr{'y' if len(extra) == 1 else 'ies'} "
                f"beside the split folders {', '.join(found)}: {_names(extra)}"), stacklevel=2)  # fmt: skip
        return f"{'/'.join(found)} folders", [root / n for n in found]
    _refuse_mixed(root, folders, images)
    return ("class folders" if folders else "loose images"), [root]


def _refuse_mixed(folder: Path, folders: list[Path], images: list[str]) -> None:
    if folders and images:
        raise DataError(
            f"image folder {shown_path(folder)} holds both image files ({_names(images)}) and sub-folders "
            f"({_names([d.name for d in folders])}); put every image in a class folder, or remove the sub-folders"
        )


def _images_under(
    folder: Path, recursive: bool, special: list[str], suffixes: tuple[str, ...] = IMAGE_SUFFIXES
) -> list[tuple[str, int, int]]:
    """(path relative to `folder`, size in bytes, mtime in ns) of every image file, sorted by path.

    Symlinks to files and folders are followed; a folder that leads back to one above it is a DataError;
    image-suffixed entries that are no regular file are appended to `special` (relative to `folder`)."""
    found: list[tuple[str, int, int]] = []
    stack: list[tuple[Path, frozenset[tuple[int, int]]]] = [(folder, frozenset())]
    while stack:
        current, above = stack.pop()
        info = os.stat(current)
        key = (info.st_dev, info.st_ino)
        if key in above:
            raise DataError(f"image folder {shown_path(current)} is a symlink loop (it leads back to a folder above it)")
        above = above | {key}
        with os.scandir(current) as entries:
            for entry in entries:
                if _passed_over(entry.name):
                    continue
                if entry.is_dir():
                    if recursive:
                        stack.append((Path(entry.path), above))
                elif not _is_image(entry.name, suffixes):
                    continue
                elif entry.is_file():
                    st = entry.stat()
                    found.append((os.path.relpath(entry.path, folder), st.st_size, st.st_mtime_ns))
                else:
                    special.append(os.path.relpath(entry.path, folder))
    return sorted(found)


def stat_files(root: Path, files: list[str]) -> dict[str, Any]:
    """What `_scan` gives for the files of a list (LIST_LAYOUT; relative to root, or absolute): their names,
    sizes and mtimes now, missing ones left out."""
    found = [(f, os.stat(root / f)) for f in files if (root / f).is_file()]
    return {"files": [f for f, _ in found], "sizes": [st.st_size for _, st in found],
            "mtimes": [st.st_mtime_ns for _, st in found]}  # fmt: skip


def _scan(root: Path, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> dict[str, Any]:
    """The listing of `root`: layout, parts, classes, files (relative to root), sizes, mtimes, labels, part of each."""
    layout, parts = folder_layout(root, suffixes)
    files: list[str] = []
    sizes: list[int] = []
    mtimes: list[int] = []
    names: list[str | None] = []
    part_of: list[int] = []
    kinds: dict[str, bool] = {}
    special: list[str] = []
    for p, part in enumerate(parts):
        class_dirs, loose, odd = _entries(part, suffixes)
        if part != root:
            _refuse_mixed(part, class_dirs, loose)
        if class_dirs:  # a FIFO beside class folders: no class folder's walk will name it
            special += [os.path.relpath(part / name, root) for name in odd]
        kinds[part.name] = bool(class_dirs)
        groups = [(d, d.name, True) for d in class_dirs] if class_dirs else [(part, None, False)]
        for folder, name, recursive in groups:
            skipped: list[str] = []
            listed = _images_under(folder, recursive, skipped, suffixes)
            special += [os.path.relpath(folder / rel, root) for rel in skipped]
            if not listed and (name is not None or part != root):
                what = "class folder" if name is not None else "split folder"
                raise DataError(f"{what} {shown_path(folder)} holds no images ({', '.join(suffixes)})")
            for rel, size, mtime in listed:
                files.append(os.path.relpath(folder / rel, root))
                sizes.append(size)
                mtimes.append(mtime)
                names.append(name)
                part_of.append(p)
    if special:
        kinds_of = [f"{shown_path(s)} ({_kind(str(root / s))})" for s in special[:SHOWN_NAMES]]
        warnings.warn(DataWarning(
            f"image folder {shown_path(root)}: skipped {len(special)} "
            f"{'entry that is not a regular file' if len(special) == 1 else 'entries that are not regular files'}: "
            f"{', '.join(kinds_of)}{', ...' if len(special) > SHOWN_NAMES else ''}"
        ), stacklevel=3)  # fmt: skip
    if len(set(kinds.values())) > 1:
        with_classes = ", ".join(n for n, k in kinds.items() if k)
        loose = ", ".join(n for n, k in kinds.items() if not k)
        raise DataError(f"in {shown_path(root)}, {with_classes} holds class folders but {loose} holds loose images; "
                        "use one kind")  # fmt: skip
    classes = sorted({n for n in names if n is not None}) if any(kinds.values()) else None
    if classes is None and len(parts) > 1:
        layout += ", loose images"
    return {"layout": layout, "parts": [p.name if p != root else "" for p in parts], "classes": classes,
            "files": files, "sizes": sizes, "mtimes": mtimes, "names": names, "part_of": part_of}  # fmt: skip


def _content_sha256(root: Path, files: list[str]) -> list[str]:
    """Hex SHA-256 of every file's bytes, in the index's order (read in chunks: memory flat in file size)."""
    from maskkit.data.fingerprint import sha256_of_file

    return [sha256_of_file(root / f) for f in files]


def _line(name: str, *fields: Any) -> bytes:
    """One file's line of the digest: its name's own bytes (any encoding) and fields, NUL-separated."""
    return name.encode("utf-8", "surrogateescape") + b"".join(b"\0" + str(f).encode() for f in fields) + b"\n"


@dataclass
class FolderIndex:
    """An image folder listed once: relative file names, sizes, mtimes, labels, split folder, and what the headers said.

    files: [n] paths relative to `root`; sizes: [n] bytes; mtimes: [n] modification times in ns (None in an
    index of format 1); hashes: [n] hex SHA-256 of each file's bytes (only when it covers content);
    labels: [n] int64 (None for loose images); parts: the split folder names ("train", "val", ...; ""
    when the folder has none); part_of: [n] into parts; mode: "L" or "RGB" (from a seeded sample of
    headers); sample_sizes: the (width, height) of those headers.
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
    mtimes: np.ndarray | None = None
    hashes: list[str] | None = None
    suffixes: tuple[str, ...] = IMAGE_SUFFIXES

    def __len__(self) -> int:
        return len(self.files)

    @property
    def covers(self) -> str:
        """What the fingerprint and `changes` see: COVERS_CONTENT, COVERS_MTIMES, or COVERS_SIZES (format 1)."""
        if self.hashes is not None:
            return COVERS_CONTENT
        return COVERS_SIZES if self.mtimes is None else COVERS_MTIMES

    @classmethod
    def scan(
        cls, path: str | Path, content: bool = False, suffixes: tuple[str, ...] = IMAGE_SUFFIXES,
        headers: Callable[[Path, list[str]], tuple[str, list[tuple[int, int]]]] | None = None,
        source: str = "imagefolder",
    ) -> FolderIndex:
        """List the folder `path` (one stat call per file, HEADER_SAMPLE headers opened; with `content`, every
        file's bytes hashed as well); DataError if it holds none, or if its layout is refused (`folder_layout`).
        A folder of other files (clips) names their `suffixes`, the reader of its `headers` and its `source`."""
        root = check_dir(path, source).resolve()
        listing = _scan(root, suffixes)
        if not listing["files"]:
            raise DataError(f"data directory {shown_path(root)} holds no images ({', '.join(suffixes)})")
        classes = listing["classes"]
        index = {name: i for i, name in enumerate(classes or [])}
        labels = None if classes is None else np.array([index[n] for n in listing["names"]], dtype=np.int64)
        mode, sample_sizes = (headers or _read_headers)(root, listing["files"])
        hashes = _content_sha256(root, listing["files"]) if content else None
        return cls(root, listing["layout"], listing["parts"], classes, listing["files"],
                   np.asarray(listing["sizes"], dtype=np.int64), labels,
                   np.asarray(listing["part_of"], dtype=np.int64), mode, sample_sizes,
                   np.asarray(listing["mtimes"], dtype=np.int64), hashes, tuple(suffixes))  # fmt: skip

    def path(self, i: int) -> Path:
        return self.root / self.files[i]

    def _record(self) -> list[list[Any]]:
        """Per file, what the index covers beside its name: [size], [size, mtime] or [size, sha256]."""
        sizes = self.sizes.tolist()
        if self.hashes is not None:
            return [list(pair) for pair in zip(sizes, self.hashes, strict=True)]
        if self.mtimes is not None:
            return [list(pair) for pair in zip(sizes, self.mtimes.tolist(), strict=True)]
        return [[size] for size in sizes]

    def fingerprint(self) -> dict[str, Any]:
        """{"kind": "files", "covers": what it covers, "count": n, "digest": SHA-256 of every file's line}.

        A line is the relative name, size and mtime in ns (or content SHA-256), NUL-separated. An index of
        format 1 (`covers` COVERS_SIZES) keeps its fingerprint of then, without "covers": {"kind", "count",
        "digest" of every "name <tab> size" line}, so that the runs that recorded it are still checked."""
        digest = hashlib.sha256()
        if self.mtimes is None and self.hashes is None:
            for name, size in zip(self.files, self.sizes.tolist(), strict=True):
                digest.update(f"{name}\t{size}\n".encode("utf-8", "surrogateescape"))
            return {"kind": "files", "count": len(self.files), "digest": digest.hexdigest()}
        for name, fields in zip(self.files, self._record(), strict=True):
            digest.update(_line(name, *fields))
        return {"kind": "files", "covers": self.covers, "count": len(self.files), "digest": digest.hexdigest()}

    def changes(self) -> str | None:
        """What differs between the index and the folder on disk now (None if nothing): missing, new, resized
        files, and as the index covers them, files modified at the same size (a new mtime, or new bytes:
        every file is hashed again); the phrase ends with what the comparison covers."""
        try:
            with warnings.catch_warnings():  # the listing's warnings were given when the run listed it
                warnings.simplefilter("ignore", DataWarning)
                now = stat_files(self.root, self.files) if self.layout == LIST_LAYOUT else _scan(self.root, self.suffixes)
        except (OSError, DataError) as err:
            return f"it can no longer be listed ({err})"
        before = dict(zip(self.files, self.sizes.tolist(), strict=True))
        after = dict(zip(now["files"], now["sizes"], strict=True))
        missing = sorted(set(before) - set(after))
        new = sorted(set(after) - set(before))
        kept = sorted(f for f in before if f in after)
        resized = [f for f in kept if before[f] != after[f]]
        same_size = [f for f in kept if before[f] == after[f]]
        modified, how = self._modified(same_size, now)
        what = []
        for label, names in (("missing", missing), ("new", new), ("changed size", resized), (how, modified)):
            if names:
                what.append(f"{len(names)} file(s) {label} ({_names(names)})")
        return f"{'; '.join(what)} (the check covers {self.covers})" if what else None

    def _modified(self, names: list[str], now: dict[str, Any]) -> tuple[list[str], str]:
        """Which of `names` (same size as listed) changed since, and how the index tells it."""
        if self.hashes is not None:
            listed = dict(zip(self.files, self.hashes, strict=True))
            current = _content_sha256(self.root, names)
            return [f for f, h in zip(names, current, strict=True) if listed[f] != h], "with new content"
        if self.mtimes is not None:
            listed = dict(zip(self.files, self.mtimes.tolist(), strict=True))
            current = dict(zip(now["files"], now["mtimes"], strict=True))
            return [f for f in names if listed[f] != current[f]], "modified at the same size (new mtime)"
        return [], ""

    # ---- the index file ------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The index file's JSON: format 2, or format 1 (no mtimes, no hashes) for an index read from one."""
        legacy = self.covers == COVERS_SIZES
        raw = {
            "format": 1 if legacy else INDEX_FORMAT, "root": str(self.root), "layout": self.layout,
            "parts": self.parts, "classes": self.classes, "files": self.files, "sizes": self.sizes.tolist(),
            "labels": None if self.labels is None else self.labels.tolist(), "part_of": self.part_of.tolist(),
            "mode": self.mode, "sample_sizes": [list(s) for s in self.sample_sizes],
            "fingerprint": self.fingerprint(),
        }  # fmt: skip
        if not legacy:
            raw["mtimes"] = None if self.mtimes is None else self.mtimes.tolist()
            raw["hashes"] = self.hashes
        if self.suffixes != IMAGE_SUFFIXES:  # a folder of clips; an image folder's index stays as it was
            raw["suffixes"] = list(self.suffixes)
        return raw

    def save(self, path: str | Path) -> None:
        """Write the index as gzip'd JSON at `path` (atomically: a temporary file, then a rename)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        with gzip.open(tmp, "wt", encoding="utf-8", compresslevel=6) as f:
            json.dump(self.to_dict(), f)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> FolderIndex:
        """The index saved at `path` (format 1 or 2); DataError naming the file if it is unreadable or its
        fingerprint is wrong."""
        try:
            with gzip.open(path, "rt", encoding="utf-8") as f:
                raw = json.load(f)
            version = raw.get("format")
            if version not in (1, INDEX_FORMAT):
                raise DataError(f"the data index {shown_path(path)} has format {version!r}, not 1 or {INDEX_FORMAT} "
                                "(written by another maskkit)")  # fmt: skip
            later = version == INDEX_FORMAT
            mtimes = raw["mtimes"] if later else None
            hashes = raw["hashes"] if later else None
            index = cls(Path(raw["root"]), raw["layout"], list(raw["parts"]), raw["classes"], list(raw["files"]),
                        np.asarray(raw["sizes"], dtype=np.int64),
                        None if raw["labels"] is None else np.asarray(raw["labels"], dtype=np.int64),
                        np.asarray(raw["part_of"], dtype=np.int64), raw["mode"],
                        [tuple(s) for s in raw["sample_sizes"]],
                        None if mtimes is None else np.asarray(mtimes, dtype=np.int64),
                        None if hashes is None else [str(h) for h in hashes],
                        tuple(raw.get("suffixes", IMAGE_SUFFIXES)))  # fmt: skip
            recorded = raw["fingerprint"]
            if later and mtimes is None and hashes is None:
                raise ValueError("it records neither mtimes nor hashes")
            fingerprint = index.fingerprint()
        except DataError:
            raise
        except (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise DataError(f"cannot read the data index {shown_path(path)}: {err}") from None
        if fingerprint != recorded:
            raise DataError(f"the data index {shown_path(path)} is damaged (its fingerprint does not match its list)")
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
