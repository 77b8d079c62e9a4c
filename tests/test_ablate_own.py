"""`maskkit ablate` owns its study directory, its children and its cache (issue 30, items 1 and 2).

Process faults are tested with real processes: two `ablate`s on one --out, SIGKILL / SIGTERM / SIGINT to
`ablate` while its `pretrain` child trains, a run directory held by another process. The rest runs the
`StudyRunner` in this process with a stand-in for the `maskkit` commands that writes what they write.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from maskkit.ablate import StudyError, StudyRunner, parse_study
from maskkit.ablate.runner import shown

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

STUDY = """
[study]
data = "digits"
seeds = [0, 1]
steps = 3
baseline = "random"
options = { model = "micro", device = "cpu" }

[evaluations.linear]
epochs = 1

[arms.random]
options = { policy = "random" }

[arms.hpm]
options = { policy = "hpm" }
"""


def study(text: str = STUDY):
    return parse_study(tomllib.loads(text), source=text)


class FakeMaskkit:
    """Stands in for `maskkit pretrain` / `evaluate`: writes config.json (with its command), model.pt,
    summary.json and eval.json entries, and records every command."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.calls.append(list(args))
        if args[0] == "pretrain":
            resume = "--resume" in args
            out = Path(args[args.index("--resume" if resume else "--out") + 1])
            out.mkdir(parents=True, exist_ok=True)
            if not resume:
                steps = int(args[args.index("--steps") + 1])
                command = ["maskkit/cli/__main__.py", *args]  # sys.argv: the subcommand first
                (out / "config.json").write_text(json.dumps({"command": command, "train": {"steps": steps}}))
            (out / "model.pt").write_bytes(b"weights")
            (out / "summary.json").write_text(json.dumps({"steps": 3}))
        else:
            out, split = Path(args[1]), args[args.index("--split") + 1]
            protocol = args[args.index("--protocol") + 1]
            path = out / "eval.json"
            scores = json.loads(path.read_text()) if path.is_file() else {}
            scores[protocol if split == "test" else f"{protocol}@{split}"] = {"top1": 0.5}
            path.write_text(json.dumps(scores))


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` and its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def finished(tmp_path: Path, text: str = STUDY) -> tuple[Path, FakeMaskkit]:
    out, fake = tmp_path / "d", FakeMaskkit()
    StudyRunner(study(text), out, launch=fake, threads=1).run()
    return out, fake


# ---- names ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["x-s0/../../../victim", "/tmp/victim", "..", "a\x00b", "", "a\\b"])
def test_a_select_value_that_would_leave_the_study_folder_is_refused_at_load(value):
    grid = STUDY + '\n[arms.grid]\nselect = { option = "data-dir", values = ["a", %s], by = "linear" }\n' % json.dumps(value)
    with pytest.raises(StudyError) as err:
        study(grid)
    assert str(err.value).startswith("arms.grid.select.values: ") and "run directory" in str(err.value)
    assert "\n" not in str(err.value)


def test_a_traversal_select_value_through_the_cli_is_one_line_and_touches_nothing(tmp_path):
    from typer.testing import CliRunner

    from maskkit.cli.app import app

    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("mine")
    path = tmp_path / "s.toml"
    path.write_text(STUDY + '\n[arms.grid]\nselect = { option = "data-dir", values = ["a", "x-s0/../../../victim"], '
                    'by = "linear", seeds = [0] }\n')
    result = CliRunner().invoke(app, ["ablate", str(path), "--out", str(tmp_path / "s" / "d"), "--dry-run"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "Error: arms.grid.select.values: 'x-s0/../../../victim' cannot be part of a run directory's name "
        "(it holds a path separator)"]
    assert snapshot(victim) == {"keep.txt": b"mine"} and not (tmp_path / "s").exists()


# ---- nothing rewritten before the study is accepted -----------------------------------------------


def test_a_refused_ablate_leaves_the_study_directory_byte_identical(tmp_path):
    out, fake = finished(tmp_path)
    before = snapshot(out)
    changed = STUDY.replace('options = { policy = "hpm" }', 'options = { policy = "hpm", batch-size = 16 }\nlabel = "new"')
    with pytest.raises(StudyError, match="made with other options"):
        StudyRunner(study(changed), out, launch=fake, threads=1).run()
    assert snapshot(out) == before  # study.toml, plan.json, no lock file left behind


def test_a_refused_ablate_writes_no_file_beside_the_cache_it_refuses(tmp_path):
    out = tmp_path / "new"
    grid = STUDY + '\n[arms.grid]\nselect = { option = "batch-size", values = ["8", "16"], by = "linear" }\n'
    runner = StudyRunner(study(grid), out, launch=FakeMaskkit(), threads=1)
    out.mkdir()
    (out / "selection.json").write_text(json.dumps({"grid": {"chosen": "32"}}))
    before = snapshot(out)
    with pytest.raises(StudyError, match=r"selection\.json: field grid\.chosen must be one of the grid's values"):
        runner.run()
    assert snapshot(out) == before and sorted(os.listdir(out)) == ["selection.json"]


# ---- the evaluation settings are part of a reusable run ------------------------------------------


def test_changed_evaluations_are_evaluated_again_never_kept_under_the_new_settings(tmp_path):
    out, fake = finished(tmp_path)
    changed = STUDY.replace("epochs = 1", "epochs = 5")
    runner = StudyRunner(study(changed), out, launch=fake, threads=1)
    lines = runner.dry_run()
    assert sum("# evaluate again: linear in eval.json was made with other settings" in line for line in lines) == 4
    assert sum(line.startswith("# done: maskkit pretrain") for line in lines) == 4
    fake.calls.clear()
    runner.run()
    assert [c[0] for c in fake.calls] == ["evaluate"] * 4  # pretraining is reused, every score made again
    assert all(c[c.index("--epochs") + 1] == "5" for c in fake.calls)
    fake.calls.clear()
    StudyRunner(study(changed), out, launch=fake, threads=1).run()
    assert fake.calls == []  # now recorded under the new settings


# ---- a damaged cache is refused in one line -------------------------------------------------------

DAMAGED = [
    ("plan.json", "{not json", r"plan\.json: not JSON"),
    ("plan.json", json.dumps({"format": 2, "runs": {"random-s0": {"pretrain": "--policy random"}}}),
     r"plan\.json: field runs\[\"random-s0\"\]\.pretrain must be a list of strings"),
    ("plan.json", json.dumps({"format": 2}), r"plan\.json: field runs is missing"),
    ("plan.json", json.dumps([1, 2]), r"plan\.json: must hold a JSON object"),
    ("plan.json", json.dumps({"format": 2, "runs": {"random-s0": {"pretrain": [], "scored": {"linear": 3}}}}),
     r"plan\.json: field runs\[\"random-s0\"\]\.scored\.linear must be a list of strings"),
]


@pytest.mark.parametrize("name,text,message", DAMAGED, ids=["not-json", "wrong-type", "no-runs", "no-object", "scored"])
def test_a_damaged_plan_is_refused_in_one_line_naming_the_file_and_the_field(tmp_path, name, text, message):
    out, fake = finished(tmp_path)
    (out / name).write_text(text)
    before = snapshot(out)
    for call in (StudyRunner(study(), out, launch=fake, threads=1).run,
                 StudyRunner(study(), out, launch=fake, threads=1).dry_run):  # fmt: skip
        with pytest.raises(StudyError, match=message) as err:
            call()
        assert "\n" not in str(err.value) and str(out / name) in str(err.value)
    assert snapshot(out) == before


@pytest.mark.parametrize("text,message", [
    (json.dumps({"grid": {"chosen": "../../victim"}}), r"selection\.json: field grid\.chosen must be one of"),
    (json.dumps({"grid": {"option": "--batch-size"}}), r"selection\.json: field grid\.chosen is missing"),
    (json.dumps({"grid": {"chosen": 8}}), r"selection\.json: field grid\.chosen must be a string"),
])  # fmt: skip
def test_a_damaged_selection_is_refused_and_never_names_a_run_outside_the_study(tmp_path, text, message):
    grid = STUDY + '\n[arms.grid]\nselect = { option = "batch-size", values = ["8", "16"], by = "linear" }\n'
    out = tmp_path / "d"
    out.mkdir()
    (out / "selection.json").write_text(text)
    fake = FakeMaskkit()
    with pytest.raises(StudyError, match=message):
        StudyRunner(study(grid), out, launch=fake, threads=1).run()
    assert fake.calls == [] and not (tmp_path / "victim").exists()


def test_a_damaged_calibration_is_refused_in_one_line(tmp_path):
    eq = STUDY + '\n[arms.eq]\noptions = { policy = "hpm" }\nequal_cost = { of = "random", basis = "flops" }\n'
    out = tmp_path / "d"
    out.mkdir()
    (out / "calibration.json").write_text(json.dumps({"steps": {"eq": "ten"}, "options": {}}))
    with pytest.raises(StudyError, match=r"calibration\.json: field steps\.eq must be an integer >= 1, got \"ten\""):
        StudyRunner(study(eq), out, launch=FakeMaskkit(), threads=1).dry_run()


def test_without_plan_json_a_run_made_with_other_options_is_still_refused_by_its_config(tmp_path):
    out, fake = finished(tmp_path)
    (out / "plan.json").unlink()  # what a user does with a plan.json refused as damaged
    changed = STUDY.replace('options = { policy = "hpm" }', 'options = { policy = "hpm", batch-size = 16 }')
    with pytest.raises(StudyError, match=r"hpm-s0 was made with other options .*config\.json"):
        StudyRunner(study(changed), out, launch=fake, threads=1).run()


# ---- dry run = run --------------------------------------------------------------------------------


def test_the_dry_run_lists_exactly_what_the_run_then_does(tmp_path):
    out, fake = finished(tmp_path)
    runs = out / "runs"
    (runs / "random-s1" / "model.pt").unlink()  # stopped after its checkpoint at step 2: resumed
    (runs / "random-s1" / "summary.json").unlink()
    (runs / "random-s1" / "eval.json").unlink()
    (runs / "random-s1" / "checkpoints").mkdir()
    (runs / "random-s1" / "checkpoints" / "checkpoint-0000002.pt").write_bytes(b"x")
    for name in ("model.pt", "summary.json", "eval.json"):  # stopped before its first checkpoint: restarted
        (runs / "hpm-s0" / name).unlink()
    (runs / "hpm-s1" / "eval.json").unlink()  # pretrained, never scored: evaluated
    three = STUDY.replace("seeds = [0, 1]", "seeds = [0, 1, 2]")  # a new seed: started
    runner = StudyRunner(study(three), out, launch=fake, threads=1)
    planned = [line.split("  # ")[0] for line in runner.dry_run() if not line.startswith("# done: ")]
    assert any("  # resume: from checkpoint-0000002.pt" in line for line in runner.dry_run())
    assert any("  # restart: " in line and "hpm-s0" in line for line in runner.dry_run())
    fake.calls.clear()
    runner.run()
    assert planned == [shown(call) for call in fake.calls]
    assert ["pretrain", "--resume", str(runs / "random-s1"), "--no-progress"] in fake.calls
    assert [(s.run, s.action) for s in runner.launched] == [  # seed by seed
        ("hpm-s0", "restart"), ("hpm-s0", "evaluate"), ("random-s1", "resume"), ("random-s1", "evaluate"),
        ("hpm-s1", "evaluate"), ("random-s2", "start"), ("random-s2", "evaluate"), ("hpm-s2", "start"),
        ("hpm-s2", "evaluate")]  # fmt: skip


# ---- processes --------------------------------------------------------------------------------------

LONG = """
[study]
data = "digits"
seeds = [0, 1]
steps = 5000
baseline = "random"
options = { model = "micro", device = "cpu", log-every = 1, ckpt-every = 1 }

[evaluations.linear]
epochs = 1

[arms.random]
options = { policy = "random" }
"""


def alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie nobody reaped has ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def wait_for(condition, seconds: float = 180.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


def ablate(tmp_path: Path, *extra: str) -> subprocess.Popen:
    """`maskkit ablate LONG --out d` as a real process; its output in tmp_path/ablate-*.txt."""
    path = tmp_path / "s.toml"
    path.write_text(LONG)
    n = len(list(tmp_path.glob("ablate-*.out")))
    cmd = [sys.executable, "-m", "maskkit.cli", "ablate", str(path), "--out", str(tmp_path / "d"), "--threads", "1",
           "--no-progress", *extra]  # fmt: skip
    return subprocess.Popen(cmd, stdout=open(tmp_path / f"ablate-{n}.out", "w"),
                            stderr=open(tmp_path / f"ablate-{n}.err", "w"), env=dict(os.environ, MASKKIT_DEBUG=""))


def training_child(tmp_path: Path, run: str = "random-s0") -> int:
    """Wait until `run`'s pretrain child has written a checkpoint; its process id (from the run's lock)."""
    d = tmp_path / "d" / "runs" / run
    assert wait_for(lambda: any((d / "checkpoints").glob("checkpoint-*.pt.sha256")) and (d / ".lock").is_file())
    return int(json.loads((d / ".lock").read_text())["pid"])


def stop(process: subprocess.Popen, sig: int = signal.SIGTERM) -> int:
    process.send_signal(sig)
    try:
        return process.wait(timeout=180)
    finally:
        if process.poll() is None:
            process.kill()


@pytest.mark.slow
def test_a_second_ablate_on_one_out_is_refused_in_one_line_and_changes_nothing(tmp_path):
    first = ablate(tmp_path)
    try:
        child = training_child(tmp_path)
        before = {name: (tmp_path / "d" / name).read_bytes() for name in ("study.toml", "plan.json")}
        second = subprocess.run([*first.args], capture_output=True, text=True, timeout=300)
        assert second.returncode == 1
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"Error: study directory {tmp_path / 'd'} is in use by "
                                                       f"process {first.pid} ")  # fmt: skip
        assert alive(child) and any((tmp_path / "d" / "runs" / "random-s0" / "checkpoints").glob("*.pt"))
        assert {name: (tmp_path / "d" / name).read_bytes() for name in before} == before
    finally:
        assert stop(first) == 143


@pytest.mark.slow
def test_sigkill_to_ablate_stops_its_child_and_the_rerun_resumes_it(tmp_path):
    first = ablate(tmp_path)
    child = training_child(tmp_path)
    first.kill()
    first.wait()
    assert wait_for(lambda: not alive(child), 120), "the pretrain child outlived its ablate"
    run = tmp_path / "d" / "runs" / "random-s0"
    kept = sorted(p.name for p in (run / "checkpoints").glob("checkpoint-*.pt"))
    reached = int(kept[-1].split("-")[1].split(".")[0])
    again = ablate(tmp_path)
    try:  # the rerun resumes the run from its checkpoint and trains on past it
        assert wait_for(lambda: any(int(p.stem.split("-")[1]) > reached for p in (run / "checkpoints").glob("*.pt")))
    finally:
        assert stop(again) == 143
    log = (tmp_path / "d" / "logs" / "random-s0.log").read_text()
    assert log.count("$ maskkit pretrain ") == 2  # started once, then resumed: never removed and started over
    assert log.splitlines()[-1].startswith("Stopped by SIGTERM") or f"--resume {run} --no-progress" in log
    assert f"$ maskkit pretrain --resume {run} --no-progress" in log
    assert f"from {kept[-1]}" in log or f"{kept[-1]}" in log


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_sigterm_and_sigint_stop_the_children_and_launch_nothing_more(tmp_path, sig, code):
    first = ablate(tmp_path)
    child = training_child(tmp_path)
    assert stop(first, sig) == code
    assert not alive(child)
    assert not (tmp_path / "d" / "runs" / "random-s1").exists()  # the queued run never started
    err = (tmp_path / "ablate-0.err").read_text().strip().splitlines()
    assert err[-1].startswith(f"Stopped: stopped by {signal.Signals(sig).name}") and err[-1].endswith(
        f"continue with: maskkit ablate {tmp_path / 's.toml'} --out {tmp_path / 'd'} --threads 1")
    log = (tmp_path / "d" / "logs" / "random-s0.log").read_text()
    assert f"Stopped by {signal.Signals(sig).name} at step" in log  # the child checkpointed on its way out


def hold(path: Path) -> subprocess.Popen:
    """Another process holding `path`'s RunLock (as a running ablate or pretrain does) until killed."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom maskkit.locking import RunLock\n"
                               "RunLock(sys.argv[1]).acquire()\nprint('held', flush=True)\ntime.sleep(120)", str(path)],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_study_directory_another_process_holds_is_refused_for_run_and_dry_run(tmp_path):
    out, fake = finished(tmp_path)
    (out / "runs" / "hpm-s1" / "eval.json").unlink()  # work left: a second ablate would evaluate it
    before = snapshot(out)
    holder = hold(out)
    try:
        for call in (StudyRunner(study(), out, launch=fake, threads=1).run,
                     StudyRunner(study(), out, launch=fake, threads=1).dry_run):  # fmt: skip
            fake.calls.clear()
            with pytest.raises(StudyError, match=rf"^study directory {out} is in use by process {holder.pid} "):
                call()
            assert fake.calls == []
    finally:
        holder.kill()
        holder.wait()
    before.pop(".lock")
    assert {k: v for k, v in snapshot(out).items() if k != ".lock"} == before


def test_a_run_directory_another_process_holds_is_never_removed(tmp_path):
    out = tmp_path / "d"
    run = out / "runs" / "random-s0"
    run.mkdir(parents=True)
    (run / "notes.txt").write_text("being written")  # no checkpoint: a restart would remove it
    holder = hold(run)
    try:
        fake = FakeMaskkit()
        for call in (StudyRunner(study(), out, launch=fake, threads=1).run,
                     StudyRunner(study(), out, launch=fake, threads=1).dry_run):  # fmt: skip
            with pytest.raises(StudyError, match=rf"run directory {run} is in use by process {holder.pid} "):
                call()
        assert fake.calls == [] and (run / "notes.txt").read_text() == "being written"
        runner = StudyRunner(study(), out, launch=fake, threads=1)  # held only once the run is under way
        from maskkit.ablate.runner import RunFailed

        with pytest.raises(RunFailed, match=rf"{run} is in use by process {holder.pid} .*not removed"):
            runner._clear(run)
        assert (run / "notes.txt").read_text() == "being written"
    finally:
        holder.kill()
        holder.wait()
