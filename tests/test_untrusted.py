"""Untrusted files: a checkpoint or an npz carrying a pickled payload is refused with one clear line and
the payload never runs (a marker file it would create stays absent), through the `maskkit` command."""

from __future__ import annotations

import hashlib
import pathlib

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from maskkit.cli.app import app

runner = CliRunner()


class Payload:
    """Unpickling this would create the marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


pytestmark = pytest.mark.usefixtures("one_thread")


def plant(path: pathlib.Path, marker: pathlib.Path) -> None:
    """An 'evil' checkpoint with a VALID checksum sidecar (whoever sends the file can write both)."""
    torch.save({"version": 2, "step": 2, "evil": Payload(str(marker))}, path)
    path.with_name(path.name + ".sha256").write_text(hashlib.sha256(path.read_bytes()).hexdigest() + "\n")
    assert not marker.exists()


def one_line_error(result, text: str) -> None:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and text in lines[0], result.stderr
    assert "Traceback" not in result.output


def test_pickled_checkpoint_is_refused_and_never_runs(tmp_path):
    run, marker = tmp_path / "run", tmp_path / "payload-ran"
    result = runner.invoke(app, ["pretrain", "--policy", "random", "--steps", "2", "--batch-size", "16",
                                 "--ckpt-every", "1", "--no-progress", "--out", str(run)])
    assert result.exit_code == 0, result.output
    ckpts = run / "checkpoints"
    # only an evil checkpoint: resume refuses with one line
    for p in ckpts.iterdir():
        p.unlink()
    plant(ckpts / "checkpoint-0000002.pt", marker)
    one_line_error(runner.invoke(app, ["pretrain", "--resume", str(run), "--steps", "3", "--no-progress"]),
                   "holds pickled objects that are refused")
    # an evil final model: evaluate and visualize refuse it too
    plant(run / "model.pt", marker)
    one_line_error(runner.invoke(app, ["evaluate", str(run), "--epochs", "1"]), "pickled objects that are refused")
    one_line_error(runner.invoke(app, ["visualize", str(run), "-o", str(tmp_path / "m.png")]),
                   "pickled objects that are refused")
    assert not marker.exists()


def test_object_array_npz_is_refused_and_never_runs(tmp_path):
    marker, path = tmp_path / "payload-ran", tmp_path / "evil.npz"
    images = np.empty(4, dtype=object)
    images[:] = [Payload(str(marker))] * 4
    np.savez(path, images=images, labels=np.arange(4))
    assert not marker.exists()
    result = runner.invoke(app, ["pretrain", "--dataset", f"npz:{path}", "--policy", "random", "--steps", "1",
                                 "--no-progress", "--out", str(tmp_path / "run")])
    one_line_error(result, "Object arrays cannot be loaded")
    assert not marker.exists() and not (tmp_path / "run").exists()
