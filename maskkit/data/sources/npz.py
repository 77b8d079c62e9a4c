"""`npz:PATH`: arrays in one .npz archive: `images` ([N,H,W], [N,H,W,C] or [N,C,H,W]; uint8 or float in
[0, 1]) and optional `labels` [N] (integers or strings, remapped to 0..K-1 in sorted order), in memory.

The archive is read with `allow_pickle=False`: an object array is refused, never unpickled. The file is
read once: its bytes are hashed (`NpzData.fingerprint`, the run's record of what it trained on) and the
arrays loaded from those same bytes.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from maskkit.data.load import register_dataset
from maskkit.data.source import DataError, ImageData
from maskkit.options import shown_path
from maskkit.registry import Card

CARD = Card(
    idea="arrays 'images' (and optional 'labels') of one .npz archive, in memory",
    allowed={"arg": "PATH of an .npz file: images [N,H,W] | [N,H,W,C] | [N,C,H,W], uint8 or float in [0, 1]"},
)


#: what a damaged archive raises on reading (beside ValueError and OSError)
BROKEN = (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error)


@dataclass
class NpzData(ImageData):
    """The arrays of one .npz file in memory, and the SHA-256 and size of the file's bytes they came from."""

    file_sha256: str = ""
    file_bytes: int = 0

    def fingerprint(self) -> dict[str, Any]:
        """{"kind": "npz", "bytes": size of the file, "sha256": hex SHA-256 of its bytes}."""
        return {"kind": "npz", "bytes": self.file_bytes, "sha256": self.file_sha256}


@register_dataset("npz", card=CARD, arg="path")
def npz(*, arg: str, **_: Any) -> ImageData:
    """The arrays of the .npz file `arg`."""
    return load_npz(arg)


def load_npz(path: str | Path) -> NpzData:
    """Arrays `images` ([N,H,W], [N,H,W,C] or [N,C,H,W]; uint8, or float in [0, 1]) and optional `labels` [N]."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"npz file {path} does not exist")
    try:
        blob = path.read_bytes()
        archive = np.load(io.BytesIO(blob), allow_pickle=False)
    except BROKEN as err:
        raise DataError(f"cannot read npz file {path}: {_reason(err)}") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{path} is a single .npy array, not an .npz archive with 'images' and 'labels'")
    with archive:
        keys = set(archive.files)
        if "images" not in keys:
            raise DataError(f"npz file {path} has no array 'images' (found: {', '.join(sorted(keys)) or 'none'})")
        try:
            raw = archive["images"]
            raw_labels = archive["labels"] if "labels" in keys else None
        except BROKEN as err:
            raise DataError(f"cannot read npz file {path}: {_reason(err)}") from None
    images = _npz_images(raw, path)
    labels = classes = None
    if raw_labels is not None:
        labels, classes = _npz_labels(raw_labels, len(images), path)
    return NpzData(f"npz:{path}", images, labels, classes, file_sha256=hashlib.sha256(blob).hexdigest(),
                   file_bytes=len(blob))  # fmt: skip


def _reason(err: BaseException) -> str:
    """The first line of what went wrong ('empty file' for numpy's EOFError)."""
    if isinstance(err, EOFError):
        return "the file is empty"
    if isinstance(err, zipfile.BadZipFile):
        return f"not a complete .npz (zip) archive ({err})"
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _npz_images(raw: np.ndarray, path: Path) -> Tensor:
    if raw.ndim == 3:
        arr = raw[:, None]  # [N, 1, H, W]
    elif raw.ndim == 4:
        channels_last = raw.shape[-1] in (1, 3, 4) and raw.shape[1] not in (1, 3, 4)
        arr = np.moveaxis(raw, -1, 1) if channels_last else raw
        if arr.shape[1] not in (1, 3, 4):
            raise DataError(f"npz file {shown_path(path)}: 'images' of shape {raw.shape} has no channel axis of size 1, 3 or 4")
    else:
        raise DataError(f"npz file {shown_path(path)}: 'images' must be [N,H,W], [N,H,W,C] or [N,C,H,W], got shape {raw.shape}")
    if arr.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(arr))
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)):
            bad = int(np.flatnonzero((~np.isfinite(arr.reshape(len(arr), -1))).any(axis=1))[0])
            raise DataError(f"npz file {shown_path(path)}: 'images' holds non-finite values (NaN or inf), "
                            f"first in image {bad}")  # fmt: skip
        if arr.min(initial=0.0) < 0.0 or arr.max(initial=0.0) > 1.0:
            raise DataError(f"npz file {shown_path(path)}: 'images' of dtype {arr.dtype} must lie in [0, 1], "
                            f"got values in [{float(arr.min()):g}, {float(arr.max()):g}]")  # fmt: skip
        return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    raise DataError(f"npz file {shown_path(path)}: 'images' must be uint8 or float in [0, 1], got dtype {arr.dtype}")


def _npz_labels(raw: np.ndarray, n: int, path: Path) -> tuple[Tensor, list[str]]:
    if raw.ndim != 1:
        raise DataError(f"npz file {shown_path(path)}: 'labels' must be one-dimensional [N], got shape {raw.shape}")
    if len(raw) != n:
        raise DataError(f"npz file {path} has {n} images but {len(raw)} labels")
    if not (np.issubdtype(raw.dtype, np.integer) or np.issubdtype(raw.dtype, np.str_)):
        if not (np.issubdtype(raw.dtype, np.floating) and np.all(raw == np.round(raw))):
            raise DataError(f"npz file {shown_path(path)}: 'labels' must be integers or strings, got dtype {raw.dtype}")
    values, inverse = np.unique(raw, return_inverse=True)
    return torch.from_numpy(inverse.astype(np.int64)), [str(v) for v in values]
