"""Messages (issue 30, items 6 and 7): every refusal is one line naming the option, file or argument, never a
traceback, a silent last-wins or a run in the current folder.

- two spellings of one option (`--batch-size 8 --batch_size 32`), an empty path, a device maskkit does not
  run on or this machine lacks, an --accum-iter or --epochs no run can finish: exit 1, one `Error:` line
  naming it, nothing written (checked before any file);
- file names with a newline or bytes that are not UTF-8 are shown escaped, on one line;
- a TensorBoard logger that cannot open or loses its folder: one line, no thread traceback;
- the library API (MAE protocol functions, policies, MaskPlan, TrainStep) refuses an empty batch or a
  shape that does not fit with one ValueError naming the argument and the shapes.
"""

from __future__ import annotations

import os
import shutil
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from test_adversarial import clean_error
from test_cli import invoke, one_thread  # noqa: F401 - one torch thread for the module, the CLI runner

from maskkit.adapters import create_mae
from maskkit.mae import mae_forward, mae_step_loss, masked_loss, patch_loss
from maskkit.options import option_extras, shown_path
from maskkit.plan import MaskPlan
from maskkit.policies import create_sized_policy

#: options of a run that would start at once if nothing refused it (micro on 8x8 digits)
QUICK = ["--steps", "1", "--batch-size", "16", "--no-progress", "--device", "cpu"]


def refused(tmp_path: Path, *args: str, words: tuple[str, ...]) -> str:
    """`maskkit pretrain --out RUN ...` is one clean error holding `words`, and RUN was not made."""
    out = tmp_path / "run"
    line = clean_error(invoke("pretrain", "--out", out, *args), *words)
    assert not out.exists()
    return line


# ---- one option, two spellings -------------------------------------------------------------------------

TWO_SPELLINGS = {
    "batch-size": (["--batch-size", "8", "--batch_size", "32"], ("--batch-size", "--batch_size")),
    "accum-iter": (["--accum_iter", "2", "--accum-iter", "3"], ("--accum_iter", "--accum-iter")),
    "keep-last": (["--keep-checkpoints", "2", "--keep-last", "3"], ("--keep-checkpoints", "--keep-last")),
    "log-logger": (["--log", "none", "--logger", "none"], ("--log", "--logger")),
    "img-size": (["--img-size", "8", "--input_size", "8"], ("--img-size", "--input_size")),
    "inline-value": (["--min-lr=0", "--min_lr=0.001"], ("--min-lr", "--min_lr")),
    "switch-both-ways": (["--progress"], ("--no-progress", "--progress")),
    "policy-option-two-ways": (["--policy", "attention", "--attention-mode", "hint", "--policy-opt", "mode=high"],
                               ("--attention-mode", "--policy-opt mode")),  # fmt: skip
}


@pytest.mark.parametrize("extra, words", TWO_SPELLINGS.values(), ids=TWO_SPELLINGS.keys())
def test_an_option_under_two_spellings_is_one_line_naming_both(tmp_path, extra, words):
    line = refused(tmp_path, *QUICK, *extra, words=words)
    assert "two spellings of one option" in line


def test_output_dir_beside_out_names_both_and_makes_neither(tmp_path):
    result = invoke("pretrain", "--out", tmp_path / "a", "--output_dir", tmp_path / "b", *QUICK)
    clean_error(result, "--out", "--output_dir")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_visualize_output_under_two_spellings_is_one_line(tmp_path):
    result = invoke("visualize", "--policies", "random", "-o", tmp_path / "a.png", "--output", tmp_path / "b.png")
    clean_error(result, "-o", "--output")
    assert not (tmp_path / "a.png").exists() and not (tmp_path / "b.png").exists()


def test_the_same_spelling_twice_keeps_the_last_as_a_shell_does():
    """The documented rule (maskkit ablate layers an arm's options over the study's this way)."""
    found = option_extras("attention", "darts", ["--attention-mode", "hint", "--attention-mode", "high"], [], [])
    assert found["policy"][0] == {"mode": "high"}
    with pytest.raises(ValueError, match="--attention-mode and --policy-opt mode are two spellings"):
        option_extras("attention", "darts", ["--attention-mode", "hint"], ["mode=high"], [])


# ---- empty paths ----------------------------------------------------------------------------------------

#: a study file of the examples (the checks come before it is read)
STUDY = Path(__file__).resolve().parents[1] / "examples" / "studies" / "digits.toml"


@pytest.mark.parametrize("args, words", [
    (["pretrain", "--out", "", *QUICK], ("--out", "empty path")),
    (["pretrain", "--out=   ", *QUICK], ("--out", "empty path")),
    (["pretrain", "--resume", ""], ("--resume", "empty path")),
    (["pretrain", "--data-dir", " ", *QUICK], ("--data-dir", "empty path")),
    (["visualize", "", "-o", "x.png"], ("RUN_DIR", "empty path")),
    (["visualize", "--policies", "random", "-o", ""], ("-o", "empty path")),
    (["bench", "--json", ""], ("--json", "empty path")),
    (["ablate", str(STUDY), "--out", "", "--dry-run"], ("--out", "empty path")),
    (["ablate", "run", str(STUDY), "--out", "  "], ("--out", "empty path")),
    (["ablate", "report", ""], ("STUDY_DIR", "empty path")),
], ids=["out", "out-blank", "resume", "data-dir", "visualize-run", "visualize-output", "bench-json", "ablate-out",
        "ablate-run-out", "ablate-report"])  # fmt: skip
def test_an_empty_path_is_one_line_naming_the_option_and_writes_nothing(tmp_path, monkeypatch, args, words):
    monkeypatch.chdir(tmp_path)  # where an empty path would have written
    clean_error(invoke(*args), *words)
    assert list(tmp_path.iterdir()) == []


def test_create_run_refuses_an_empty_out(tmp_path, monkeypatch):
    from maskkit.run import RunConfig, RunError, create_run

    monkeypatch.chdir(tmp_path)
    with pytest.raises(RunError, match="--out is an empty path"):
        create_run(RunConfig(), "")
    assert list(tmp_path.iterdir()) == []


# ---- devices --------------------------------------------------------------------------------------------

DEVICES = ["meta", "xla", "cpu:1", "cuda:x", "🙂"]
if not torch.backends.mps.is_available():
    DEVICES.append("mps")
DEVICES.append(f"cuda:{torch.cuda.device_count() + 6}")  # beyond this machine's devices (or: no CUDA at all)


@pytest.mark.parametrize("device", DEVICES)
def test_an_unsupported_or_absent_device_is_one_line_naming_device(tmp_path, device):
    refused(tmp_path, *QUICK, "--device", device, words=("--device", repr(device)))


@pytest.mark.parametrize("command", [["bench", "--plans"], ["visualize", "--policies", "random", "-o", "x.png"]])
def test_other_commands_refuse_the_meta_device_in_one_line(tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    clean_error(invoke(*command, "--device", "meta"), "--device 'meta'")
    assert list(tmp_path.iterdir()) == []


def test_the_device_spelling_is_checked_with_the_settings():
    from maskkit.run import RunConfig, RunError, TrainSettings

    with pytest.raises(RunError, match="--device 'meta' is not a device maskkit runs on"):
        RunConfig(train=TrainSettings(device="meta")).check()


# ---- unbounded integers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("extra, words", [
    (["--accum-iter", str(10**12)], ("--accum-iter must be at most 4096", str(10**12))),
    (["--accum-iter", "100"], ("--accum-iter 100", "more than the train split", "at most")),
    (["--steps", str(10**12)], ("--steps must be at most",)),
    (["--epochs", "1e12", "--steps", None], ("--epochs", "more than the most a run takes")),
], ids=["accum-huge", "accum-beyond-split", "steps-huge", "epochs-huge"])  # fmt: skip
def test_a_run_no_one_could_finish_is_refused_before_it_starts(tmp_path, extra, words):
    args = list(QUICK)
    for key, value in zip(extra[::2], extra[1::2], strict=True):
        if key in args:
            del args[args.index(key) : args.index(key) + 2]
        if value is not None:
            args += [key, value]
    refused(tmp_path, *args, words=words)


# ---- escaped file names ---------------------------------------------------------------------------------


def test_shown_path_escapes_newlines_and_bytes_that_are_not_utf8():
    assert shown_path("runs/a\nb") == "runs/a\\nb"
    assert shown_path(os.fsdecode(b"runs/x\xff\xfey")) == "runs/x\\xff\\xfey"
    assert shown_path(b"runs/\xe9t\xc3\xa9") == "runs/\\xe9t\u00e9"  # an accent that is UTF-8 stays as it is
    assert shown_path(Path("a\tb")) == "a\\tb"


@pytest.mark.parametrize("name", ["run\nsecond line", os.fsdecode(b"run\xff")], ids=["newline", "not-utf8"])
def test_a_file_name_is_shown_escaped_on_one_line(tmp_path, name):
    missing = tmp_path / name
    line = clean_error(invoke("pretrain", "--resume", missing), "does not exist")
    assert shown_path(missing) in line


def test_a_run_directory_whose_name_holds_a_newline_is_named_whole(tmp_path):
    out = tmp_path / "a\nb"
    out.write_text("a file, not a folder")
    line = clean_error(invoke("pretrain", "--out", out, *QUICK), "it is a file")
    assert f"{tmp_path}/a\\nb" in line


# ---- logger threads -------------------------------------------------------------------------------------

pytest.importorskip("tensorboard")


def test_a_logger_that_cannot_open_its_folder_is_one_line_naming_it(tmp_path):
    from maskkit.train.loggers import open_logger

    folder = tmp_path / "tensorboard"
    folder.write_text("a file where the folder goes")
    with pytest.raises(ValueError, match=r"--log tensorboard cannot write .*tensorboard"):
        open_logger("tensorboard", folder)


def test_a_logger_whose_folder_vanishes_warns_once_and_no_thread_prints_a_traceback(tmp_path, monkeypatch):
    from maskkit.train.loggers import LoggerWarning, open_logger

    escaped = []  # what reaches threading.excepthook (the default one prints a traceback)
    monkeypatch.setattr(threading, "excepthook", escaped.append)
    logger = open_logger("tensorboard", tmp_path / "tb")
    logger.log(1, {"metrics/loss": 1.0})
    shutil.rmtree(tmp_path / "tb")  # the writer thread's next write fails
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logger.log(2, {"metrics/loss": 0.5})
        logger.log(3, {"metrics/loss": 0.25})  # dropped: no second warning
        logger.image(3, "masks", torch.zeros(8, 8, 3, dtype=torch.uint8).numpy())
        logger.close()
    assert [type(w.message) for w in caught] == [LoggerWarning]
    assert "--log tensorboard stopped logging" in str(caught[0].message)
    assert escaped == []


# ---- the library API ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def micro():
    """micro on 8x8 grey images (patch 2: 16 patches of width 64), a batch of 4, its tokens and a plan."""
    mae = create_mae("micro", img_size=8, in_chans=1, seed=0)
    images = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    tokens = mae.patch_tokens(images)
    policy = create_sized_policy("random", embed_dim=mae.embed_dim, num_patches=mae.num_patches)
    return mae, images, tokens, policy, policy(tokens, generator=torch.Generator().manual_seed(1))


def test_an_empty_batch_is_one_value_error_naming_it(micro):
    mae, images, tokens, policy, plan = micro
    with pytest.raises(ValueError, match=r"images is an empty batch \(B=0"):
        mae_step_loss(mae, policy, images[:0])
    with pytest.raises(ValueError, match=r"images is an empty batch \(B=0"):
        mae_forward(mae, images[:0], plan)
    with pytest.raises(ValueError, match=r"tokens is an empty batch \(B=0"):
        policy(tokens[:0])
    with pytest.raises(ValueError, match=r"scores is an empty batch \(B=0"):
        MaskPlan.from_scores(torch.rand(0, 16), 0.75)


@pytest.mark.parametrize("name", ["random", "block", "simmim", "hpm", "learned", "adamae", "colornoise", "uniform"])
def test_every_policy_refuses_an_empty_batch_and_images_of_another_batch(micro, name):
    mae, images, tokens, _, _ = micro
    policy = create_sized_policy(name, embed_dim=mae.embed_dim, num_patches=mae.num_patches)
    with pytest.raises(ValueError, match="tokens is an empty batch"):
        policy(tokens[:0], images=images[:0], encoder=mae)
    with pytest.raises(ValueError, match=r"images must hold the tokens' B=4 images, got shape \(2, 1, 8, 8\)"):
        policy(tokens, images=images[:2], encoder=mae)


def test_a_plan_for_another_batch_or_model_is_one_value_error_naming_the_plan(micro):
    mae, images, tokens, _, plan = micro
    with pytest.raises(ValueError, match="plan is for 4 images of 16 patches, but images has 2"):
        mae_forward(mae, images[:2], plan)
    with pytest.raises(ValueError, match=r"tokens must be \[B, N, D\] = \[4, 16, D\] for this plan .* got shape \(4, 9, 64\)"):
        mae_forward(mae, images, plan, tokens=tokens[:, :9])
    with pytest.raises(ValueError, match="tokens must be .* the model's width D=64, got shape"):
        mae_forward(mae, images, plan, tokens=tokens[..., :7])
    with pytest.raises(ValueError, match=r"images must be \[B, 1, H, W\] .* got shape \(4, 3, 8, 8\)"):
        mae_forward(mae, images.expand(4, 3, 8, 8), plan)


@pytest.mark.parametrize("call, message", [
    (lambda plan, t: plan.gather(t[:2]), r"tokens must be \[B, N, D\] = \[4, 16, D\] .* got shape \(2, 16, 64\)"),
    (lambda plan, t: plan.gather(t[:, :9]), r"tokens must be .* got shape \(4, 9, 64\)"),
    (lambda plan, t: plan.gather(t[..., 0]), r"tokens must be .* got shape \(4, 16\)"),
    (lambda plan, t: plan.restore(t[:3]), r"shuffled must be \[B, N, D\] = \[4, 16, D\] .* got shape \(3, 16, 64\)"),
    (lambda plan, t: plan.fill(t[:, :3], torch.zeros(1, 1, 64)), r"visible must be \[B, N, D\] = \[4, 4, D\]"),
    (lambda plan, t: plan.fill(t[:, :4], torch.zeros(1, 1, 5)), r"mask_token must be \[1, 1, D\] .* D=64, got \(1, 1, 5\)"),
], ids=["gather-batch", "gather-patches", "gather-2d", "restore-batch", "fill-visible", "fill-token"])  # fmt: skip
def test_maskplan_helpers_name_the_argument_and_both_shapes(micro, call, message):
    _, _, tokens, _, plan = micro
    with pytest.raises(ValueError, match=message):
        call(plan, tokens)


def test_the_losses_refuse_shapes_that_would_broadcast():
    with pytest.raises(ValueError, match=r"pred and target must have one shape .* pred \(2, 16, 4\) and target \(2, 1, 4\)"):
        patch_loss(torch.zeros(2, 16, 4), torch.zeros(2, 1, 4))
    with pytest.raises(ValueError, match=r"weights must have per_patch's shape \(2, 16\), got \(16,\)"):
        masked_loss(torch.zeros(2, 16), torch.ones(2, 16), torch.ones(16))


@pytest.mark.parametrize("policy", ["random", "learned"])  # PlainStep, MLOStep
def test_a_train_step_refuses_an_empty_or_misshapen_batch_naming_images(policy):
    from test_train_step import build  # the step tests' micro trainer on digits

    step = build(policy).train_step
    with pytest.raises(ValueError, match=r"images is an empty batch \(B=0"):
        step.run(torch.zeros(0, 1, 8, 8), {}, agree=bool)
    with pytest.raises(ValueError, match=r"images must be \[B, 1, H, W\] .* got shape \(4, 1, 6, 6\)"):
        step.run(torch.zeros(4, 1, 6, 6), {}, agree=bool)


# ---- npz files: every message names the file ---------------------------------------------------------------


@pytest.mark.parametrize("images, words", [
    (np.full((4, 8, 8), np.nan, dtype=np.float32), ("non-finite", "first in image 0")),
    (np.concatenate([np.zeros((2, 8, 8)), np.full((1, 8, 8), np.inf), np.zeros((1, 8, 8))]).astype(np.float32),
     ("non-finite", "first in image 2")),
    (np.full((4, 8, 8), 2.0, dtype=np.float32), ("must lie in [0, 1]", "got values in [2, 2]")),
    (np.zeros((4, 8, 8), dtype=np.int64), ("must be uint8 or float",)),
    (np.zeros((4, 8), dtype=np.uint8), ("must be [N,H,W]",)),
], ids=["nan", "inf-in-image-2", "above-one", "int64", "2d"])  # fmt: skip
def test_a_bad_npz_images_array_is_one_line_naming_the_file(tmp_path, images, words):
    path = tmp_path / "bad.npz"
    np.savez(path, images=images, labels=np.arange(len(images)) % 2)
    clean_error(invoke("pretrain", "--dataset", f"npz:{path}", "--out", tmp_path / "run", *QUICK), str(path), *words)
    assert not (tmp_path / "run").exists()
