"""Throughput of a training loop: images per second, the fraction of time spent waiting for data, peak memory.

What `train` writes to perf.jsonl (one line per metrics.jsonl line, same `step`) and what the progress bar
shows. Wall-clock numbers differ from run to run, so they never go into metrics.jsonl (the run's
reproducible record, compared byte for byte across resumes, worker counts and golden fixtures) nor into a
checkpoint; measuring reads the clock and, on CUDA, the allocator's statistics, and nothing else.

    meter = PerfMeter(effective_batch=128, device=torch.device("cuda"))
    meter.start()
    with meter.waiting():      # around the train loader's next()
        batch = loader.next()
    meter.step_done()
    meter.pop()                # {"images_per_s": ..., "data_wait": ..., "step_s": ..., "peak_mem_mb": ...}

Each window runs from the previous `pop` (or `start`) to this one: `step_s` is its wall time over its
steps, `images_per_s` its steps x effective batch over its wall time (so images_per_s x step_s is the
effective batch), `data_wait` the part of its wall time spent inside the train loader's `next()`.
`peak_mem_mb` (CUDA only) is `torch.cuda.max_memory_allocated` in MiB since `start`. `train` writes its
log lines and draws a TensorBoard mask picture `excluded()` from the clock, so what observing costs is
not counted as training time; checkpoints are.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch

__all__ = ["PERF_KEYS", "PerfMeter"]

#: the keys of a perf.jsonl line (peak_mem_mb only on CUDA); a benchmark script reads them
PERF_KEYS = ("step", "images_per_s", "data_wait", "step_s", "peak_mem_mb")


class PerfMeter:
    """Wall time, data wait and steps of a training loop, by window (`pop`) and since `start` (`totals`)."""

    def __init__(self, effective_batch: int, device: torch.device | str = "cpu") -> None:
        self.effective_batch = int(effective_batch)
        self.device = torch.device(device)
        #: whether there are CUDA statistics to read and kernels to wait for
        self.cuda = self.device.type == "cuda" and torch.cuda.is_available()
        self._zero()  # `start` (by `train`) also resets CUDA's peak: building a trainer leaves it alone

    def _zero(self) -> None:
        self._window_t0 = time.perf_counter()
        self._seconds = 0.0  # of the windows popped
        self._wait = self._window_wait = 0.0
        self._steps = self._window_steps = 0

    def start(self) -> None:
        """Start measuring (the first window and the totals); on CUDA, the peak memory statistics too."""
        self._zero()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        """Count the time inside this block as waiting for the train loader's batches."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            spent = time.perf_counter() - t0
            self._wait += spent
            self._window_wait += spent

    def step_done(self) -> None:
        """One optimizer step (skipped ones too) ended."""
        self._steps += 1
        self._window_steps += 1

    def _numbers(self, seconds: float, wait: float, steps: int) -> dict[str, float]:
        seconds = max(seconds, 1e-12)
        out = {
            "images_per_s": self.effective_batch * steps / seconds,
            "data_wait": min(max(wait / seconds, 0.0), 1.0),
            "step_s": seconds / max(steps, 1),
        }
        peak = self.peak_mem_mb()
        if peak is not None:
            out["peak_mem_mb"] = peak
        return out

    def peak_mem_mb(self) -> float | None:
        """Peak CUDA memory allocated since `start`, in MiB; None on any other device."""
        if not self.cuda:
            return None
        return torch.cuda.max_memory_allocated(self.device) / 2**20

    def pop(self) -> dict[str, float]:
        """The window's numbers (since the last `pop` or `start`), and a new window from now."""
        if self.cuda:
            torch.cuda.synchronize(self.device)  # the window's kernels are done before its clock stops
        now = time.perf_counter()
        out = self._numbers(now - self._window_t0, self._window_wait, self._window_steps)
        self._seconds += now - self._window_t0
        self._window_t0, self._window_wait, self._window_steps = now, 0.0, 0
        return out

    @contextlib.contextmanager
    def excluded(self) -> Iterator[None]:
        """Count the time inside this block in no window and in no total (writing the log, a picture)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._window_t0 += time.perf_counter() - t0

    def totals(self) -> dict[str, float]:
        """The numbers since `start`: the windows popped and the current one (what the progress bar shows)."""
        seconds = self._seconds + time.perf_counter() - self._window_t0
        return self._numbers(seconds, self._wait, self._steps)
