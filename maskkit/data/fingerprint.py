"""Data fingerprints: what a run's data was when it was pretrained, so that a changed file is noticed.

`data_fingerprint(source)` is a small JSON object that changes when the data does:

- a source with a `fingerprint()` method (the protocol hook) gives its own, e.g. the npz source
  {"kind": "npz", "bytes": n, "sha256": hex of the file's bytes}, or a lazy folder source
  {"kind": "files", "covers": "names, sizes, mtimes", "count": n, "digest": ...} (an optional
  "covers" says what the fingerprint sees: `maskkit.data.folder_index`);
- a whole data set in memory (`ImageData`: digits, photos8, mnist5k, torchvision sets, movingdigits'
  clips) gives {"kind": "arrays", "count", "shape", "dtype", "images_sha256", "labels_sha256"}: SHA-256
  of the images' and the labels' bytes (cheap: they are in memory; a clip's shape is [C, T, H, W]);
- a resized view (`Resized`) gives its source's;
- any other source gives what is cheap to know without reading every sample: {"kind": "source",
  "count", "image_size", "in_chans", "labels_sha256"}, and "num_frames" for a source of clips.

`fingerprint_change(recorded, current)` names what changed in a short phrase ("content changed
(sha256 1a2b3c4d... -> 5e6f7a8b...)", "file count 1000 -> 999"), generic over the keys, or None; with
"covers", the phrase ends with what the fingerprint covers, and two fingerprints that cover different
things are reported as not comparable rather than as changed data.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
from torch import Tensor

from maskkit.data.source import DataError, ImageData, Resized, frames_of

__all__ = ["data_fingerprint", "fingerprint_change", "sha256_of_file", "tensor_sha256"]

#: how many hex digits of a digest a message shows
SHOWN_DIGITS = 8


def sha256_of_file(path: Any, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of the file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def tensor_sha256(t: Tensor | None) -> str | None:
    """Hex SHA-256 of a tensor's bytes (C order, on the CPU), or None for None."""
    if t is None:
        return None
    return hashlib.sha256(np.ascontiguousarray(t.detach().cpu().numpy())).hexdigest()  # the buffer, uncopied


def _is_json(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


def data_fingerprint(source: Any) -> dict[str, Any]:
    """The fingerprint of `source` (a JSON object with a "kind"); see the module docstring."""
    hook = getattr(source, "fingerprint", None)
    if callable(hook):
        value = hook()
        if not isinstance(value, dict) or not isinstance(value.get("kind"), str) or not _is_json(value):
            name = getattr(source, "name", type(source).__name__)
            raise DataError(
                f"dataset {name!r}: fingerprint() must return a JSON object with a 'kind', got {value!r:.60}"
            )
        return dict(value)
    if isinstance(source, Resized):
        return data_fingerprint(source.source)
    labels = getattr(source, "labels", None)
    if isinstance(source, ImageData):
        images = source.images
        return {
            "kind": "arrays", "count": int(images.shape[0]), "shape": [int(s) for s in images.shape[1:]],
            "dtype": str(images.dtype).removeprefix("torch."), "images_sha256": tensor_sha256(images),
            "labels_sha256": tensor_sha256(labels),
        }  # fmt: skip
    found = {
        "kind": "source", "count": len(source), "image_size": [int(s) for s in source.image_size],
        "in_chans": int(source.in_chans), "labels_sha256": tensor_sha256(labels),
    }  # fmt: skip
    if frames_of(source) is not None:  # (absent for images: their fingerprints stay as they were)
        found["num_frames"] = int(frames_of(source))
    return found


def _is_digest(key: str) -> bool:
    return key in ("sha256", "digest") or key.endswith(("_sha256", "_digest"))


def _show(value: Any) -> str:
    """A value as a message shows it: a long hex digest cut to its first digits, anything else as JSON."""
    if (
        isinstance(value, str)
        and len(value) > SHOWN_DIGITS * 2
        and all(c in "0123456789abcdef" for c in value)
    ):
        return value[:SHOWN_DIGITS] + "..."
    if isinstance(value, str):
        return value
    if value is None:
        return "none"
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _label(key: str, kind: str) -> str:
    if key == "count":
        return "file count" if kind == "files" else "image count"
    if key == "bytes":
        return "size in bytes"
    return key.replace("_", " ")


def _digest_phrase(key: str, old: Any, new: Any) -> str:
    """'content changed (sha256 1a2b3c4d... -> 5e6f7a8b...)', 'images changed (...)' for images_sha256."""
    what, _, algorithm = key.rpartition("_")
    return f"{what.replace('_', ' ') or 'content'} changed ({algorithm} {_show(old)} -> {_show(new)})"


def fingerprint_change(recorded: dict[str, Any], current: dict[str, Any]) -> str | None:
    """What changed between two fingerprints, in a short phrase; None when they are equal.

    Keys that differ are named in the recorded order (then the new ones), sizes and counts before
    digests: a size or count as 'file count 1000 -> 999', a digest as 'content changed (sha256
    1a2b3c4d... -> 5e6f7a8b...)', a key only the current one has (e.g. a first changed file) as
    'first changed file: a/1.png', one only the recorded one had as 'gone 1 -> absent'.
    """
    if recorded == current:
        return None
    old_kind, new_kind = recorded.get("kind"), current.get("kind")
    if old_kind != new_kind:
        return f"fingerprint kind {_show(old_kind)} -> {_show(new_kind)} (the source is read another way now)"
    kind = str(new_kind)
    old_covers, covers = recorded.get("covers"), current.get("covers")
    if old_covers != covers:
        return (f"the recorded fingerprint covers {_show(old_covers) if old_covers else 'what an older maskkit saw'}, "
                f"this one covers {_show(covers) if covers else 'what an older maskkit saw'}: they cannot be compared "
                "(the source is read another way now)")  # fmt: skip
    skip = ("kind", "covers")
    keys = [k for k in recorded if k not in skip] + [k for k in current if k not in recorded and k not in skip]
    plain, digests = [], []
    for key in keys:
        if key in recorded and key in current and recorded[key] == current[key]:
            continue
        old, new = recorded.get(key), current.get(key)
        if key not in recorded:
            plain.append(f"{_label(key, kind)}: {_show(new)}")
        elif key not in current:
            plain.append(f"{_label(key, kind)} {_show(old)} -> absent")
        elif _is_digest(key):
            digests.append(_digest_phrase(key, old, new))
        else:
            plain.append(f"{_label(key, kind)} {_show(old)} -> {_show(new)}")
    phrase = ", ".join(plain + digests)
    return phrase if covers is None else f"{phrase} (the fingerprint covers {covers})"
