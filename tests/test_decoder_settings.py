"""--decoder-ratio / --decoder-rule and the video data options: checked once, in one line, and absent from an
image run's record unless asked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from maskkit.cli.app import app
from maskkit.run import RunConfig, RunError
from maskkit.train.config import TrainSettings
from maskkit.train.decoding import DecoderMasking

runner = CliRunner()
FAST = ["--steps", "2", "--batch-size", "16", "--no-progress", "--ckpt-every", "2", "--log-every", "1"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fails(message: str, *args: str) -> None:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], result.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--decoder-ratio", "1"], "--decoder-ratio must lie in [0, 1), got 1.0"),
    (["--decoder-ratio", "-0.1"], "--decoder-ratio must lie in [0, 1)"),
    (["--decoder-ratio", "nan"], "--decoder-ratio must lie in [0, 1)"),
    (["--decoder-rule", "random"], "--decoder-rule only applies with --decoder-ratio"),
    (["--decoder-ratio", "0.5", "--decoder-rule", "cells"], "--decoder-rule must be one of auto, random, runningcell"),
    (["--decoder-ratio", "0.5", "--policy", "learned"], "--decoder-ratio is not yet supported with a masker the MLO"),
    (["--num-frames", "0"], "--num-frames must be an integer in [1, 1024], got 0"),
    (["--sampling-rate", "5000"], "--sampling-rate must be an integer in [1, 1024]"),
    (["--num-frames", "8"], "--num-frames applies to video sources only; dataset 'digits' does not take it"),
])  # fmt: skip
def test_bad_decoder_and_frame_options_are_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    fails(message, "pretrain", "--out", tmp_path / "r", *FAST, *args)
    assert not (tmp_path / "r").exists()


def test_the_auto_rule_is_runningcell_on_clips_and_random_on_images() -> None:
    auto = DecoderMasking("auto", 0.5)
    assert auto.rule_for((4, 7, 7)) == "runningcell" and auto.rule_for((7, 7)) == "random"
    assert auto.rule_for(None) == "random" and DecoderMasking("random", 0.5).rule_for((4, 7, 7)) == "random"
    assert DecoderMasking.from_settings(TrainSettings()) is None
    assert DecoderMasking.from_settings(TrainSettings(decoder_ratio=0.25, decoder_rule="runningcell")) == \
        DecoderMasking("runningcell", 0.25)


def test_an_image_run_records_no_frames_and_reads_back_its_decoder_settings(tmp_path: Path) -> None:
    result = runner.invoke(app, ["pretrain", "--out", str(tmp_path / "r"), *FAST])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "r" / "config.json").read_text())
    assert "num_frames" not in record["dataset"] and "num_frames" not in record["model"]
    assert record["train"]["decoder_ratio"] is None and record["train"]["decoder_rule"] == "auto"
    config = RunConfig.from_dict(record["config"])
    assert config.train.decoder_ratio is None and config.data.num_frames is None


def test_run_config_round_trips_the_new_settings() -> None:
    config = RunConfig.from_dict({"train": {"decoder_ratio": 0.5, "decoder_rule": "runningcell"},
                                  "data": {"num_frames": 8, "sampling_rate": 2}})  # fmt: skip
    config.check()
    assert RunConfig.from_json(config.to_json()) == config
    with pytest.raises(RunError, match="--decoder-rule must be one of"):
        RunConfig.from_dict({"train": {"decoder_ratio": 0.5, "decoder_rule": "x"}}).check()
