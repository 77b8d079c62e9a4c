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

tensorboard is an optional extra (`pip install "maskkit[tensorboard]"`), imported only when asked for.
W&B is not built in: `wandb sync --sync-tensorboard RUN/tensorboard` (or `wandb.tensorboard.patch`)
uploads the TensorBoard files, and metrics.jsonl / perf.jsonl are plain JSON lines.
"""

from __future__ import annotations

import importlib
import random
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

__all__ = [
    "LOGGERS", "MASK_PICTURE_IMAGES", "MASK_PICTURE_TILE", "TENSORBOARD_DIR", "RunLogger", "TensorBoardLogger",
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
        writer = _summary_writer()
        self.log_dir = Path(log_dir)
        self.writer = writer(log_dir=str(self.log_dir), purge_step=purge_step)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()

    def image(self, step: int, name: str, array: np.ndarray) -> None:
        """`array`: [H, W, 3] uint8."""
        self.writer.add_image(name, array, global_step=step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


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
    from maskkit.visualize import mask_grid

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
