"""Run-directory locks with real processes: a second writer is refused naming the holder's pid; a lock of a
SIGKILLed process does not block; `run_in_progress` tells a reader; unique directories never collide."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from maskkit.locking import RunLock, RunLockedError, make_unique_dir, run_in_progress

HOLD = """
import sys, time
from maskkit.locking import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(120)
"""


def _holder(run: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_naming_the_holder_and_a_killed_holder_frees_the_lock(tmp_path):
    run = tmp_path / "run"
    proc = _holder(run)
    try:
        assert run_in_progress(run) is not None and f"process {proc.pid}" in run_in_progress(run)
        with pytest.raises(RunLockedError, match=f"in use by process {proc.pid} on "):
            RunLock(run).acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert run_in_progress(run) is None  # the kernel released the dead process's lock
    with RunLock(run) as lock:
        assert lock.held
        assert f"process {os.getpid()}" in run_in_progress(run)
    assert run_in_progress(run) is None


def test_make_unique_dir_never_gives_two_callers_the_same_directory(tmp_path):
    base = tmp_path / "runs" / "20261201-120000"
    with ThreadPoolExecutor(8) as pool:
        made = list(pool.map(lambda _: make_unique_dir(base), range(16)))
    assert len(set(made)) == 16 and all(p.is_dir() for p in made)
    assert sorted(p.name for p in made)[0] == base.name


def test_no_lock_file_means_not_in_progress(tmp_path):
    assert run_in_progress(tmp_path) is None
    time.sleep(0)
