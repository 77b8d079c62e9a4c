"""Masking cost on video: every policy's cost per step on VideoMAE's space-time grid, and a pretraining step of the
built-in video MAE with and without decoder masking.

    python benchmarks/video.py --out video-bench.json

(a) `maskkit.video_bench.bench_video_policies`: one masking step (the policy's plan + `plan.gather`) on tokens
    [B, N, D] of the grid (default 8 x 14 x 14 = 1568 tokens, VideoMAE's for 16 x 224 x 224 clips in 2 x 16 x 16
    tubelets) at ratio 0.9, the same noise for all, clips of random pixels for a policy that reads them (motion),
    interleaved rounds, medians; the policies that refuse the grid listed with their one-line reason.
(b) `maskkit.video_bench.bench_video_step`: the trainer's plain step (`PlainStep`: policy, forward, loss, backward,
    AdamW) on the built-in video MAE --preset at --step-batch, with the decoder reconstructing every hidden token
    ("plain") or half of them (decoder ratio 0.5, rules runningcell and random: VideoMAE V2's dual masking).
The loader's clips per second against a plain DataLoader is benchmarks/video_loader.py's. Prints markdown tables,
writes JSON with --out. A benchmark, not a test: run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

from maskkit.policies import list_policies
from maskkit.video_bench import VIDEO_RATIO, bench_video_policies, bench_video_step, parse_grid


def policy_table(result: dict[str, Any]) -> str:
    """Markdown: one row per measured policy (ms a step, peak MiB, ratio to its baseline), then the refusals."""
    lines = [f"policy cost per step: grid {result['grid']} (N = {result['num_patches']}), ratio {result['mask_ratio']:g}, "
             f"B = {result['batch']}, D = {result['dim']}", "",
             "| policy | ms / step | peak MiB | vs | ratio |", "|---|---:|---:|---|---:|"]  # fmt: skip
    for row in result["rows"]:
        ratio = "" if row["ratio"] is None else f"{row['ratio']:.2f}"
        lines.append(f"| {row['name']} | {row['seconds'] * 1e3:.3f} | {row['peak_mem_mb']:.1f} | "
                     f"{row['baseline'] or '-'} | {ratio} |")  # fmt: skip
    for name, reason in result["refused"].items():
        lines.append(f"| {name}_policy | refuses | | | {reason} |")
    return "\n".join(lines)


def step_table(result: dict[str, Any]) -> str:
    """Markdown: one row per decoder setting (s a step, tokens decoded per clip, ratio to the plain step)."""
    c, t, h, w = result["clip"]
    lines = [f"pretraining step: video:{result['preset']} on clips {c}x{t}x{h}x{w} (grid {result['grid']}, "
             f"N = {result['num_patches']}), policy {result['policy']} at {result['mask_ratio']:g}, "
             f"B = {result['batch']}", "",
             "| step | s / step | hidden tokens decoded per clip | vs plain |", "|---|---:|---:|---:|"]  # fmt: skip
    for row in result["rows"]:
        ratio = "" if row["ratio"] is None else f"{row['ratio']:.2f}"
        lines.append(f"| {row['name']} | {row['seconds']:.4f} | {row['decoded']} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", default="8x14x14", help="space-time token grid of the policy rows")
    parser.add_argument("--batch", type=int, default=8, help="clips per policy step")
    parser.add_argument("--dim", type=int, default=768, help="token width of the policy rows (ViT-B's)")
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds of the policy rows")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--preset", default="tiny", help="built-in video MAE of the step rows (video:PRESET)")
    parser.add_argument("--step-batch", type=int, default=8)
    parser.add_argument("--step-repeats", type=int, default=5)
    parser.add_argument("--step-policy", default=None, help="policy of the step rows (default tube, else random)")
    parser.add_argument("--decoder-ratio", type=float, default=0.5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-steps", action="store_true", help="only the policy rows")
    parser.add_argument("--out", default=None, help="write the JSON here")
    args = parser.parse_args()
    policy = args.step_policy or ("tube" if "tube" in list_policies() else "random")
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                                           "python": platform.python_version(), "torch": torch.__version__,
                                           "device": args.device}, "args": vars(args)}  # fmt: skip
    results["policies"] = bench_video_policies(parse_grid(args.grid), VIDEO_RATIO, batch=args.batch, dim=args.dim,
                                               repeats=args.repeats, warmup=args.warmup, device=args.device)  # fmt: skip
    print(policy_table(results["policies"]), flush=True)
    if not args.skip_steps:
        decoders = (None, ("runningcell", args.decoder_ratio), ("random", args.decoder_ratio))
        results["steps"] = bench_video_step(args.preset, batch=args.step_batch, policy=policy, decoders=decoders,
                                            repeats=args.step_repeats, warmup=1, device=args.device)  # fmt: skip
        print()
        print(step_table(results["steps"]))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
