"""A run's life: `create_run` (check, build, write config.json), `resume_run` (from the newest good
checkpoint), `train_run` (to the end, then model.pt and summary.json).

    config = RunConfig(data=DataConfig("digits"), policy=PolicyConfig("random"), train=TrainSettings(steps=50))
    prepared = create_run(config, "runs/demo")      # validates everything, then writes config.json
    summary = train_run(prepared)                   # metrics, checkpoints, model.pt, summary.json
    prepared = resume_run("runs/demo", steps=100)   # continues from the newest checkpoint

Under torchrun every rank calls these and rank 0 alone writes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from maskkit.checkpoint import CheckpointError, list_checkpoints, load_latest, save_checkpoint
from maskkit.distributed import SINGLE, DistContext, barrier, broadcast_object
from maskkit.train import MetricsLog, Pretrainer, StopSignals, train

from .builder import build_run, build_trainer, load_data, model_kind, new_run, resolve_device
from .config import RunConfig, RunError
from .record import (
    CHECKPOINTS,
    METRICS,
    MODEL,
    SUMMARY,
    RunRecord,
    check_writable,
    fresh_run_dir,
    holds_a_run,
    write_json,
)

__all__ = [
    "PreparedRun", "create_run", "resume_run", "train_run",
]  # fmt: skip


@dataclass
class PreparedRun:
    """A run ready to train: its directory, record, trainer, and where it starts from."""

    out: Path
    record: RunRecord
    trainer: Pretrainer
    source: str = "the start"  # the checkpoint it resumes from
    warnings: list[str] = field(default_factory=list)

    def resume_command(self) -> str:
        """How to continue this run: under torchrun, with the same number of processes."""
        dist = self.trainer.dist
        if dist.enabled:
            return f"torchrun --nproc_per_node {dist.world_size} -m maskkit.cli pretrain --resume {self.out}"
        return f"maskkit pretrain --resume {self.out}"


def create_run(
    config: RunConfig, out: str | Path | None = None, *, dist: DistContext = SINGLE, command: list[str] | None = None
) -> PreparedRun:
    """Validate `config`, build data, MAE, policy and trainer, then write `out`/config.json.

    Every check runs before anything is written; `out` defaults to runs/<date-time>. Under
    torchrun every rank calls it and rank 0 alone writes.
    """
    config.check()
    torch.manual_seed(config.train.seed)  # whatever initialises from the global RNG (policies, head) is seeded
    dev = resolve_device(config.train.device, dist)
    if out is None:
        out = broadcast_object(
            fresh_run_dir(Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")) if dist.is_main else None, dist
        )  # one directory for all ranks: rank 0's
    out = Path(out)
    if holds_a_run(out):
        raise RunError(f"{out} already holds a run; continue it with --resume {out} or choose another --out")
    if out.exists() and not out.is_dir():
        raise RunError(f"cannot write to output directory {out}: it is a file")
    model_kind(config.model.name)  # an unknown builder fails before the data is read
    run = new_run(config, load_data(config.data), dev, world_size=dist.world_size, command=command)
    trainer = build_trainer(run, dist)  # builds optimizers and engine: may fail
    barrier(dist)  # every rank has checked the directory before rank 0 writes
    if dist.is_main:
        check_writable(out)
        run.record.write(out)
    return PreparedRun(out, run.record, trainer)


def resume_run(
    run_dir: str | Path,
    *,
    steps: int | None = None,
    device: str = "auto",
    dist: DistContext = SINGLE,
    trust_unverified: bool = False,
) -> PreparedRun:
    """The run in `run_dir`, from its newest good checkpoint (or from step 0, with a warning, if it has none).

    `steps` extends the run (written to config.json); `device` 'auto' means the run's own. A checkpoint
    without its `.sha256` is skipped (with a warning) unless `trust_unverified`. metrics.jsonl is
    checked line by line before anything is built, then cut back to the restored step.
    """
    from maskkit.checkpoint import UnverifiedCheckpointError, is_verified

    run_dir = Path(run_dir)
    record = RunRecord.read(run_dir)
    metrics = MetricsLog(run_dir / METRICS)
    metrics.load()  # a bad line: one line naming the file and the line, before anything is built or written
    dev = resolve_device(record.device if device == "auto" else device, dist)
    path, state, warnings = None, None, []
    if list_checkpoints(run_dir / CHECKPOINTS):
        try:
            path, state, skipped = load_latest(run_dir / CHECKPOINTS, trust_unverified=trust_unverified)
        except UnverifiedCheckpointError as err:
            raise RunError(f"cannot resume {run_dir}: {err} (--trust-unverified uses it)") from None
        except CheckpointError as err:
            raise RunError(f"cannot resume {run_dir}: {err}") from None
        warnings += [f"skipped {problem}" for problem in skipped]
        if not is_verified(path):
            warnings.append(f"trusting {path.name} without its checksum file, as --trust-unverified asks")
    start = 0 if state is None else int(state["step"])
    cfg = record.train_config
    torch.manual_seed(cfg.seed)  # as a new run seeds itself: starting over repeats it exactly
    run = build_run(record, dev)
    if steps is not None and steps <= start:
        raise RunError(f"--steps {steps} does not go beyond the checkpoint's step {start}")
    if steps is None and start >= cfg.steps:
        raise RunError(f"run {run_dir} is complete ({start} of {cfg.steps} steps); extend it with --steps N")
    if cfg.world_size != dist.world_size:
        raise RunError(
            f"run {run_dir} was trained by {cfg.world_size} process(es); resume it with the same number "
            f"(torchrun --nproc_per_node {cfg.world_size}), not {dist.world_size}"
        )
    trainer = build_trainer(run, dist, steps=steps)
    if state is not None:
        trainer.load_state_dict(state)
    barrier(dist)  # every rank has read the checkpoint before rank 0 changes the directory
    if dist.is_main:
        check_writable(run_dir)
        if steps is not None and steps != record.train["steps"]:
            record.train["steps"] = steps
            record.write(run_dir)
        warnings += metrics.truncate_after(trainer.step_count)
    if path is None:
        warnings.append(f"{run_dir} has no checkpoint (it was stopped before its first); starting over from step 0")
    return PreparedRun(run_dir, record, trainer, "the start" if path is None else path.name, warnings)


def train_run(
    prepared: PreparedRun,
    *,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    stop: StopSignals | None = None,
) -> dict[str, Any]:
    """Train to the end, then write model.pt and summary.json (rank 0); returns the summary.

    Raises `maskkit.train.TrainingStopped` after checkpointing when `stop` was signalled, and
    `FloatingPointError` on a non-finite number (the last good checkpoint stays).
    """
    trainer, out = prepared.trainer, prepared.out
    start, t0 = trainer.step_count, time.perf_counter()
    records = train(trainer, out, on_step=on_step, stop=stop)
    seconds = time.perf_counter() - t0
    images = (trainer.step_count - start) * trainer.loaders["train"].stream.batch_size
    summary = {
        "steps": trainer.step_count,
        "steps_this_call": trainer.step_count - start,
        "seconds": round(seconds, 3),
        "images_per_second": round(images / max(seconds, 1e-9), 1),
        "final": records[-1] if records else {},
        "model": str(out / MODEL),
    }
    if trainer.dist.is_main:  # rank 0 writes the final weights and the summary
        save_checkpoint(out / MODEL, trainer.weights())
        write_json(out / SUMMARY, summary)
    return summary
