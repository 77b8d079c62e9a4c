"""Micro-benchmark of the masking policies against MAE's plain `random_masking`.

Measures what the MaskPolicy abstraction costs over the plain function: medians of many
interleaved runs in one process, same noise for every contender. Run `python -m maskkit.bench`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from maskkit.compile import NO_COMPILE, check_backend
from maskkit.data.source import Source
from maskkit.measure import peak_memory_mb, sync
from maskkit.plan import set_plan_checks
from maskkit.policies import AttentionPolicy, RandomPolicy, create_sized_policy, list_policies
from maskkit.train.config import check_device

#: policies with rows of their own in `bench_policy_overhead` (the others get `<name>_policy`).
OWN_ROWS = ("random", "attention")


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


def interleaved_medians(
    contenders: dict[str, Callable[[], Any]], repeats: int, warmup: int, device: torch.device
) -> dict[str, float]:
    """Median seconds of each contender: every round runs each once, in turn (interleaved, so a slow spell of the
    machine hits all alike), the device synchronised around each call; the first `warmup` rounds are not timed."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for round_ in range(warmup + repeats):
        for name, fn in contenders.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of `module` (only those with requires_grad if `trainable_only`)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def sized_policies(
    num_patches: int, dim: int, ratio: float, device: str = "cpu", seed: int = 0
) -> dict[str, nn.Module]:
    """Every registered policy but `OWN_ROWS` that can be built from sizes alone (`create_sized_policy`,
    parameters seeded) and masks a [1, N, D] batch given only `noise`; those that cannot are left out."""
    dev = torch.device(device)
    probe = torch.zeros(1, num_patches, dim, device=dev)  # [1, N, D]
    noise = torch.rand(1, num_patches, generator=torch.Generator().manual_seed(seed)).to(dev)  # [1, N]
    policies = {}
    for name in list_policies():
        if name in OWN_ROWS:
            continue
        try:
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                torch.manual_seed(seed)
                policy = create_sized_policy(name, ratio=ratio, embed_dim=dim, num_patches=num_patches)
                policy = policy.to(dev) if isinstance(policy, nn.Module) else policy
                policy(probe, noise=noise)
        except (ValueError, TypeError):  # needs more than sizes (e.g. a ratio it does not allow)
            continue
        policies[name] = policy
    return policies


def bench_policy_overhead(
    batch: int = 256,
    num_patches: int = 196,
    dim: int = 768,
    ratio: float = 0.75,
    repeats: int = 100,
    warmup: int = 10,
    device: str = "cpu",
    seed: int = 0,
    encoder: nn.Module | None = None,
) -> list[dict[str, Any]]:
    """Median seconds and peak memory of the masking step: plain function vs the policies.

    Rows (name, seconds, peak_mem_mb, baseline, ratio = seconds / baseline's seconds):
      mae_random_masking: `plain_random_masking` (the baseline);
      random_policy: `RandomPolicy` with the same noise, plus `plan.gather(x)` for x_masked
        (plan.mask is already the float mask), vs mae_random_masking;
      attention_policy: `AttentionPolicy(mode="high")` plus `plan.gather(x)`, vs random_policy.
        With `encoder` (an MAE whose num_patches and embed_dim equal `num_patches` and `dim`),
        the policy reads the CLS attention itself from `encoder.cls_attention(images)` on
        unmasked images without grad, as it does in training: that pass is its real cost. The
        row then also holds `select_seconds`, the policy given a precomputed attention tensor
        (its own cost, attention read excluded), and `select_ratio` against random_policy.
        Without `encoder` the row is the precomputed-attention cost only (`includes_encoder`).
      <name>_policy, for every other registered policy that `sized_policies` can build from these
        sizes (e.g. simmim, uniform, colornoise, adamae, hpm, block, learned; `uniform` only at ratio
        0.75 on an even square grid): the policy given the same noise, plus `plan.gather(x)`, vs
        random_policy. Policies with parameters run them (no grad).
    Every repeat runs each contender once, in turn (interleaved), after `warmup` rounds.
    """
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, num_patches, dim, generator=gen).to(dev)  # [B, N, D]
    noise = torch.rand(batch, num_patches, generator=gen).to(dev)  # [B, N]
    attention = torch.rand(batch, num_patches, generator=gen).softmax(dim=1).to(dev)  # [B, N]
    random_policy = RandomPolicy(ratio)
    attention_policy = AttentionPolicy(ratio, mode="high")
    others = sized_policies(num_patches, dim, ratio, device, seed)
    images = None
    if encoder is not None:
        if (encoder.num_patches, encoder.embed_dim) != (num_patches, dim):
            raise ValueError(
                f"encoder has {encoder.num_patches} patches of width {encoder.embed_dim}, "
                f"the benchmark {num_patches} of width {dim}"
            )
        size = tuple(getattr(encoder, "img_size", (32, 32)))
        images = torch.randn(batch, encoder.in_chans, *size, generator=gen).to(dev)  # [B, C, H, W]
        encoder = encoder.to(dev).eval()

    def plain() -> Any:
        return plain_random_masking(x, ratio, noise)

    def policy() -> Any:
        plan = random_policy(x, noise=noise)
        return plan.gather(x), plan.mask, plan.ids_restore

    def attention_select() -> Any:
        plan = attention_policy(x, attention=attention)
        return plan.gather(x), plan.mask, plan.ids_restore

    def attention_guided() -> Any:  # reads the attention from the encoder, as in training
        plan = attention_policy(x, images=images, encoder=encoder)
        return plan.gather(x), plan.mask, plan.ids_restore

    contenders: list[tuple[str, Callable[[], Any], str | None]] = [
        ("mae_random_masking", plain, None),
        ("random_policy", policy, "mae_random_masking"),
        ("attention_policy", attention_select if encoder is None else attention_guided, "random_policy"),
    ]
    if encoder is not None:
        contenders.append(("attention_select", attention_select, "random_policy"))

    def masker(policy: Any) -> Callable[[], Any]:
        def run() -> Any:
            plan = policy(x, noise=noise)
            return plan.gather(x), plan.mask, plan.ids_restore

        return run

    contenders += [(f"{name}_policy", masker(pol), "random_policy") for name, pol in others.items()]
    with torch.no_grad():
        medians = interleaved_medians({name: fn for name, fn, _ in contenders}, repeats, warmup, dev)
        rows = []
        for name, fn, baseline in contenders:
            if name == "attention_select":
                continue  # reported inside the attention_policy row
            rows.append(
                {
                    "name": name,
                    "seconds": medians[name],
                    "peak_mem_mb": peak_memory_mb(fn, dev),
                    "baseline": baseline,
                    "ratio": None if baseline is None else medians[name] / medians[baseline],
                }
            )
        attention_row = next(row for row in rows if row["name"] == "attention_policy")
        attention_row["includes_encoder"] = encoder is not None
        if encoder is not None:
            attention_row["select_seconds"] = medians["attention_select"]
            attention_row["select_ratio"] = medians["attention_select"] / medians["random_policy"]
    return rows


#: where the plan check's cost is measured (issue 25): the random policy at B=256, N=196 (ViT-B/16 sizes)
PLAN_CHECK_SIZE = {"batch": 256, "num_patches": 196, "dim": 768}


def bench_plan_check(
    batch: int = 256,
    num_patches: int = 196,
    dim: int = 768,
    ratio: float = 0.75,
    repeats: int = 200,
    warmup: int = 20,
    device: str = "cpu",
    seed: int = 0,
) -> list[dict[str, Any]]:
    """What checking a plan costs: a policy's plan with `MaskPlan.validate` (and the finite-noise check) on and
    off (`maskkit.plan.set_plan_checks`), interleaved, the same noise for both; for the `random` policy (a plan
    without weights) and `uniform` with secondary masking 0.5 (a weighted plan: the weights' checks run too).

    Rows (name, seconds: median, peak_mem_mb, baseline, ratio, batch, num_patches), for P in random, weighted:
      P_plan_unchecked: `policy(tokens, noise=noise)` with the checks off (the baseline);
      P_plan_checked: the same with the checks on, vs P_plan_unchecked, with `overhead_pct`
        (100 x (checked / unchecked - 1)) and `check_seconds` (the difference of the medians).
    Each of `warmup + repeats` rounds runs all four, in alternating order; the previous setting is restored.
    """
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randn(batch, num_patches, dim, generator=gen).to(dev)  # [B, N, D]
    noise = torch.rand(batch, num_patches, generator=gen).to(dev)  # [B, N]
    policies = {"random": RandomPolicy(ratio),
                "weighted": create_sized_policy("uniform", embed_dim=dim, num_patches=num_patches, secondary_ratio=0.5)}
    checks = {f"{p}_plan_{c}": (p, c == "checked") for p in policies for c in ("unchecked", "checked")}

    def plan(policy: str, checked: bool) -> Callable[[], Any]:
        def run() -> Any:
            set_plan_checks(checked)
            return policies[policy](tokens, noise=noise)

        return run

    times: dict[str, list[float]] = {name: [] for name in checks}
    previous = set_plan_checks(True)
    try:
        with torch.no_grad():
            for round_ in range(warmup + repeats):
                for name in list(checks) if round_ % 2 == 0 else list(reversed(checks)):
                    policy, checked = checks[name]
                    set_plan_checks(checked)  # before the clock starts
                    sync(dev)
                    start = time.perf_counter()
                    policies[policy](tokens, noise=noise)
                    sync(dev)
                    if round_ >= warmup:
                        times[name].append(time.perf_counter() - start)
            peaks = {name: peak_memory_mb(plan(*checks[name]), dev) for name in checks}
    finally:
        set_plan_checks(previous)
    size = {"batch": batch, "num_patches": num_patches}
    rows = []
    for policy in policies:
        off, on = (statistics.median(times[f"{policy}_plan_{c}"]) for c in ("unchecked", "checked"))
        rows += [
            {"name": f"{policy}_plan_unchecked", "seconds": off, "peak_mem_mb": peaks[f"{policy}_plan_unchecked"],
             "baseline": None, "ratio": None, **size},
            {"name": f"{policy}_plan_checked", "seconds": on, "peak_mem_mb": peaks[f"{policy}_plan_checked"],
             "baseline": f"{policy}_plan_unchecked", "ratio": on / off, "overhead_pct": 100.0 * (on / off - 1.0),
             "check_seconds": on - off, **size},
        ]  # fmt: skip
    return rows


def plan_check_line(rows: list[dict[str, Any]]) -> str:
    """One line of the plan check's cost from `bench_plan_check`'s rows."""
    by = {row["name"]: row for row in rows}
    on, off = by["random_plan_checked"], by["random_plan_unchecked"]
    line = (f"plan check (random policy, B={on['batch']}, N={on['num_patches']}): "
            f"{on['seconds'] * 1e3:.3f} ms checked vs {off['seconds'] * 1e3:.3f} ms unchecked, "
            f"overhead {on['overhead_pct']:+.1f}% ({on['check_seconds'] * 1e3:+.3f} ms a plan)")  # fmt: skip
    weighted = by.get("weighted_plan_checked")
    if weighted is not None:
        line += (f"; weighted plan (uniform, secondary 0.5): overhead {weighted['overhead_pct']:+.1f}% "
                 f"({weighted['check_seconds'] * 1e3:+.3f} ms a plan)")  # fmt: skip
    return line


#: where the checks of a plugin source's samples are measured: a batch of 256 RGB 32x32 samples
SOURCE_CHECK_SIZE = {"batch": 256, "img_size": 32, "in_chans": 3}


class _Samples(Source):
    """A plugin-style source over samples held in a tensor [N, C, H, W], read one at a time (the bench's)."""

    def __init__(self, images: Tensor) -> None:
        self.images, self.name = images, "bench"

    def __len__(self) -> int:
        return self.images.shape[0]

    def read(self, i: int) -> Tensor:
        return self.images[int(i)]


def bench_input_checks(
    batch: int = 256, img_size: int = 32, in_chans: int = 3, embed_dim: int = 768, num_patches: int = 196,
    repeats: int = 200, warmup: int = 20, seed: int = 0,
) -> list[dict[str, Any]]:
    """What checking a plugin's other outputs costs (on the CPU, where samples are read).

    Rows (name, seconds: median, peak_mem_mb, baseline, ratio):
      source_read_unchecked: a batch of `batch` samples read one at a time from a plugin-style source (`floats`);
      source_read_checked: the same through `maskkit.data.checks.Checked` (each sample's shape, dtype, finite
        values), vs source_read_unchecked, with `overhead_pct` and `check_seconds`, interleaved;
      masker_grads_check: `check_masker_grads` on one gradient per parameter of the learned masker at
        (embed_dim, num_patches) (Python comparisons; once per masker step).
    """
    from maskkit.data.checks import Checked
    from maskkit.mlo import HYPERGRADS
    from maskkit.mlo.base import check_masker_grads
    from maskkit.mlo.steps import FinetuneStep, trainable

    gen = torch.Generator().manual_seed(seed)
    raw = _Samples(torch.rand(batch, in_chans, img_size, img_size, generator=gen))
    contenders = {"source_read_unchecked": raw, "source_read_checked": Checked(raw, _Samples, "bench")}
    index = torch.arange(batch)
    masker = create_sized_policy("learned", embed_dim=embed_dim, num_patches=num_patches)
    params = trainable(masker)
    result = ([torch.zeros_like(p) for p in params], FinetuneStep(torch.zeros(()), torch.zeros(()), torch.zeros(()), None))
    method = HYPERGRADS.create("darts")
    times: dict[str, list[float]] = {name: [] for name in (*contenders, "masker_grads_check")}
    for round_ in range(warmup + repeats):
        for name in list(contenders) if round_ % 2 == 0 else list(reversed(contenders)):
            start = time.perf_counter()
            contenders[name].floats(index)
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
        start = time.perf_counter()
        check_masker_grads(method, result, params)
        if round_ >= warmup:
            times["masker_grads_check"].append(time.perf_counter() - start)
    cpu = torch.device("cpu")
    peaks = {name: peak_memory_mb(lambda source=source: source.floats(index), cpu) for name, source in contenders.items()}
    off, on, grads = (statistics.median(times[n]) for n in (*contenders, "masker_grads_check"))
    size = {"batch": batch, "img_size": img_size, "in_chans": in_chans}
    return [
        {"name": "source_read_unchecked", "seconds": off, "peak_mem_mb": peaks["source_read_unchecked"],
         "baseline": None, "ratio": None, **size},
        {"name": "source_read_checked", "seconds": on, "peak_mem_mb": peaks["source_read_checked"],
         "baseline": "source_read_unchecked", "ratio": on / off, "overhead_pct": 100.0 * (on / off - 1.0),
         "check_seconds": on - off, **size},
        {"name": "masker_grads_check", "seconds": grads, "peak_mem_mb": 0.0, "baseline": None, "ratio": None,
         "num_params": len(params), "embed_dim": embed_dim, "num_patches": num_patches},
    ]  # fmt: skip


def input_check_line(rows: list[dict[str, Any]]) -> str:
    """One line of the plugin input checks' cost from `bench_input_checks`' rows."""
    by = {row["name"]: row for row in rows}
    on, off, grads = by["source_read_checked"], by["source_read_unchecked"], by["masker_grads_check"]
    return (f"source sample check ({on['batch']} samples {on['in_chans']}x{on['img_size']}x{on['img_size']}): "
            f"{on['seconds'] * 1e3:.3f} ms checked vs {off['seconds'] * 1e3:.3f} ms unchecked, overhead "
            f"{on['overhead_pct']:+.1f}% ({on['check_seconds'] * 1e6 / on['batch']:+.2f} us a sample); "
            f"hypergradient check ({grads['num_params']} masker parameters): {grads['seconds'] * 1e6:.1f} us "
            "a masker step")  # fmt: skip


#: ViT-B (width 768) at the two patch counts of issue 7: CIFAR 32x32 with patch 2, ImageNet 224 with patch 16.
PARAM_SIZES = {"cifar_p2": 256, "imagenet_p16": 196}


def masker_parameter_counts(
    embed_dim: int = 768, sizes: dict[str, int] | None = None
) -> list[dict[str, Any]]:
    """Parameters of the learned masker, arch `paper` against `token`, at each patch count.

    Built on the meta device, so nothing is allocated. Rows: {"size", "num_patches",
    "embed_dim", "paper", "token", "ratio" (paper / token)}.
    """
    from maskkit.policies import create_policy

    rows = []
    for size, n in (sizes or PARAM_SIZES).items():
        counts = {}
        for arch in ("paper", "token"):
            with torch.device("meta"):
                masker = create_policy("learned", arch=arch, embed_dim=embed_dim, num_patches=n)
            counts[arch] = count_parameters(masker)
        rows.append(
            {
                "size": size,
                "num_patches": n,
                "embed_dim": embed_dim,
                **counts,
                "ratio": counts["paper"] / counts["token"],
            }
        )
    return rows



#: bench size -> policy rows (batch, patches, width; the MAE whose attention the attention policy reads)
#: and MLO rows (MAE preset, batch); `trivial` is for tests (seconds, no RSS subprocesses).
#: On CPU `vit-b` runs at a CPU's size (policy rows batch 8, 5 rounds; MLO rows batch 2, 2 cycles after
#: one warm-up, no RSS subprocesses): minutes, not hours. On CUDA at batch 256 / 64, 20 rounds / 7 cycles.
BENCH_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"batch": 64, "num_patches": 64, "dim": 192, "mae": "tiny", "mlo_batch": 64, "repeats": 30},
    "small": {"batch": 64, "num_patches": 64, "dim": 384, "mae": "small", "mlo_batch": 32, "repeats": 20,
              "mlo_repeats": 5},
    "vit-b": {"batch": 256, "num_patches": 196, "dim": 768, "mae": "vit-b", "mlo_batch": 64, "repeats": 20,
              "cpu": {"batch": 8, "repeats": 5, "mlo_batch": 2, "mlo_repeats": 2, "warmup": 1, "rss": False}},
    "trivial": {"batch": 4, "num_patches": 16, "dim": 64, "mae": "micro", "mlo_batch": 4, "repeats": 2,
                "mlo_repeats": 2, "warmup": 1, "rss": False, "plan_repeats": 3, "plan_warmup": 1},
}  # fmt: skip


def run_bench(
    preset: str = "tiny",
    device: str = "cpu",
    *,
    batch: int | None = None,
    repeats: int | None = None,
    skip_mlo: bool = False,
    rss: bool = True,
    compile: str = NO_COMPILE,
    plans_only: bool = False,
    grid: str | None = None,
) -> dict[str, Any]:
    """`maskkit bench`: the policy rows, the checks' rows (`bench_plan_check`, always at B=256, N=196, and
    `bench_input_checks`: a plugin source's samples, a hypergradient), then (unless `skip_mlo`) the MLO rows, as
    one JSON-ready payload; `plans_only`: the checks' rows alone.

    compile: a torch.compile backend: each MLO contender also runs with the MAE's blocks compiled
    (rows `<name>@<backend>`, interleaved with the eager ones); "none" for eager only.
    grid: a space-time token grid 'T'xH'xW'' (VideoMAE's 8x14x14): the policy rows alone, on that grid at
    ratio 0.9, with the policies that refuse it and why (`maskkit.video_bench.run_video_bench`).
    """
    if grid is not None:
        from maskkit.video_bench import run_video_bench

        if plans_only or skip_mlo or compile != NO_COMPILE:
            raise ValueError("--grid times the policies on a space-time grid alone: drop --plans, --skip-mlo and --compile")
        return run_video_bench(grid, preset, device, batch=batch, repeats=repeats)
    from maskkit.adapters.timm import create_mae
    from maskkit.mlo_bench import DEFAULT_NAMES, bench_mlo

    if preset not in BENCH_SIZES:
        raise ValueError(f"--preset must be one of {', '.join(BENCH_SIZES)}, got {preset!r}")
    for name, value in (("batch", batch), ("repeats", repeats)):
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be a positive integer, got {value}")
    check_backend(compile)
    dev = check_device(device)
    size = {**BENCH_SIZES[preset], **BENCH_SIZES[preset].get(dev.type, {})}
    warmup = {"warmup": size["warmup"]} if "warmup" in size else {}
    plan_warmup = {"warmup": size["plan_warmup"]} if "plan_warmup" in size else {}
    plan_repeats = repeats or size.get("plan_repeats", 200)
    plan_rows = bench_plan_check(**PLAN_CHECK_SIZE, device=str(dev), repeats=plan_repeats, **plan_warmup)
    plan_rows += bench_input_checks(**SOURCE_CHECK_SIZE, repeats=plan_repeats, **plan_warmup)
    if plans_only:
        return {"device": str(dev), "torch": torch.__version__, "preset": preset,
                "threads": torch.get_num_threads(), "rows": plan_rows, "params": []}  # fmt: skip
    rows = bench_policy_overhead(
        batch=batch or size["batch"], num_patches=size["num_patches"], dim=size["dim"], device=str(dev),
        repeats=repeats or size["repeats"], encoder=create_mae(size["mae"], seed=0), **warmup,
    )  # fmt: skip
    rows += plan_rows
    if not skip_mlo:
        names = list(DEFAULT_NAMES)
        if compile != NO_COMPILE:
            names += [f"{n}@{compile}" for n in DEFAULT_NAMES]
        rows += bench_mlo(
            preset=size["mae"], device=str(dev), batch=batch or size["mlo_batch"], rss=rss and size.get("rss", True),
            repeats=repeats or size.get("mlo_repeats", 7), names=names, **warmup,
        )  # fmt: skip
    from maskkit.mlo_bench import predicted_ratios

    return {"device": str(dev), "torch": torch.__version__, "preset": preset, "threads": torch.get_num_threads(),
            "mlo_batch": batch or size["mlo_batch"], "cost_model": predicted_ratios(size["mae"]),
            "rows": rows, "params": masker_parameter_counts()}  # fmt: skip

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
    print(plan_check_line(bench_plan_check()))
    print(input_check_line(bench_input_checks()))
    for row in masker_parameter_counts():
        print(
            f"masker parameters, ViT-B {row['size']} ({row['num_patches']} patches): "
            f"paper {row['paper']:,}, token {row['token']:,} ({row['ratio']:.1f}x)"
        )
