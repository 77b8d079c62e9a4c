"""A small study end to end, as CI runs it: 2 arms x 2 seeds of `micro` on the bundled digits, 30 steps
each, through `maskkit ablate STUDY.toml --out DIR --jobs 2`, then `maskkit ablate report DIR` writing
the markdown table, the CSV, the JSON and the PNGs. A second run of the same command does nothing."""

from __future__ import annotations

import csv
import json

from PIL import Image
from typer.testing import CliRunner

from maskkit.cli.app import app

STUDY = """
[study]
name = "ci"
data = "digits"
seeds = [0, 1]
steps = 30
baseline = "random"
options = { model = "micro", log-every = 10, ckpt-every = 30, device = "cpu" }

[evaluations.linear]

[arms.random]
options = { policy = "random" }

[arms.hpm]
options = { policy = "hpm" }
"""


def test_a_small_study_runs_and_reports(tmp_path):
    study, out = tmp_path / "study.toml", tmp_path / "d"
    study.write_text(STUDY)
    cli = CliRunner()
    result = cli.invoke(app, ["ablate", str(study), "--out", str(out), "--jobs", "2", "--threads", "1"])
    assert result.exit_code == 0, result.output
    for name in ("random-s0", "hpm-s0", "random-s1", "hpm-s1"):
        run = out / "runs" / name
        assert json.loads((run / "summary.json").read_text())["steps"] == 30
        assert 0.0 < json.loads((run / "eval.json").read_text())["linear"]["top1"] <= 1.0
    assert "4 runs done" in result.output

    again = cli.invoke(app, ["ablate", str(study), "--out", str(out), "--dry-run"])
    assert again.exit_code == 0 and all(line.startswith("# done: ") for line in again.output.strip().splitlines())

    report = cli.invoke(app, ["ablate", "report", str(out)])
    assert report.exit_code == 0, report.output
    table = (out / "report" / "report.md").read_text()
    assert "| random | 30 | 2 |" in table and "| hpm | 30 | 2 |" in table
    assert "| hpm − random | equal steps | linear probe |" in table
    assert any(word in table for word in ("beats", "ties within noise", "loses"))
    rows = list(csv.DictReader((out / "report" / "arms.csv").open()))
    assert sorted((r["arm"], r["seed"]) for r in rows) == [("hpm", "0"), ("hpm", "1"), ("random", "0"), ("random", "1")]
    evals = {(r["arm"], r["seed"]): float(r["linear"]) for r in rows}
    top1 = json.loads((out / "runs" / "hpm-s1" / "eval.json").read_text())["linear"]["top1"]
    assert abs(evals[("hpm", "1")] - 100 * top1) < 1e-3
    for png in ("chart.png", "masks.png"):
        with Image.open(out / "report" / png) as image:
            assert image.format == "PNG" and image.width > 100
