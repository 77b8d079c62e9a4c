"""How the `maskkit` commands run: one-line errors, the torchrun process group, and pretraining with
its progress bar and clean stops.

Every expected failure (bad option, bad data, bad checkpoint) ends a command with exit code 1 and
ONE line on stderr, no traceback (MASKKIT_DEBUG=1 shows it); a warning of maskkit's own (e.g. a run
read while still in progress) is one 'Warning: ...' line on stderr. Under torchrun `distributed` joins the
process group and quiets every rank but 0; `train_with_progress` turns SIGTERM/SIGINT/SIGUSR1 into a
checkpoint, one line and exit code 143/130/138.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from typing import Any

import typer
from rich.console import Console

from .printing import pretrain_progress, step_fields


class CommandError(ValueError):
    """An expected failure, reported as one line."""


#: set by `distributed` under torchrun: this process's place in the group (maskkit.distributed.DistContext)
DIST: Any = None


def say(on: Console, text: str) -> None:
    """Print `text` as it is (no rich markup, no highlighting)."""
    on.print(text, markup=False, highlight=False)


def one_line(message: BaseException | Warning | str) -> str:
    """An error or warning as one printable line. maskkit's own messages are one line by contract, so a line
    break in one came from a name (a file name with a newline) and is escaped, as are bytes that are not
    UTF-8 (`maskkit.options.shown_path`); a foreign message (torch's, several lines) keeps its first line."""
    from maskkit.options import shown_path

    text = str(message).strip()
    if not text:
        return type(message).__name__
    own = type(message).__module__.startswith("maskkit")
    return shown_path(text if own else text.splitlines()[0])


@contextlib.contextmanager
def one_line_errors(err_console: Console) -> Iterator[None]:
    """Turn expected exceptions into 'Error: ...' on stderr and exit code 1, maskkit's warnings into 'Warning: ...'."""
    with warnings.catch_warnings():
        shown = warnings.showwarning

        def show(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
            if not category.__module__.startswith("maskkit"):
                shown(message, category, *args, **kwargs)
            elif not err_console.quiet:
                say(err_console, f"Warning: {one_line(message)}")

        warnings.showwarning = show
        try:
            yield
        except typer.Exit:
            raise
        except (ValueError, TypeError, OSError, FloatingPointError, KeyError, ImportError) as err:
            if os.environ.get("MASKKIT_DEBUG"):
                raise
            text = one_line(err)
            if isinstance(err, KeyError):
                text = f"missing entry {text}"
            if DIST is not None and DIST.enabled and not DIST.is_main:  # quiet rank: still name its failure
                say(Console(stderr=True, soft_wrap=True), f"Error (rank {DIST.rank}): {text}")
            else:
                say(err_console, f"Error: {text}")
            raise typer.Exit(code=1) from None


@contextlib.contextmanager
def distributed(device: str, console: Console, err_console: Console) -> Iterator[Any]:
    """Under torchrun: join the process group (gloo on CPU, nccl on CUDA); rank 0 alone prints and writes.

    Yields this process's `DistContext` (`SINGLE` outside torchrun).
    """
    global DIST
    from maskkit.distributed import SINGLE, cleanup, init_from_env, launched_by_torchrun
    from maskkit.run import resolve_device

    if not launched_by_torchrun():
        DIST = SINGLE
        yield DIST
        return
    with one_line_errors(err_console):
        DIST = init_from_env(resolve_device(device).type)
    quiet = console.quiet, err_console.quiet
    if not DIST.is_main:
        console.quiet = err_console.quiet = True
    try:
        yield DIST
    finally:
        console.quiet, err_console.quiet = quiet
        cleanup(DIST)
        DIST = SINGLE


def train_with_progress(prepared: Any, console: Console, err_console: Console, show_progress: bool) -> dict | None:
    """Train `prepared` to the end under a progress bar; returns the summary (None on a rank but 0).

    SIGTERM/SIGINT/SIGUSR1 become a clean stop: checkpoint, one line naming the resume command, exit 143/130/138.
    """
    from maskkit.run import CHECKPOINTS, train_run
    from maskkit.train import StopSignals, TrainingStopped

    trainer, out = prepared.trainer, prepared.out
    bar, task = pretrain_progress(console, trainer.config.steps, trainer.step_count,
                                  disable=not (show_progress and trainer.dist.is_main))  # fmt: skip

    def on_step(step: int, metrics: dict[str, float]) -> None:  # the library measures (Trainer.perf), we print
        bar.update(task, completed=step, **step_fields(metrics["loss"], **trainer.perf.totals()))

    with StopSignals() as stop, bar:  # also over the final writes: a late signal lets the run finish them
        try:
            summary = train_run(prepared, on_step=on_step, stop=stop)
        except FloatingPointError as err:
            kept = sorted((out / CHECKPOINTS).glob("checkpoint-*.pt"))
            where = f"the last good checkpoint is kept: {kept[-1]}" if kept else "no checkpoint was written before it"
            raise CommandError(f"{err}; {where}") from None
        except TrainingStopped as stopped:  # a scheduler's SIGTERM or a Ctrl-C: checkpointed, ready to resume
            say(err_console, f"Stopped by {stopped.signal_name} at step {stopped.step}, checkpoint "
                f"{stopped.checkpoint.name} written; continue with: {prepared.resume_command()}")  # fmt: skip
            raise typer.Exit(code=stopped.exit_code) from None
        except KeyboardInterrupt:  # a second Ctrl-C while waiting for the step to end
            say(err_console, f"Interrupted at step {trainer.step_count} (no checkpoint at this step); continue "
                f"with: {prepared.resume_command()}")  # fmt: skip
            raise typer.Exit(code=130) from None
    return summary if trainer.dist.is_main else None
