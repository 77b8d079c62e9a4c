"""Where an MLO darts cycle spends its time: MAE steps, head step (and its unmasked pass), finite difference, masker step.

Runs `maskkit bench`'s `mlo_darts` contender (timm MAE `tiny`, batch 64, labeled and validation
batches 64, masker every 2 iterations) under cProfile and reads the cumulative time of the
functions that make up one cycle, next to the plain `mae_step` contender's cycle. Seconds are per
2-iteration cycle, averaged over the profiled cycles (after warm-up).

    OMP_NUM_THREADS=2 python examples/study/profile_mlo.py --preset tiny --cycles 5   # writes examples/study/profile_mlo.json
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
from pathlib import Path

import torch

from maskkit.mlo_bench import make_contender

OUT = Path(__file__).with_name("profile_mlo.json")
#: table row -> (module file ending, function name) whose cumulative time it reports
TERMS = {
    "MAE steps (2 real pretrain steps)": ("maskkit/mlo/steps.py", "pretrain_step"),
    "head step with the darts vector": ("maskkit/mlo/steps.py", "finetune_step"),
    "  of which the unmasked encoder passes (features)": ("adapters/timm.py", "features"),
    "finite difference (darts_masker_grad)": ("maskkit/mlo/darts.py", "darts_masker_grad"),
    "masker step (optimizer)": ("maskkit/mlo/engine.py", "_masker_update"),
    "whole cycle (MLOEngine.step x 2)": ("maskkit/mlo/engine.py", "step"),
}


def cumulative(stats: pstats.Stats, file_end: str, name: str) -> float:
    total = 0.0
    for (file, _, func), (_, _, _, cum, _) in stats.stats.items():  # type: ignore[attr-defined]
        if func == name and file.endswith(file_end):
            total += cum
    return total


def profile(name: str, preset: str, cycles: int, warmup: int) -> pstats.Stats:
    cycle = make_contender(name, preset=preset)
    for _ in range(warmup):
        cycle()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(cycles):
        cycle()
    prof.disable()
    return pstats.Stats(prof)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--cycles", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    darts = profile("mlo_darts", args.preset, args.cycles, args.warmup)
    plain = profile("mae_step", args.preset, args.cycles, args.warmup)
    rows = {label: cumulative(darts, *where) / args.cycles for label, where in TERMS.items()}
    plain_cycle = plain.total_tt / args.cycles  # type: ignore[attr-defined]
    payload = {"preset": args.preset, "cycles": args.cycles, "threads": torch.get_num_threads(),
               "seconds_per_cycle": rows, "plain_mae_cycle": plain_cycle}  # fmt: skip
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"| term ({args.preset}, per 2-iteration cycle) | seconds | x plain cycle |")
    print("| --- | --- | --- |")
    for label, seconds in rows.items():
        print(f"| {label} | {seconds:.3f} | {seconds / plain_cycle:.2f} |")
    print(f"| plain MAE cycle (2 steps) | {plain_cycle:.3f} | 1.00 |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
