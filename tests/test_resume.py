"""Crash-safe pretraining: a real `maskkit pretrain` process killed with SIGKILL at several steps and
resumed with --resume ends bit-identical (weights and metrics.jsonl) to an uninterrupted run; a
corrupt newest checkpoint falls back to the previous good one; --keep-last N keeps N."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from maskkit.checkpoint import list_checkpoints, load_checkpoint, load_latest
from maskkit.cli.app import app

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
ENV.pop("MASKKIT_INJECT_NAN", None)
RANDOM = ["--policy", "random", "--steps", "16", "--batch-size", "32", "--log-every", "1", "--ckpt-every", "2"]
LEARNED = ["--policy", "learned", "--learned-hidden-dim", "8", "--hypergrad", "darts", "--steps", "14",
           "--batch-size", "32", "--log-every", "1", "--ckpt-every", "3"]


def pretrain(*args: object) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "maskkit.cli", "pretrain", "--no-progress", *map(str, args)]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


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


@pytest.mark.parametrize("args, kills", [(RANDOM, (3, 9)), (LEARNED, (4, 9))], ids=["random", "learned-darts"])
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
