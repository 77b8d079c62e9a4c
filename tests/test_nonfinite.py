"""Bad numbers: a NaN injected at each level (pretrain batch, head's labeled batch, masker's validation
batch) stops the run with one clear line and never reaches a checkpoint; --skip-nonfinite skips the
batch instead (no update at any level, optimizer states untouched) and counts it in metrics.jsonl."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from maskkit.checkpoint import list_checkpoints, load_checkpoint
from maskkit.cli.app import app
from maskkit.train import INJECT_NAN_ENV, parse_inject_nan

runner = CliRunner()
RANDOM = ["--policy", "random"]
LEARNED = ["--policy", "learned", "--learned-hidden-dim", "8", "--hypergrad", "darts", "--masker-every", "2"]
CASES = [  # (policy args, injected fault, level named in the message)
    (RANDOM, "train:3", "pretrain loss"),
    (LEARNED, "train:3", "pretrain loss"),
    (LEARNED, "labeled:4", "head (finetune) loss"),
    (LEARNED, "val:4", "validation loss"),
]


pytestmark = pytest.mark.usefixtures("one_thread")


def pretrain(run: Path, policy: list[str], *extra: str):
    return runner.invoke(app, ["pretrain", "--policy", "learned", *policy, "--steps", "5", "--batch-size", "16", "--log-every", "1",
                               "--ckpt-every", "1", "--keep-last", "10", "--no-progress", "--out", str(run), *extra])


def all_finite(state) -> bool:
    if isinstance(state, torch.Tensor):
        return not state.is_floating_point() or bool(torch.isfinite(state).all())
    if isinstance(state, dict):
        return all(all_finite(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return all(all_finite(v) for v in state)
    return not isinstance(state, float) or math.isfinite(state)


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=False))
    return a == b


@pytest.mark.parametrize("policy, fault, level", CASES, ids=["random-train", "learned-train", "learned-head", "learned-val"])
@pytest.mark.slow
def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, policy, fault, level):
    monkeypatch.setenv(INJECT_NAN_ENV, fault)
    run = tmp_path / "run"
    result = pretrain(run, policy)
    assert result.exit_code == 1, result.output
    message = result.stderr.strip().splitlines()
    assert len(message) == 1 and "Traceback" not in result.output, result.stderr
    step = int(fault.split(":")[1])
    assert f"Error: non-finite {level}" in message[0] and f"at step {step}" in message[0], message[0]
    assert "last good checkpoint is kept" in message[0]
    kept = list_checkpoints(run / "checkpoints")
    assert [load_checkpoint(p)["step"] for p in kept] == list(range(1, step))  # nothing from the bad step
    assert all(all_finite(load_checkpoint(p)) for p in kept)
    assert not (run / "model.pt").exists()
    # the run continues from the last good state once the data is fixed
    monkeypatch.delenv(INJECT_NAN_ENV)
    result = runner.invoke(app, ["pretrain", "--resume", str(run), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert all_finite(load_checkpoint(run / "model.pt"))


@pytest.mark.parametrize("policy, fault, level", CASES, ids=["random-train", "learned-train", "learned-head", "learned-val"])
def test_skip_nonfinite_skips_the_batch_without_any_update(tmp_path, monkeypatch, policy, fault, level):
    monkeypatch.setenv(INJECT_NAN_ENV, fault)
    run = tmp_path / "run"
    result = pretrain(run, policy, "--skip-nonfinite")
    assert result.exit_code == 0, result.output
    step = int(fault.split(":")[1])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert [r["skipped"] for r in records] == [int(r["step"] >= step) for r in records]
    assert "loss" not in records[step - 1]  # the skipped batch contributes no metrics
    before = load_checkpoint(run / "checkpoints" / f"checkpoint-{step - 1:07d}.pt")
    after = load_checkpoint(run / "checkpoints" / f"checkpoint-{step:07d}.pt")
    parts = ("engine",) if "engine" in before else ("mae", "policy", "optimizer", "scheduler")
    for part in parts:  # weights, optimizer and scheduler states, engine step: all untouched
        assert same(before[part], after[part]), part
    later = load_checkpoint(run / "checkpoints" / f"checkpoint-{step + 1:07d}.pt")
    key = "engine" if "engine" in before else "mae"
    assert not same(before[key], later[key])  # training went on after the skipped batch
    assert all_finite(load_checkpoint(run / "model.pt"))


def test_fault_injection_spec_is_checked():
    assert parse_inject_nan("train:3, val:4,val:6") == {"train": {3}, "val": {4, 6}}
    assert parse_inject_nan(None) == {}
    for bad in ("train", "test:3", "train:0", "train:x"):
        with pytest.raises(ValueError, match=INJECT_NAN_ENV):
            parse_inject_nan(bad)
