"""What masking costs on video: the policies on a space-time token grid, and a pretraining step with and without
decoder masking.

VideoMAE's grid is 8 x 14 x 14 = 1568 tokens (16 frames of 224 x 224 in tubelets of 2 x 16 x 16) at mask ratio
0.9. `bench_video_policies` times every registered policy there (`maskkit bench --grid 8x14x14`); a policy that
refuses a space-time grid (or these sizes) is reported with its one-line reason, not as a failure.
`bench_video_step` times the trainer's plain step (`PlainStep`: forward, backward, optimizer) on the built-in
video MAE, with the decoder reconstructing every hidden token or a subset (VideoMAE V2's dual masking).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from maskkit.bench import interleaved_medians, plain_random_masking
from maskkit.measure import peak_memory_mb
from maskkit.policies import create_sized_policy, list_policies

#: VideoMAE's token grid (T/t, H/p, W/p) for 16 x 224 x 224 clips in 2 x 16 x 16 tubelets, and its mask ratio
VIDEO_GRID = (8, 14, 14)
VIDEO_RATIO = 0.9
#: the tubelet (t, p) that turns a grid into the clips a pixel-reading policy (e.g. motion) is given
VIDEO_TUBELET = (2, 16)

#: bench size -> the policy rows' batch, token width, timed rounds and warm-up rounds on a space-time grid (clips
#: of batch x 3 x 16 x 224 x 224 floats are 2.4 MB a clip at VideoMAE's grid); `trivial` is for tests.
VIDEO_BENCH_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"batch": 8, "dim": 192, "repeats": 10, "warmup": 2},
    "small": {"batch": 8, "dim": 384, "repeats": 10, "warmup": 2},
    "vit-b": {"batch": 32, "dim": 768, "repeats": 20, "warmup": 3, "cpu": {"batch": 4, "repeats": 5, "warmup": 1}},
    "trivial": {"batch": 2, "dim": 32, "repeats": 2, "warmup": 1},
}


def parse_grid(text: str) -> tuple[int, int, int]:
    """'8x14x14' -> (8, 14, 14): a space-time token grid T' x H' x W' of positive integers (one-line ValueError
    naming --grid otherwise)."""
    parts = str(text).lower().replace(" ", "").split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"--grid must be a space-time token grid T'xH'xW' of positive integers (VideoMAE's: "
                         f"8x14x14), got {text!r}")  # fmt: skip
    return int(parts[0]), int(parts[1]), int(parts[2])


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def video_policies(
    context: dict[str, Any], num_patches: int, dim: int, ratio: float, device: torch.device, seed: int = 0
) -> tuple[dict[str, Any], dict[str, str]]:
    """Every registered policy built from sizes alone (`create_sized_policy`, parameters seeded) that masks one
    clip's tokens [1, N, D] given `context` (the first sample of each batched entry: noise, grid, images, ...);
    returns (policies by name, the others' one-line reasons by name)."""
    probe = torch.zeros(1, num_patches, dim, device=device)  # [1, N, D]
    first = {k: v[:1] if isinstance(v, Tensor) else v for k, v in context.items()}
    policies, refused = {}, {}
    for name in list_policies():
        try:
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                torch.manual_seed(seed)
                policy = create_sized_policy(name, ratio=ratio, embed_dim=dim, num_patches=num_patches)
                policy = policy.to(device).eval() if isinstance(policy, nn.Module) else policy
                policy(probe, ratio=ratio, **first)
        except (ValueError, TypeError) as err:  # refuses a space-time grid, this ratio or these sizes
            refused[name] = _first_line(err)
            continue
        policies[name] = policy
    return policies, refused


def bench_video_policies(
    grid: tuple[int, int, int] = VIDEO_GRID,
    ratio: float = VIDEO_RATIO,
    *,
    batch: int = 8,
    dim: int = 192,
    in_chans: int = 3,
    tubelet: tuple[int, int] = VIDEO_TUBELET,
    repeats: int = 10,
    warmup: int = 2,
    device: str = "cpu",
    seed: int = 0,
) -> dict[str, Any]:
    """Median seconds and peak memory of one masking step on the space-time token `grid` (N = its product).

    Every contender gets tokens [B, N, D], the same `noise` [B, N], and the context a training step gives a policy:
    `grid`, the clips `images` [B, C, t T', p H', p W'] (random pixels, for a policy that reads them), and an
    `attention` [B, N] (softmax of random scores: the attention policy's selection cost, without the encoder pass
    that reads it in training). Returns {"rows", "refused", sizes}: rows (name, seconds, peak_mem_mb, baseline,
    ratio) for mae_random_masking (MAE's random_masking written out: the baseline), random_policy (vs it) and
    <name>_policy for every other policy that masks these tokens (vs random_policy), each followed by
    `plan.gather(x)` as in training, interleaved; `refused`: {policy: its one-line reason} for the others.
    """
    dev = torch.device(device)
    n = math.prod(grid)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, dim, generator=gen).to(dev)  # [B, N, D]
    noise = torch.rand(batch, n, generator=gen).to(dev)  # [B, N]
    t, p = tubelet
    clips = torch.randn(batch, in_chans, grid[0] * t, grid[1] * p, grid[2] * p, generator=gen).to(dev)  # [B, C, T, H, W]
    attention = torch.rand(batch, n, generator=gen).softmax(dim=1).to(dev)  # [B, N]
    context = {"noise": noise, "grid": tuple(grid), "images": clips, "attention": attention}
    policies, refused = video_policies(context, n, dim, ratio, dev, seed)

    def masker(policy: Any) -> Any:
        def run() -> Any:
            plan = policy(x, ratio=ratio, **context)
            return plan.gather(x), plan.mask, plan.ids_restore

        return run

    contenders = {"mae_random_masking": lambda: plain_random_masking(x, ratio, noise)}
    order = sorted(policies, key=lambda name: name != "random")  # random_policy first: the others' baseline
    contenders.update({f"{name}_policy": masker(policies[name]) for name in order})
    with torch.no_grad():
        medians = interleaved_medians(contenders, repeats, warmup, dev)
        rows = []
        for name, fn in contenders.items():
            baseline = None if name == "mae_random_masking" else (
                "mae_random_masking" if name == "random_policy" or "random_policy" not in medians else "random_policy")
            rows.append({"name": name, "seconds": medians[name], "peak_mem_mb": peak_memory_mb(fn, dev),
                         "baseline": baseline, "ratio": None if baseline is None else medians[name] / medians[baseline]})  # fmt: skip
    sizes = {"grid": "x".join(map(str, grid)), "num_patches": n, "mask_ratio": ratio, "batch": batch, "dim": dim,
             "clip": [in_chans, grid[0] * t, grid[1] * p, grid[2] * p]}  # fmt: skip
    return {"rows": rows, "refused": refused, **sizes}


def run_video_bench(
    grid: str | tuple[int, int, int], preset: str = "tiny", device: str = "cpu", *, batch: int | None = None,
    repeats: int | None = None,
) -> dict[str, Any]:
    """`maskkit bench --grid T'xH'xW'`: `bench_video_policies` at VIDEO_RATIO with the preset's batch and width
    (VIDEO_BENCH_SIZES, its device's override), as one JSON-ready payload."""
    from maskkit.train.config import check_device

    if preset not in VIDEO_BENCH_SIZES:
        raise ValueError(f"--preset must be one of {', '.join(VIDEO_BENCH_SIZES)}, got {preset!r}")
    for name, value in (("batch", batch), ("repeats", repeats)):
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be a positive integer, got {value}")
    cells = parse_grid(grid) if isinstance(grid, str) else tuple(grid)
    dev = check_device(device)
    size = {**VIDEO_BENCH_SIZES[preset], **VIDEO_BENCH_SIZES[preset].get(dev.type, {})}
    result = bench_video_policies(cells, VIDEO_RATIO, batch=batch or size["batch"], dim=size["dim"],
                                  repeats=repeats or size["repeats"], warmup=size["warmup"], device=str(dev))  # fmt: skip
    return {"device": str(dev), "torch": torch.__version__, "preset": preset, "threads": torch.get_num_threads(),
            "params": [], **result}  # fmt: skip


def refusal_lines(payload: dict[str, Any]) -> list[str]:
    """One line per policy that does not mask the grid at the ratio: '<name>: not measured on ... (<its reason>)'."""
    where = f"the {payload['grid']} grid at ratio {payload['mask_ratio']:g}"
    return [f"{name}: not measured on {where} ({reason})" for name, reason in payload["refused"].items()]


# ---- a pretraining step with and without decoder masking ------------------------------------------


def bench_video_step(
    preset: str = "micro",
    *,
    batch: int = 4,
    policy: str = "random",
    ratio: float = VIDEO_RATIO,
    decoders: tuple[tuple[str, float] | None, ...] = (None, ("runningcell", 0.5), ("random", 0.5)),
    repeats: int = 5,
    warmup: int = 1,
    device: str = "cpu",
    seed: int = 0,
    **sizes: Any,
) -> dict[str, Any]:
    """Median seconds of the trainer's plain step (`PlainStep.run` + `commit`: policy, forward, loss, backward,
    AdamW step) on the built-in video MAE `preset` (`sizes`: its clip's num_frames / img_size / in_chans), one
    contender per entry of `decoders`: None (the decoder reconstructs every hidden token) or (rule, decoder ratio).
    Each contender has its own model copy, optimizer and seeded generator; rounds are interleaved.
    Rows (name, seconds, baseline, ratio vs "plain", decoded: tokens the decoder reconstructs per clip)."""
    from maskkit.adapters.video_mae import create_video_mae
    from maskkit.mae import policy_context
    from maskkit.train.decoding import DecoderMasking
    from maskkit.train.plain import PlainStep

    dev = torch.device(device)
    steps: dict[str, tuple[PlainStep, torch.Generator]] = {}
    for entry in decoders:
        name = "plain" if entry is None else f"decoder_{entry[0]}_{entry[1]:g}"
        mae = create_video_mae(preset, seed=seed, **sizes).to(dev).train()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            masker = create_sized_policy(policy, ratio=ratio, embed_dim=mae.embed_dim, num_patches=mae.num_patches)
        masker = masker.to(dev) if isinstance(masker, nn.Module) else masker
        step = PlainStep(mae, masker, torch.optim.AdamW(mae.parameters(), lr=1e-4), trains_aux=False, mask_ratio=ratio)
        step.decoder = None if entry is None else DecoderMasking(entry[0], float(entry[1]))
        steps[name] = (step, torch.Generator(device=dev).manual_seed(seed))
    mae = next(iter(steps.values()))[0].mae
    gen = torch.Generator().manual_seed(seed)
    clips = torch.randn(batch, mae.in_chans, mae.num_frames, *mae.img_size, generator=gen).to(dev)  # [B, C, T, H, W]
    decoded: dict[str, int] = {}

    def one_step(name: str) -> Any:
        step, generator = steps[name]

        def run() -> None:
            step.run(clips, {"generator": generator}, agree=lambda bad: bad is not None)
            step.commit()

        return run

    medians = interleaved_medians({name: one_step(name) for name in steps}, repeats, warmup, dev)
    for name, (step, generator) in steps.items():  # the decoder's tokens per clip, from one more plan
        context = policy_context(step.mae, clips, generator=generator)
        with torch.no_grad():
            plan = step.policy(step.mae.patch_tokens(clips), ratio=ratio, **context)
            plan = plan if step.decoder is None else step.decoder(plan, context)
        decoded[name] = plan.num_decoded
    rows = [{"name": name, "seconds": medians[name], "baseline": None if name == "plain" else "plain",
             "ratio": None if name == "plain" else medians[name] / medians["plain"], "decoded": decoded[name]}
            for name in steps]  # fmt: skip
    return {"rows": rows, "preset": preset, "batch": batch, "policy": policy, "mask_ratio": ratio,
            "grid": "x".join(map(str, mae.grid)), "num_patches": mae.num_patches,
            "clip": [mae.in_chans, mae.num_frames, *mae.img_size]}  # fmt: skip
