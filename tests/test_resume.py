"""Crash-safe pretraining: a real `maskkit pretrain` process killed with SIGKILL at several steps and
resumed with --resume ends bit-identical (weights and metrics.jsonl) to an uninterrupted run; one
stopped by SIGTERM or SIGINT checkpoints at the step it was on, says how to resume in one line,
exits 143 / 130 and resumes bit-identically too (an open unroll window is finished first); a
corrupt newest checkpoint falls back to the previous good one; --keep-last N keeps N."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from maskkit import run as runs
from maskkit.checkpoint import list_checkpoints, load_checkpoint, load_latest
from maskkit.cli.app import app
from maskkit.data import Batcher, channel_stats, load_dataset, make_splits
from maskkit.policies import create_policy
from maskkit.train import STOP_SIGNALS, Pretrainer, StopSignals, TrainConfig, TrainingStopped, train

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
ENV.pop("MASKKIT_INJECT_NAN", None)
RANDOM = ["--policy", "random", "--steps", "16", "--batch-size", "32", "--log-every", "1", "--ckpt-every", "2"]
LEARNED = ["--policy", "learned", "--learned-hidden-dim", "8", "--hypergrad", "darts", "--steps", "14",
           "--batch-size", "32", "--log-every", "1", "--ckpt-every", "3"]


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # not inherited as ignored (a background test run): Ctrl-C works


def pretrain(*args: object) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "maskkit.cli", "pretrain", "--no-progress", *map(str, args)]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_default_sigint)


def lines(run: Path) -> int:
    path = run / "metrics.jsonl"
    return path.read_text().count("\n") if path.is_file() else 0


def kill_after(proc: subprocess.Popen, run: Path, logged: int) -> int:
    """SIGKILL `proc` once metrics.jsonl has `logged` lines; returns the lines there at the kill."""
    deadline = time.monotonic() + 120
    while lines(run) < logged and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return lines(run)


def finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()
    return err.decode()


def assert_same_run(a: Path, b: Path) -> None:
    assert (a / "metrics.jsonl").read_bytes() == (b / "metrics.jsonl").read_bytes()
    wa, wb = load_checkpoint(a / "model.pt"), load_checkpoint(b / "model.pt")
    assert wa.keys() == wb.keys()
    for part in ("mae", "policy", "head"):
        if part in wa:
            assert wa[part].keys() == wb[part].keys()
            assert all(torch.equal(wa[part][k], wb[part][k]) for k in wa[part]), part


# random masking killed and resumed: tests/test_golden.py (the "resume" case) and, with workers, test_data_scale.py
@pytest.mark.parametrize("args, kills", [(LEARNED, (4, 9))], ids=["learned-darts"])
@pytest.mark.slow
def test_sigkill_at_several_steps_then_resume_is_bit_identical(tmp_path, args, kills):
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    reference = pretrain("--out", full, *args)  # runs alongside the interrupted one
    proc = pretrain("--out", crashed, *args)
    seen = []
    for target in kills:
        seen.append(kill_after(proc, crashed, target))
        assert not (crashed / "model.pt").exists(), "the run finished before it could be killed"
        proc = pretrain("--resume", crashed)
    finish(proc)
    finish(reference)
    assert len(set(seen)) == len(kills)  # killed at different steps
    assert_same_run(full, crashed)


# ---- SIGTERM / SIGINT: stop cleanly, resume exactly --------------------------------------------------

#: long enough (150 steps of ~20 ms) to be signalled mid-run; no periodic checkpoint, and the stop lands
#: inside a metrics window (log every 3), so the resume depends on the stop's own checkpoint.
SLOW = ["--policy", "random", "--steps", "150", "--batch-size", "32", "--log-every", "3", "--ckpt-every", "1000"]


def signal_after(proc: subprocess.Popen, run: Path, logged: int, sig: int) -> tuple[int, str]:
    """Send `sig` once metrics.jsonl has `logged` lines; (exit code, stderr) of the process."""
    deadline = time.monotonic() + 120
    while lines(run) < logged and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err.decode()


def stopped_step(stderr: str, run: Path, resume_command: str) -> int:
    """The step of the ONE resume line on stderr, checked against the checkpoint written at that step."""
    said = [line for line in stderr.splitlines() if "--resume" in line]
    assert len(said) == 1, stderr
    assert said[0].endswith(f"continue with: {resume_command} {run}"), said[0]
    step = int(re.search(r"at step (\d+), checkpoint checkpoint-(\d+)\.pt written", said[0]).group(1))
    newest = list_checkpoints(run / "checkpoints")[-1]
    assert newest.name == f"checkpoint-{step:07d}.pt" and load_checkpoint(newest)["step"] == step
    assert not (run / "model.pt").exists()
    return step


@pytest.mark.slow
def test_sigterm_sigint_and_sigusr1_stop_at_a_checkpoint_and_resume_bit_identically(tmp_path):
    full, run = tmp_path / "full", tmp_path / "stopped"
    reference = pretrain("--out", full, *SLOW)
    proc = pretrain("--out", run, *SLOW)
    steps = []
    for sig, code in ((signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGUSR1, 138)):  # USR1: SLURM's warning
        exit_code, err = signal_after(proc, run, lines(run) + 3, sig)
        assert exit_code == code, err
        assert f"Stopped by {signal.Signals(sig).name} at step" in err
        steps.append(stopped_step(err, run, "maskkit pretrain --resume"))
        proc = pretrain("--resume", run)
    finish(proc)
    finish(reference)
    assert steps[0] < steps[1] < steps[2] < 150
    assert_same_run(full, run)


def test_stop_signals_record_the_first_signal_and_restore_the_handlers():
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
        with StopSignals() as stop:
            assert not stop.requested and all(signal.getsignal(s) != before[s] for s in STOP_SIGNALS)
            signal.raise_signal(signal.SIGTERM)  # recorded, not fatal
            assert stop.signum == signal.SIGTERM
        assert {s: signal.getsignal(s) for s in STOP_SIGNALS} == before
        with StopSignals() as stop:
            signal.raise_signal(signal.SIGINT)
            assert stop.signum == signal.SIGINT
            with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C does not wait for the step to end
                signal.raise_signal(signal.SIGINT)
        assert {s: signal.getsignal(s) for s in STOP_SIGNALS} == before
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # e.g. a background job: an ignored signal stays ignored
        with StopSignals() as stop:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            signal.raise_signal(signal.SIGINT)
            assert not stop.requested
    finally:
        signal.signal(signal.SIGINT, previous_int)


def build(policy: str, cfg: TrainConfig | None = None, **train_config) -> Pretrainer:
    """A micro MAE on digits with `policy`, as `maskkit pretrain` builds it (`cfg`: else from `train_config`)."""
    torch.manual_seed(0)
    data = load_dataset("digits")
    splits = make_splits(data, 0)
    mean, std = channel_stats(data, splits["train"])
    mae = runs.build_mae({"preset": "micro", "img_size": 8, "patch_size": 2, "in_chans": 1, "norm_pix_loss": False,
                          "init_seed": 0})
    kwargs = {"ratio": 0.75, **({"embed_dim": mae.embed_dim, "hidden_dim": 8} if policy == "learned" else {})}
    if cfg is None:
        cfg = TrainConfig.from_dict({"batch_size": 16, "log_every": 2, "ckpt_every": 100, **train_config})
    device = torch.device("cpu")
    return Pretrainer(mae, create_policy(policy, **kwargs), Batcher(data, mean, std, device), splits, cfg, device)


def test_a_stop_inside_an_unroll_window_checkpoints_when_it_closes(tmp_path, one_thread):
    unroll = {"steps": 7, "hypergrad": "unroll", "masker_every": 3, "unroll_steps": 3}
    for name in ("full", "run"):
        (tmp_path / name).mkdir()
    full = build("learned", **unroll)
    train(full, tmp_path / "full")
    stopped = build("learned", **unroll)
    seen = []

    def on_step(step: int, metrics: dict) -> None:
        seen.append((step, stopped.can_checkpoint()))
        if step == 1:
            signal.raise_signal(signal.SIGTERM)

    with StopSignals() as stop, pytest.raises(TrainingStopped) as info:
        train(stopped, tmp_path / "run", on_step=on_step, stop=stop)
    assert seen == [(1, False), (2, False), (3, True)]  # the window of steps 1-3 is finished, then it stops
    assert (info.value.step, info.value.signum, info.value.exit_code) == (3, signal.SIGTERM, 143)
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["checkpoint-0000003.pt"]
    assert info.value.checkpoint == tmp_path / "run" / "checkpoints" / "checkpoint-0000003.pt"
    resumed = build("learned", **unroll)
    resumed.load_state_dict(load_checkpoint(info.value.checkpoint))
    train(resumed, tmp_path / "run")  # metrics.jsonl: steps 2 (before the stop), 4, 6, 7
    assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == (tmp_path / "full" / "metrics.jsonl").read_bytes()
    for module in ("mae", "policy", "head"):
        a, b = getattr(full, module).state_dict(), getattr(resumed, module).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), module


def test_a_stop_during_the_last_step_lets_the_run_finish(tmp_path):
    trainer = build("random", steps=3)
    with StopSignals() as stop:
        records = train(trainer, tmp_path, on_step=lambda step, m: stop.request() if step == 3 else None, stop=stop)
    assert trainer.step_count == 3 and [r["step"] for r in records] == [2, 3]


def test_corrupt_checkpoint_falls_back_and_keep_last_keeps_n(tmp_path):
    run = tmp_path / "run"
    runner = CliRunner()
    torch.set_num_threads(1)
    result = runner.invoke(app, ["pretrain", "--policy", "random", "--steps", "8", "--batch-size", "16",
                                 "--log-every", "1", "--ckpt-every", "1", "--keep-last", "3", "--no-progress",
                                 "--out", str(run)])
    assert result.exit_code == 0, result.output
    ckpts = list_checkpoints(run / "checkpoints")
    assert [p.name for p in ckpts] == [f"checkpoint-{s:07d}.pt" for s in (6, 7, 8)]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == sorted(
        [p.name for p in ckpts] + [p.name + ".sha256" for p in ckpts])
    (run / "checkpoints" / ".checkpoint-0000009.pt.x1y2.tmp").write_bytes(b"half a checkpoint")  # a killed write
    # truncate the newest, flip one byte of the next: the oldest good one is used, with a warning each
    newest, middle = ckpts[2], ckpts[1]
    newest.write_bytes(newest.read_bytes()[:1000])
    data = bytearray(middle.read_bytes())
    data[len(data) // 2] ^= 0xFF
    middle.write_bytes(bytes(data))
    path, state, skipped = load_latest(run / "checkpoints")
    assert path == ckpts[0] and state["step"] == 6 and len(skipped) == 2
    assert all("checksum mismatch" in s for s in skipped)
    (run / "model.pt").unlink()
    result = runner.invoke(app, ["pretrain", "--resume", str(run), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert result.stderr.count("Warning: skipped checkpoint") == 2
    # the run went on from step 6 and rewrote 7 and 8 with good checkpoints; still three kept
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == [p.name for p in ckpts]
    assert not list((run / "checkpoints").glob("*.tmp"))  # the interrupted write's leftover is gone
    for p in list_checkpoints(run / "checkpoints"):
        load_checkpoint(p)


def test_verify_checkpoint_reads_the_file_back(tmp_path):
    from maskkit.checkpoint import CheckpointError, save_checkpoint, verify_checkpoint

    path = tmp_path / "checkpoint-0000001.pt"
    digest = save_checkpoint(path, {"w": torch.arange(4.0)})
    verify_checkpoint(path, digest)
    verify_checkpoint(path)  # against the sidecar
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        verify_checkpoint(path, "0" * 64)
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        verify_checkpoint(path)
