"""The report's numbers against an independent computation on fixed scores: per-arm mean and sd, the
paired differences with their 95% paired t interval (t quantiles from printed tables), the verdicts,
the CSV rows, recorded rows, and the chart (a PNG)."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from pathlib import Path

import pytest
from PIL import Image

from maskkit.ablate import build_report, markdown, write_report
from maskkit.ablate.report import arms_csv

T975 = {1: 12.706, 2: 4.303, 3: 3.182}
STUDY = """
[study]
data = "digits"
seeds = [0, 1, 2, 3]
steps = 30
baseline = "random"
options = { model = "micro" }

[evaluations.linear]
[evaluations.finetune]
epochs = 2

[arms.random]
options = { policy = "random" }
[arms.mlo]
options = ["--policy", "learned", "--learned-selection", "gumbel"]
control = "frozen"
[arms.frozen]
options = ["--policy", "learned", "--freeze-masker"]
"""
#: top-1 (linear, finetune) per arm and seed; seed 3 of mlo is missing (an unfinished run)
SCORES = {
    "random": {0: (0.900, 0.95), 1: (0.910, 0.96), 2: (0.890, 0.94), 3: (0.950, 0.97)},
    "mlo": {0: (0.920, 0.95), 1: (0.935, 0.97), 2: (0.905, 0.93)},
    "frozen": {0: (0.905, 0.95), 1: (0.915, 0.96), 2: (0.880, 0.95), 3: (0.940, 0.96)},
}
DIAG = {"random": 0.608, "mlo": 0.7, "frozen": 0.61}


def make_study_dir(root: Path) -> Path:
    d = root / "study"
    (d / "runs").mkdir(parents=True)
    (d / "study.toml").write_text(STUDY)
    for arm, seeds in SCORES.items():
        for seed, (lin, ft) in seeds.items():
            run = d / "runs" / f"{arm}-s{seed}"
            run.mkdir()
            final = {"loss": 0.4 + seed / 100, "mask_iou": DIAG[arm], "mask_pos_entropy": 0.98}
            (run / "summary.json").write_text(json.dumps({"steps": 30, "seconds": 10.0 + seed, "final": final}))
            (run / "eval.json").write_text(json.dumps({"linear": {"top1": lin}, "finetune": {"top1": ft}}))
    return d


def test_per_arm_and_paired_numbers_match_an_independent_computation(tmp_path):
    report = build_report(make_study_dir(tmp_path))
    arms = {a.arm: a for a in report.arms}
    random_linear = [100 * SCORES["random"][s][0] for s in range(4)]
    assert arms["random"].scores["linear"].mean == pytest.approx(statistics.fmean(random_linear))
    assert arms["random"].scores["linear"].sd == pytest.approx(statistics.stdev(random_linear))
    assert arms["mlo"].per_seed["linear"] == {s: pytest.approx(100 * SCORES["mlo"][s][0]) for s in range(3)}
    assert arms["random"].diagnostics["mask_iou"].mean == pytest.approx(0.608)
    assert arms["random"].seconds.mean == pytest.approx(11.5)
    assert report.missing == ["mlo-s3"]
    found = {(c.arm, c.reference, p): c for p, c in report.comparisons}
    assert set(found) == {(a, r, p) for a, r in (("mlo", "random"), ("mlo", "frozen"), ("frozen", "random"))
                          for p in ("linear", "finetune")}  # fmt: skip
    for (arm, ref, protocol), c in found.items():
        i = 0 if protocol == "linear" else 1
        seeds = sorted(set(SCORES[arm]) & set(SCORES[ref]))
        diffs = [100 * (SCORES[arm][s][i] - SCORES[ref][s][i]) for s in seeds]
        mean, sd, n = statistics.fmean(diffs), statistics.stdev(diffs), len(diffs)
        half = T975[n - 1] * sd / math.sqrt(n)
        assert c.seeds == tuple(seeds) and c.n == n
        assert c.mean == pytest.approx(mean, abs=1e-9) and c.sd == pytest.approx(sd, abs=1e-9)
        assert c.low == pytest.approx(mean - half, abs=2e-3 * half)
        assert c.high == pytest.approx(mean + half, abs=2e-3 * half)
        assert c.verdict == ("beats" if mean - half > 0 else "loses" if mean + half < 0 else "ties within noise")
    # mlo - random, linear: +2.0, +2.5, +1.5 points -> 2.0 ± 0.5, CI 2.0 ± 4.303 * 0.5 / sqrt(3) > 0
    assert found[("mlo", "random", "linear")].verdict == "beats"
    assert found[("mlo", "random", "linear")].mean == pytest.approx(2.0)


def test_markdown_csv_and_json_show_every_seed(tmp_path):
    d = make_study_dir(tmp_path)
    report = build_report(d)
    text = markdown(report)
    assert "| random | 30 | 4 | 91.2 ± 2.6 | s0: 90.0, s1: 91.0, s2: 89.0, s3: 95.0 |" in text
    assert "| mlo − random | equal steps | linear probe | +2.00 ± 0.50 | 3 |" in text
    assert "- mlo against random, linear probe (equal steps): beats, +2.00 ± 0.50 over 3 paired seed(s)" in text
    assert "Not finished yet (1): mlo-s3" in text
    rows = list(csv.DictReader(io.StringIO(arms_csv(report))))
    assert len(rows) == 11
    assert {(r["arm"], r["seed"]) for r in rows} == {(a, str(s)) for a, ss in SCORES.items() for s in ss}
    assert float(next(r for r in rows if r["arm"] == "mlo" and r["seed"] == "1")["linear"]) == pytest.approx(93.5)
    written = write_report(report, d / "report", gallery=False)
    payload = json.loads(written["json"].read_text())
    assert payload["interval"].startswith("95% paired t")
    assert len(payload["comparisons"]) == 6
    with Image.open(written["chart"]) as png:
        assert png.format == "PNG" and png.width > 400 and png.height > 200
    from maskkit.ablate.chart import draw_chart_pil  # the chart without matplotlib

    with Image.open(draw_chart_pil(report, d / "pil.png")) as png:
        assert png.format == "PNG" and png.width > 400 and png.height > 200
        assert len(png.convert("RGB").getcolors(maxcolors=1 << 16)) > 5  # points, bars and intervals: not a blank


def test_recorded_rows_fill_runs_that_have_no_directory(tmp_path):
    d = make_study_dir(tmp_path)
    row = {"arm": "mlo", "seed": 3, "scores": {"linear": 0.97, "finetune": 0.98}, "steps": 30, "seconds": 12.0,
           "diagnostics": {"mask_iou": 0.7}}  # fmt: skip
    (d / "recorded.jsonl").write_text(json.dumps(row) + "\n")
    report = build_report(d)
    mlo = next(a for a in report.arms if a.arm == "mlo")
    assert mlo.per_seed["linear"][3] == pytest.approx(97.0) and report.missing == []
    (d / "recorded.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="recorded.jsonl line 1"):
        build_report(d)


def test_a_folder_without_a_study_is_refused_in_one_line(tmp_path):
    with pytest.raises(ValueError, match="holds no study.toml"):
        build_report(tmp_path)
