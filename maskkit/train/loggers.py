"""Loggers next to metrics.jsonl (`--log`): TensorBoard, fed what metrics.jsonl and perf.jsonl hold.

metrics.jsonl stays the run's record; a logger is a view of it: every scalar of each metrics.jsonl line
(tag `metrics/<key>`), the perf.jsonl line's (`perf/<key>`), and every `--log-images-every` steps a
picture of the masks (`masks`: a few fixed test images, their hidden patches under the current policy,
its scores and the reconstruction, as `maskkit visualize` draws them). Drawing the picture draws no
random number of the run's (its own seeded generator; the global RNG states are restored after it), so a
run logs the same metrics.jsonl bytes with and without a logger.

    logger = open_logger("tensorboard", "runs/demo/tensorboard", purge_step=21)  # resuming from step 20
    logger.log(30, {"metrics/loss": 0.41})
    logger.image(30, "masks", picture)       # [H, W, 3] uint8
    logger.close()

A logger that cannot open its folder is a one-line ValueError naming --log and the folder (the run stops before
its first step); one that fails later (its folder removed, the disk full), in the caller's thread or in the
writer's own thread, is dropped with one `LoggerWarning` line and the run goes on: metrics.jsonl stays the
record, and no thread prints a traceback.

tensorboard is an optional extra (`pip install "maskkit[tensorboard]"`), imported only when asked for.
W&B is not built in: `wandb sync --sync-tensorboard RUN/tensorboard` (or `wandb.tensorboard.patch`)
uploads the TensorBoard files, and metrics.jsonl / perf.jsonl are plain JSON lines.
"""

from __future__ import annotations

import contextlib
import importlib
import random
import threading
import warnings
import weakref
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

__all__ = [
    "LOGGERS", "MASK_PICTURE_IMAGES", "MASK_PICTURE_TILE", "TENSORBOARD_DIR", "LoggerWarning", "RunLogger",
    "TensorBoardLogger",
    "check_logger", "mask_picture", "open_logger", "scalars_of",
]  # fmt: skip

#: what --log takes
LOGGERS = ("none", "tensorboard")
#: the TensorBoard event files' folder in the run directory
TENSORBOARD_DIR = "tensorboard"
#: images and tile side (pixels) of the logged mask picture
MASK_PICTURE_IMAGES, MASK_PICTURE_TILE = 4, 96
#: the seed of the picture's images and masks (its own generator: the run's are not drawn from)
MASK_PICTURE_SEED = 0
INSTALL_HINT = 'pip install "maskkit[tensorboard]"'


class LoggerWarning(UserWarning):
    """A logger that failed during a run and was dropped (the CLI prints one line)."""


#: threads of open loggers: an exception there is not printed (the writer raises it again in the caller's thread)
_QUIET_THREADS: weakref.WeakSet[threading.Thread] = weakref.WeakSet()
_hook_before: Any = None


def _quiet_hook(args: Any) -> None:
    """threading.excepthook: silent for a logger's writer thread, the previous hook for any other."""
    if args.thread is not None and args.thread in _QUIET_THREADS:
        return
    (_hook_before or threading.__excepthook__)(args)


def _quieted(start: Any) -> Any:
    """`start()`, with the threads it starts registered in _QUIET_THREADS (and _quiet_hook installed)."""
    global _hook_before
    before = set(threading.enumerate())
    try:
        return start()
    finally:
        _QUIET_THREADS.update(set(threading.enumerate()) - before)
        if threading.excepthook is not _quiet_hook:
            _hook_before, threading.excepthook = threading.excepthook, _quiet_hook


class RunLogger(Protocol):
    """Where a run's logged numbers and pictures also go (rank 0 only)."""

    def log(self, step: int, scalars: dict[str, float]) -> None: ...

    def image(self, step: int, name: str, array: np.ndarray) -> None: ...

    def close(self) -> None: ...


def check_logger(kind: str) -> None:
    """One-line ValueError for an unknown --log, or for `tensorboard` without the tensorboard package."""
    if kind not in LOGGERS:
        raise ValueError(f"--log must be one of {', '.join(LOGGERS)}, got {kind!r}")
    if kind == "tensorboard":
        _summary_writer()


def _summary_writer() -> Any:
    """torch's SummaryWriter; ValueError naming the extra when tensorboard is not installed."""
    try:
        importlib.import_module("tensorboard")  # torch.utils.tensorboard may be imported already: ask for the package
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError(f"--log tensorboard needs the tensorboard package: {INSTALL_HINT}") from None
    return SummaryWriter


class TensorBoardLogger:
    """TensorBoard event files in `log_dir`; `purge_step` (a resume's step + 1) drops the events logged at or
    after it by an earlier writer (when TensorBoard reads the folder): a resumed run's steps appear once."""

    def __init__(self, log_dir: str | Path, *, purge_step: int | None = None) -> None:
        from maskkit.options import shown_path

        writer = _summary_writer()
        self.log_dir = Path(log_dir)
        self.failed: str | None = None  # why the logger was dropped, once it was
        try:
            self.writer = _quieted(lambda: writer(log_dir=str(self.log_dir), purge_step=purge_step))
        except Exception as err:  # e.g. the folder is a file, or cannot be made
            raise ValueError(f"--log tensorboard cannot write {shown_path(self.log_dir)}: {_reason(err)}") from None

    def log(self, step: int, scalars: dict[str, float]) -> None:
        def write() -> None:
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, global_step=step)
            self.writer.flush()

        self._guarded(write)

    def image(self, step: int, name: str, array: np.ndarray) -> None:
        """`array`: [H, W, 3] uint8."""
        def write() -> None:
            self.writer.add_image(name, array, global_step=step, dataformats="HWC")
            self.writer.flush()

        self._guarded(write)

    def close(self) -> None:
        self._guarded(self.writer.close)

    def _guarded(self, write: Any) -> None:
        """`write()` unless the logger failed before; a failure drops the logger with one LoggerWarning."""
        if self.failed is not None:
            return
        try:
            write()
        except Exception as err:
            from maskkit.options import shown_path

            self.failed = _reason(err)
            warnings.warn(LoggerWarning(f"--log tensorboard stopped logging to {shown_path(self.log_dir)}: "
                                        f"{self.failed}; the run goes on (metrics.jsonl is its record)"), stacklevel=3)
            with contextlib.suppress(Exception):  # let its thread end; what it still holds is lost
                self.writer.close()


def _reason(err: BaseException) -> str:
    """An exception as a few words on one line."""
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def open_logger(kind: str, log_dir: str | Path, *, purge_step: int | None = None) -> RunLogger | None:
    """The logger --log names (None for `none`); ValueError as `check_logger`."""
    check_logger(kind)
    if kind == "none":
        return None
    return TensorBoardLogger(log_dir, purge_step=purge_step)


def scalars_of(record: dict[str, Any], prefix: str) -> dict[str, float]:
    """`prefix/key` -> value of every number in a metrics.jsonl or perf.jsonl line but its step."""
    return {f"{prefix}/{k}": float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float))}  # fmt: skip


def mask_picture(trainer: Any, *, num_images: int = MASK_PICTURE_IMAGES, tile: int = MASK_PICTURE_TILE) -> np.ndarray:
    """The run's masks now, [H, W, 3] uint8: `num_images` fixed test images (the val split's when the test
    split is empty), drawn as `maskkit visualize` draws a run (`maskkit.visualize.mask_grid`, seed 0).

    Draws no random number the run would: the picture's images and masks come from their own seeded
    generator, and the global torch (CPU and the device's), numpy and Python RNG states are put back.
    """
    from maskkit.visualize_clips import mask_picture as mask_grid

    splits = trainer.splits
    pool = splits["test"] if len(splits.get("test", ())) else splits["val"]
    devices = [trainer.device] if trainer.device.type == "cuda" else []
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        with torch.random.fork_rng(devices=devices):
            image = mask_grid(trainer.mae, trainer.policy, trainer.batcher, pool, ratio=trainer.config.resolved.mask_ratio,
                              num_images=num_images, tile=tile, seed=MASK_PICTURE_SEED)  # fmt: skip
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)
