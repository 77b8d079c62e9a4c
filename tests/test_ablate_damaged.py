"""`maskkit ablate report` on damaged and hostile study files: every file the report reads (study.toml,
selection.json, calibration.json, recorded.jsonl, a run's summary.json and eval.json), truncated, not
UTF-8, not JSON, of the wrong type, not finite, out of range, missing a field or naming what the study
does not have, is refused with exit code 1 and exactly ONE line naming the file and the field, never a
traceback nor a wrong number (a top-1 of 5.0 shown as 500%). Absent files mean "not there yet"; a study
directory whose name is not UTF-8 or holds a newline is shown escaped. The study directory is written
by hand (no training): the files as `maskkit ablate` writes them."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from maskkit.ablate import build_report
from maskkit.cli.app import app
from maskkit.jsonfile import shown_path

STUDY = """
[study]
data = "digits"
seeds = [0, 1]
steps = 30
baseline = "random"
options = { model = "micro" }

[evaluations.linear]

[arms.random]
options = { policy = "random" }
[arms.hpm]
options = { policy = "hpm" }
select = { option = "mask-ratio", values = [0.6, 0.75], by = "linear", seeds = [0] }
[arms.random-time]
options = { policy = "random" }
equal_cost = { of = "hpm", basis = "wall time" }
[arms.random-flops]
options = { policy = "random" }
equal_cost = { of = "random", basis = "flops" }
"""
SELECTION = {"hpm": {"option": "--mask-ratio", "by": "linear", "chosen": "0.75", "split": "val",
                     "scores": {"0.6": {"0": 0.8}, "0.75": {"0": 0.85}}}}  # fmt: skip
CALIBRATION = {"steps": {"random-time": 20, "random-flops": 30},
               "basis": {"random-time": "wall time", "random-flops": "flops"},
               "costs": {"hpm": {"seconds_per_step": 0.3, "basis": "wall time"},
                         "random-time": {"seconds_per_step": 0.2, "basis": "wall time"},
                         "random (flops)": {"flops_ratio": 1.0, "basis": "flops"},
                         "random-flops (flops)": {"flops_ratio": 1.0, "basis": "flops"}}, "threads": 1}  # fmt: skip
#: run directory -> its linear top-1 (random seed 1 comes from recorded.jsonl)
RUNS = {"random-s0": 0.80, "hpm@mask-ratio=0.75-s0": 0.81, "hpm@mask-ratio=0.75-s1": 0.83, "random-time-s0": 0.82,
        "random-time-s1": 0.84, "random-flops-s0": 0.83, "random-flops-s1": 0.85}  # fmt: skip
ROW = {"arm": "random", "seed": 1, "scores": {"linear": 0.81}, "steps": 30, "seconds": 9.0, "final_loss": 0.5,
       "diagnostics": {"mask_iou": 0.6}}  # fmt: skip
SUMMARY = {"steps": 30, "steps_this_call": 30, "seconds": 10.0, "final": {"step": 30, "loss": 0.5, "mask_iou": 0.6}}


def write_study(d: Path) -> Path:
    (d / "runs").mkdir(parents=True)
    (d / "study.toml").write_text(STUDY)
    (d / "selection.json").write_text(json.dumps(SELECTION))
    (d / "calibration.json").write_text(json.dumps(CALIBRATION))
    (d / "recorded.jsonl").write_text(json.dumps(ROW) + "\n")
    for name, top1 in RUNS.items():
        (d / "runs" / name).mkdir()
        (d / "runs" / name / "summary.json").write_text(json.dumps(SUMMARY))
        (d / "runs" / name / "eval.json").write_text(json.dumps({"linear": {"top1": top1, "step": 30}}))
    return d


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return write_study(tmp_path_factory.mktemp("pristine") / "study")


@pytest.fixture
def study(pristine, tmp_path, monkeypatch) -> Path:
    monkeypatch.delenv("MASKKIT_DEBUG", raising=False)
    return Path(shutil.copytree(pristine, tmp_path / "study"))


def report(d: Path):
    return CliRunner().invoke(app, ["ablate", "report", os.fsdecode(d), "--no-chart", "--no-gallery"])


def refused(d: Path) -> str:
    """The report of `d` fails as a user sees it: exit 1, one 'Error: ...' line, nothing else, no traceback."""
    result = report(d)
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)  # a typer.Exit, not an escaped exception
    assert "Traceback" not in result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def dump(value) -> bytes:
    return json.dumps(value).encode()


def put(base: dict, value, *keys: str) -> bytes:
    """`base` with the field at `keys` set to `value` (deleted for DROP), as JSON bytes."""
    raw = json.loads(json.dumps(base))
    inner = raw
    for key in keys[:-1]:
        inner = inner[key]
    if value is DROP:
        del inner[keys[-1]]
    else:
        inner[keys[-1]] = value
    return json.dumps(raw).encode()


DROP = object()
R0, H0 = "runs/random-s0", "runs/hpm@mask-ratio=0.75-s0"
TOP = {"linear": {"top1": 0.8}}
BOUND = "must be a number in [0, 1], got"

#: (file in the study directory, its damaged bytes, what follows the file's name in the one error line)
CASES = {
    # a run's summary.json
    "summary-truncated": (f"{R0}/summary.json", b'{"steps": 30, "sec', ": not JSON (Unterminated string starting at at column 15)"),
    "summary-empty": (f"{R0}/summary.json", b"", ": empty"),
    "summary-not-utf8": (f"{R0}/summary.json", b'{"steps": 30, "final": {"loss": "\xff"}}', ": not UTF-8 text (byte 33)"),
    "summary-a-list": (f"{R0}/summary.json", b"[]", ": must hold a JSON object, got []"),
    "summary-steps-string": (f"{R0}/summary.json", put(SUMMARY, "30", "steps"), ': field steps must be an integer >= 0, got "30"'),
    "summary-steps-missing": (f"{R0}/summary.json", put(SUMMARY, DROP, "steps"), ": field steps is missing"),
    "summary-seconds-nan": (f"{R0}/summary.json", put(SUMMARY, float("nan"), "seconds"), ": field seconds must be a number >= 0, got NaN"),
    "summary-seconds-negative": (f"{R0}/summary.json", put(SUMMARY, -5, "seconds"), ": field seconds must be a number >= 0, got -5"),
    "summary-timed-steps-beyond": (f"{R0}/summary.json", put(SUMMARY, 31, "steps_this_call"),
                                   ": field steps_this_call must be an integer in [0, 30], got 31"),
    "summary-final-a-list": (f"{R0}/summary.json", put(SUMMARY, [], "final"), ": field final must be an object, got []"),
    "summary-loss-infinite": (f"{R0}/summary.json", put(SUMMARY, float("inf"), "final", "loss"),
                              ": field final.loss must be a finite number, got Infinity"),
    "summary-diagnostic-string": (f"{R0}/summary.json", put(SUMMARY, "0.6", "final", "mask_iou"),
                                  ': field final.mask_iou must be a finite number, got "0.6"'),
    "summary-diagnostic-bool": (f"{R0}/summary.json", put(SUMMARY, True, "final", "mask_iou"),
                                ": field final.mask_iou must be a finite number, got true"),
    # a run's eval.json
    "eval-top1-5": (f"{R0}/eval.json", put(TOP, 5.0, "linear", "top1"), f": field linear.top1 {BOUND} 5.0"),
    "eval-top1-negative": (f"{R0}/eval.json", put(TOP, -0.1, "linear", "top1"), f": field linear.top1 {BOUND} -0.1"),
    "eval-top1-string": (f"{R0}/eval.json", put(TOP, "0.9", "linear", "top1"), f': field linear.top1 {BOUND} "0.9"'),
    "eval-top1-nan": (f"{R0}/eval.json", put(TOP, float("nan"), "linear", "top1"), f": field linear.top1 {BOUND} NaN"),
    "eval-top1-bool": (f"{R0}/eval.json", put(TOP, True, "linear", "top1"), f": field linear.top1 {BOUND} true"),
    "eval-top1-missing": (f"{R0}/eval.json", put(TOP, DROP, "linear", "top1"), ": field linear.top1 is missing"),
    "eval-entry-a-number": (f"{R0}/eval.json", put(TOP, 0.9, "linear"), ": field linear must be an object, got 0.9"),
    "eval-a-list": (f"{R0}/eval.json", b"[1]", ": must hold a JSON object, got [1]"),
    "eval-not-utf8": (f"{R0}/eval.json", b"\xff\xfe", ": not UTF-8 text (byte 0)"),
    "eval-in-progress": (f"{R0}/eval.json", put(TOP, True, "linear", "in_progress"),
                         ": field linear.in_progress is true: a score of weights in progress, not of the run's final "
                         f"weights; score it again: maskkit evaluate <study>/{R0}"),  # fmt: skip
    # selection.json
    "selection-a-list": ("selection.json", b"[]", ": must hold a JSON object, got []"),
    "selection-truncated": ("selection.json", b'{"hpm": {"opt', ": not JSON (Unterminated string starting at at column 10)"),
    "selection-chosen-missing": ("selection.json", put(SELECTION, DROP, "hpm", "chosen"), ": field hpm.chosen is missing"),
    "selection-chosen-escapes": ("selection.json", put(SELECTION, "../../../victim", "hpm", "chosen"),
                                 ': field hpm.chosen must be one of the grid\'s values (0.6, 0.75), got "../../../victim"'),
    "selection-chosen-not-the-best": ("selection.json", put(SELECTION, "0.6", "hpm", "chosen"),
                                      ': field hpm.chosen is "0.6", but its scores choose "0.75"'),
    "selection-score-5": ("selection.json", put(SELECTION, 5.0, "hpm", "scores", "0.6", "0"),
                          f': field hpm.scores["0.6"]["0"] {BOUND} 5.0'),
    "selection-score-string": ("selection.json", put(SELECTION, "1", "hpm", "scores", "0.6", "0"),
                               f': field hpm.scores["0.6"]["0"] {BOUND} "1"'),
    "selection-scores-a-list": ("selection.json", put(SELECTION, [], "hpm", "scores"), ": field hpm.scores must be an object, got []"),
    "selection-seed-not-a-seed": ("selection.json", put(SELECTION, {"zero": 0.85}, "hpm", "scores", "0.75"),
                                  ': field hpm.scores["0.75"].zero is no selection seed of the grid (0)'),
    "selection-score-missing": ("selection.json", put(SELECTION, {}, "hpm", "scores", "0.6"),
                                ': field hpm.scores["0.6"] has no score for seed 0'),
    "selection-unknown-arm": ("selection.json", dump({"nope": SELECTION["hpm"]}), ": field nope names no arm of study.toml with a select grid"),
    "selection-other-option": ("selection.json", put(SELECTION, "--masker-reg", "hpm", "option"),
                               ': field hpm.option is "--masker-reg", but study.toml\'s arms.hpm.select gives "--mask-ratio"'),
    # calibration.json
    "calibration-a-list": ("calibration.json", b"[]", ": must hold a JSON object, got []"),
    "calibration-steps-string": ("calibration.json", put(CALIBRATION, "many", "steps", "random-time"),
                                 ': field steps["random-time"] must be an integer >= 1, got "many"'),
    "calibration-steps-a-list": ("calibration.json", put(CALIBRATION, [], "steps"), ": field steps must be an object, got []"),
    "calibration-basis-missing": ("calibration.json", put(CALIBRATION, DROP, "basis"), ": field basis is missing"),
    "calibration-basis-other": ("calibration.json", put(CALIBRATION, "flops", "basis", "random-time"),
                                ': field basis["random-time"] is "flops", but study.toml\'s arms.random-time.equal_cost.basis is "wall time"'),
    "calibration-flops-cost-missing": ("calibration.json", put(CALIBRATION, DROP, "costs", "random-flops (flops)"),
                                       ': field costs["random-flops (flops)"] is missing'),
    "calibration-seconds-nan": ("calibration.json", put(CALIBRATION, float("nan"), "costs", "hpm", "seconds_per_step"),
                                ": field costs.hpm.seconds_per_step must be a number > 0, got NaN"),
    "calibration-seconds-string": ("calibration.json", put(CALIBRATION, "x", "costs", "hpm", "seconds_per_step"),
                                   ': field costs.hpm.seconds_per_step must be a number > 0, got "x"'),
    "calibration-unknown-arm": ("calibration.json", put(CALIBRATION, {"nope": 20}, "steps"),
                                ": field steps.nope names no equal_cost arm of study.toml"),
    # recorded.jsonl (one damaged line among good ones)
    "recorded-not-json": ("recorded.jsonl", b"{not json\n", " line 1: not JSON (Expecting property name enclosed in double quotes at column 2)"),
    "recorded-score-5": ("recorded.jsonl", put(ROW, 5.0, "scores", "linear") + b"\n", f" line 1: field scores.linear {BOUND} 5.0"),
    "recorded-seed-string": ("recorded.jsonl", put(ROW, "zero", "seed") + b"\n", ' line 1: field seed must be an integer >= 0, got "zero"'),
    "recorded-seed-fraction": ("recorded.jsonl", put(ROW, 1.7, "seed") + b"\n", " line 1: field seed must be an integer >= 0, got 1.7"),
    "recorded-seed-unknown": ("recorded.jsonl", put(ROW, 7, "seed") + b"\n", " line 1: field seed is no seed of study.toml (0, 1), got 7"),
    "recorded-arm-missing": ("recorded.jsonl", put(ROW, DROP, "arm") + b"\n", " line 1: field arm is missing"),
    "recorded-arm-unknown": ("recorded.jsonl", put(ROW, "nope", "arm") + b"\n", ' line 1: field arm names no arm of study.toml, got "nope"'),
    "recorded-arm-number": ("recorded.jsonl", put(ROW, 3, "arm") + b"\n", " line 1: field arm must be a string, got 3"),
    "recorded-a-list": ("recorded.jsonl", b"\n[1, 2]\n", " line 2: must hold a JSON object, got [1, 2]"),
    "recorded-not-utf8": ("recorded.jsonl", b'{"arm": "\xff"}\n', " line 1: not UTF-8 text (byte 9)"),
    "recorded-scores-a-list": ("recorded.jsonl", put(ROW, [0.5], "scores") + b"\n", " line 1: field scores must be an object, got [0.5]"),
    "recorded-unknown-evaluation": ("recorded.jsonl", put(ROW, {"finetune": 0.5}, "scores") + b"\n",
                                    " line 1: field scores.finetune is no evaluation of study.toml (linear)"),
    "recorded-steps-string": ("recorded.jsonl", put(ROW, "30", "steps") + b"\n", ' line 1: field steps must be an integer >= 0, got "30"'),
    "recorded-seconds-string": ("recorded.jsonl", put(ROW, "9", "seconds") + b"\n", ' line 1: field seconds must be a number >= 0, got "9"'),
    "recorded-loss-nan": ("recorded.jsonl", put(ROW, float("nan"), "final_loss") + b"\n", " line 1: field final_loss must be a finite number, got NaN"),
    "recorded-diagnostic-string": ("recorded.jsonl", put(ROW, {"mask_iou": "x"}, "diagnostics") + b"\n",
                                   ' line 1: field diagnostics.mask_iou must be a finite number, got "x"'),
    "recorded-twice": ("recorded.jsonl", dump(ROW) + b"\n" + put(ROW, 0.9, "scores", "linear") + b"\n",
                       " line 2: field seed repeats arm random seed 1 of line 1"),
    # study.toml
    "study-not-utf8": ("study.toml", STUDY.encode().replace(b'"digits"', b'"\xff"'), ": not UTF-8 text (byte 17)"),
    "study-not-toml": ("study.toml", b"[study\n", ": not valid TOML (Expected ']' at the end of a table declaration (at line 1, column 7))"),
    "study-seeds-string": ("study.toml", STUDY.encode().replace(b"[0, 1]", b'"x"', 1), ": study.seeds must be a non-empty list of seeds"),
    "study-control-a-list": ("study.toml", STUDY.encode() + b'control = ["random"]\n', ": arms.random-flops.control must name an arm, got ['random']"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_a_damaged_file_is_refused_in_one_line_naming_it_and_its_field(study, name):
    file, data, tail = CASES[name]
    (study / file).write_bytes(data)
    assert refused(study) == f"Error: {study / file}{tail}".replace("<study>", str(study))


def test_the_undamaged_study_reports_what_its_files_hold(study):
    """The control of the cases above: the same files, undamaged, report every run (a guard against a
    check that refuses good files; the shipped studies of docs/studies read too)."""
    result = report(study)
    assert result.exit_code == 0, result.output
    arms = {a.arm: a for a in build_report(study).arms}
    assert arms["random"].per_seed["linear"] == {0: pytest.approx(80.0), 1: pytest.approx(81.0)}
    assert arms["hpm"].per_seed["linear"] == {0: pytest.approx(81.0), 1: pytest.approx(83.0)}
    for shipped in sorted((Path(__file__).parents[1] / "docs" / "studies").glob("*/study.toml")):
        assert all(a.rows for a in build_report(shipped.parent).arms), shipped


@pytest.mark.parametrize("file", ["runs/random-s0/summary.json", "recorded.jsonl", "selection.json"])
def test_a_fifo_or_a_folder_in_place_of_a_file_is_refused_without_waiting(study, file):
    """A FIFO would block the reader for ever (a helper thread opens its other end so that code which
    does read it ends instead of hanging the suite); a folder cannot be read."""
    path = study / file
    path.unlink()
    os.mkfifo(path)
    done = threading.Event()

    def unblock() -> None:
        while not done.wait(0.2):
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:  # no reader waiting
                pass

    threading.Thread(target=unblock, daemon=True).start()
    try:
        assert refused(study) == f"Error: {path}: not a regular file"
    finally:
        done.set()
    path.unlink()
    path.mkdir()
    assert refused(study) == f"Error: {path}: not a regular file"


@pytest.mark.parametrize("raw", [b"bad\xffname", b"two\nlines"], ids=["not-utf8", "newline"])
def test_a_study_folder_named_oddly_is_shown_escaped(pristine, tmp_path, monkeypatch, raw):
    monkeypatch.delenv("MASKKIT_DEBUG", raising=False)
    d = Path(os.fsdecode(os.path.join(os.fsencode(tmp_path), raw)))
    shutil.copytree(pristine, d)
    shown = shown_path(d)
    assert shown == "'" + str(tmp_path) + ("/bad\\xffname'" if b"\xff" in raw else "/two\\nlines'")
    result = report(d)
    assert result.exit_code == 0, result.output
    assert f"**{shown_path(d.name)}**: digits" in result.stdout and str(d) not in result.stdout
    assert shown_path(d / "report" / "report.md") in result.stdout.replace("\n", "")  # rich wraps the line
    (d / "runs" / "random-s0" / "eval.json").write_text(json.dumps({"linear": {"top1": 5.0}}))
    assert refused(d) == f"Error: {shown_path(d / 'runs' / 'random-s0' / 'eval.json')}: field linear.top1 {BOUND} 5.0"


def test_shown_path_keeps_printable_names_and_escapes_the_rest():
    assert shown_path("runs/ünï-s0/summary.json") == "runs/ünï-s0/summary.json"
    assert shown_path(b"a\xffb/c") == "'a\\xffb/c'"
    assert shown_path("a\tb\\c\n") == "'a\\tb\\\\c\\n'"


def test_a_validation_score_out_of_range_is_refused_not_chosen(tmp_path):
    """`maskkit ablate` reads the grid's validation scores from eval.json as the report does: a top-1 of
    5.0 for one value would otherwise win the grid (a launcher stands in for pretrain and evaluate)."""
    import tomllib

    from maskkit.ablate import StudyError, StudyRunner, parse_study

    def launch(args: list[str], env: dict[str, str], log: Path) -> None:
        if args[0] == "pretrain":
            out = Path(args[args.index("--out") + 1])
            out.mkdir(parents=True, exist_ok=True)
            (out / "summary.json").write_text(json.dumps(SUMMARY))
            (out / "model.pt").write_bytes(b"")
        else:  # evaluate RUN ... --split val
            run = Path(args[1])
            (run / "eval.json").write_text(json.dumps({"linear@val": {"top1": 5.0 if "=0.6-" in run.name else 0.85}}))

    runner = StudyRunner(parse_study(tomllib.loads(STUDY)), tmp_path / "d", launch=launch)
    with pytest.raises(StudyError) as refusal:
        runner.select()
    where = tmp_path / "d" / "runs" / "hpm@mask-ratio=0.6-s0" / "eval.json"
    assert str(refusal.value) == f'{where}: field ["linear@val"].top1 {BOUND} 5.0'
    assert not (tmp_path / "d" / "selection.json").exists()
