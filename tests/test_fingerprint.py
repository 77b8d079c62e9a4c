"""Data fingerprints (issue 25, item 2): config.json records what the run's data was; `evaluate`,
`visualize` and `pretrain --resume` refuse data that changed since, in one line naming the dataset and
what changed, unless --trust-data-change. Digests are checked against hashlib computed here, and the
refusals are real `maskkit` processes (one line on the real stderr, exit code 1, nothing written)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_cli import invoke, one_thread  # noqa: F401 - one torch thread for the module, the CLI runner

from maskkit.data import DataError, ImageData, data_fingerprint, fingerprint_change, load_dataset, load_npz
from maskkit.data.source import Resized
from maskkit.run import CONFIG, EVAL, RunRecord, load_run

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
ENV.pop("MASKKIT_INJECT_NAN", None)
FAST = ["--steps", "2", "--batch-size", "16", "--log-every", "1", "--ckpt-every", "1", "--no-progress",
        "--device", "cpu"]  # fmt: skip


def write_npz(path: Path, seed: int, count: int = 120) -> Path:
    """`count` random 8x8 greyscale images of 3 classes (the same shapes whatever the seed)."""
    rng = np.random.default_rng(seed)
    np.savez(path, images=rng.integers(0, 256, (count, 8, 8), dtype=np.uint8), labels=np.arange(count) % 3)
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def maskkit(*args: object) -> tuple[int, str, str]:
    """A real `maskkit` process: (exit code, stdout, stderr)."""
    command = [sys.executable, "-m", "maskkit.cli", *map(str, args)]
    proc = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


def snapshot(directory: Path) -> dict[str, str]:
    """Every file of the run but its lock file."""
    return {str(p.relative_to(directory)): sha256(p) for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != ".lock"}  # fmt: skip


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> dict[str, Path]:
    """A two-step run on an npz, and the npz (keep it unchanged; tests that change it copy the run)."""
    root = tmp_path_factory.mktemp("fp")
    data = write_npz(root / "data.npz", seed=0)
    run = root / "run"
    result = invoke("pretrain", "--dataset", f"npz:{data}", "--out", run, *FAST)
    assert result.exit_code == 0, result.output
    return {"run": run, "data": data, "root": root}


def replaced(pretrained: dict[str, Path], where: Path) -> tuple[Path, Path, str, str]:
    """A copy of the run and its npz, the npz then replaced: (run, npz, old sha256, new sha256)."""
    data = where / "data.npz"
    shutil.copyfile(pretrained["data"], data)
    run = where / "run"
    shutil.copytree(pretrained["run"], run)
    record = json.loads((run / CONFIG).read_text())
    old = sha256(data)
    record["dataset"]["name"] = record["config"]["data"]["dataset"] = f"npz:{data}"
    (run / CONFIG).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    write_npz(data, seed=1)  # same count and shapes, other pixels
    return run, data, old, sha256(data)


# ---- the fingerprints themselves ------------------------------------------------------------------


def test_an_npz_fingerprint_is_the_sha256_and_size_of_the_file(tmp_path):
    path = write_npz(tmp_path / "a.npz", seed=0)
    expected = {"kind": "npz", "bytes": path.stat().st_size, "sha256": sha256(path)}
    assert load_npz(path).fingerprint() == expected
    assert data_fingerprint(load_dataset(f"npz:{path}")) == expected
    assert (
        data_fingerprint(load_dataset(f"npz:{path}", img_size=4)) == expected
    )  # of the file, not the resize


def test_an_in_memory_fingerprint_hashes_the_images_and_labels_bytes():
    data = load_dataset("digits")
    images = hashlib.sha256(data.images.numpy().tobytes()).hexdigest()
    labels = hashlib.sha256(data.labels.numpy().tobytes()).hexdigest()
    expected = {"kind": "arrays", "count": 1797, "shape": [1, 8, 8], "dtype": "float32",
                "images_sha256": images, "labels_sha256": labels}  # fmt: skip
    assert data_fingerprint(data) == expected
    changed = data.images.clone()
    changed[5, 0, 3, 3] += 0.25
    other = hashlib.sha256(changed.numpy().tobytes()).hexdigest()
    current = data_fingerprint(ImageData("digits", changed, data.labels))
    assert (
        fingerprint_change(expected, current) == f"images changed (sha256 {images[:8]}... -> {other[:8]}...)"
    )
    unlabeled = data_fingerprint(ImageData("x", data.images, None))
    assert unlabeled["labels_sha256"] is None
    assert fingerprint_change(expected, unlabeled) == f"labels changed (sha256 {labels[:8]}... -> none)"


def test_a_source_s_own_fingerprint_is_used_and_a_resized_view_gives_its_source_s():
    class Files:
        name, labels, classes, layout = "files-source", None, None, None

        def __init__(self, value):
            self.value = value

        def fingerprint(self):
            return self.value

    own = {"kind": "files", "count": 3, "digest": "ab" * 32}
    assert data_fingerprint(Files(own)) == own
    assert data_fingerprint(Resized(Files(own), 4)) == own
    for bad in ([1, 2], {"count": 3}, {"kind": "files", "x": float("nan")}):
        with pytest.raises(DataError, match="'files-source': fingerprint\\(\\) must return a JSON object"):
            data_fingerprint(Files(bad))


def test_fingerprint_change_names_what_changed_over_any_keys():
    a, b = "1a2b3c4d" + "0" * 56, "5e6f7a8b" + "1" * 56
    digests = "(sha256 1a2b3c4d... -> 5e6f7a8b...)"
    npz = {"kind": "npz", "bytes": 9, "sha256": a}
    assert fingerprint_change(npz, dict(npz)) is None
    assert fingerprint_change(npz, npz | {"sha256": b}) == f"content changed {digests}"
    assert (
        fingerprint_change(npz, {"kind": "npz", "bytes": 7, "sha256": b})
        == f"size in bytes 9 -> 7, content changed {digests}"
    )
    files = {"kind": "files", "count": 1000, "names": "x" * 64, "digest": a}
    now = {"kind": "files", "count": 999, "names": "x" * 64, "digest": b, "first_changed_file": "c0/17.png"}
    assert fingerprint_change(files, now) == (
        "file count 1000 -> 999, first changed file: c0/17.png, "
        "content changed (digest 1a2b3c4d... -> 5e6f7a8b...)"
    )
    kinds = fingerprint_change({"kind": "arrays", "count": 3}, {"kind": "files", "count": 3})
    assert kinds == "fingerprint kind arrays -> files (the source is read another way now)"
    gone = fingerprint_change({"kind": "files", "count": 3, "gone": 1}, {"kind": "files", "count": 3})
    assert gone == "gone 1 -> absent"
    assert fingerprint_change({"kind": "files", "x": None}, {"kind": "files"}) == "x none -> absent"
    assert fingerprint_change({"kind": "files"}, {"kind": "files", "x": None}) == "x: none"


# ---- recorded by pretrain, checked by evaluate, visualize and --resume ------------------------------


def test_pretrain_records_the_npz_digest_of_the_file(pretrained):
    record = RunRecord.read(pretrained["run"])  # the strict format-2 schema takes it
    data = pretrained["data"]
    assert record.dataset["fingerprint"] == {
        "kind": "npz",
        "bytes": data.stat().st_size,
        "sha256": sha256(data),
    }


def test_an_unchanged_npz_passes_evaluate_visualize_and_resume(pretrained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(pretrained["run"], run)
    result = invoke("evaluate", run, "--epochs", "1", "--no-progress", "--device", "cpu")
    assert result.exit_code == 0 and "Warning" not in result.stderr, result.output
    assert "data_changed" not in json.loads((run / EVAL).read_text())["linear"]
    result = invoke(
        "visualize", run, "-o", tmp_path / "m.png", "--num-images", "2", "--tile", "16", "--device", "cpu"
    )
    assert result.exit_code == 0 and (tmp_path / "m.png").is_file(), result.output
    result = invoke("pretrain", "--resume", run, "--steps", "3", "--no-progress")
    assert result.exit_code == 0 and "Warning" not in result.stderr, result.output


@pytest.mark.slow
def test_a_replaced_npz_is_refused_by_evaluate_visualize_and_resume_in_one_line(pretrained, tmp_path):
    run, data, old, new = replaced(pretrained, tmp_path)
    before = snapshot(run)
    expected = (f"Error: data of run {run} changed since it was pretrained: npz:{data}: content changed "
                f"(sha256 {old[:8]}... -> {new[:8]}...); pass --trust-data-change to use it "
                "anyway")  # fmt: skip
    png = tmp_path / "m.png"
    for argv in (["evaluate", run, "--epochs", "1", "--no-progress"], ["visualize", run, "-o", png],
                 ["pretrain", "--resume", run, "--steps", "3", "--no-progress"]):  # fmt: skip
        code, _, err = maskkit(*argv)
        assert code == 1 and err.strip().splitlines() == [expected], (argv, err)
    assert snapshot(run) == before and not png.exists()
    with pytest.raises(ValueError, match=f"npz:{data}: content changed \\(sha256 {old[:8]}"):
        load_run(run, "cpu")


@pytest.mark.slow
def test_trust_data_change_uses_a_replaced_npz_with_one_warning_and_records_it(pretrained, tmp_path):
    run, data, old, new = replaced(pretrained, tmp_path)
    changed = f"content changed (sha256 {old[:8]}... -> {new[:8]}...)"
    warning = (f"Warning: data of run {run} changed since it was pretrained: npz:{data}: {changed}; using it "
               "anyway, as --trust-data-change asks")  # fmt: skip
    code, _, err = maskkit("evaluate", run, "--epochs", "1", "--no-progress", "--trust-data-change")
    assert code == 0 and err.strip().splitlines() == [warning], err
    assert json.loads((run / EVAL).read_text())["linear"]["data_changed"] == changed
    png = tmp_path / "m.png"
    result = invoke("visualize", run, "-o", png, "--num-images", "2", "--tile", "16", "--trust-data-change")
    assert result.exit_code == 0 and png.is_file() and result.stderr.strip().splitlines() == [warning], (
        result.output
    )
    result = invoke("pretrain", "--resume", run, "--steps", "3", "--no-progress", "--trust-data-change")
    assert result.exit_code == 0 and result.stderr.strip().splitlines() == [warning], result.output
    assert json.loads((run / "summary.json").read_text())["steps"] == 3
    assert (
        RunRecord.read(run).dataset["fingerprint"]["sha256"] == old
    )  # the record keeps what it was pretrained on


def test_trust_data_change_without_a_run_to_check_is_one_line(tmp_path):
    result = invoke("pretrain", "--trust-data-change", "--out", tmp_path / "run", *FAST)
    assert (
        result.exit_code == 1
        and result.stderr.strip() == "Error: --trust-data-change only applies with --resume"
    )
    assert not (tmp_path / "run").exists()
    result = invoke("visualize", "--policies", "random", "-o", tmp_path / "g.png", "--trust-data-change")
    assert result.exit_code == 1 and result.stderr.strip().splitlines() == [
        "Error: --trust-data-change only applies with RUN_DIR (a run's data)"]  # fmt: skip


def test_a_run_recorded_without_a_fingerprint_is_not_checked(pretrained, tmp_path):
    run, _, _, _ = replaced(pretrained, tmp_path)
    record = json.loads((run / CONFIG).read_text())
    del record["dataset"]["fingerprint"]  # as written before fingerprints: format 2 without the field
    (run / CONFIG).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    result = invoke("evaluate", run, "--epochs", "1", "--no-progress", "--device", "cpu")
    assert result.exit_code == 0 and "Warning" not in result.stderr, result.output


def test_an_in_memory_data_set_that_changed_is_refused_naming_it(tmp_path):
    run = tmp_path / "run"
    assert invoke("pretrain", "--out", run, *FAST).exit_code == 0  # digits
    record = json.loads((run / CONFIG).read_text())
    recorded = record["dataset"]["fingerprint"]
    digits = load_dataset("digits")
    assert recorded["images_sha256"] == hashlib.sha256(digits.images.numpy().tobytes()).hexdigest()
    recorded["count"], recorded["images_sha256"] = 1796, "0" * 64  # as if one image had gone
    (run / CONFIG).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    result = invoke("evaluate", run, "--epochs", "1", "--no-progress")
    now = recorded | {"count": 1797, "images_sha256": data_fingerprint(digits)["images_sha256"]}
    assert now == data_fingerprint(digits)
    assert result.exit_code == 1 and result.stderr.strip().splitlines() == [
        f"Error: data of run {run} changed since it was pretrained: digits: image count 1796 -> 1797, "
        f"images changed (sha256 00000000... -> {now['images_sha256'][:8]}...); pass --trust-data-change "
        "to use it anyway"
    ], result.stderr  # fmt: skip
    assert torch.equal(
        digits.images, load_dataset("digits").images
    )  # the check reads, never changes, the data
