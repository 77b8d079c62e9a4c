"""`maskkit ablate report DIR`: what a study's runs say, as tables (markdown, CSV, JSON) and verdicts.

Per arm: each evaluation's score (top-1 %, test split) as mean ± sd over seeds with every seed shown,
its steps and pretraining wall time, and the collapse diagnostics of its final metrics line (mask IoU
between images, position entropy, logit spread, hpm rank correlation, masker prior KL; see
maskkit/diagnostics.py). Per comparison (each arm against its baseline, each learned arm against its
control, each equal-cost partner against its equal-cost arm): the per-seed differences in points,
their mean ± sd, n, the 95% paired t interval and the verdict (maskkit.ablate.stats), with the basis
of the comparison (equal steps, equal wall time, equal FLOPs).

Scores come from the run directories (`runs/<run>/eval.json`, `summary.json`); a study directory may
also hold `recorded.jsonl`, rows recorded before the runs lived there (one JSON object per line:
arm, seed, scores {protocol: top-1 in [0, 1]}, steps, seconds, final_loss, diagnostics), used where a
run directory has no score (examples/study/convert_results.py writes them from the old results.jsonl).
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from maskkit.jsonfile import shown_path

from .files import Row, read_calibration, read_recorded, read_run, read_selection, read_study
from .plan import study_runs
from .runner import CALIBRATION, RUNS, SELECTION, STUDY_FILE
from .stats import Comparison, Summary, compare, describe
from .study import Study, StudyError

__all__ = ["DIAGNOSTICS", "RECORDED", "ArmResult", "Report", "Row", "build_report", "write_report"]

RECORDED = "recorded.jsonl"
#: the collapse diagnostics a report shows (from a run's final metrics line), with their digits
#: (ink_hidden / background_hidden: shares of ink and background patches hidden, in recorded rows of digits)
DIAGNOSTICS = {"mask_iou": 3, "mask_pos_entropy": 3, "logit_spread": 2, "hpm_rank_corr": 2, "masker_prior_kl": 4,
               "ink_hidden": 2, "background_hidden": 2}  # fmt: skip
DIAGNOSTIC_NAMES = {"mask_iou": "mask IoU", "mask_pos_entropy": "position entropy", "logit_spread": "logit spread",
                    "hpm_rank_corr": "hpm rank corr", "masker_prior_kl": "prior KL", "ink_hidden": "ink hidden",
                    "background_hidden": "background hidden"}  # fmt: skip


@dataclass
class ArmResult:
    """An arm over its seeds."""

    arm: str
    label: str
    rows: list[Row]
    scores: dict[str, Summary]  # in points
    per_seed: dict[str, dict[int, float]]  # in points
    steps: list[int]
    seconds: Summary | None
    final_loss: Summary | None
    diagnostics: dict[str, Summary]


@dataclass
class Report:
    """A study's results: per arm, per comparison, the grids' choices and the equal-cost budgets."""

    study: Study
    arms: list[ArmResult]
    comparisons: list[tuple[str, Comparison]]  # (protocol, comparison)
    selection: dict[str, Any]
    calibration: dict[str, Any]
    missing: list[str]  # runs without every score

    def to_dict(self) -> dict[str, Any]:
        return {
            "study": self.study.name, "data": self.study.data, "seeds": list(self.study.seeds),
            "interval": "95% paired t (scipy.stats.t), differences in points of top-1",
            "arms": [_arm_dict(a) for a in self.arms],
            "comparisons": [{"protocol": p, **asdict(c), "n": c.n, "verdict": c.verdict,
                             "sentence": c.sentence(_metric(p))} for p, c in self.comparisons],
            "selection": self.selection, "calibration": self.calibration, "missing": self.missing,
        }  # fmt: skip


def _arm_dict(a: ArmResult) -> dict[str, Any]:
    return {"arm": a.arm, "label": a.label, "steps": a.steps, "scores": {p: asdict(s) for p, s in a.scores.items()},
            "per_seed": a.per_seed, "seconds": a.seconds and asdict(a.seconds),
            "final_loss": a.final_loss and asdict(a.final_loss),
            "diagnostics": {k: asdict(v) for k, v in a.diagnostics.items()},
            "rows": [{**asdict(r), "source": shown_path(r.source)} for r in a.rows]}  # fmt: skip


def _metric(protocol: str) -> str:
    return {"linear": "linear probe", "finetune": "fine-tune"}.get(protocol, protocol)


def _summary(values: list[float]) -> Summary | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return describe(values) if values else None


def build_report(study_dir: str | Path) -> Report:
    """Read a study directory (its study.toml, runs, selection.json, calibration.json, recorded.jsonl).

    Every file is checked as maskkit.ablate.files says: an absent one is "not there yet", a damaged one
    refuses the report (StudyError naming the file and the field).
    """
    study_dir = Path(study_dir)
    if not (study_dir / STUDY_FILE).exists():
        raise StudyError(f"{shown_path(study_dir)} holds no {STUDY_FILE}: not a study directory "
                         "(maskkit ablate STUDY.toml --out DIR)")  # fmt: skip
    study = read_study(study_dir / STUDY_FILE, name=shown_path(study_dir.resolve().name))
    selection = read_selection(study_dir / SELECTION, study)
    calibration = read_calibration(study_dir / CALIBRATION, study)
    chosen = {arm: entry["chosen"] for arm, entry in selection.items()}
    protocols = list(study.evaluations)
    recorded = read_recorded(study_dir / RECORDED, study)
    rows: dict[str, list[Row]] = {name: [] for name in study.arms}
    missing = []
    for spec in study_runs(study, chosen, calibration.get("steps", {})):
        row = read_run(spec.arm, spec.seed, study_dir / RUNS / spec.name, protocols, list(DIAGNOSTICS))
        old = recorded.get((spec.arm, spec.seed))
        if old is not None and (row is None or not row.scores):
            row = old
        if row is None or set(row.scores) != set(protocols):
            missing.append(spec.name)
        if row is not None and row.scores:
            rows[spec.arm].append(row)
    arms = []
    for name, arm in study.arms.items():
        got = rows[name]
        per_seed = {p: {r.seed: 100 * r.scores[p] for r in got if p in r.scores} for p in protocols}
        label = arm.label or name
        if name in chosen:
            label += f" ({arm.select.option} {chosen[name]}, chosen on val)"
        arms.append(ArmResult(
            name, label, got, {p: describe(list(v.values())) for p, v in per_seed.items() if v}, per_seed,
            sorted({r.steps for r in got if r.steps is not None}), _summary([r.seconds for r in got]),
            _summary([r.final_loss for r in got]),
            {k: s for k in DIAGNOSTICS if (s := _summary([r.diagnostics.get(k) for r in got])) is not None},
        ))  # fmt: skip
    by_name = {a.arm: a for a in arms}
    comparisons = []
    for arm, reference, basis in study.comparisons():
        for p in protocols:
            mine, theirs = by_name[arm].per_seed.get(p, {}), by_name[reference].per_seed.get(p, {})
            if set(mine) & set(theirs):
                comparisons.append((p, compare(arm, reference, mine, theirs, basis=basis)))
    return Report(study, arms, comparisons, selection, calibration, missing)


# ---- rendering -------------------------------------------------------------------------------------


def _ms(s: Summary | None, digits: int = 1) -> str:
    if s is None:
        return "-"
    return f"{s.mean:.{digits}f}" if s.sd is None else f"{s.mean:.{digits}f} ± {s.sd:.{digits}f}"


def _diagnostic_keys(report: Report) -> list[str]:
    return [k for k in DIAGNOSTICS if any(k in a.diagnostics for a in report.arms)]


def arms_table(report: Report) -> str:
    """Markdown: one row per arm."""
    protocols = list(report.study.evaluations)
    diags = _diagnostic_keys(report)
    head = ["arm", "steps", "seeds"]
    for p in protocols:
        head += [f"{_metric(p)} %", "per seed"]
    head += ["final loss", *(DIAGNOSTIC_NAMES[k] for k in diags), "pretrain wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for a in report.arms:
        cells = [a.label, ", ".join(map(str, a.steps)) or "-", str(len(a.rows))]
        for p in protocols:
            seeds = a.per_seed.get(p, {})
            cells += [_ms(a.scores.get(p)), ", ".join(f"s{s}: {v:.1f}" for s, v in sorted(seeds.items())) or "-"]
        cells.append(_ms(a.final_loss, 3))
        cells += [_ms(a.diagnostics.get(k), DIAGNOSTICS[k]) for k in diags]
        cells.append(_ms(a.seconds, 0))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparisons_table(report: Report) -> str:
    """Markdown: one row per (comparison, evaluation)."""
    lines = ["| comparison | basis | metric | Δ points, mean ± sd | n | 95% CI (paired t) | verdict |",
             "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for p, c in report.comparisons:
        ci = "-" if c.low is None else f"[{c.low:+.2f}, {c.high:+.2f}]"
        sd = "" if c.sd is None else f" ± {c.sd:.2f}"
        lines.append(f"| {c.arm} − {c.reference} | {c.basis} | {_metric(p)} | {c.mean:+.2f}{sd} | {c.n} | {ci} | "
                     f"{c.verdict} |")  # fmt: skip
    return "\n".join(lines)


def selection_table(report: Report) -> str:
    """Markdown: each grid's validation scores (never the test split's) and its choice."""
    parts = []
    for arm, entry in report.selection.items():
        lines = [f"| {arm}: {entry['option']} | {_metric(entry['by'])} % on **val** | per seed | chosen |",
                 "| --- | --- | --- | --- |"]  # fmt: skip
        for value, per in entry["scores"].items():
            points = {int(s): 100 * x for s, x in per.items()}
            lines.append(f"| {value} | {_ms(describe(list(points.values())))} | "
                         + ", ".join(f"s{s}: {v:.1f}" for s, v in sorted(points.items()))
                         + f" | {'yes' if value == entry['chosen'] else ''} |")  # fmt: skip
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def calibration_lines(report: Report) -> list[str]:
    out = []
    costs = report.calibration.get("costs", {})
    for arm, steps in report.calibration.get("steps", {}).items():
        of = report.study.arms[arm].equal_cost.of
        basis = report.calibration["basis"][arm]
        if basis == "wall time" and not {arm, of} <= set(costs):
            how = "wall time recorded with the rows"
        elif basis == "wall time":
            mine, theirs = costs[arm]["seconds_per_step"], costs[of]["seconds_per_step"]
            how = (f"{of} {theirs:.4f} s/step, {arm} {mine:.4f} s/step (interleaved calibration, "
                   f"{report.calibration.get('threads', 1)} thread(s))")  # fmt: skip
        else:
            how = f"FLOPs ratio {of} {costs[f'{of} (flops)']['flops_ratio']:.2f}, {arm} {costs[f'{arm} (flops)']['flops_ratio']:.2f}"
        out.append(f"{arm}: {steps} steps, the {basis} of {report.study.budget(of)[0]} steps of {of}: {how}")
    return out


def markdown(report: Report) -> str:
    """The whole report as markdown: arms, comparisons, verdicts, grids, equal-cost budgets."""
    s = report.study
    parts = [f"**{s.name}**: {s.data}, seeds {', '.join(map(str, s.seeds))}; scores are top-1 % on the test split.",
             arms_table(report), comparisons_table(report),
             "\n".join(f"- {c.sentence(_metric(p))}" for p, c in report.comparisons) or "- no comparison has scores yet"]  # fmt: skip
    if report.selection:
        parts.append("Chosen on the validation split only:\n\n" + selection_table(report))
    cal = calibration_lines(report)
    if cal:
        parts.append("Equal cost:\n\n" + "\n".join(f"- {line}" for line in cal))
    if report.missing:
        parts.append(f"Not finished yet ({len(report.missing)}): {', '.join(report.missing)}")
    return "\n\n".join(parts) + "\n"


def arms_csv(report: Report) -> str:
    """CSV: one line per (arm, seed), the raw numbers (scores in points)."""
    protocols = list(report.study.evaluations)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["arm", "seed", *protocols, "steps", "seconds", "final_loss", *DIAGNOSTICS, "source"])
    for a in report.arms:
        for r in sorted(a.rows, key=lambda r: r.seed):
            writer.writerow([a.arm, r.seed, *(_num(100 * r.scores[p]) if p in r.scores else "" for p in protocols),
                             r.steps, _num(r.seconds), _num(r.final_loss),
                             *(_num(r.diagnostics.get(k)) for k in DIAGNOSTICS), shown_path(r.source)])  # fmt: skip
    return buffer.getvalue()


def comparisons_csv(report: Report) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["arm", "reference", "protocol", "basis", "n", "mean", "sd", "low", "high", "verdict", "seeds"])
    for p, c in report.comparisons:
        writer.writerow([c.arm, c.reference, p, c.basis, c.n, _num(c.mean), _num(c.sd), _num(c.low), _num(c.high),
                         c.verdict, " ".join(map(str, c.seeds))])  # fmt: skip
    return buffer.getvalue()


def _num(x: float | None) -> str:
    return "" if x is None else f"{x:.6g}"


def write_report(report: Report, out: str | Path, *, chart: bool = True, gallery: bool = True) -> dict[str, Path]:
    """Write report.md, arms.csv, comparisons.csv, report.json, chart.png and masks.png into `out`."""
    from maskkit.checkpoint import atomic_write_text

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = {"markdown": out / "report.md", "csv": out / "arms.csv", "comparisons_csv": out / "comparisons.csv",
               "json": out / "report.json"}  # fmt: skip
    atomic_write_text(written["markdown"], markdown(report))
    atomic_write_text(written["csv"], arms_csv(report))
    atomic_write_text(written["comparisons_csv"], comparisons_csv(report))
    atomic_write_text(written["json"], json.dumps(report.to_dict(), indent=2, sort_keys=True) + "\n")
    if chart:
        from .chart import draw_chart

        written["chart"] = draw_chart(report, out / "chart.png")
    if gallery:
        from .gallery import draw_gallery

        path = draw_gallery(report, out / "masks.png")
        if path is not None:
            written["gallery"] = path
    return written
