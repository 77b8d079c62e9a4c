"""A study's `maskkit` child processes, which die with it.

Each child starts in its own session, so a terminal's Ctrl-C reaches `ablate` alone and `ablate`
forwards it exactly once (two SIGINTs would make `pretrain` give up its checkpoint). A stop signal to
`ablate` (SIGTERM, SIGINT, SIGUSR1, recorded by `maskkit.train.StopSignals`) is forwarded to every
running child, whose `pretrain` finishes its step, checkpoints and exits; `ablate` waits for it and
launches nothing more. For a SIGKILL of `ablate`, which no handler sees, every child is started with
Linux's `PR_SET_PDEATHSIG` = SIGTERM (set between fork and exec): the kernel sends it SIGTERM when
the thread that started it dies, however it dies, so the child checkpoints and ends on its own and a
rerun resumes it. (The launching thread waits for its child, so it lives exactly as long as the study
does.) Elsewhere than Linux there is no such call; the forwarded signals still stop the children.
"""

from __future__ import annotations

import ctypes
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from maskkit.train.signals import StoppedBySignal

__all__ = ["RunFailed", "StudyStopped", "shown", "subprocess_launcher"]

#: seconds between looks at the stop signal while a child runs
POLL_SECONDS = 0.1
PR_SET_PDEATHSIG = 1


class RunFailed(RuntimeError):
    """A `maskkit` command of the study failed; one line naming it and its error."""


class StudyStopped(StoppedBySignal):
    """The study stopped on a signal: its running children were stopped, nothing more was launched."""

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        super().__init__(f"stopped by {self.signal_name}: the runs in progress were stopped (pretrain keeps a "
                         "checkpoint to resume from) and no more were started")  # fmt: skip


def shown(args: list[str]) -> str:
    """A command as a user would type it."""
    return "maskkit " + shlex.join(args)


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec function asking Linux for SIGTERM when the launching thread dies (None elsewhere).

    prctl is looked up here, in the parent: between fork and exec the child only calls it.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # pragma: no cover - no libc symbol
        return None
    parent = os.getpid()

    def arm() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
        if os.getppid() != parent:  # the parent died before the call: nothing would tell us
            os.kill(os.getpid(), signal.SIGTERM)

    return arm


def subprocess_launcher(
    args: list[str], env: dict[str, str], log: Path, *, stop: Any = None, abort: threading.Event | None = None
) -> None:
    """Run `maskkit ARGS` as a child process, its output appended to `log`; RunFailed when it fails.

    `stop` (a `maskkit.train.StopSignals`): once it records a signal, the child gets that signal (once)
    and is waited for, then StudyStopped is raised; nothing starts after it. `abort` set: the child
    is killed (a second Ctrl-C).
    """
    if stop is not None and stop.requested:
        raise StudyStopped(stop.signum)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as out, tempfile.TemporaryFile("w+", encoding="utf-8") as err:
        out.write(f"$ {shown(args)}\n")
        out.flush()
        child = subprocess.Popen([sys.executable, "-m", "maskkit.cli", *args], env=env, stdout=out, stderr=err,
                                 text=True, start_new_session=True, preexec_fn=_die_with_parent())  # fmt: skip
        forwarded = False
        while True:
            try:
                code = child.wait(timeout=POLL_SECONDS)
                break
            except subprocess.TimeoutExpired:
                pass
            if abort is not None and abort.is_set():
                child.kill()
            elif stop is not None and stop.requested and not forwarded:
                child.send_signal(stop.signum)
                forwarded = True
        err.seek(0)
        text = err.read()
        out.write(text)
    if stop is not None and stop.requested and (forwarded or code != 0):
        raise StudyStopped(stop.signum)
    if code != 0:
        lines = [line for line in text.splitlines() if line.strip()]
        raise RunFailed(f"{shown(args[:2])} failed ({lines[-1].strip() if lines else f'exit {code}'}); see {log}")
