"""Cost of MLO-MAE training per iteration against a plain MAE step: `python -m maskkit.mlo_bench`.

Contenders (timm MAE of preset "tiny": 32x32 images, patch 4, width 192, depth 4, decoder
128x2; batch 64, labeled train and validation batches 64, masker every 2 iterations):
  mae_step          the trainer's PlainStep (random masks, forward, backward, AdamW step): the baseline
  hpm_step          PlainStep masked by `hpm` (its scorer's forward, ranking loss and update)
  mlo_darts         MLOStep (one MLOEngine step), darts along both paths (the reference's setting)
  mlo_darts_direct  darts, masker -> pretrain -> validation path only
  mlo_unroll_k1/k2  exact hypergradient through 1 / 2 unrolled pretrain steps
  (--extra) mlo_darts_fwdfd, mlo_darts_direct_fwdfd: darts with darts_fd="forward"
  (--extra) mlo_darts_direct_half: direct darts with labeled and validation batches of half the MAE batch
            (`maskkit pretrain --darts-paths direct --labeled-batch-size B/2`)
  NAME@BACKEND      any of them with the MAE's blocks compiled by torch.compile(backend=BACKEND)
                    (`maskkit bench --compile inductor`); no RSS row (a fresh process would compile again)
Times are per iteration, amortised over a masker cycle (masker_every iterations), medians of
`repeats` cycles run interleaved in one process (so machine load hits all alike).

Usage: python -m maskkit.mlo_bench [REPEATS] [DEVICE] [--extra]
(On a CPU shared with other jobs set OMP_NUM_THREADS=1: multi-threaded timings under contention
are meaningless.)

Work per masker cycle (2 iterations), in masked MAE forwards F (batch 64, 17 of 65 tokens in the
encoder; the unmasked encoder on 64 images costs ~2.1 F, a backward ~2x its forward), at this size:
  mae_step          2 x (F + B)                                              ~ 6 F
  mlo_darts         2 x (F + B) + 2 F (central difference) + encoder F+B on 128 unmasked   ~ 20 F
  mlo_darts_direct  2 x (F + B) + 2 F + encoder F (64, no grad) + encoder F+B (64)          ~ 16 F
  mlo_unroll_k1     2 x (F + B) + double backward of one step (~2 B) + encoder F+B on 128    ~ 22 F
The unmasked encoder pass of the finetune/validation batches dominates the overhead.

Memory, two honest measures (tracemalloc does not see torch's allocations):
  peak_mem_mb  transient peak over one cycle: CUDA max_memory_allocated above the memory in use
               before it; CPU the running sum of torch.profiler's allocation/free events
               (maskkit.bench.peak_memory_mb). Excludes what persists (weights, optimizer state).
  rss_mb       peak resident set size (VmHWM) of a fresh subprocess that builds only that
               contender and runs warm-up plus two cycles: everything, the Python/torch runtime
               included (CPU only; `rss=False` skips it).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import torch
from torch import nn

from maskkit.compile import NO_COMPILE, compile_blocks
from maskkit.measure import peak_memory_mb, peak_rss_mb, sync
from maskkit.mlo import MLOConfig, MLOEngine, default_optimizers
from maskkit.optim import param_groups
from maskkit.policies import create_policy, create_sized_policy, policy_card
from maskkit.train.mlo_step import MLOStep
from maskkit.train.plain import PlainStep
from maskkit.train.step import TrainStep

__all__ = [
    "BASELINE",
    "DEFAULT_NAMES",
    "bench_mlo",
    "block_flops",
    "cls_only_block_flops",
    "format_rows",
    "make_contender",
    "predicted_ratios",
    "rss_peak_mb",
]

#: contender name -> MLO config (None: the plain MAE step).
CONTENDERS: dict[str, MLOConfig | None] = {
    "mae_step": None,
    "hpm_step": None,
    "mlo_darts": MLOConfig(hypergrad="darts", darts_paths="both"),
    "mlo_darts_direct": MLOConfig(hypergrad="darts", darts_paths="direct"),
    "mlo_unroll_k1": MLOConfig(hypergrad="unroll", unroll_steps=1),
    "mlo_unroll_k2": MLOConfig(hypergrad="unroll", unroll_steps=2),
    # optional (`--extra`): darts with the one-forward finite difference
    "mlo_darts_fwdfd": MLOConfig(hypergrad="darts", darts_paths="both", darts_fd="forward"),
    "mlo_darts_direct_fwdfd": MLOConfig(hypergrad="darts", darts_paths="direct", darts_fd="forward"),
    "mlo_darts_direct_half": MLOConfig(hypergrad="darts", darts_paths="direct"),
}
#: contender -> its labeled and validation batch as a fraction of the one it is given (default 1)
LABELED_FRACTION = {"mlo_darts_direct_half": 0.5}
#: the contenders `bench_mlo` runs by default.
DEFAULT_NAMES = ["mae_step", "hpm_step", "mlo_darts", "mlo_darts_direct", "mlo_unroll_k1", "mlo_unroll_k2"]
#: the policy of each plain-step contender (no MLO config)
PLAIN_POLICIES = {"mae_step": "random", "hpm_step": "hpm"}
BASELINE = "mae_step"
CYCLE = 2  # iterations per masker cycle (masker_every of the contenders)


def make_contender(name: str, preset: str = "tiny", device: str = "cpu", batch: int = 64,
                   val_batch: int = 64, num_classes: int = 10, seed: int = 0) -> Callable[[], None]:
    """Build one contender; returns a function that runs one masker cycle (CYCLE iterations).
    `NAME@BACKEND` is contender NAME with the MAE's transformer blocks compiled by BACKEND."""
    from maskkit.adapters.timm import create_mae

    name, _, backend = name.partition("@")
    if name not in CONTENDERS:
        raise ValueError(f"unknown contender {name!r}; choose from {list(CONTENDERS)}")
    dev = torch.device(device)
    mae = create_mae(preset, seed=seed).to(dev)
    compile_blocks(mae, backend or NO_COMPILE)
    gen = torch.Generator().manual_seed(seed)
    shape = (mae.in_chans, *tuple(getattr(mae, "img_size", (32, 32))))

    def data(n: int) -> torch.Tensor:
        return torch.randn(n, *shape, generator=gen).to(dev)

    images = [data(batch) for _ in range(CYCLE)]
    config = CONTENDERS[name]
    step: TrainStep
    context: dict[str, Any] = {}
    if config is None:  # the trainer's plain step; a policy that learns from reconstruction trains beside the MAE
        policy_name = PLAIN_POLICIES[name]
        policy = create_sized_policy(policy_name, embed_dim=mae.embed_dim, num_patches=mae.num_patches,
                                     ratio=0.75).to(dev)
        opt = torch.optim.AdamW(param_groups(nn.ModuleDict({"mae": mae, "policy": policy}), 1e-3), lr=1e-4,
                                betas=(0.9, 0.95))
        step = PlainStep(mae, policy, opt, trains_aux=policy_card(policy_name).learns == "reconstruction")
        context["generator"] = torch.Generator(device=dev).manual_seed(seed)  # no progress: hpm at its full fraction
    else:
        masker = create_policy("learned", embed_dim=mae.embed_dim, num_patches=mae.num_patches).to(dev)
        head = nn.Linear(mae.embed_dim, num_classes).to(dev)
        val_batch = max(1, round(val_batch * LABELED_FRACTION.get(name, 1.0)))
        train = (data(val_batch), torch.randint(0, num_classes, (val_batch,), generator=gen).to(dev))
        val = (data(val_batch), torch.randint(0, num_classes, (val_batch,), generator=gen).to(dev))
        engine = MLOEngine(mae, masker, head, **default_optimizers(mae, head, masker), config=config,
                           train_batches=lambda: train, val_batches=lambda: val)
        if config.masker_every != CYCLE:
            raise ValueError("the benchmark assumes masker_every == CYCLE")
        step = MLOStep(engine)

    def cycle() -> None:
        for x in images:
            step.run(x, context, agree=_never, undoable=False)
            step.commit()

    cycle.step = step  # type: ignore[attr-defined]  # for inspection (tests)
    cycle.engine = getattr(step, "engine", None)  # type: ignore[attr-defined]
    return cycle


def _never(bad: Any) -> bool:
    """A benchmark does not guard: every iteration's update is applied."""
    return False


def rss_peak_mb(name: str, preset: str = "tiny", batch: int = 64, warmup: int = 2) -> float:
    """Peak RSS (MiB) of a fresh Python process that runs only contender `name` on CPU."""
    cmd = [sys.executable, "-m", "maskkit.mlo_bench", "--rss-child", name, preset, str(batch), str(warmup)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"rss measurement of {name} failed: {done.stderr.strip().splitlines()[-1:]}")
    return float(json.loads(done.stdout.strip().splitlines()[-1])["rss_mb"])


def _rss_child(name: str, preset: str, batch: int, warmup: int) -> None:
    cycle = make_contender(name, preset=preset, batch=batch, val_batch=batch)
    for _ in range(warmup + 2):
        cycle()
    print(json.dumps({"name": name, "rss_mb": peak_rss_mb()}))


def bench_mlo(preset: str = "tiny", device: str = "cpu", batch: int = 64, repeats: int = 7, warmup: int = 2,
              names: list[str] | None = None, rss: bool = True, seed: int = 0) -> list[dict[str, Any]]:
    """Seconds per iteration (amortised over a masker cycle) and peak memory of each contender.

    Rows: {"name", "seconds", "peak_mem_mb", "rss_mb" (None unless CPU and rss), "baseline",
    "ratio" (seconds / baseline's), "mem_ratio", "rss_ratio"}; the baseline is "mae_step".
    """
    names = list(DEFAULT_NAMES) if names is None else list(names)
    if BASELINE not in names:
        names.insert(0, BASELINE)
    dev = torch.device(device)
    cycles = {n: make_contender(n, preset=preset, device=device, batch=batch, val_batch=batch, seed=seed)
              for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    for round_ in range(warmup + repeats):
        for n in names:  # interleaved: each round runs every contender once
            sync(dev)
            start = time.perf_counter()
            cycles[n]()
            sync(dev)
            if round_ >= warmup:
                times[n].append((time.perf_counter() - start) / CYCLE)
    rows = []
    for n in names:
        rows.append({
            "name": n,
            "seconds": statistics.median(times[n]),
            "peak_mem_mb": peak_memory_mb(cycles[n], dev),
            "rss_mb": rss_peak_mb(n, preset, batch) if rss and dev.type == "cpu" and "@" not in n else None,
            "baseline": None if n == BASELINE else BASELINE,
        })
    base = rows[0]
    for row in rows:
        row["ratio"] = row["seconds"] / base["seconds"]
        row["mem_ratio"] = row["peak_mem_mb"] / base["peak_mem_mb"]
        row["rss_ratio"] = None if row["rss_mb"] is None or base["rss_mb"] is None else row["rss_mb"] / base["rss_mb"]
    return rows



# ---- the cost model ---------------------------------------------------------------------------


def block_flops(tokens: int, width: int, mlp_ratio: float = 4.0) -> float:
    """Forward FLOPs (multiply-adds x 2) of one ViT block on `tokens` tokens: QKV, projection, MLP, attention."""
    dense = 2 * tokens * width * width * (3 + 1 + 2 * mlp_ratio)  # qkv, proj, fc1 + fc2
    attention = 4 * tokens * tokens * width  # q k^T and attn v
    return dense + attention


def cls_only_block_flops(tokens: int, width: int, mlp_ratio: float = 4.0) -> float:
    """The last block when only the CLS feature is needed: keys and values for every token, the rest for one row."""
    return 2 * tokens * width * width * 2 + 4 * tokens * width + 2 * width * width * (1 + 1 + 2 * mlp_ratio)


def predicted_ratios(preset: str, ratio: float = 0.75) -> dict[str, float]:
    """MLO time per iteration over a plain MAE step, from pass counts and FLOPs (labeled = val = MAE batch).

    Per masker cycle of 2 iterations, in units of one masked MAE forward F (encoder on the K+1
    visible tokens, decoder on all N+1) and one unmasked encoder forward U for the CLS feature (the
    last block CLS-only), a backward costing twice its forward:
      mae_step 2 x 3F = 6F; darts (both paths) 6F + 2F (central difference) + 3 x 2U (forward and
      backward over the labeled and validation batches); darts direct 6F + 2F + U + 3U (direct_half:
      half of that U); unroll K=1 6F + 4F (the differentiated step's double backward) + 6U.
    """
    from maskkit.adapters.timm import get_preset
    from maskkit.plan import num_visible

    p = get_preset(preset)
    side = p.img_size if isinstance(p.img_size, int) else p.img_size[0]
    n = (side // p.patch_size) ** 2
    k = num_visible(n, ratio)
    f = p.depth * block_flops(k + 1, p.embed_dim) + p.decoder_depth * block_flops(n + 1, p.decoder_embed_dim)
    u = (p.depth - 1) * block_flops(n + 1, p.embed_dim) + cls_only_block_flops(n + 1, p.embed_dim)
    return {
        "num_patches": n,
        "unmasked_over_masked": u / f,
        "mlo_darts": (8 * f + 6 * u) / (6 * f),
        "mlo_darts_direct": (8 * f + 4 * u) / (6 * f),
        "mlo_darts_direct_half": (8 * f + 2 * u) / (6 * f),
        "mlo_unroll_k1": (10 * f + 6 * u) / (6 * f),
    }

def format_rows(rows: list[dict[str, Any]]) -> str:
    """Plain-text table of `bench_mlo` rows."""
    lines = [f"{'name':<18} {'s/iter':>8} {'x time':>7} {'peak MiB':>9} {'x mem':>6} {'RSS MiB':>8} {'x RSS':>6}"]
    for r in rows:
        rss = "-" if r["rss_mb"] is None else f"{r['rss_mb']:.0f}"
        rss_ratio = "-" if r["rss_ratio"] is None else f"{r['rss_ratio']:.2f}"
        lines.append(f"{r['name']:<18} {r['seconds']:>8.3f} {r['ratio']:>7.2f} {r['peak_mem_mb']:>9.1f} "
                     f"{r['mem_ratio']:>6.2f} {rss:>8} {rss_ratio:>6}")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if argv[:1] == ["--rss-child"]:
        _rss_child(argv[1], argv[2], int(argv[3]), int(argv[4]))
        return
    extra = "--extra" in argv
    argv = [a for a in argv if a != "--extra"]
    repeats = int(argv[0]) if argv else 7
    device = argv[1] if len(argv) > 1 else "cpu"
    names = list(CONTENDERS) if extra else None
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, preset tiny "
          f"(32x32, patch 4, width 192, depth 4, decoder 128x2), batch 64, val batch 64, masker every {CYCLE}, "
          f"medians of {repeats} cycles")
    print(format_rows(bench_mlo(device=device, repeats=repeats, names=names)))


if __name__ == "__main__":
    main(sys.argv[1:])
