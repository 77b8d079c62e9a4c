"""A run's life: `create_run` (check, build, write config.json), `resume_run` (from the newest good
checkpoint), `train_run` (to the end, then model.pt and summary.json).

A run is complete when its summary.json is written, and that comes after its final weights: a run whose
last checkpoint is at its last step but whose model.pt or summary.json is missing (the disk filled while
they were written) is not complete, and `resume_run` writes them.

    config = RunConfig(data=DataConfig("digits"), policy=PolicyConfig("random"), train=TrainSettings(steps=50))
    prepared = create_run(config, "runs/demo")      # validates everything, then writes config.json
    summary = train_run(prepared)                   # metrics, checkpoints, model.pt, summary.json
    prepared = resume_run("runs/demo", steps=100)   # continues from the newest checkpoint

Under torchrun every rank calls these and rank 0 alone writes. One writer per run directory: rank 0
holds the directory's `maskkit.locking.RunLock` (an fcntl.flock on `<run>/.lock`) from before its first
write, and before the authoritative "already holds a run" check, until model.pt and summary.json are
written, a stop or an error ends `train_run`, or `PreparedRun.close()`; a second `pretrain` or
`--resume` of the directory gets RunLockedError naming the holder's process. The kernel drops the lock
of a killed process, so a SIGKILLed run never blocks its resume.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from maskkit.checkpoint import (
    CheckpointError,
    checkpoint_path,
    list_checkpoints,
    load_latest,
    save_checkpoint,
)
from maskkit.data import parse_dataset
from maskkit.distributed import SINGLE, DistContext, barrier, broadcast_object
from maskkit.locking import RunLock, RunLockedError, make_unique_dir, run_in_progress
from maskkit.options import shown_path
from maskkit.train import MetricsLog, Pretrainer, StopSignals, TrainSettings, train
from maskkit.train.config import MAX_STEPS
from maskkit.train.loggers import check_logger, open_logger

from .builder import build_run, build_trainer, load_data, model_kind, new_run, resolve_device
from .config import RunConfig, RunError, _one_line
from .record import (
    CHECKPOINTS,
    CONFIG,
    METRICS,
    MODEL,
    PERF,
    SUMMARY,
    TENSORBOARD,
    RunRecord,
    check_writable,
    holds_a_run,
    write_json,
)

__all__ = [
    "PreparedRun", "create_run", "is_complete", "refuse_inside_data", "resume_run", "take_lock", "train_run",
]  # fmt: skip

#: tries at taking a run's lock: a reader's momentary probe (`run_in_progress`) must not refuse a writer
LOCK_TRIES, LOCK_RETRY_SECONDS = 3, 0.05


@dataclass
class PreparedRun:
    """A run ready to train: its directory, record, trainer, and where it starts from."""

    out: Path
    record: RunRecord
    trainer: Pretrainer
    source: str = "the start"  # the checkpoint it resumes from
    warnings: list[str] = field(default_factory=list)
    lock: RunLock | None = field(default=None, repr=False)  # held by rank 0 until the run ends

    def close(self) -> None:
        """Let the run directory's lock go (`train_run` does this when it ends, however it ends)."""
        if self.lock is not None:
            self.lock.release()

    def __del__(self) -> None:  # a run dropped untrained frees its directory
        with contextlib.suppress(Exception):  # at interpreter exit the kernel frees it anyway
            self.close()

    def resume_command(self) -> str:
        """How to continue this run: under torchrun, with the same number of processes (and nodes)."""
        dist = self.trainer.dist
        if dist.enabled and dist.nodes > 1:  # the rendezvous is the user's: the same flags as the first launch
            return (f"torchrun --nnodes {dist.nodes} --nproc_per_node {dist.per_node} --rdzv-backend c10d "
                    f"--rdzv-endpoint HOST:PORT -m maskkit.cli pretrain --resume {self.out} (on every node)")
        if dist.enabled:
            return f"torchrun --nproc_per_node {dist.world_size} -m maskkit.cli pretrain --resume {self.out}"
        return f"maskkit pretrain --resume {self.out}"


def create_run(
    config: RunConfig, out: str | Path | None = None, *, dist: DistContext = SINGLE, command: list[str] | None = None
) -> PreparedRun:
    """Validate `config`, build data, MAE, policy and trainer, then write `out`/config.json.

    Every check runs before anything is written; `out` defaults to runs/<date-time> (`-2`, `-3`, ...
    when taken, made atomically) and may not lie inside an image folder of the data. Under torchrun
    every rank calls it and rank 0 alone writes, taking `out`'s lock before its last "already holds a
    run" check and its first write (RunLockedError, naming the holder, while another process has it).
    """
    if out is not None and not str(out).strip():
        raise RunError(f"--out is an empty path ({str(out)!r}); give a directory name (or none: runs/<date-time>)")
    config.check()
    torch.manual_seed(config.train.seed)  # whatever initialises from the global RNG (policies, head) is seeded
    dev = resolve_device(config.train.device, dist)
    target = Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S") if out is None else Path(out)
    refuse_inside_data(target, config.data.dataset, "--out")
    if out is not None:
        _refuse_taken(target)  # early, before the data is read; checked again under the lock
    model_kind(config.model.name)  # an unknown builder fails before the data is read
    run = new_run(config, load_data(config.data), dev, world_size=dist.world_size, command=command)
    trainer = build_trainer(run, dist)  # builds optimizers and engine: may fail
    barrier(dist)  # every rank has built the run before rank 0 takes the directory

    def take() -> tuple[Path, _Lock]:
        made = target if out is not None else make_unique_dir(target)  # atomic: never another run's
        check_writable(made)
        lock = take_lock(made, "pretrain")
        try:
            _refuse_taken(made, locked=True)  # under the lock: no other writer can pass it now
            run.record.write(made)
            if callable(getattr(run.data, "save_index", None)):
                run.data.save_index(made)  # the file list, read back by resume, evaluate and visualize
        except BaseException:
            lock.abandon()
            raise
        return made, lock

    path, lock = _on_main(take, dist)
    return PreparedRun(path, run.record, trainer, lock=lock)


def resume_run(
    run_dir: str | Path,
    *,
    steps: int | None = None,
    device: str = "auto",
    dist: DistContext = SINGLE,
    trust_unverified: bool = False,
    trust_data_change: bool = False,
) -> PreparedRun:
    """The run in `run_dir`, from its newest good checkpoint (or from step 0, with a warning, if it has none).

    `steps` extends the run (written to config.json); `device` 'auto' means the run's own. A checkpoint
    without its `.sha256` is skipped (with a warning) unless `trust_unverified`; data that changed since
    the run was pretrained (its fingerprint in config.json) is refused unless `trust_data_change`.
    metrics.jsonl and perf.jsonl are checked line by line before anything is built, then cut back to the
    restored step (and a --log tensorboard run's events after it are purged when training starts).
    Rank 0 takes the directory's lock before anything is read or written (RunLockedError while another
    process has it).
    """
    run_dir = Path(run_dir)
    _, lock = _on_main(lambda: (None, take_lock(run_dir, "resume") if (run_dir / CONFIG).is_file() else None), dist)
    try:
        prepared = _resume_run(
            run_dir, steps=steps, device=device, dist=dist, trust_unverified=trust_unverified,
            trust_data_change=trust_data_change,
        )  # fmt: skip
    except BaseException:
        if lock is not None:
            lock.abandon()  # a refused resume leaves the directory as it was
        raise
    prepared.lock = lock
    return prepared


def _resume_run(
    run_dir: str | Path, *, steps: int | None = None, device: str = "auto", dist: DistContext = SINGLE,
    trust_unverified: bool = False, trust_data_change: bool = False,
) -> PreparedRun:
    """`resume_run` under the lock: read, check, rebuild and restore the run."""
    from maskkit.checkpoint import UnverifiedCheckpointError, is_verified

    run_dir = Path(run_dir)
    record = RunRecord.read(run_dir)
    _one_line(check_logger, logging_of(record)[0])  # --log tensorboard without tensorboard: before any work
    metrics, perf = MetricsLog(run_dir / METRICS), MetricsLog(run_dir / PERF)
    metrics.load()  # a bad line: one line naming the file and the line, before anything is built or written
    perf.load()
    dev = resolve_device(record.device if device == "auto" else device, dist)
    path, state, warnings = None, None, []
    if list_checkpoints(run_dir / CHECKPOINTS):
        try:
            path, state, skipped = load_latest(run_dir / CHECKPOINTS, trust_unverified=trust_unverified)
        except UnverifiedCheckpointError as err:
            raise RunError(f"cannot resume {shown_path(run_dir)}: {err} (--trust-unverified uses it)") from None
        except CheckpointError as err:
            raise RunError(f"cannot resume {shown_path(run_dir)}: {err}") from None
        warnings += [f"skipped {problem}" for problem in skipped]
        if not is_verified(path):
            warnings.append(f"trusting {path.name} without its checksum file, as --trust-unverified asks")
    start = 0 if state is None else int(state["step"])
    cfg = record.resolved.train
    torch.manual_seed(cfg.seed)  # as a new run seeds itself: starting over repeats it exactly
    run = build_run(record, dev, run_dir=run_dir, trust_data_change=trust_data_change)
    if steps is not None and steps > MAX_STEPS:
        raise RunError(f"--steps must be at most {MAX_STEPS:,}, got {steps}")
    if steps is not None and steps <= start:
        raise RunError(f"--steps {steps} does not go beyond the checkpoint's step {start}")
    unfinished = steps is None and start >= cfg.steps and not is_complete(run_dir)
    if steps is None and start >= cfg.steps and not unfinished:
        raise RunError(f"run {shown_path(run_dir)} is complete ({start} of {cfg.steps} steps); extend it with --steps N")
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
        if steps is not None and steps != record.resolved.train.steps:
            record.extend_to(steps)
            record.write(run_dir)
        warnings += metrics.truncate_after(trainer.step_count)
        warnings += perf.truncate_after(trainer.step_count)
    if path is None:
        warnings.append(f"{run_dir} has no checkpoint (it was stopped before its first); starting over from step 0")
    if unfinished:
        warnings.append(f"{run_dir} trained all {start} steps but its final {MODEL} and {SUMMARY} were not both "
                        "written; writing them now from its last checkpoint")  # fmt: skip
    return PreparedRun(run_dir, record, trainer, "the start" if path is None else path.name, warnings)


def train_run(
    prepared: PreparedRun,
    *,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    stop: StopSignals | None = None,
) -> dict[str, Any]:
    """Train to the end, then write model.pt and summary.json (rank 0); returns the summary.

    Raises `maskkit.train.TrainingStopped` after checkpointing when `stop` was signalled, and
    `FloatingPointError` on a non-finite number (the last good checkpoint stays). However it ends,
    the run directory's lock is then released.
    """
    try:
        return _train(prepared, on_step, stop)
    finally:  # finished, stopped or failed: the directory is free
        prepared.close()


def _train(
    prepared: PreparedRun, on_step: Callable[[int, dict[str, float]], None] | None, stop: StopSignals | None
) -> dict[str, Any]:
    trainer, out = prepared.trainer, prepared.out
    kind, images_every = logging_of(prepared.record)
    start, t0 = trainer.step_count, time.perf_counter()
    # rank 0 logs; the events an earlier process logged after the resumed step are dropped (purge_step):
    # the steps it re-runs are logged again, those up to it were kept, as in metrics.jsonl
    logger = open_logger(kind, out / TENSORBOARD, purge_step=start + 1) if trainer.dist.is_main else None
    try:
        records = train(trainer, out, on_step=on_step, stop=stop, logger=logger, log_images_every=images_every)
    finally:
        if logger is not None:
            logger.close()
    seconds = time.perf_counter() - t0
    images = (trainer.step_count - start) * trainer.perf.effective_batch  # batch x accum x processes
    if not records and trainer.dist.is_main:  # a resume that only finishes the final writes
        records = MetricsLog(out / METRICS).read()[-1:]
    summary = {
        "steps": trainer.step_count,
        "steps_this_call": trainer.step_count - start,
        "seconds": round(seconds, 3),
        "images_per_second": round(images / max(seconds, 1e-9), 1),
        "final": records[-1] if records else {},
        "model": str(out / MODEL),
    }
    if trainer.dist.is_main:
        _finish(prepared, summary)
    return summary


def _finish(prepared: PreparedRun, summary: dict[str, Any]) -> None:
    """Write the final weights (model.pt, atomically, with its checksum) and only then summary.json, the
    mark of a complete run (`is_complete`). A failed write is a one-line RunError naming the file: the
    run's last checkpoint is kept and `--resume` writes them."""
    out = prepared.out
    try:
        save_checkpoint(out / MODEL, prepared.trainer.weights())
        write_json(out / SUMMARY, summary)
    except OSError as err:
        step = prepared.trainer.step_count
        kept = f"its checkpoint of step {step} is kept" if checkpoint_path(out / CHECKPOINTS, step).is_file() \
            else "its checkpoints are kept"
        raise RunError(f"{err}; the run is not complete: {kept}, finish it with: {prepared.resume_command()}") \
            from None


def is_complete(run_dir: str | Path) -> bool:
    """Whether the run in `run_dir` has finished: its summary.json, written after its final weights
    (model.pt and their checksum file), is there, and so are they."""
    run_dir = Path(run_dir)
    return all((run_dir / name).is_file() for name in (MODEL, f"{MODEL}.sha256", SUMMARY))


def logging_of(record: RunRecord) -> tuple[str, int]:
    """(--log, steps between its mask pictures; 0: none) of a run, as config.json records them (a run
    recorded before --log: none)."""
    asked = record.asked.train
    settings = TrainSettings(log_every=record.resolved.train.train.log_every, log=asked.log,
                             log_images_every=asked.log_images_every)  # fmt: skip
    return settings.log, settings.images_every()


# ---- one writer per run directory -------------------------------------------------------------


class _Lock(RunLock):
    """A `RunLock` that can leave a directory as it found it: `abandon()` removes a lock file it created.

    Removing a lock file is safe only with a check on taking: the lock is ours when the file we hold is
    still the one at the path (same inode); else a remover got between our open and our flock, and we
    take it again. Only a holder removes the file.
    """

    created = False

    def acquire(self) -> _Lock:
        while self._fd is None:
            fresh = not self.path.exists()
            super().acquire()
            try:
                current = os.stat(self.path).st_ino
            except FileNotFoundError:
                current = None
            if current != os.fstat(self._fd).st_ino:  # we locked a removed file
                self.release()
                continue
            self.created = fresh
        return self

    def abandon(self) -> None:
        """Release after a failure: the directory keeps no lock file it did not have."""
        if self._fd is not None and self.created:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        self.release()


def take_lock(run_dir: Path, what: str) -> _Lock:
    """`run_dir`'s lock, taken; RunLockedError (one line, naming the holder) while another process has it.

    A refusal is tried again twice, 50 ms apart: a reader's probe (`run_in_progress`) holds the lock for
    microseconds, and a holder that has just taken it writes its process id a moment later.
    """
    for attempt in range(LOCK_TRIES):
        try:
            return _Lock(run_dir, what=what).acquire()
        except RunLockedError:
            if attempt == LOCK_TRIES - 1:
                raise
            time.sleep(LOCK_RETRY_SECONDS)
    raise AssertionError("unreachable")  # pragma: no cover


def _refuse_taken(out: Path, *, locked: bool = False) -> None:
    """RunLockedError while another process writes `out` (unless we hold its lock: `locked`); RunError
    if it holds a run or is a file."""
    holder = None if locked else run_in_progress(out)
    if holder is not None:
        raise RunLockedError(f"run directory {shown_path(out)} is in use by {holder}; wait for it to end or choose "
                             "another --out")  # fmt: skip
    if holds_a_run(out):
        raise RunError(f"{shown_path(out)} already holds a run; continue it with --resume {shown_path(out)} or choose "
                       "another --out")  # fmt: skip
    if out.exists() and not out.is_dir():
        raise RunError(f"cannot write to output directory {shown_path(out)}: it is a file")


def _on_main(work: Callable[[], tuple[Any, _Lock | None]], dist: DistContext) -> tuple[Any, _Lock | None]:
    """Rank 0 does `work` (-> value, lock); every rank gets the value, or the one-line error of rank 0."""
    if not dist.enabled:
        return work()
    value, lock, error = None, None, None
    if dist.is_main:
        try:
            value, lock = work()
        except (ValueError, OSError) as err:
            error = (isinstance(err, RunLockedError), str(err).strip().splitlines()[0])
    value, error = broadcast_object((value, error), dist)
    if error is not None:
        raise (RunLockedError if error[0] else RunError)(error[1])
    return value, lock


def _data_folder_holding(path: str | Path, dataset: str) -> Path | None:
    """The data folder (`imagefolder:DIR`, or any source read from a folder) that `path` is or lies in, else None.

    Resolved paths: a symbolic link or `..` does not hide it. A file source (`npz:FILE`) has no data folder:
    nothing written beside the file changes what it holds.
    """
    try:
        _, source = parse_dataset(dataset)
    except ValueError:
        return None  # an unknown dataset is refused by its own check
    if source is None or not os.path.isdir(source):
        return None
    folder, target = Path(source).resolve(), Path(path).resolve()
    return folder if target == folder or folder in target.parents else None


def refuse_inside_data(path: str | Path, dataset: str, option: str) -> None:
    """RunError naming `option` when `path` lies in the data folder (its files would become images or classes)."""
    folder = _data_folder_holding(path, dataset)
    if folder is not None:
        raise RunError(f"{option} {shown_path(path)} lies inside the data folder {shown_path(folder)} of dataset "
                       f"'{shown_path(dataset)}'; what a run "
                       "writes there would be read as data: choose a directory outside it")  # fmt: skip
