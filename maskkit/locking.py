"""One writer per run directory: an exclusive advisory lock held for the whole of a run, and run
directories created atomically.

`RunLock(run_dir)` takes `fcntl.flock(LOCK_EX | LOCK_NB)` on `run_dir/.lock` and writes the holder's
process id, host and start time into it. The kernel releases a flock when its process ends, however it
ends (SIGKILL included), so a stale lock never blocks a resume, and no lock file ever needs deleting.
The standard library's fcntl is used rather than the `filelock` package because the message a second
writer gets must name the process that holds the lock, which filelock does not record; both rest on the
same flock(2). POSIX only (Linux, macOS): on other systems the lock is a no-op, said once in a warning.

`locked(path)` holds a blocking exclusive flock on a sibling lock file for a short read-modify-write
(`maskkit.run.record.merge_json`: two `evaluate`s of one run each keep their eval.json entry).

Every lock file is opened by `open_lock_file`: O_NOFOLLOW and O_CREAT without O_TRUNC, and refused
(`LockFileError`, one line naming it) unless it is a regular file, so a `.lock` that is a symbolic link
never has its target truncated or overwritten with a holder record.

`make_unique_dir(base)` creates `base`, or `base-2`, `base-3`, ... with `os.mkdir`, which fails if the
name exists, so two runs started in the same second never share a directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".lock"


class RunLockedError(ValueError):
    """The run directory is held by another process; the message (one line) names it."""


class LockFileError(ValueError):
    """A lock file that cannot be used safely (a symbolic link, a directory, a FIFO); one line naming it."""


def open_lock_file(path: Path, flags: int) -> int:
    """A descriptor of the lock file `path` (opened with `flags`, never following a symbolic link and never
    truncating it); LockFileError unless it is a regular file.

    O_NOFOLLOW makes the open of a symbolic link fail (ELOOP) instead of reaching, creating or changing
    its target; O_NONBLOCK keeps a FIFO put at the path from blocking the open.
    """
    nofollow = getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, (flags & ~os.O_TRUNC) | nofollow | os.O_NONBLOCK, 0o644)
    except OSError as err:
        if os.path.islink(path):
            raise LockFileError(f"lock file {path} is a symbolic link; remove it (a lock must be a plain file, "
                                "never one that leads elsewhere)") from None  # fmt: skip
        if os.path.isdir(path):
            raise LockFileError(f"lock file {path} is a directory; remove it") from None
        raise OSError(err.errno, f"cannot open lock file {path}: {err.strerror or err}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise LockFileError(f"lock file {path} is not a regular file; remove it")
    os.set_blocking(fd, True)
    return fd


def _holder_text(path: Path) -> str:
    """Who holds the lock, from the lock file: 'process 1234 on host (since 12:00:00)'."""
    try:
        info = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict) or "pid" not in info:
        return "another process"
    since = f" (since {info['started']})" if info.get("started") else ""
    return f"process {info['pid']} on {info.get('host', '?')}{since}"


#: descriptors of the locks this process holds; a forked child (a data-loader worker) closes its copies at
#: once, so that a lock dies with the process that took it, not with its last child
_HELD_FDS: set[int] = set()


def _close_inherited_locks() -> None:
    for fd in list(_HELD_FDS):
        try:
            os.close(fd)  # drops the child's reference only: the parent still holds the lock
        except OSError:
            pass
    _HELD_FDS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_locks)


class RunLock:
    """Context manager: the exclusive lock of a run directory, held until released or the process ends."""

    def __init__(self, run_dir: str | Path, *, what: str = "pretrain") -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock; RunLockedError naming the holder when another process has it."""
        if self._fd is not None:
            return self
        if fcntl is None:  # pragma: no cover
            warnings.warn("run directory locks need fcntl (POSIX); two writers are not prevented here", stacklevel=2)
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = open_lock_file(self.path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunLockedError(
                f"run directory {self.run_dir} is in use by {_holder_text(self.path)}; wait for it to end "
                "or choose another --out"
            ) from None
        record: dict[str, Any] = {"pid": os.getpid(), "host": socket.gethostname(), "what": self.what,
                                  "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(record) + "\n").encode())
        os.fsync(fd)
        self._fd = fd
        _HELD_FDS.add(fd)
        return self

    def release(self) -> None:
        """Let the lock go (the file stays: deleting a lock file races with the next taker)."""
        if self._fd is not None:
            _HELD_FDS.discard(self._fd)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def run_in_progress(run_dir: str | Path) -> str | None:
    """Who is writing `run_dir` now ('process 1234 on host ...'), or None when no process holds its lock."""
    path = Path(run_dir) / LOCK_FILE
    if fcntl is None or not os.path.lexists(path):
        return None
    try:
        fd = open_lock_file(path, os.O_RDONLY)
    except FileNotFoundError:  # removed since: no holder
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder_text(path)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def lock_path(path: str | Path) -> Path:
    """The sibling lock file of `path`: `dir/.name.lock`."""
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


@contextlib.contextmanager
def locked(path: str | Path) -> Iterator[Path]:
    """Hold an exclusive flock on `path`'s sibling lock file (`lock_path`), waiting for it, while the block
    runs.

    For a short read-modify-write of `path` by several processes; the lock file stays (deleting it races
    with the next taker), and the kernel drops the lock of a process that dies holding it.
    """
    lock = lock_path(path)
    if fcntl is None:  # pragma: no cover
        yield lock
        return
    fd = open_lock_file(lock, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield lock
    finally:
        os.close(fd)  # closing the descriptor lets the lock go


def make_unique_dir(base: str | Path) -> Path:
    """Create and return `base`, or the first free `base-2`, `base-3`, ...; atomic (os.mkdir)."""
    base = Path(base)
    base.parent.mkdir(parents=True, exist_ok=True)
    n = 1
    while True:
        candidate = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            os.mkdir(candidate)
            return candidate
        except FileExistsError:
            n += 1
