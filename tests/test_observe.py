"""Observing a run (issue 23): perf.jsonl (throughput beside metrics.jsonl, which stays byte-identical),
the progress bar's numbers from the library, and `--log tensorboard` read back with the tensorboard package."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import maskkit.train.perf as perf_module
from maskkit.cli.app import app
from maskkit.run import PERF, RunConfig, TrainSettings, create_run, train_run

runner = CliRunner()
#: the default micro model on 8x8 digits: 6 steps, a log line every 2, checkpoints at 3 and 6
FAST = ["--steps", "6", "--batch-size", "32", "--log-every", "2", "--ckpt-every", "3", "--no-progress"]
CUDA = torch.cuda.is_available()  # device auto: perf.jsonl has peak_mem_mb exactly there
MISSING = 'Error: --log tensorboard needs the tensorboard package: pip install "maskkit[tensorboard]"'


def ok(*args: object):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def fails(line: str, *args: object) -> None:
    """Exit code 1 and exactly `line` as the one line on stderr."""
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 1, result.output
    assert result.stderr.strip().splitlines() == [line], result.stderr
    assert "Traceback" not in result.output


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def snapshot(directory: Path) -> dict[str, str]:
    """Every file's hash but the lock's (it names the last process that held it)."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != ".lock"}  # fmt: skip


def events(run: Path) -> tuple[dict[str, list[tuple[int, float]]], dict[str, list[int]]]:
    """TensorBoard's view of RUN/tensorboard: {tag: [(step, value)]} and {image tag: [steps]}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in tags["scalars"]}
    return scalars, {tag: [e.step for e in acc.Images(tag)] for tag in tags["images"]}


def expected_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard should hold: each number of each metrics.jsonl and perf.jsonl line, as float32."""
    out: dict[str, list[tuple[int, float]]] = {}
    for prefix, name in (("metrics", "metrics.jsonl"), ("perf", PERF)):
        for record in lines(run / name):
            for key, value in record.items():
                if key != "step":
                    out.setdefault(f"{prefix}/{key}", []).append((record["step"], float(np.float32(value))))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same run without a logger and with TensorBoard (a mask picture every 3 steps)."""
    base = tmp_path_factory.mktemp("observe")
    ok("pretrain", "--out", base / "plain", *FAST)
    ok("pretrain", "--out", base / "tb", *FAST, "--log", "tensorboard", "--log-images-every", "3")
    return base


def test_perf_jsonl_has_the_throughput_of_every_logged_step(runs):
    keys = {"step", "images_per_s", "data_wait", "step_s"} | ({"peak_mem_mb"} if CUDA else set())
    for name in ("plain", "tb"):
        run = runs / name
        perf = lines(run / PERF)
        assert [p["step"] for p in perf] == [m["step"] for m in lines(run / "metrics.jsonl")] == [2, 4, 6]
        for p in perf:
            assert set(p) == keys
            assert 0 <= p["data_wait"] <= 1 and p["images_per_s"] > 0 and p["step_s"] > 0
            assert p["images_per_s"] * p["step_s"] == pytest.approx(32, rel=1e-9)  # the effective batch per step
            assert not CUDA or p["peak_mem_mb"] > 0
        assert not any("images_per_s" in m or "data_wait" in m for m in lines(run / "metrics.jsonl"))


def test_tensorboard_holds_every_logged_number_and_the_mask_pictures_and_changes_no_metric(runs):
    tb = runs / "tb"
    assert (tb / "metrics.jsonl").read_bytes() == (runs / "plain" / "metrics.jsonl").read_bytes()
    config = json.loads((tb / "config.json").read_text())["config"]["train"]
    assert (config["log"], config["log_images_every"]) == ("tensorboard", 3)  # what --resume logs by
    scalars, images = events(tb)
    expected = expected_scalars(tb)
    assert {"metrics/loss", "metrics/lr", "metrics/mask_iou", "perf/images_per_s", "perf/data_wait"} <= set(expected)
    assert scalars == expected
    assert images == {"masks": [3, 6]}
    assert not (runs / "plain" / "tensorboard").exists()


def test_resume_cuts_perf_jsonl_and_tensorboard_back_to_the_checkpoint(runs, tmp_path):
    run = tmp_path / "killed"
    shutil.copytree(runs / "tb", run)  # as if killed after logging step 6, before its checkpoint
    for path in (*run.glob("checkpoints/checkpoint-0000006.pt*"), run / "model.pt", run / "model.pt.sha256",
                 run / "summary.json"):  # fmt: skip
        path.unlink()
    before = lines(run / PERF)
    ok("pretrain", "--resume", run, "--no-progress")  # from step 3
    perf = lines(run / PERF)
    assert [p["step"] for p in perf] == [2, 4, 6]
    assert perf[0] == before[0]  # the line up to the checkpoint kept as it was
    assert (run / "metrics.jsonl").read_bytes() == (runs / "plain" / "metrics.jsonl").read_bytes()
    scalars, images = events(run)
    assert scalars == expected_scalars(run)  # each step once: the re-run steps' events replaced
    assert images == {"masks": [3, 6]}


def test_a_learned_masker_pictured_every_step_trains_bit_identically(tmp_path):
    """The picture runs the MAE and the policy (the most stateful one: the MLO engine's masker) without
    touching the run's generators, RNG or modes: the same metrics.jsonl bytes and weights."""
    args = ["--policy", "learned", "--steps", "4", "--batch-size", "32", "--log-every", "1", "--no-progress"]
    ok("pretrain", "--out", tmp_path / "plain", *args)
    ok("pretrain", "--out", tmp_path / "tb", *args, "--logger", "tensorboard", "--log-images-every", "1")  # torchrun's spelling
    assert (tmp_path / "tb" / "metrics.jsonl").read_bytes() == (tmp_path / "plain" / "metrics.jsonl").read_bytes()
    weights = [torch.load(tmp_path / name / "model.pt", weights_only=True) for name in ("plain", "tb")]
    for part in ("mae", "policy", "head"):
        assert weights[0][part].keys() == weights[1][part].keys()
        assert all(torch.equal(weights[0][part][k], weights[1][part][k]) for k in weights[0][part])
    assert events(tmp_path / "tb")[1] == {"masks": [1, 2, 3, 4]}


class FakeClock:
    """perf_counter for `maskkit.train.perf`: moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def test_throughput_counts_the_train_loaders_wait_and_the_effective_batch(tmp_path, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(perf_module, "time", clock)
    config = RunConfig(train=TrainSettings(steps=4, batch_size=16, accum_iter=2, log_every=2, ckpt_every=100,
                                             device="cpu"))
    prepared = create_run(config, tmp_path / "run")
    trainer = prepared.trainer
    draw, run = trainer.loaders["train"].next, trainer.train_step.run

    def slow_draw():  # 1 s waiting for each micro-batch of the train loader
        clock.now += 1.0
        return draw()

    def slow_step(*args, **kwargs):  # 3 s computing each micro-batch
        clock.now += 3.0
        return run(*args, **kwargs)

    monkeypatch.setattr(trainer.loaders["train"], "next", slow_draw)
    monkeypatch.setattr(trainer.train_step, "run", slow_step)
    seen = []
    train_run(prepared, on_step=lambda step, metrics: seen.append(trainer.perf.totals()))
    # a step: 2 micro-batches of 16 = 32 images in 2 x (1 + 3) s, a quarter of it waiting for data
    expected = {"images_per_s": 4.0, "data_wait": 0.25, "step_s": 8.0}
    assert lines(tmp_path / "run" / PERF) == [{"step": 2, **expected}, {"step": 4, **expected}]
    assert seen == [expected] * 4  # what the progress bar shows after each step


@pytest.mark.skipif(not CUDA, reason="peak_mem_mb is measured on CUDA only")
def test_peak_memory_is_cuda_s_peak_since_training_started():
    meter = perf_module.PerfMeter(8, "cuda")
    meter.start()
    block = torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda")  # 64 MiB
    meter.step_done()
    del block
    assert meter.pop()["peak_mem_mb"] >= 64 and meter.totals()["peak_mem_mb"] >= 64


def test_the_bar_shows_images_per_second_data_wait_and_peak_memory():
    from io import StringIO

    from rich.console import Console

    from maskkit.cli.app import pretrain_progress, step_fields

    def frame(bar) -> str:
        out = Console(file=StringIO(), width=200, color_system=None)
        out.print(bar.get_renderable())
        return out.file.getvalue()

    bar, task = pretrain_progress(Console(file=StringIO()), total=10, completed=0)
    assert "- img/s" in frame(bar) and "data wait -" in frame(bar)
    bar.update(task, completed=1, **step_fields(0.5, images_per_s=812.4, data_wait=0.254, step_s=0.1))
    assert "812 img/s" in frame(bar) and "data wait 25%" in frame(bar) and "MiB" not in frame(bar)  # CPU
    bar.update(task, completed=2, **step_fields(0.5, images_per_s=812.4, data_wait=0.0, peak_mem_mb=1234.4))
    assert "data wait 0%" in frame(bar) and "peak 1234 MiB" in frame(bar)


@pytest.mark.parametrize(("args", "line"), [
    (["--log", "wandb"], "Error: --log must be one of none, tensorboard, got 'wandb'"),
    (["--log", "tensorboard", "--log-images-every", "-1"], "Error: --log-images-every must be a non-negative integer, got -1"),
    (["--log-images-every", "5"], "Error: --log-images-every only applies with --log tensorboard"),
])  # fmt: skip
def test_bad_log_options_are_one_line_errors_before_anything_is_written(tmp_path, args, line):
    fails(line, "pretrain", "--out", tmp_path / "run", *FAST, *args)
    assert not (tmp_path / "run").exists()


def test_log_tensorboard_without_tensorboard_is_one_line_also_on_resume(runs, tmp_path, monkeypatch):
    run = tmp_path / "resumable"
    shutil.copytree(runs / "tb", run)
    for path in run.glob("checkpoints/checkpoint-0000006.pt*"):  # a resume that would run steps 4 to 6
        path.unlink()
    before = snapshot(run)
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard raises ImportError
    fails(MISSING, "pretrain", "--out", tmp_path / "new", *FAST, "--log", "tensorboard")
    assert not (tmp_path / "new").exists()
    fails(MISSING, "pretrain", "--resume", run, "--no-progress")
    assert snapshot(run) == before
    ok("pretrain", "--out", tmp_path / "plain", *FAST)  # without --log nothing needs it
