"""Seconds per pretraining step of each study arm on one idle core: the equal-wall-time budgets.

    python examples/study/step_cost.py --data mnist5k photos8 --steps 60     # run alone on an idle machine

Each arm runs `maskkit pretrain` (the study's settings, OMP_NUM_THREADS=1) for --steps steps, one
after the other, and the training loop's own time (summary.json `seconds`, which excludes start-up
and data loading) divided by the steps is written to examples/study/step_costs.json under
"<data>/<arm>", with the ratio to random masking. Rerun it when nothing else runs: the numbers are
only meaningful on an idle core.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_study import ARMS, COMMON, DATASETS, GUIDED, ROOT  # noqa: E402

OUT = ROOT / "examples" / "study" / "step_costs.json"


def step_seconds(data: str, arm: str, steps: int, tmp: Path) -> float:
    out = tmp / f"{data}-{arm}"
    cmd = ["maskkit", "pretrain", "--dataset", DATASETS[data][0], *COMMON, "--steps", str(steps),
           "--ckpt-every", str(steps), "--seed", "0", *ARMS[arm], "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return json.loads((out / "summary.json").read_text())["seconds"] / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", default=["mnist5k", "photos8"], choices=sorted(DATASETS))
    parser.add_argument("--arms", nargs="+", default=["random", *GUIDED])
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    costs = json.loads(OUT.read_text()) if OUT.is_file() else {}
    with tempfile.TemporaryDirectory() as tmp:
        for data in args.data:
            for arm in args.arms:
                costs[f"{data}/{arm}"] = {"seconds_per_step": round(step_seconds(data, arm, args.steps, Path(tmp)), 5),
                                          "steps": args.steps}
                base = costs.get(f"{data}/random")
                if base:
                    costs[f"{data}/{arm}"]["ratio_to_random"] = round(
                        costs[f"{data}/{arm}"]["seconds_per_step"] / base["seconds_per_step"], 3)
                print(data, arm, costs[f"{data}/{arm}"], flush=True)
    OUT.write_text(json.dumps(costs, indent=2, sort_keys=True) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
