"""Checkpoints written atomically and loaded without running code from the file.

A checkpoint is one state dict (tensors, numbers, strings, lists, dicts) saved with
`torch.save` into a temporary file in the target directory, flushed, fsync'ed and renamed over
the target, so a crash leaves either the old file or the new one, never half of one. A SHA-256
of the bytes is stored beside it (`<name>.sha256`) and checked on load, so a truncated or
corrupted file is detected. A file without its sidecar is not trusted: `load_checkpoint` refuses
it (`UnverifiedCheckpointError`) and `load_latest` falls back to an older verified one, unless
`trust_unverified=True` says to use it. Loading uses `torch.load(weights_only=True)`: a pickled
payload is refused, never executed.

RNG helpers capture the torch, numpy and python generators as plain tensors and lists so that
they survive `weights_only` loading.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_GLOB = "checkpoint-*.pt"
_STEP_RE = re.compile(r"checkpoint-(\d+)\.pt$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (missing, corrupt, or carrying pickled code)."""


class UnverifiedCheckpointError(CheckpointError):
    """A checkpoint that loads but has no `.sha256` sidecar to verify it against (not trusted by default)."""


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` atomically: temporary file in the same directory, fsync, rename.

    A failed write (disk full, file too large, no permission) leaves `path` as it was, removes the
    temporary file and raises an OSError of the same class and errno whose one-line message names `path`.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise _naming(err, path) from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # as a plain open() would create it (mkstemp uses 0600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, OSError):
            raise _naming(err, path) from None
        raise
    _fsync_dir(path.parent)


def _naming(err: OSError, path: Path) -> OSError:
    """`err` again (same class and errno) with the one-line message 'cannot write PATH: REASON'."""
    named = type(err)(f"cannot write {path}: {err.strerror or err}")
    named.errno = err.errno
    return named


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> str:
    """Save `state` atomically to `path` with a SHA-256 sidecar; returns the hex digest."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    atomic_write_bytes(path, data)
    atomic_write_text(f"{path}.sha256", digest + "\n")
    return digest


def verify_checkpoint(path: str | os.PathLike[str], digest: str | None = None) -> None:
    """Read `path` back and check its SHA-256 (against `digest`, else its sidecar); CheckpointError if wrong."""
    path = Path(path)
    expected = digest
    if expected is None:
        sidecar = Path(f"{path}.sha256")
        if not sidecar.is_file():
            raise CheckpointError(f"checkpoint {path} has no checksum file {sidecar.name}")
        expected = sidecar.read_text().strip()
    if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != expected:
        raise CheckpointError(f"checkpoint {path} is corrupt (checksum mismatch)")


def _sidecar(path: Path) -> Path:
    return Path(f"{path}.sha256")


def is_verified(path: str | os.PathLike[str]) -> bool:
    """Whether `path` has its `.sha256` sidecar (whether its bytes match is checked on load)."""
    return _sidecar(Path(path)).is_file()


def load_checkpoint(
    path: str | os.PathLike[str], map_location: Any = "cpu", *, trust_unverified: bool = False
) -> dict[str, Any]:
    """Load a checkpoint safely (weights_only); CheckpointError names the file and the problem.

    The bytes must match the `.sha256` sidecar; a file without one is refused with
    `UnverifiedCheckpointError` (after it was read, so a corrupt or pickled file says so first),
    unless `trust_unverified`.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    data = path.read_bytes()
    sidecar = _sidecar(path)
    verified = sidecar.is_file()
    if verified:
        expected = sidecar.read_bytes().decode("ascii", errors="replace").strip()
        if hashlib.sha256(data).hexdigest() != expected:
            raise CheckpointError(f"checkpoint {path} is corrupt (checksum mismatch)")
    try:
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means an unusable file
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            raise CheckpointError(f"checkpoint {path} holds pickled objects that are refused: {first}") from None
        raise CheckpointError(f"checkpoint {path} is corrupt or not a checkpoint: {first}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} does not hold a state dict (got {type(state).__name__})")
    if not verified and not trust_unverified:
        raise UnverifiedCheckpointError(
            f"checkpoint {path} is unverified: its checksum file {sidecar.name} is missing, so it is not trusted"
        )
    return state


def checkpoint_path(directory: str | os.PathLike[str], step: int) -> Path:
    """The file name of the checkpoint of `step`: checkpoint-0000100.pt."""
    return Path(directory) / f"checkpoint-{step:07d}.pt"


def list_checkpoints(directory: str | os.PathLike[str]) -> list[Path]:
    """Checkpoints in `directory`, oldest step first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.glob(CHECKPOINT_GLOB) if (m := _STEP_RE.search(p.name))]
    return [p for _, p in sorted(found)]


def load_latest(
    directory: str | os.PathLike[str], map_location: Any = "cpu", *, trust_unverified: bool = False
) -> tuple[Path, dict[str, Any], list[str]]:
    """The newest checkpoint in `directory` that loads and is verified: (path, state, problems of newer ones skipped).

    One without its `.sha256` is skipped like a corrupt one, unless `trust_unverified`.
    CheckpointError if there is none, or if none loads (the newest one's error, of its class).
    """
    paths = list_checkpoints(directory)
    if not paths:
        raise CheckpointError(f"no checkpoint in {directory}")
    errors: list[CheckpointError] = []
    for path in reversed(paths):
        try:
            return path, load_checkpoint(path, map_location, trust_unverified=trust_unverified), [str(e) for e in errors]
        except CheckpointError as err:
            errors.append(err)
    raise errors[0]


def prune_checkpoints(directory: str | os.PathLike[str], keep: int) -> None:
    """Delete all but the newest `keep` (>= 1) checkpoints and their sidecars, and temporary files
    left by a write that a crash interrupted (`.checkpoint-*.tmp`; call it after a save returned)."""
    for stale in Path(directory).glob(".checkpoint-*.tmp"):
        stale.unlink(missing_ok=True)
    paths = list_checkpoints(directory)
    for path in paths[: max(len(paths) - max(keep, 1), 0)]:
        path.unlink(missing_ok=True)
        Path(f"{path}.sha256").unlink(missing_ok=True)


def rng_state() -> dict[str, Any]:
    """The global torch (CPU and CUDA), numpy and python RNG states, as weights_only-safe values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": {"version": int(version), "internal": list(internal), "gauss": gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    torch.set_rng_state(state["torch"].cpu())
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["kind"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached"],
        )
    )
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
