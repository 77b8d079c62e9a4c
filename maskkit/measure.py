"""Measuring a benchmark's contenders: device sync, peak memory of one call, peak resident set size.

Shared by `maskkit.bench` (the policy rows) and `maskkit.mlo_bench` (the MLO rows), so neither imports the other
for it.
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (the profiler backend logs start/stop lines there from C++)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory_mb(fn: Callable[[], Any], device: torch.device) -> float:
    """Peak extra memory one call of `fn` allocates, in MiB.

    CUDA: torch.cuda.max_memory_allocated above the memory in use before the call.
    CPU: the running sum of torch.profiler's allocation and free events (`[memory]`, + bytes for
    an allocation, - for a free) in time order, read from the profiler's raw events: peaks inside an
    op are seen, and there is no per-op table to build (which took 0.1-0.4 s a call, 50x the raw
    read). Where a torch has no raw events, the per-op table's self memory, summed in op order.
    """
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    raw = getattr(getattr(prof, "profiler", None), "kineto_results", None)
    if raw is not None:
        changes = [n for _, n in sorted((e.start_ns(), e.nbytes()) for e in raw.events() if e.name() == "[memory]")]
    else:
        changes = [e.self_cpu_memory_usage for e in sorted(prof.events(), key=lambda e: e.time_range.start)]
    live = peak = 0
    for change in changes:
        live += change
        peak = max(peak, live)
    return peak / 2**20


def peak_rss_mb() -> float:
    """This process's peak RSS in MiB: VmHWM (ru_maxrss on Linux carries the parent's peak across fork/exec)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux (bytes on macOS)
