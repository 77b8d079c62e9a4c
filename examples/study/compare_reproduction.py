"""Issue 24's reproduction check: the runs `maskkit ablate` made against direct `maskkit pretrain` + `evaluate`
runs of the same options, and against the rows recorded in examples/study/results.jsonl.

    maskkit ablate examples/studies/issue12-reproduce.toml --out runs/ablate/reproduce --jobs 1 --threads 1
    bash examples/study/reproduce.sh
    python examples/study/compare_reproduction.py runs/ablate/reproduce runs/direct

For each arm: the final loss (the last line of metrics.jsonl) and the linear-probe top-1 (eval.json) of
both, whether they are identical, and the recorded row's numbers (issue 12's run, older packages).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "examples" / "study" / "results.jsonl"
ARMS = {"random-rerun": "random-rerun@1632/s0", "hpm": "hpm@1632/s0",
        "mlo-gumbel-g05-reg0.1": "mlo-gumbel-g05-reg0.1@1632/s0"}  # fmt: skip


def numbers(run: Path) -> tuple[float | None, float | None]:
    """(final loss, linear top-1) of a run directory; None where it has none yet."""
    try:
        loss = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["loss"]
    except (OSError, IndexError, KeyError):
        loss = None
    try:
        top1 = json.loads((run / "eval.json").read_text())["linear"]["top1"]
    except (OSError, KeyError):
        top1 = None
    return loss, top1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ablate", type=Path, help="the study directory of examples/studies/issue12-reproduce.toml")
    parser.add_argument("direct", type=Path, help="the folder of examples/study/reproduce.sh's runs")
    args = parser.parse_args()
    recorded = {}
    for line in RESULTS.read_text().splitlines():
        entry = json.loads(line)
        recorded[entry["key"]] = entry
    print("| arm | final loss, ablate | final loss, direct | linear %, ablate | linear %, direct | identical | "
          "recorded final loss | recorded linear % |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for arm, key in ARMS.items():
        a, d = numbers(args.ablate / "runs" / f"{arm}-s0"), numbers(args.direct / f"{arm}-s0")
        old = recorded.get(key, {})
        same = "yes" if a == d and None not in a else "no" if None not in a + d else "not finished"
        cells = [f"{x!r}" if x is not None else "-" for x in (a[0], d[0])]
        cells += [f"{100 * x:.2f}" if x is not None else "-" for x in (a[1], d[1])]
        old_linear = f"{100 * old['linear']:.2f}" if "linear" in old else "-"
        print(f"| {arm} | {' | '.join(cells)} | {same} | {old.get('final_loss', '-')!r} | {old_linear} |")


if __name__ == "__main__":
    main()
