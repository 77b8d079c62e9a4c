"""eval.json says what ran (issue 30, item 5): every setting of an evaluation is recorded beside its score,
as it ran (defaults resolved) and as it was asked; `evaluate`'s options are checked in one place
(`EvalConfig.check`) before anything is read, each bad one a single line naming it, nothing written."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from test_cli import invoke, one_thread  # noqa: F401 - one torch thread for the module, the CLI runner
from test_records import fails, ok

from maskkit.evaluate import FINETUNE_BATCH_SIZE, FINETUNE_LR, LINEAR_BASE_LR, LINEAR_BATCH_SIZE
from maskkit.run import EvalConfig, RunError, evaluate_run

SHORT = ["--policy", "random", "--steps", "4", "--batch-size", "32", "--log-every", "2", "--ckpt-every", "2",
         "--device", "cpu", "--no-progress"]  # fmt: skip




@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval") / "run"
    ok("pretrain", "--out", out, *SHORT)
    return out


def entries(run: Path) -> dict:
    return json.loads((run / "eval.json").read_text())


def test_eval_json_records_the_settings_as_run_and_as_asked_and_they_reproduce_the_score(run):
    ok("evaluate", run, "--no-progress", "--device", "cpu", "--seed", "3")
    linear = entries(run)["linear"]
    bs = min(LINEAR_BATCH_SIZE, linear["num_train"])  # the default batch, cut to the train split
    assert linear["batch_size"] == bs and linear["lr"] == LINEAR_BASE_LR * bs / 256  # the default lr, resolved
    assert (linear["weight_decay"], linear["optimizer"], linear["momentum"], linear["seed"]) == (0.0, "lars", 0.9, 3)
    assert (linear["protocol"], linear["init"], linear["split"], linear["device"]) == ("linear", "pretrained",
                                                                                         "test", "cpu")  # fmt: skip
    assert linear["head"].startswith("BatchNorm1d(affine=False) + Linear") and linear["warmup_epochs"] == 10
    assert linear["asked"] == {"protocol": "linear", "init": "pretrained", "split": "test", "epochs": None,
                               "batch_size": None, "lr": None, "seed": 3, "device": "cpu",
                               "trust_data_change": False}  # fmt: skip
    # the settings recorded are the whole story: asking for them explicitly gives the same score
    ok("evaluate", run, "--no-progress", "--device", "cpu", "--seed", "3", "--lr", repr(linear["lr"]),
       "--epochs", linear["epochs"], "--batch-size", linear["batch_size"])  # fmt: skip
    again = entries(run)["linear"]
    assert (again["top1"], again["train_top1"]) == (linear["top1"], linear["train_top1"])
    assert {k: again[k] for k in ("lr", "epochs", "batch_size", "seed")} == {
        k: linear[k] for k in ("lr", "epochs", "batch_size", "seed")}
    assert again["asked"]["lr"] == linear["lr"] and again["asked"]["epochs"] == linear["epochs"]


def test_finetune_records_its_own_optimizer_weight_decay_and_learning_rate(run):
    result = ok("evaluate", run, "--no-progress", "--device", "cpu", "--protocol", "finetune", "--epochs", "1",
                "--split", "val")  # fmt: skip
    entry = entries(run)["finetune@val"]
    assert (entry["optimizer"], entry["weight_decay"], entry["lr"], entry["momentum"]) == ("adamw", 0.05,
                                                                                           FINETUNE_LR, None)
    assert entry["batch_size"] == min(FINETUNE_BATCH_SIZE, entry["num_train"]) and entry["epochs"] == 1
    assert entry["split"] == "val" and entry["asked"]["lr"] is None and entry["asked"]["split"] == "val"
    assert f"settings: adamw lr {FINETUNE_LR:g}, weight decay 0.05, 1 epochs" in " ".join(result.stdout.split())


@pytest.mark.parametrize(("args", "message"), [
    (["--lr", "inf"], "--lr must be a finite positive number, got inf"),
    (["--lr", "nan"], "--lr must be a finite positive number, got nan"),
    (["--lr", "0"], "--lr must be a finite positive number, got 0.0"),
    (["--lr", "-0.5"], "--lr must be a finite positive number, got -0.5"),
    (["--seed", "-1"], "--seed must be an integer in [0, 2^63 - 1], got -1"),
    (["--seed", str(2**63)], "--seed must be an integer in [0, 2^63 - 1], got 9223372036854775808"),
])  # fmt: skip
def test_each_bad_evaluate_option_is_one_line_naming_it_and_nothing_is_written(run, tmp_path, args, message):
    before = (run / "eval.json").read_bytes() if (run / "eval.json").exists() else None
    fails(message, "evaluate", run, "--no-progress", "--device", "cpu", "--epochs", "1", *args)
    assert ((run / "eval.json").read_bytes() if (run / "eval.json").exists() else None) == before
    fails(message, "evaluate", tmp_path / "no-run-here", *args)  # the options first: nothing is read before


def test_the_library_checks_the_same_options_in_one_place(run):
    with pytest.raises(RunError, match=r"^--lr must be a finite positive number, got inf$"):
        evaluate_run(run, lr=math.inf, device="cpu")
    with pytest.raises(RunError, match=r"^--protocol must be one of linear, finetune, got 'probe'$"):
        evaluate_run(run, "probe")
    with pytest.raises(RunError, match=r"^--epochs must be a positive integer, got True$"):
        EvalConfig(epochs=True).check()  # a bool is no epoch count
    with pytest.raises(RunError, match=r"^--split must be one of test, val, got 'train'$"):
        EvalConfig(split="train").check()
    assert EvalConfig(init="random", split="val").key == "linear-random@val"


def test_a_run_without_model_pt_is_evaluated_from_its_checkpoint_with_one_warning_naming_both(run, tmp_path):
    """A stopped run, or one whose final write failed, has checkpoints but no model.pt: evaluate reads the
    newest checkpoint, as for a run in progress, and says so in one line instead of scoring it silently."""
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    (copy / "model.pt").unlink()
    result = ok("evaluate", copy, "--no-progress", "--device", "cpu", "--epochs", "1")
    warned = [line for line in result.stderr.splitlines() if line.startswith("Warning: ")]
    assert len(warned) == 1, result.stderr
    assert "has no model.pt" in warned[0] and "checkpoint of step 4" in warned[0] and "--resume" in warned[0]
    assert entries(copy)["linear"]["weights"].endswith("checkpoint-0000004.pt")
