"""Convert the old study records (examples/study/results.jsonl, step_costs.json) into study directories that
`maskkit ablate report` reads: docs/studies/<study>/ with study.toml (from examples/studies/), recorded.jsonl
(one row per arm and seed, the old rows under the new arm names), selection.json (each grid's validation
rows and the value they choose) and calibration.json (the equal-wall-time budgets the rows were run with).

    python examples/study/convert_results.py            # writes docs/studies/*/ (run once; idempotent)
    maskkit ablate report docs/studies/issue12-mnist5k  # the tables of docs/results.md

The old rows were keyed `<prefix><arm>@<steps>/s<seed>[@val]` (run_study.py, retired: `maskkit ablate`
replaces it); ARMS below maps each study's arms onto them.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from maskkit.ablate import load_study
from maskkit.ablate.select import choose

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "examples" / "study" / "results.jsonl"
COSTS = ROOT / "examples" / "study" / "step_costs.json"
STUDIES = ROOT / "examples" / "studies"
OUT = ROOT / "docs" / "studies"

#: study -> (the data set's key prefix, {arm: old label}, {grid arm: {value: old label}}, {equal-cost arm: costs key})
ARMS: dict[str, tuple[str, dict[str, str], dict[str, dict[str, str]]]] = {
    "issue7": ("", {"random": "random", "attention-high": "attention-high", "attention-hint": "attention-hint",
                    "learned-darts-topk": "learned-darts-topk", "learned-darts-gumbel": "learned-darts-gumbel",
                    "learned-unroll-k1": "learned-unroll-k1", "frozen-masker": "frozen-masker",
                    "frozen-masker-gumbel": "frozen-masker-gumbel", "random-eqtime": "random-eqtime"}, {}),
    "issue7-1632": ("", {"random": "random-eqtime", "learned-darts-topk": "learned-darts-topk@1632",
                         "frozen-masker": "frozen-masker@1632", "frozen-masker-gumbel": "frozen-masker-gumbel@1632",
                         "attention-high": "attention-high@1632", "attention-hint": "attention-hint@1632"},
                    {"learned-darts-gumbel": {"0.001": "learned-darts-gumbel@1632",
                                              "0.0001": "gumbel-masker-lr1e-4@1632"}}),
    "issue12-mnist5k": ("", {"random-rerun": "random-rerun@1632", "hpm": "hpm@1632", "hpm-g1": "hpm-g1@1632",
                             "attention-high-g05": "attention-high-g05@1632", "mlo-gumbel-g05": "mlo-gumbel-g05@1632",
                             "frozen-gumbel-g05": "frozen-gumbel-g05@1632", "random-eqtime": "random-rerun@5758",
                             "random-rerun-4000": "random-rerun@4000",
                             "mlo-gumbel-g05-reg0.1-4000": "mlo-gumbel-g05-reg0.1@4000",
                             "frozen-gumbel-g05-4000": "frozen-gumbel-g05@4000"},
                        {"mlo-gumbel-g05-reg": {"0.0": "mlo-gumbel-g05@1632", "0.1": "mlo-gumbel-g05-reg0.1@1632",
                                                "1.0": "mlo-gumbel-g05-reg1@1632"}}),
    "issue12-photos8": ("photos8:", {"random-rerun": "random-rerun@1632", "hpm": "hpm@1632", "hpm-g1": "hpm-g1@1632",
                                     "attention-high-g05": "attention-high-g05@1632",
                                     "mlo-gumbel-g05": "mlo-gumbel-g05@1632", "frozen-gumbel-g05": "frozen-gumbel-g05@1632",
                                     "random-eqtime": "random-rerun@6670"},
                        {"mlo-gumbel-g05-reg": {"0.0": "mlo-gumbel-g05@1632", "0.1": "mlo-gumbel-g05-reg0.1@1632",
                                                "1.0": "mlo-gumbel-g05-reg1@1632"}}),
    "issue15-zoo": ("", {arm: f"{arm}@1632" for arm in ("random-rerun", "simmim", "simmim-r0.75", "colornoise",
                                                        "adamae-r0.95", "adamae", "random-i32", "uniform-i32")}, {}),
}  # fmt: skip
#: the old step-cost keys (examples/study/step_costs.json) of the equal-wall-time pairs
COST_KEYS = {"issue12-mnist5k": ("mnist5k", {"random-eqtime": "random", "mlo-gumbel-g05-reg": "mlo-gumbel-g05-reg0.1"}),
             "issue12-photos8": ("photos8", {"random-eqtime": "random", "mlo-gumbel-g05": "mlo-gumbel-g05"})}  # fmt: skip
DIAGNOSTICS = ("mask_iou", "mask_pos_entropy", "logit_spread", "hpm_rank_corr", "masker_prior_kl", "ink_hidden",
               "background_hidden")  # fmt: skip


def load_rows() -> dict[str, dict]:
    """The last line of every key in results.jsonl."""
    rows = {}
    for line in RESULTS.read_text().splitlines():
        if line.strip():
            entry = json.loads(line)
            rows[entry["key"]] = entry
    return rows


def new_row(arm: str, entry: dict, protocols: list[str]) -> dict:
    seconds = entry.get("pretrain_seconds")
    if seconds is not None and entry.get("steps_timed"):
        seconds = seconds * entry["steps"] / entry["steps_timed"]  # a resumed run timed its last call only
    return {"arm": arm, "seed": entry["seed"], "steps": entry.get("steps"), "seconds": seconds,
            "final_loss": entry.get("final_loss"), "source": entry["key"],
            "scores": {p: entry[p] for p in protocols if entry.get(p) is not None},
            "diagnostics": {k: entry[k] for k in DIAGNOSTICS if entry.get(k) is not None}}  # fmt: skip


def convert(name: str, rows: dict[str, dict]) -> Path:
    study = load_study(STUDIES / f"{name}.toml")
    prefix, arms, grids = ARMS[name]
    protocols = list(study.evaluations)
    out = OUT / name
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(STUDIES / f"{name}.toml", out / "study.toml")
    recorded, selection = [], {}
    for arm, grid in grids.items():
        sel = study.arms[arm].select

        def score(value: str, seed: int, split: str, grid: dict = grid, by: str = sel.by) -> float:
            return rows[f"{prefix}{grid[value]}/s{seed}@{split}"][f"{by}_{split}"]

        choice = choose(sel, score)
        selection[arm] = choice.to_dict()
        arms = {**arms, arm: grid[choice.chosen]}
    for arm, label in arms.items():
        for seed in study.seeds:
            entry = rows.get(f"{prefix}{label}/s{seed}")
            if entry is not None:
                recorded.append(new_row(arm, entry, protocols))
    (out / "recorded.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in recorded))
    if selection:
        (out / "selection.json").write_text(json.dumps(selection, indent=2, sort_keys=True) + "\n")
    equal = {a: arm for a, arm in study.arms.items() if arm.equal_cost is not None}
    if equal:
        costs = json.loads(COSTS.read_text())
        data, keys = COST_KEYS.get(name, ("", {}))
        calibration = {"steps": {}, "basis": {}, "costs": {}, "threads": 1,
                       "note": "recorded: the idle-core costs of examples/study/step_costs.json"}  # fmt: skip
        for a, arm in equal.items():
            calibration["steps"][a] = next(r["steps"] for r in recorded if r["arm"] == a)
            calibration["basis"][a] = arm.equal_cost.basis
            for member in (a, arm.equal_cost.of):
                cost = costs.get(f"{data}/{keys.get(member, member)}")
                if cost is not None:
                    calibration["costs"][member] = {"seconds_per_step": cost["seconds_per_step"], "basis": "wall time"}
        (out / "calibration.json").write_text(json.dumps(calibration, indent=2, sort_keys=True) + "\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("studies", nargs="*", default=list(ARMS), help=f"which (default all: {', '.join(ARMS)})")
    args = parser.parse_args()
    rows = load_rows()
    for name in args.studies:
        print(f"wrote {convert(name, rows).relative_to(ROOT)}")


if __name__ == "__main__":
    main()
