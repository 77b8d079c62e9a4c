"""Every command on video, as real processes: pretrain on a clip folder with 2 workers killed mid-epoch and resumed
bit for bit; evaluate (linear probe and fine-tune) on clips; visualize; a study file on video; bench on a
space-time grid; and a video MAE meeting images (or the reverse) in one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from maskkit.checkpoint import load_checkpoint
from maskkit.data.make_clips import make_clips

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
CLIPS = ["--model", "video:micro", "--num-frames", "4", "--sampling-rate", "2", "--img-size", "16", "--batch-size", "4",
         "--log-every", "1", "--no-progress", "--augment", "crop-flip", "--policy", "tube"]  # fmt: skip


def cli(*args: object, cwd: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "maskkit.cli", *map(str, args)], env=ENV, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip


def finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err.decode()[-3000:]
    return out.decode()


def lines(run: Path) -> int:
    path = run / "metrics.jsonl"
    return path.read_text().count("\n") if path.is_file() else 0


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clips")
    make_clips(root / "train", classes=2, per_class=12, frames=10, side=24, seed=1)
    make_clips(root / "val", classes=2, per_class=3, frames=10, side=24, seed=2)
    return root


@pytest.mark.slow
def test_sigkill_mid_epoch_on_a_clip_folder_with_2_workers_resumes_bit_identically(clips, tmp_path):
    args = ["pretrain", "--dataset", f"clipfolder:{clips}", *CLIPS, "--steps", "14", "--ckpt-every", "3",
            "--num-workers", "2", "--decoder-ratio", "0.5"]  # fmt: skip
    full, run = tmp_path / "full", tmp_path / "run"
    reference = cli(*args, "--out", full)
    proc = cli(*args, "--out", run)
    deadline = time.monotonic() + 300
    while lines(run) < 8 and proc.poll() is None and time.monotonic() < deadline:  # an epoch is 5 steps (20 clips)
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "model.pt").exists()
    finish(cli("pretrain", "--resume", run, "--no-progress"))
    finish(reference)
    assert (full / "metrics.jsonl").read_bytes() == (run / "metrics.jsonl").read_bytes()
    a, b = load_checkpoint(full / "model.pt"), load_checkpoint(run / "model.pt")
    assert all(torch.equal(a["mae"][k], b["mae"][k]) for k in a["mae"])
    record = json.loads((run / "config.json").read_text())
    assert record["dataset"]["num_frames"] == record["model"]["num_frames"] == 4
    assert record["train"]["decoder_ratio"] == 0.5


@pytest.mark.slow
def test_evaluate_visualize_and_bench_work_on_clips(tmp_path):
    run = tmp_path / "run"
    finish(cli("pretrain", "--dataset", "movingdigits,count=120,side=16", "--num-frames", "4", "--model", "video:micro",
               "--policy", "motion", "--steps", "3", "--batch-size", "8", "--no-progress", "--out", run))  # fmt: skip
    for protocol in ("linear", "finetune"):
        out = finish(cli("evaluate", run, "--protocol", protocol, "--epochs", "1"))
        assert protocol in out.lower()
    scores = json.loads((run / "eval.json").read_text())
    assert {"linear", "finetune"} <= set(json.dumps(scores).replace('"', " ").split())
    finish(cli("visualize", run, "-o", tmp_path / "clips.png"))
    assert (tmp_path / "clips.png").stat().st_size > 0


@pytest.mark.slow
def test_a_study_file_on_video_runs_and_reports(tmp_path):
    study = tmp_path / "video.toml"
    study.write_text(
        '[study]\ndata = "movingdigits,count=80,side=16"\nseeds = [0]\nsteps = 2\nbaseline = "random"\n'
        'options = ["--model", "video:micro", "--num-frames", "4", "--batch-size", "8"]\n'
        "[evaluations.linear]\nepochs = 1\n[arms.random]\noptions = { policy = \"random\" }\n"
        "[arms.tube]\noptions = { policy = \"tube\" }\n"
    )
    finish(cli("ablate", "run", study, "--out", tmp_path / "study"))
    finish(cli("ablate", "report", tmp_path / "study"))
    runs = sorted(p.name for p in (tmp_path / "study" / "runs").iterdir() if (p / "model.pt").is_file())
    assert any("tube" in name for name in runs) and any("random" in name for name in runs), runs
    assert (tmp_path / "study" / "report" / "masks.png").stat().st_size > 0  # the gallery drawn on clips


@pytest.mark.slow
def test_a_video_mae_on_images_and_an_image_mae_on_clips_are_one_line(tmp_path):
    for args, words in [(["--dataset", "digits", "--model", "video:micro"], "is a video MAE, but dataset 'digits'"),
                        (["--dataset", "movingdigits,count=40,side=16", "--num-frames", "4"],
                         "holds clips of 4 frames, but model 'micro' is an image MAE")]:  # fmt: skip
        proc = cli("pretrain", *args, "--steps", "1", "--no-progress", "--out", tmp_path / "r")
        out, err = proc.communicate(timeout=300)
        lines_ = err.decode().strip().splitlines()
        assert proc.returncode == 1 and len(lines_) == 1 and words in lines_[0], err.decode()
        assert not (tmp_path / "r").exists()
