"""One writer per run directory, with real `maskkit` processes (issue 25): two `pretrain --out` of one
directory and two `--resume` of one run, started together: exactly one proceeds, the other exits 1 with
the lock's message naming the winner's process, and the directory is byte for byte what the winner
alone writes. A SIGKILLed run's lock does not block its resume; default run directories never collide;
`evaluate` / `visualize` of a run in progress say so in one line and record it; `--out` (and a picture)
inside an image folder of the data is refused before anything is written.

Two processes started together race for the lock; to make the outcome independent of timing, the
test freezes (SIGSTOP) whichever took the lock until the other has ended, then lets it finish."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from maskkit.checkpoint import checkpoint_path
from maskkit.cli.app import app
from maskkit.locking import LOCK_FILE, RunLockedError, run_in_progress
from maskkit.run import DataConfig, PolicyConfig, RunConfig, TrainSettings, create_run, resume_run, train_run

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
ENV.pop("MASKKIT_INJECT_NAN", None)
TINY = ["--policy", "random", "--batch-size", "16", "--log-every", "5", "--ckpt-every", "10", "--device", "cpu",
        "--no-progress"]  # fmt: skip
HANG_GUARD = 300  # seconds: a broken test fails instead of hanging (no assertion on time)


def maskkit(*args: object, cwd: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "maskkit.cli", *map(str, args)], env=ENV, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=HANG_GUARD)
    return proc.returncode, out, err


def lock_holder(run: Path, pids: set[int]) -> int | None:
    """The pid recorded in `run`/.lock if it is one of `pids` (a taker writes it right after flock)."""
    try:
        pid = json.loads((run / LOCK_FILE).read_text()).get("pid")
    except (OSError, ValueError, AttributeError):
        return None
    return pid if pid in pids else None


def race(run: Path, *argvs: list[object]) -> tuple[tuple[int, str, str], tuple[int, str, str], int]:
    """Start the two commands together; freeze the one that takes `run`'s lock until the other has ended.

    Returns (winner's result, loser's result, winner's pid).
    """
    procs = [maskkit(*argv) for argv in argvs]
    by_pid = {p.pid: p for p in procs}
    deadline = time.monotonic() + HANG_GUARD
    while (pid := lock_holder(run, set(by_pid))) is None:
        assert any(p.poll() is None for p in procs), [finish(p) for p in procs]
        assert time.monotonic() < deadline, "no process took the lock"
        time.sleep(0.002)
    winner = by_pid[pid]
    winner.send_signal(signal.SIGSTOP)  # holds the lock, frozen, until the other one has ended
    try:
        (loser,) = [p for p in procs if p is not winner]
        lost = finish(loser)
    finally:
        winner.send_signal(signal.SIGCONT)
    return finish(winner), lost, pid


def assert_refused_by_lock(result: tuple[int, str, str], run: Path, pid: int) -> None:
    code, _, err = result
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1, err
    assert lines[0].startswith(f"Error: run directory {run} is in use by process {pid} on "), lines[0]
    assert "Traceback" not in err


def weights(run: Path) -> dict:
    return torch.load(run / "model.pt", weights_only=True)


def assert_same_run(run: Path, alone: Path, *, same_command: bool) -> None:
    """config.json (but its `command` when the --out differs), metrics.jsonl and model.pt are those of `alone`."""
    assert (run / "metrics.jsonl").read_bytes() == (alone / "metrics.jsonl").read_bytes()
    if same_command:
        assert (run / "config.json").read_bytes() == (alone / "config.json").read_bytes()
    else:
        a, b = (json.loads((d / "config.json").read_text()) for d in (run, alone))
        assert a.pop("command") != b.pop("command") and a == b
    a, b = weights(run), weights(alone)
    assert a.keys() == b.keys()
    for part in a:
        if isinstance(a[part], dict):
            assert a[part].keys() == b[part].keys()
            assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
        else:
            assert a[part] == b[part], part


@pytest.fixture(scope="module")
def pretrain_race(tmp_path_factory) -> dict:
    """Two `pretrain --out dup` started together, and the same run alone."""
    root = tmp_path_factory.mktemp("race")
    dup, alone = root / "dup", root / "alone"
    argv = ["pretrain", *TINY, "--steps", "40", "--out"]
    won, lost, pid = race(dup, [*argv, dup], [*argv, dup])
    alone_result = finish(maskkit(*argv, alone))
    return {"root": root, "dup": dup, "alone": alone, "won": won, "lost": lost, "pid": pid, "alone_result": alone_result}


@pytest.mark.slow
def test_two_pretrains_on_one_out_one_proceeds_and_writes_what_it_writes_alone(pretrain_race):
    r = pretrain_race
    assert r["won"][0] == 0 and r["alone_result"][0] == 0, (r["won"], r["alone_result"])
    assert_refused_by_lock(r["lost"], r["dup"], r["pid"])
    assert_same_run(r["dup"], r["alone"], same_command=False)
    assert json.loads((r["dup"] / "summary.json").read_text())["steps"] == 40
    assert run_in_progress(r["dup"]) is None  # released after model.pt and summary.json


@pytest.mark.slow
def test_two_resumes_of_one_run_one_proceeds_and_writes_what_it_writes_alone(pretrain_race):
    root = pretrain_race["root"]
    run, alone = root / "resumed", root / "resumed-alone"
    shutil.copytree(pretrain_race["alone"], run)
    shutil.copytree(pretrain_race["alone"], alone)
    argv = ["pretrain", "--no-progress", "--steps", "70", "--resume", run]
    won, lost, pid = race(run, argv, argv)
    assert won[0] == 0, won
    assert_refused_by_lock(lost, run, pid)
    code, _, err = finish(maskkit("pretrain", "--no-progress", "--steps", "70", "--resume", alone))
    assert code == 0, err
    assert_same_run(run, alone, same_command=True)  # steps 5 ... 70, each once
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(5, 71, 5))


@pytest.mark.slow
def test_a_run_in_progress_is_read_as_such_and_its_killed_lock_does_not_block_resume(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "maskkit.cli", "pretrain", *TINY, "--steps", "100000", "--out",
                             run], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + HANG_GUARD
        while not list((run / "checkpoints").glob("*.sha256")):
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
            time.sleep(0.01)
        proc.send_signal(signal.SIGSTOP)  # still running (its lock held), frozen so that its state stays put
        assert f"process {proc.pid} on " in run_in_progress(run)
        code, _, err = finish(maskkit("evaluate", run, "--epochs", "1", "--no-progress"))
        assert code == 0, err
        entry = json.loads((run / "eval.json").read_text())["linear"]
        k, name = entry["step"], checkpoint_path(run / "checkpoints", entry["step"]).name
        assert entry["in_progress"] is True and k >= 10 and Path(entry["weights"]).name == name
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"Warning: {run} is still in progress (process {proc.pid} on ")
        assert f"reading its step {k} ({name}), not its final weights" in lines[0]
        png = tmp_path / "masks.png"
        code, out, err = finish(maskkit("visualize", run, "-o", png, "--num-images", "2", "--tile", "16"))
        assert code == 0 and f"wrote {png}" in out.replace("\n", ""), err  # rich wraps a long path
        lines = err.strip().splitlines()
        assert len(lines) == 1 and f"is still in progress (process {proc.pid} on " in lines[0]
        note = json.loads(Image.open(png).text["maskkit"])
        assert note["in_progress"] is True and note["step"] >= k
        code, _, err = finish(maskkit("pretrain", "--no-progress", "--resume", run))  # a second writer
        assert_refused_by_lock((code, "", err), run, proc.pid)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == proc.pid  # the stale lock file stays
    assert run_in_progress(run) is None  # but no process holds it
    newest = max(int(p.stem.split("-")[1]) for p in (run / "checkpoints").glob("checkpoint-*.pt"))
    code, out, err = finish(maskkit("pretrain", "--no-progress", "--steps", newest + 10, "--resume", run))
    assert code == 0 and "Error" not in err, err
    assert json.loads((run / "summary.json").read_text())["steps"] == newest + 10


@pytest.mark.slow
def test_default_run_directories_of_runs_started_together_never_collide(tmp_path):
    procs = [maskkit("pretrain", "--steps", "2", "--batch-size", "16", "--device", "cpu", "--no-progress",
                     cwd=tmp_path) for _ in range(4)]  # fmt: skip
    results = [finish(p) for p in procs]
    assert all(code == 0 for code, _, _ in results), results
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 4
    writers = {json.loads((d / LOCK_FILE).read_text())["pid"] for d in runs}
    assert writers == {p.pid for p in procs}  # each directory written by a process of its own
    for d in runs:
        assert [json.loads(line)["step"] for line in (d / "metrics.jsonl").read_text().splitlines()] == [2]
        assert (d / "model.pt").is_file() and json.loads((d / "summary.json").read_text())["steps"] == 2


# ---- in the library and through CliRunner (one process) -----------------------------------------


def small(steps: int = 4) -> RunConfig:
    return RunConfig(data=DataConfig("digits"), policy=PolicyConfig("random"),
                     train=TrainSettings(steps=steps, batch_size=16, log_every=2, ckpt_every=2, device="cpu"))  # fmt: skip


def test_the_library_holds_the_lock_from_create_to_the_end_of_train_run(tmp_path):
    out = tmp_path / "run"
    prepared = create_run(small(), out)
    assert prepared.lock.held and f"process {os.getpid()} on " in run_in_progress(out)
    with pytest.raises(RunLockedError, match=f"in use by process {os.getpid()} on "):
        create_run(small(), out)
    with pytest.raises(RunLockedError, match=f"in use by process {os.getpid()} on "):
        resume_run(out)
    train_run(prepared)
    assert not prepared.lock.held and run_in_progress(out) is None
    with pytest.raises(ValueError, match="is complete"):
        resume_run(out)  # refused after taking the lock: it is let go
    assert run_in_progress(out) is None
    train_run(resume_run(out, steps=6))
    assert run_in_progress(out) is None


def _loose_pngs(folder: Path, count: int = 40) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, size=(8, 8), dtype=np.uint8)).save(folder / f"{i:03d}.png")


def test_out_inside_the_data_folder_is_refused_before_anything_is_written(tmp_path):
    cli = CliRunner()
    pics = tmp_path / "pics"
    _loose_pngs(pics)
    (tmp_path / "elsewhere").mkdir()
    data = ["--dataset", f"imagefolder:{pics}", *TINY, "--steps", "2"]
    for out in (pics / "run", pics, tmp_path / "elsewhere" / ".." / "pics" / "deep" / "run"):
        result = cli.invoke(app, ["pretrain", *data, "--out", str(out)])
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 1 and len(lines) == 1, result.output
        assert lines[0].startswith(f"Error: --out {out} lies inside the data folder {pics.resolve()}"), lines[0]
    assert sorted(p.name for p in pics.iterdir()) == [f"{i:03d}.png" for i in range(40)]  # nothing written there
    run = tmp_path / "run"
    assert cli.invoke(app, ["pretrain", *data, "--out", str(run)]).exit_code == 0  # beside it: fine
    result = cli.invoke(app, ["visualize", str(run), "-o", str(pics / "masks.png")])  # a picture would be an image
    assert result.exit_code == 1 and result.stderr.strip().startswith(f"Error: --output {pics / 'masks.png'} lies ")
    assert not (pics / "masks.png").exists()
    result = cli.invoke(app, ["visualize", str(run), "-o", str(tmp_path / "masks.png")])
    assert result.exit_code == 0 and "Warning" not in result.stderr and "maskkit" not in Image.open(
        tmp_path / "masks.png").text  # a finished run: no in-progress note


# ---- two evaluates of one run: eval.json's read-modify-write under a lock ----------------------------

#: a process that waits for `go` to exist, then merges `count` keys of its own into the JSON file
MERGER = """
import sys, time
from pathlib import Path
from maskkit.run.record import merge_json
path, who, go, count = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
while not go.exists():
    time.sleep(0.001)
for i in range(count):
    merge_json(path, f"{who}-{i}", {"who": who, "i": i})
"""


@pytest.mark.slow
def test_merge_json_from_four_processes_at_once_loses_no_key(tmp_path):
    """Without the lock, four processes merging 100 keys each kept about 120 of the 400 (tried by hand)."""
    path, go = tmp_path / "eval.json", tmp_path / "go"
    writers, count = ["a", "b", "c", "d"], 100
    procs = [subprocess.Popen([sys.executable, "-c", MERGER, str(path), who, str(go), str(count)], env=ENV,
                              stderr=subprocess.PIPE, text=True) for who in writers]  # fmt: skip
    go.touch()  # they start merging together once each has imported maskkit
    results = [(p.wait(timeout=HANG_GUARD), p.stderr.read()) for p in procs]
    assert all(code == 0 for code, _ in results), results
    expected = {f"{who}-{i}": {"who": who, "i": i} for who in writers for i in range(count)}
    assert json.loads(path.read_text()) == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == [".eval.json.lock", "eval.json", "go"]


@pytest.mark.slow
def test_two_evaluates_of_one_run_at_once_both_keep_their_entry(tmp_path):
    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["pretrain", *TINY, "--steps", "2", "--out", str(run)])
    assert result.exit_code == 0, result.output
    procs = [maskkit("evaluate", run, "--epochs", "1", "--no-progress", "--device", "cpu", *extra)
             for extra in ([], ["--split", "val"], ["--init", "random"])]  # fmt: skip
    results = [finish(p) for p in procs]
    assert all(code == 0 for code, _, _ in results), results
    entries = json.loads((run / "eval.json").read_text())
    assert sorted(entries) == ["linear", "linear-random", "linear@val"]
    assert entries["linear-random"]["init"] == "random" and entries["linear"]["init"] == "pretrained"


def test_merge_json_refuses_a_file_that_is_no_json_object_in_one_line(tmp_path):
    from maskkit.run import RunError, merge_json

    path = tmp_path / "eval.json"
    for content in ("[1, 2]", "not json", "\udcff"):
        path.write_text(content, errors="surrogateescape")
        with pytest.raises(RunError, match=f"^{path} (holds no JSON object|is not valid JSON); move it away"):
            merge_json(path, "linear", {})
        assert path.read_text(errors="surrogateescape") == content  # left as it was
    path.unlink()
    assert merge_json(path, "linear", {"top1": 0.5}) == {"linear": {"top1": 0.5}}
