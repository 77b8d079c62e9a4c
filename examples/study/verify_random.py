"""Is random masking today bit-identical to the issue-7 rows it reuses? Re-make one run and compare.

    python examples/study/verify_random.py            # seed 0, 1632 steps, one thread

Pretrains random masking exactly as `run_study.py --steps 1632` does for the row `random-eqtime/s0`
(the same command, into runs/study/verify-random-eqtime-s0) and compares the last metrics window's
loss, which the row recorded, to full float precision. Equal means the training is unchanged by the
code since (guided fractions, diagnostics), so the row's probe and fine-tune scores stand.
Writes examples/study/verify_random.json. (It was not equal on this study's machine, though the code
since gives the same losses as the code that made the row when both run here: the packages the
machine installed differ. So the study re-makes random masking as the arm `random-rerun`.)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_study import EQTIME_STEPS, ROOT, pretrain, result  # noqa: E402


def main() -> None:
    row = result("random-eqtime/s0")
    if row is None:
        raise SystemExit("no row random-eqtime/s0 in examples/study/results.jsonl to verify")
    out = pretrain("random", 0, EQTIME_STEPS, dry=False, name="verify-random-eqtime")
    final = json.loads((out / "summary.json").read_text())["final"]["loss"]
    verdict = {"row": "random-eqtime/s0", "recorded_final_loss": row["final_loss"], "remade_final_loss": final,
               "bit_identical": final == row["final_loss"], "run": str(out.relative_to(ROOT))}
    (ROOT / "examples" / "study" / "verify_random.json").write_text(json.dumps(verdict, indent=2) + "\n")
    print(json.dumps(verdict))
    if not verdict["bit_identical"]:
        print("not bit-identical: the study re-makes random masking (arm random-rerun) instead of reusing the rows")


if __name__ == "__main__":
    main()
