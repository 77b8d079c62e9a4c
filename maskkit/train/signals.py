"""Stopping a run cleanly on SIGTERM / SIGINT / SIGUSR1: `StopSignals` records the signal, `TrainingStopped`
reports the stop.

Schedulers send SIGTERM before preemption (SLURM, Kubernetes) and SIGUSR1 ahead of a time limit (SLURM's
`--signal=USR1@120`, as submitit and Lightning use it); the trainer finishes the step, checkpoints and
raises `TrainingStopped`, whose `exit_code` is what a shell reports for that signal.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

#: signals that ask a run to stop cleanly (SLURM and Kubernetes send SIGTERM before preemption, SLURM's
#: --signal sends SIGUSR1 ahead of the time limit; Ctrl-C is SIGINT)
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, name))


class StopSignals:
    """Context manager: while it is active, SIGTERM, SIGINT and SIGUSR1 ask the run to stop instead of ending it.

    The first such signal is only recorded (`signum`); `train(..., stop=this)` reads it after every
    step. A second one gives up waiting: the previous handlers come back and the signal is
    delivered again (SIGINT then raises KeyboardInterrupt, SIGTERM and SIGUSR1 end the process). A signal
    that was ignored (SIG_IGN, e.g. SIGINT of a background job) stays ignored. The previous
    handlers are restored on exit. Outside the main thread nothing is installed (Python allows
    handlers there only), but `request()` still works.
    """

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS) -> None:
        self.signals = tuple(signals)
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()

    @property
    def requested(self) -> bool:
        """Whether a stop was asked for."""
        return self.signum is not None

    def request(self, signum: int = signal.SIGTERM) -> None:
        """Ask for a stop as if `signum` had arrived (the first request counts)."""
        if self.signum is None:
            self.signum = int(signum)

    def _restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)  # None: not set from Python
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum
            return
        previous = self._previous.get(signum, signal.SIG_DFL)
        self._restore()
        if callable(previous):
            previous(signum, frame)  # e.g. default_int_handler: KeyboardInterrupt
        else:
            signal.raise_signal(signum)  # the default action


def signal_exit_code(signum: int) -> int:
    """The exit status of a process ended by `signum`, as shells report it: 128 + signal number."""
    return 128 + int(signum)


class StoppedBySignal(Exception):
    """A stop on signal `signum` (set by the subclass): its name and the exit status a shell reports."""

    signum: int

    @property
    def signal_name(self) -> str:
        try:
            return signal.Signals(self.signum).name
        except ValueError:
            return f"signal {self.signum}"

    @property
    def exit_code(self) -> int:
        """143 for SIGTERM, 130 for SIGINT."""
        return signal_exit_code(self.signum)


class TrainingStopped(StoppedBySignal):
    """`train` stopped on a signal after checkpointing: `step`, `signum`, the `checkpoint` written."""

    def __init__(self, step: int, signum: int, checkpoint: Path) -> None:
        self.step, self.signum, self.checkpoint = step, int(signum), Path(checkpoint)
        super().__init__(f"stopped by {self.signal_name} at step {step}; checkpoint {self.checkpoint}")
