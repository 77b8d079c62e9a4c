"""Build the study's table from examples/study/results.jsonl into docs/results.md (between markers).

python examples/study/summarize.py            # rewrite the table in docs/results.md
python examples/study/summarize.py --print    # print it only
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_study import DATASETS, EQTIME_OF, eqtime_steps  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "examples" / "study" / "results.jsonl"
DOC = ROOT / "docs" / "results.md"
BEGIN, END = "<!-- study-table:begin -->", "<!-- study-table:end -->"
GUIDED_BEGIN, GUIDED_END = "<!-- guided-study:begin -->", "<!-- guided-study:end -->"
COSTS_BEGIN, COSTS_END = "<!-- step-costs:begin -->", "<!-- step-costs:end -->"
COSTS = ROOT / "examples" / "study" / "step_costs.json"

ORDER = [
    ("random", "random (MAE)"),
    ("attention-high", "attention, high"),
    ("attention-hint", "attention, hint"),
    ("learned-darts-topk", "learned, MLO darts, top-k"),
    ("learned-darts-gumbel", "learned, MLO darts, gumbel"),
    ("learned-unroll-k1", "learned, MLO unroll K=1, top-k"),
    ("frozen-masker", "control: masker frozen at init, top-k"),
    ("frozen-masker-gumbel", "control: masker frozen at init, gumbel"),
    ("random-eqtime", "random at the wall time of MLO darts top-k"),
    ("untrained", "floor: untrained encoder (`--init random`)"),
    ("raw-pixels", "floor: raw pixels"),
]


def load() -> dict[str, dict[int, dict]]:
    table: dict[str, dict[int, dict]] = {}
    for line in RESULTS.read_text().splitlines() if RESULTS.is_file() else []:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "pretrain_seconds" in entry and "steps_timed" not in entry:  # older lines: from the run's summary
            summary = ROOT / entry["run"] / "summary.json"
            if summary.is_file():
                entry["steps_timed"] = json.loads(summary.read_text()).get("steps_this_call", entry["steps"])
        arm = entry["arm"] + ("@val" if entry.get("split") == "val" else "")  # val rows: the exploration
        table.setdefault(arm, {})[int(entry["seed"])] = entry  # the last line of a key wins
    return table


def mean_std(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


#: the main table: every arm at 1632 steps (the wall time of 500 MLO darts steps for random masking)
LONG = [
    ("random-eqtime", "random (MAE)"),
    ("learned-darts-topk@1632", "learned, MLO darts, top-k (the paper's selection)"),
    ("learned-darts-gumbel@1632", "learned, MLO darts, gumbel"),
    ("frozen-masker@1632", "control: masker frozen at init, top-k"),
    ("frozen-masker-gumbel@1632", "control: masker frozen at init, gumbel"),
    ("attention-high@1632", "attention, high"),
    ("attention-hint@1632", "attention, hint"),
    ("untrained", "floor: untrained encoder (`--init random`)"),
    ("raw-pixels", "floor: raw pixels"),
]
#: rows of the main table that exist only once the exploration has chosen them
LONG_EXTRA = [
    ("gumbel-masker-lr1e-4@1632", "learned, MLO darts, gumbel, masker lr 1e-4 (the exploration's choice, on val)"),
]


#: the exploration (validation split, 1632 steps): key in the table, label, the one change
EXPLORE = [
    ("random-eqtime@val", "random (MAE)", "-"),
    ("learned-darts-topk@1632@val", "MLO darts, top-k", "the paper's selection"),
    ("learned-darts-gumbel@1632@val", "MLO darts, gumbel", "(the base of the rows below)"),
    ("gumbel-normalized@1632@val", "MLO darts, gumbel", "loss weights normalised per image (`--learned-weighting normalized`)"),
    ("gumbel-straight@1632@val", "MLO darts, gumbel", "straight-through weights (`--learned-weighting straight`)"),
    ("gumbel-warmup400@1632@val", "MLO darts, gumbel", "masker warm-up, first update after 400 steps (`--masker-start 400`)"),
    ("gumbel-masker-lr1e-4@1632@val", "MLO darts, gumbel", "masker lr 1e-4 instead of 1e-3 (`--masker-lr 1e-4`)"),
    ("topk-straight@1632@val", "MLO darts, top-k", "straight-through weights"),
    ("gumbel-ridge@1632@val", "MLO darts, gumbel", "level 2 a ridge probe refit on every labeled batch (`--level2 ridge`)"),
    ("gumbel-ratio0.6@1632@val", "MLO darts, gumbel", "mask ratio 0.6 instead of 0.75 (`--mask-ratio 0.6`)"),
    ("random-ratio0.6@1632@val", "random (MAE)", "mask ratio 0.6 instead of 0.75"),
    ("frozen-masker@1632@val", "control: masker frozen at init, top-k", "-"),
    ("frozen-masker-gumbel@1632@val", "control: masker frozen at init, gumbel", "-"),
]


def present(runs: dict[int, dict], seeds: list[int], key: str) -> list:
    """The values of `key` over `seeds`, skipping runs that have none."""
    return [runs[s][key] for s in seeds if runs[s].get(key) is not None]


def render_explore(table: dict[str, dict[int, dict]], order: list[tuple[str, str, str]] = EXPLORE) -> str:
    """Markdown table of the exploration rows (linear probe on the validation split)."""
    lines = [
        "| arm | change | seeds | linear probe top-1 % on **val** | per seed | level-2 head val acc % (last log) | final masking prob. mean | final MAE loss | pretrain wall s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for arm, label, change in order:
        runs = table.get(arm, {})
        if not runs:
            continue
        seeds = sorted(runs)
        lin = present(runs, seeds, "linear_val")
        per_seed = ", ".join(f"s{s}: {100 * runs[s]['linear_val']:.1f}" for s in seeds if runs[s].get("linear_val") is not None)
        head = present(runs, seeds, "val_acc")
        probs = present(runs, seeds, "mask_prob_mean")
        loss = present(runs, seeds, "final_loss")
        wall = [runs[s]["pretrain_seconds"] for s in seeds if runs[s].get("pretrain_seconds")]
        lines.append(
            f"| {label} | {change} | {len(seeds)} | {mean_std(lin, 100)} | {per_seed or '-'} | {mean_std(head, 100)} | "
            f"{mean_std(probs, 1, 2)} | {mean_std(loss, 1, 3)} | {mean_std(wall, 1, 0)} |"
        )
    return "\n".join(lines)


def render(
    table: dict[str, dict[int, dict]], order: list[tuple[str, str]] = ORDER, only: set[int] | None = None
) -> str:
    """Markdown table of `order`'s arms; `only`: restrict to these seeds."""
    lines = [
        "| arm | seeds | linear probe top-1 % (mean ± std) | per seed | finetune top-1 % | pretrain steps | pretrain wall s | final masking prob. mean ± std (learned) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for arm, label in order:
        runs = {s: e for s, e in table.get(arm, {}).items() if only is None or s in only}
        seeds = sorted(runs)
        lin = present(runs, seeds, "linear")
        ft = present(runs, seeds, "finetune")
        per_seed = ", ".join(
            f"s{s}: {100 * runs[s]['linear']:.1f}" for s in seeds if runs[s].get("linear") is not None
        )
        steps = sorted({runs[s]["steps"] for s in seeds if runs[s].get("steps")})
        # a resumed run times only its last call: scale to all its steps (marked *)
        wall = [
            runs[s]["pretrain_seconds"] * runs[s]["steps"] / runs[s].get("steps_timed", runs[s]["steps"])
            for s in seeds
            if runs[s].get("pretrain_seconds")
        ]
        scaled = any(runs[s].get("steps_timed", runs[s].get("steps")) != runs[s].get("steps") for s in seeds)
        probs = [
            (runs[s]["mask_prob_mean"], runs[s].get("mask_prob_std"))
            for s in seeds
            if runs[s].get("mask_prob_mean") is not None
        ]
        prob_text = ", ".join(f"{m:.2f} ± {sd:.2f}" for m, sd in probs) if probs else "-"
        lines.append(
            f"| {label} | {len(seeds)} | {mean_std(lin, 100)} | {per_seed or '-'} | {mean_std(ft, 100)} | "
            f"{', '.join(map(str, steps)) or '-'} | {mean_std(wall, 1, 0)}{'*' if scaled else ''} | {prob_text} |"
        )
    return "\n".join(lines)


#: issue 12's arms (the same on every data set): result label, table label
GUIDED = [
    ("random-rerun@1632", "random (MAE), re-made beside these arms"),
    ("hpm@1632", "hpm: label-free, guided 0.5, ramp 1 (its defaults)"),
    ("hpm-g1@1632", "hpm, guided 1.0 (no random part)"),
    ("attention-high-g05@1632", "attention high, guided 0.5, ramp 1"),
    ("mlo-gumbel-g05@1632", "MLO darts, gumbel, guided 0.5, ramp 1"),
    ("mlo-gumbel-g05-reg0.1@1632", "MLO darts, gumbel, guided 0.5, ramp 1, `--masker-reg 0.1`"),
    ("mlo-gumbel-g05-reg1@1632", "MLO darts, gumbel, guided 0.5, ramp 1, `--masker-reg 1`"),
    ("frozen-gumbel-g05@1632", "control: that masker frozen at init (gumbel, guided 0.5, ramp 1)"),
    ("untrained", "floor: untrained encoder"),
    ("raw-pixels", "floor: raw pixels"),
]
#: the data sets of issue 12: result-key prefix, heading
GUIDED_DATA = [("", "MNIST-5k"), ("photos8:", "photos8 (natural photos)")]


def paired(table: dict[str, dict[int, dict]], arm: str, base: str, key: str) -> list[float]:
    """Per-seed differences arm - base of `key`, over the seeds where both have it (in points)."""
    a, b = table.get(arm, {}), table.get(base, {})
    return [100 * (a[s][key] - b[s][key]) for s in sorted(set(a) & set(b))
            if a[s].get(key) is not None and b[s].get(key) is not None]


def diff_text(diffs: list[float]) -> str:
    """mean ± sd of paired differences, with the seed count."""
    if not diffs:
        return "-"
    sd = statistics.stdev(diffs) if len(diffs) > 1 else float("nan")
    return f"{statistics.fmean(diffs):+.1f} ± {sd:.1f} (n={len(diffs)})"


def render_guided(table: dict[str, dict[int, dict]], prefix: str, base: str = "random-rerun@1632",
                  order: list[tuple[str, str]] = GUIDED) -> str:
    """Issue 12's table for one data set: scores, differences to random paired by seed, diagnostics."""
    lines = [
        "| arm | seeds | linear probe % | Δ linear vs random, paired | fine-tune % | Δ fine-tune vs random, paired | "
        "mask IoU | position entropy | logit spread | hpm rank corr | ink hidden | background hidden | pretrain wall s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for arm, label in order:
        runs = table.get(prefix + arm, {})
        if not runs:
            continue
        seeds = sorted(runs)
        row = [label, str(len(seeds)), mean_std(present(runs, seeds, "linear"), 100)]
        floor = arm in ("untrained", "raw-pixels")
        row.append("-" if arm == base or floor else diff_text(paired(table, prefix + arm, prefix + base, "linear")))
        row.append(mean_std(present(runs, seeds, "finetune"), 100))
        row.append("-" if arm == base or floor else diff_text(paired(table, prefix + arm, prefix + base, "finetune")))
        for key, digits in (("mask_iou", 3), ("mask_pos_entropy", 3), ("logit_spread", 2), ("hpm_rank_corr", 2),
                            ("ink_hidden", 2), ("background_hidden", 2)):
            row.append(mean_std(present(runs, seeds, key), 1, digits))
        row.append(mean_std([runs[s]["pretrain_seconds"] for s in seeds if runs[s].get("pretrain_seconds")], 1, 0))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def guided_verdicts(table: dict[str, dict[int, dict]], prefix: str) -> list[str]:
    """Issue 12's criteria (a)-(c) on one data set, from the paired differences of the linear probe."""
    learned = [arm for arm, _ in GUIDED if arm.startswith(("hpm", "mlo-", "attention-"))]
    mlo = [arm for arm in learned if arm.startswith("mlo-")]
    out = []

    def stats(arm: str, base: str) -> tuple[float, float, int] | None:
        d = paired(table, prefix + arm, prefix + base, "linear")
        return (statistics.fmean(d), statistics.stdev(d), len(d)) if len(d) > 1 else None

    wins = []
    for arm in learned:
        st = stats(arm, "random-rerun@1632")
        if st is not None and st[0] >= 1.0 and st[0] - st[1] > 0:
            provisional = "" if st[2] >= 3 else ", provisional: fewer than 3 seeds"
            wins.append(f"{arm} ({st[0]:+.1f} ± {st[1]:.1f}, n={st[2]}{provisional})")
    out.append("(a) a learned arm beats random by >= 1.0 point with mean - sd > 0: "
               + (", ".join(wins) if wins else "none"))

    def val_mean(arm: str) -> float:
        runs = table.get(prefix + arm + "@val", {})
        return statistics.fmean(present(runs, sorted(runs), "linear_val") or [float("-inf")])

    best = max((a for a in mlo if table.get(prefix + a)), default=None, key=val_mean)  # chosen on val only
    if best is not None:
        st = stats(best, "frozen-gumbel-g05@1632")
        out.append(f"(b) the MLO arm the validation split chose, {best}, against its frozen control: "
                   + ("-" if st is None else f"{st[0]:+.1f} ± {st[1]:.1f} (n={st[2]})"))
        st = stats("hpm@1632", best)
        out.append(f"(c) hpm against {best}: " + ("-" if st is None else f"{st[0]:+.1f} ± {st[1]:.1f} (n={st[2]})"))
        others = []  # every MLO arm, for the record (the verdict uses the validation split's choice only)
        for arm in mlo:
            if arm == best or not table.get(prefix + arm):
                continue
            vs_frozen, vs_hpm = stats(arm, "frozen-gumbel-g05@1632"), stats("hpm@1632", arm)
            if vs_frozen is not None and vs_hpm is not None:
                others.append(f"{arm}: against the frozen control {vs_frozen[0]:+.1f} ± {vs_frozen[1]:.1f}, "
                              f"hpm against it {vs_hpm[0]:+.1f} ± {vs_hpm[1]:.1f} (n={vs_frozen[2]})")
        if others:
            out.append("the other MLO arms (not chosen on val): " + "; ".join(others))
    return out


#: the --masker-reg choice on the validation split: result label (val rows), table label
REG_CHOICE = [
    ("mlo-gumbel-g05@1632@val", "no penalty"),
    ("mlo-gumbel-g05-reg0.1@1632@val", "`--masker-reg 0.1`"),
    ("mlo-gumbel-g05-reg1@1632@val", "`--masker-reg 1`"),
]


def render_choice(table: dict[str, dict[int, dict]], prefix: str) -> str:
    """The validation-split linear probe of the MLO arms that differ only in --masker-reg."""
    lines = ["| MLO darts, gumbel, guided 0.5, ramp 1 | seeds | linear probe % on **val** | per seed | "
             "final prior KL | logit spread |", "| --- | --- | --- | --- | --- | --- |"]
    for arm, label in REG_CHOICE:
        runs = table.get(prefix + arm, {})
        if not runs:
            continue
        seeds = sorted(runs)
        per_seed = ", ".join(f"s{s}: {100 * runs[s]['linear_val']:.1f}" for s in seeds if runs[s].get("linear_val"))
        lines.append(f"| {label} | {len(seeds)} | {mean_std(present(runs, seeds, 'linear_val'), 100)} | "
                     f"{per_seed or '-'} | {mean_std(present(runs, seeds, 'masker_prior_kl'), 1, 4)} | "
                     f"{mean_std(present(runs, seeds, 'logit_spread'), 1, 3)} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def render_guided_all(table: dict[str, dict[int, dict]]) -> str:
    parts = []
    for prefix, heading in GUIDED_DATA:
        if not any(key.startswith(prefix) and (prefix or ":" not in key) for key in table):
            continue
        choice = render_choice(table, prefix)
        if choice:
            parts.append(f"**{heading}: the `--masker-reg` weight, chosen on the validation split.**\n\n{choice}")
        parts.append(f"**{heading}, 1632 steps.** Paired differences: mean ± sd over seeds of (arm − random) "
                     "in points.\n\n" + render_guided(table, prefix))
        parts.append("\n".join(f"- {line}" for line in guided_verdicts(table, prefix)))
        eqtime = render_eqtime(table, prefix, heading)
        if eqtime:
            parts.append(eqtime)
    long_arms = [(arm.replace("@1632", "@4000"), label) for arm, label in GUIDED if arm.endswith("@1632")]
    if any(table.get(arm) for arm, _ in long_arms):
        parts.append("**MNIST-5k, 4000 steps** (`run_study.py --steps 4000 --finetune --arms random-rerun "
                     "mlo-gumbel-g05-reg0.1 frozen-gumbel-g05`; its `--dry-run` prints the commands).\n\n"
                     + render_guided(table, "", base="random-rerun@4000", order=long_arms))
        parts.append("\n".join(
            f"- {arm} against its frozen control, {what}: {diff_text(paired(table, arm, 'frozen-gumbel-g05@4000', key))}"
            for arm, _ in long_arms if arm.startswith("mlo-") and table.get(arm)
            for key, what in (("linear", "linear probe"), ("finetune", "fine-tune"))
        ))
    return "\n\n".join(parts)


def render_eqtime(table: dict[str, dict[int, dict]], prefix: str, heading: str) -> str:
    """Issue 12's equal wall time: the data set's best learned arm against random masking given its wall time."""
    data = next(name for name, (_, p) in DATASETS.items() if p == prefix)
    arm = EQTIME_OF[data]
    steps = eqtime_steps(data, arm, 1632)
    base = f"random-rerun@{steps}"
    if not table.get(prefix + base):
        return ""
    label = dict(GUIDED)[f"{arm}@1632"]
    order = [(base, f"random (MAE), {steps} steps"), (f"{arm}@1632", f"{label}, 1632 steps")]
    return (f"**{heading}, equal wall time.** Random masking for {steps} steps, the idle-core wall time of "
            f"1632 steps of `{arm}` (examples/study/step_costs.json; `run_study.py --data {data} --steps 1632 "
            f"--equal-time-of {arm} --finetune --arms random-rerun`). Δ: the learned arm − random at equal "
            "wall time, paired by seed.\n\n" + render_guided(table, prefix, base=base, order=order))


def render_step_costs() -> str:
    """examples/study/step_costs.json as a table: seconds per step and the ratio to random, per data set."""
    costs = json.loads(COSTS.read_text()) if COSTS.is_file() else {}
    data_sets = sorted({key.split("/")[0] for key in costs})
    arms = list(dict.fromkeys(key.split("/")[1] for key in costs))
    lines = ["| arm | " + " | ".join(f"{d}: s/step | {d}: x random" for d in data_sets) + " |",
             "| --- |" + " --- | --- |" * len(data_sets)]
    for arm in arms:
        cells = []
        for d in data_sets:
            c = costs.get(f"{d}/{arm}", {})
            cells += [f"{c['seconds_per_step']:.3f}" if c else "-", f"{c['ratio_to_random']:.2f}" if c else "-"]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def replace_between(doc: str, begin: str, end: str, text: str) -> str:
    if begin not in doc or end not in doc:
        raise SystemExit(f"{DOC} has no {begin} ... {end} markers")
    head, rest = doc.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{text}\n{end}{tail}"


#: issue 15's zoo table (MNIST-5k, 1632 steps): result label, policy and ratio as shown, the random
#: rows it is paired with (`uniform` needs an even grid: 32x32 digits, 8x8 patches, beside random on the same)
ZOO = [
    ("random-rerun@1632", "random (MAE), 0.75", None),
    ("simmim@1632", "`simmim` (SimMIM, 2x2 groups), 0.6: its paper's", "random-rerun@1632"),
    ("simmim-r0.75@1632", "`simmim`, 0.75", "random-rerun@1632"),
    ("colornoise@1632", "`colornoise` (ColorMAE, green), 0.75: its paper's", "random-rerun@1632"),
    ("adamae-r0.95@1632", "`adamae` (AdaMAE), 0.95: its paper's (video)", "random-rerun@1632"),
    ("adamae@1632", "`adamae`, 0.75", "random-rerun@1632"),
    ("random-i32@1632", "random (MAE), 0.75; digits at 32x32 (8x8 patches)", None),
    ("uniform-i32@1632", "`uniform` (UM-MAE), 0.75: its paper's (and only); 32x32", "random-i32@1632"),
]
ZOO_BEGIN, ZOO_END = "<!-- zoo-study:begin -->", "<!-- zoo-study:end -->"


def render_zoo(table: dict[str, dict[int, dict]]) -> str:
    """Issue 15: every zoo policy against random masking, paired by seed (linear probe and fine-tune)."""
    lines = ["| policy, mask ratio | seeds | linear probe % | Δ linear vs random, paired | fine-tune % | "
             "Δ fine-tune vs random, paired | pretrain wall s |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for arm, label, base in ZOO:
        runs = table.get(arm, {})
        if not runs:
            continue
        seeds = sorted(runs)
        lines.append("| " + " | ".join([
            label, str(len(seeds)), mean_std(present(runs, seeds, "linear"), 100),
            "-" if base is None else diff_text(paired(table, arm, base, "linear")),
            mean_std(present(runs, seeds, "finetune"), 100),
            "-" if base is None else diff_text(paired(table, arm, base, "finetune")),
            mean_std([runs[s]["pretrain_seconds"] for s in seeds if runs[s].get("pretrain_seconds")], 1, 0),
        ]) + " |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--print", action="store_true")
    args = parser.parse_args()
    table = load()
    extra = [(arm, label) for arm, label in LONG_EXTRA if table.get(arm)]
    text = (
        "**Equal iterations, 1632 steps (3 seeds; the seeds column says where fewer finished).** "
        "Fine-tune: 10 epochs (280 steps).\n\n" + render(table, LONG[:-2] + extra + LONG[-2:])  # floors last
        + "\n\n**Short budget, 500 steps (every arm, 3 seeds).**\n\n" + render(table)
    )
    text += (
        "\n\n**Exploration: what makes learned masks pay (1632 steps, scored on the validation split; "
        "chosen there, never on the test split).**\n\n" + render_explore(table)
    )
    guided = render_guided_all(table)
    if args.print or not DOC.is_file():
        print(guided + "\n\n" + text)
        return
    doc = replace_between(DOC.read_text(), BEGIN, END, text)
    if GUIDED_BEGIN in doc:
        doc = replace_between(doc, GUIDED_BEGIN, GUIDED_END, guided)
    if COSTS_BEGIN in doc:
        doc = replace_between(doc, COSTS_BEGIN, COSTS_END, render_step_costs())
    if ZOO_BEGIN in doc:
        doc = replace_between(doc, ZOO_BEGIN, ZOO_END, render_zoo(table))
    DOC.write_text(doc)
    print(f"wrote the tables into {DOC}")


if __name__ == "__main__":
    main()
