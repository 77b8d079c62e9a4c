"""Study files: every problem is one StudyError line naming its key, found before anything runs; the
example studies (examples/studies/*.toml) validate and print their commands with `--dry-run`."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from typer.testing import CliRunner

from maskkit.ablate import StudyError, load_study, parse_study
from maskkit.ablate.plan import study_runs
from maskkit.ablate.study import tomllib
from maskkit.cli.app import app

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples" / "studies").glob("*.toml"))

GOOD = {
    "study": {"data": "digits", "seeds": [0, 1], "steps": 30, "baseline": "random", "options": {"model": "micro"}},
    "evaluations": {"linear": {"epochs": 5}},
    "arms": {
        "random": {"options": {"policy": "random"}},
        "mlo": {"options": ["--policy", "learned", "--learned-selection", "gumbel"], "control": "frozen",
                "select": {"option": "masker-lr", "values": [1e-3, 1e-4], "by": "linear", "seeds": [0]}},
        "frozen": {"options": {"policy": "learned", "freeze-masker": True}},
        "random-eqtime": {"options": {"policy": "random"}, "equal_cost": {"of": "mlo", "basis": "wall time"}},
    },
}  # fmt: skip


def _with(path: str, value: object) -> dict:
    """GOOD with the key at dotted `path` set to `value` (a `None` value deletes it)."""
    raw = copy.deepcopy(GOOD)
    *parents, last = path.split("/")
    table = raw
    for key in parents:
        table = table[key]
    if value is None:
        del table[last]
    else:
        table[last] = value
    return raw


def test_the_good_study_validates_and_knows_its_comparisons():
    study = parse_study(GOOD)
    assert study.seeds == (0, 1) and study.baseline == "random"
    assert study.comparisons() == [
        ("mlo", "random", "equal steps"), ("mlo", "frozen", "equal steps"), ("frozen", "random", "equal steps"),
        ("mlo", "random-eqtime", "equal wall time"),
    ]  # fmt: skip
    names = [s.name for s in study_runs(study, {"mlo": "0.0001"}, {"random-eqtime": 77})]
    assert names == ["random-s0", "mlo@masker-lr=0.0001-s0", "frozen-s0", "random-eqtime-s0",
                     "random-s1", "mlo@masker-lr=0.0001-s1", "frozen-s1", "random-eqtime-s1"]  # seed by seed


#: (key path, value, the words the one-line error must hold: always the key)
BAD = [
    ("bogus", 1, "unknown key bogus"),
    ("study/sead", [0], "unknown key study.sead"),
    ("study/baseline", None, "study.baseline is missing"),
    ("study/baseline", "nope", "study.baseline: no arm named 'nope'"),
    ("study/seeds", [], "study.seeds"),
    ("study/seeds", [0, 0], "study.seeds lists a seed twice"),
    ("study/steps", 0, "study.steps must be an integer >= 1"),
    ("study/steps", None, "study.steps is missing"),
    ("study/options", {"model": "micro", "bogus-flag": 1}, "study.options: no such option: --bogus-flag"),
    ("study/options", {"dataset": "digits"}, "study.options: --dataset is set by study.data"),
    ("evaluations/probe", {}, "unknown key evaluations.probe"),
    ("evaluations/linear", {"epochs": 5, "epoch": 3}, "unknown key evaluations.linear.epoch"),
    ("arms/random/option", {"policy": "random"}, "unknown key arms.random.option"),
    ("arms/random/options", {"policy": "no-such-policy"}, "arms.random.options"),
    ("arms/random/options", {"policy": "random", "masker-reg": 0.1}, "arms.random.options: --masker-reg"),
    ("arms/random/options", ["--policy", "random", "--seed", "3"], "arms.random.options: --seed is not allowed"),
    ("arms/random/options", {"policy": "random", "batch-size": "many"}, "arms.random.options: --batch-size expects int"),
    ("arms/random/options", {"policy": "hpm", "attention-mode": "high"}, "arms.random.options: option --attention-mode"),
    ("arms/mlo/control", "frozn", "arms.mlo.control: no arm named 'frozn'"),
    ("arms/mlo/select/by", "finetune", "arms.mlo.select.by"),
    ("arms/mlo/select/values", [1e-3], "arms.mlo.select.values"),
    ("arms/mlo/select/option", "masker-rate", "arms.mlo.select (--masker-rate 0.001): no such option: --masker-rate"),
    ("arms/random-eqtime/equal_cost", {"of": "mlo", "basis": "joules"}, "arms.random-eqtime.equal_cost.basis"),
    ("arms/random-eqtime/equal_cost", {"of": "ghost"}, "arms.random-eqtime.equal_cost.of: no arm named 'ghost'"),
    ("arms/random-eqtime/steps", 10, "arms.random-eqtime: an equal_cost arm gets its steps from its partner"),
]  # fmt: skip


@pytest.mark.parametrize(("path", "value", "words"), BAD, ids=[f"{p}={v}" for p, v, _ in BAD])
def test_each_problem_is_one_line_naming_its_key(path, value, words):
    with pytest.raises(StudyError) as caught:
        parse_study(_with(path, value))
    message = str(caught.value)
    assert words in message
    assert "\n" not in message


def test_a_table_and_an_argument_list_ask_for_the_same_run():
    from maskkit.ablate.options import check_args, to_args

    table = {"policy": "attention", "attention-mode": "high", "attention-guided-fraction": 0.5, "batch-size": 64}
    listed = ["--policy", "attention", "--attention-mode", "high", "--attention-guided-fraction", "0.5",
              "--batch-size", "64"]  # fmt: skip
    assert check_args(to_args(table, "t"), "t") == check_args(listed, "l")
    assert check_args(to_args(table, "t"), "t").policy.options == {"mode": "high", "guided_fraction": 0.5}


def test_a_file_that_is_not_toml_names_the_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[study\n")
    with pytest.raises(StudyError, match="broken.toml is not valid TOML"):
        load_study(path)
    with pytest.raises(StudyError, match="cannot read study file"):
        load_study(tmp_path / "absent.toml")


def test_the_command_prints_one_line_and_exits_1_on_a_bad_file_and_refuses_slurm(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[study]\ndata = "digits"\nseeds = [0]\nsteps = 3\n[evaluations.linear]\n[arms.random]\n')
    result = CliRunner().invoke(app, ["ablate", str(bad), "--out", str(tmp_path / "d"), "--dry-run"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == ["Error: study.baseline is missing"]
    result = CliRunner().invoke(app, ["ablate", str(EXAMPLES[0]), "--out", str(tmp_path / "d"), "--launcher", "slurm"])
    assert result.exit_code == 1 and "--launcher slurm is not available yet" in result.output
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_every_example_study_validates_with_its_dry_run(path, tmp_path):
    result = CliRunner().invoke(app, ["ablate", str(path), "--out", str(tmp_path / "d"), "--dry-run"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    study = load_study(path)
    raw = tomllib.loads(path.read_text())
    per_run = 1 + len(study.evaluations)
    grid_runs = sum(len(a.select.values) * len(a.select.seeds) * 2 for a in study.arms.values() if a.select)
    calibration = any(a.equal_cost for a in study.arms.values())
    # a select arm's study run on a selection seed is the chosen value's selection run: pretrained once
    reused = sum(len(set(a.select.seeds) & set(study.seeds)) for a in study.arms.values() if a.select)
    assert len(lines) == len(raw["arms"]) * len(study.seeds) * per_run + grid_runs + calibration - reused
    assert all(line.startswith(("maskkit pretrain ", "maskkit evaluate ", "# calibration")) for line in lines)
    assert not (tmp_path / "d").exists()  # a dry run writes nothing
