"""maskkit.checkpoint: atomic writes, checksums, refusing pickled payloads, RNG state round trips."""

from __future__ import annotations

import hashlib
import pathlib
import pickle
import random

import numpy as np
import pytest
import torch

from maskkit.checkpoint import (
    CheckpointError,
    atomic_write_text,
    checkpoint_path,
    list_checkpoints,
    load_checkpoint,
    load_latest,
    prune_checkpoints,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


def test_round_trip_and_checksum(tmp_path):
    state = {"step": 7, "w": torch.arange(6.0).reshape(2, 3), "nested": {"names": ["a", "b"], "x": 1.5}}
    path = tmp_path / "c.pt"
    digest = save_checkpoint(path, state)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (tmp_path / "c.pt.sha256").read_text().strip() == digest
    loaded = load_checkpoint(path)
    assert loaded["step"] == 7 and loaded["nested"] == {"names": ["a", "b"], "x": 1.5}
    torch.testing.assert_close(loaded["w"], state["w"])
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_corrupt_and_truncated_files_are_detected(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"w": torch.ones(100)})
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_checkpoint(path)
    # without a sidecar, a truncated file is still refused with a one-line error
    (tmp_path / "c.pt.sha256").unlink()
    path.write_bytes(bytes(data[: len(data) // 3]))
    with pytest.raises(CheckpointError, match="corrupt or not a checkpoint"):
        load_checkpoint(path)


class Payload:
    """Unpickling this would create a file: a stand-in for code hidden in a checkpoint."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_pickled_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "evil": Payload(str(marker))}, path)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="pickled objects that are refused"):
        load_checkpoint(path)
    assert not marker.exists()


def test_failed_save_keeps_the_old_file(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"w": torch.ones(3)})
    before = path.read_bytes()
    with pytest.raises((pickle.PicklingError, AttributeError)):
        save_checkpoint(path, {"bad": lambda: None})  # cannot be pickled
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt", "c.pt.sha256"]


def test_latest_falls_back_to_an_older_good_checkpoint(tmp_path):
    for step in (10, 20, 30):
        save_checkpoint(checkpoint_path(tmp_path, step), {"step": step})
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "checkpoint-0000010.pt", "checkpoint-0000020.pt", "checkpoint-0000030.pt"]
    checkpoint_path(tmp_path, 30).write_bytes(b"garbage")
    path, state, skipped = load_latest(tmp_path)
    assert state["step"] == 20 and path.name == "checkpoint-0000020.pt"
    assert len(skipped) == 1 and "checkpoint-0000030.pt" in skipped[0]
    prune_checkpoints(tmp_path, keep=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-0000030.pt"]
    with pytest.raises(CheckpointError, match="checkpoint-0000030.pt"):
        load_latest(tmp_path)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_latest(tmp_path / "nowhere")


def test_rng_state_round_trip_through_a_checkpoint(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's legacy state
    save_checkpoint(tmp_path / "rng.pt", {"rng": rng_state()})

    def draw():
        return torch.rand(3).tolist(), np.random.rand(3).tolist(), np.random.randn(), random.random()

    first = draw()
    set_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert draw() == first


def test_atomic_write_text_replaces_content(tmp_path):
    path = tmp_path / "a.json"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two")
    assert path.read_text() == "two"
