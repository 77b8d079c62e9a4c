"""Micro-benchmark of the masking policies against MAE's plain `random_masking`.

Measures what the MaskPolicy abstraction costs over the plain function: medians of many
interleaved runs in one process, same noise for every contender. Run `python -m maskkit.bench`.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from maskkit.policies import AttentionPolicy, RandomPolicy


def plain_random_masking(x: Tensor, mask_ratio: float, noise: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """MAE's `random_masking` written out plainly: x [B, N, D], noise [B, N] -> (x_masked, mask, ids_restore).

    The K = int(N * (1 - ratio)) patches of lowest noise stay visible; mask is 1 for hidden.
    The gather index is an expanded view rather than a repeated copy as in the official code
    (same result, less work), so this is the stricter baseline.
    """
    batch, n, dim = x.shape
    keep = int(n * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)  # [B, N] ascending: kept first
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # [B, N]
    ids_keep = ids_shuffle[:, :keep]  # [B, K]
    x_masked = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))  # [B, K, D]
    mask = torch.ones(batch, n, device=x.device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)  # [B, N] patch order
    return x_masked, mask, ids_restore


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of `module` (only those with requires_grad if `trainable_only`)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
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
    CPU: the running sum of torch.profiler's allocation and free events in time order
    (an approximation: peaks inside a single op are not seen).
    """
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    live = peak = 0
    for event in events:
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak / 2**20


def bench_policy_overhead(
    batch: int = 256,
    num_patches: int = 196,
    dim: int = 768,
    ratio: float = 0.75,
    repeats: int = 100,
    warmup: int = 10,
    device: str = "cpu",
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Median seconds and peak memory of the masking step: plain function vs the policies.

    Rows (name, seconds, peak_mem_mb, baseline, ratio = seconds / baseline's seconds):
      mae_random_masking: `plain_random_masking` (the baseline);
      random_policy: `RandomPolicy` with the same noise, plus `plan.gather(x)` for x_masked
        (plan.mask is already the float mask), vs mae_random_masking;
      attention_policy: `AttentionPolicy(mode="high")` given a precomputed attention tensor plus
        `plan.gather(x)`, vs random_policy. This is the policy's own cost; reading attention
        from an encoder (one unmasked forward pass) is not included.
    Every repeat runs each contender once, in turn (interleaved), after `warmup` rounds.
    """
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, num_patches, dim, generator=gen).to(dev)  # [B, N, D]
    noise = torch.rand(batch, num_patches, generator=gen).to(dev)  # [B, N]
    attention = torch.rand(batch, num_patches, generator=gen).softmax(dim=1).to(dev)  # [B, N]
    random_policy = RandomPolicy(ratio)
    attention_policy = AttentionPolicy(ratio, mode="high")

    def plain() -> Any:
        return plain_random_masking(x, ratio, noise)

    def policy() -> Any:
        plan = random_policy(x, noise=noise)
        return plan.gather(x), plan.mask, plan.ids_restore

    def attention_guided() -> Any:
        plan = attention_policy(x, attention=attention)
        return plan.gather(x), plan.mask, plan.ids_restore

    contenders: list[tuple[str, Callable[[], Any], str | None]] = [
        ("mae_random_masking", plain, None),
        ("random_policy", policy, "mae_random_masking"),
        ("attention_policy", attention_guided, "random_policy"),
    ]
    times: dict[str, list[float]] = {name: [] for name, _, _ in contenders}
    with torch.no_grad():
        for round_ in range(warmup + repeats):
            for name, fn, _ in contenders:
                _sync(dev)
                start = time.perf_counter()
                fn()
                _sync(dev)
                if round_ >= warmup:
                    times[name].append(time.perf_counter() - start)
        medians = {name: statistics.median(ts) for name, ts in times.items()}
        rows = []
        for name, fn, baseline in contenders:
            rows.append(
                {
                    "name": name,
                    "seconds": medians[name],
                    "peak_mem_mb": peak_memory_mb(fn, dev),
                    "baseline": baseline,
                    "ratio": None if baseline is None else medians[name] / medians[baseline],
                }
            )
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    """Plain-text table of `bench_policy_overhead` rows."""
    lines = [f"{'name':<20} {'median ms':>10} {'peak MiB':>9} {'vs':<20} {'ratio':>6}"]
    for row in rows:
        ratio = "" if row["ratio"] is None else f"{row['ratio']:.3f}"
        lines.append(
            f"{row['name']:<20} {row['seconds'] * 1e3:>10.3f} {row['peak_mem_mb']:>9.1f} "
            f"{row['baseline'] or '-':<20} {ratio:>6}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, B=256 N=196 D=768, ratio 0.75")
    print(format_rows(bench_policy_overhead()))
