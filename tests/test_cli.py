"""The `maskkit` command through typer's CliRunner: pretrain / evaluate / visualize / policies on
digits and on a small npz, determinism, exact resume, and every bad-input case (exit code 1,
one line naming the problem, no traceback, nothing in the run directory lost)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from maskkit.checkpoint import load_checkpoint
from maskkit.cli.app import app

runner = CliRunner()

#: a small, fast pretraining (the default micro model on 8x8 digits)
FAST = ["--steps", "6", "--batch-size", "32", "--log-every", "2", "--ckpt-every", "3", "--no-progress"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def ok(*args: str):
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result


def fails(message: str, *args: str) -> None:
    """The command exits 1 with exactly one line on stderr that contains `message`."""
    result = invoke(*args)
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ") and message in lines[0], lines[0]
    assert "Traceback" not in result.output


def snapshot(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def random_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "random"
    ok("pretrain", "--policy", "random", "--out", run, *FAST)
    return run


def test_policies_table_lists_policies_and_options():
    out = ok("policies").output
    for text in ("random", "attention", "learned", "--attention-mode", "--learned-selection"):
        assert text in out


def test_policies_table_shows_each_card(monkeypatch):
    from rich.console import Console

    from maskkit import list_policies, policy_card
    from maskkit.cli import app as app_module

    monkeypatch.setattr(app_module, "console", Console(width=300))  # wide: no cell is wrapped
    cards, options = {}, {}
    output = ok("policies").output
    assert "simmim 0.6" in output and "random 0.75" in output and "uniform takes 0.75" in output  # the ratio line
    for line in output.splitlines():
        cells = [c.strip() for c in line.strip("│ ").split("│")]
        if len(cells) == 4 and line.startswith("│"):  # policy | paper | learns from | idea
            cards[cells[0]] = cells[1:]
        elif len(cells) == 3 and line.startswith("│"):  # option | default | allowed values
            options[cells[0]] = cells[1:]
    assert list(cards) == list_policies()
    for name in list_policies():
        card = policy_card(name)
        assert cards[name] == [card.paper, card.learns, card.idea]
    assert cards["hpm"][:2] == ["Wang et al., CVPR 2023", "reconstruction"]
    assert cards["attention"][0] == "Kakogeorgiou et al., ECCV 2022" and cards["adamae"][1] == "reconstruction"
    assert cards["learned"][1] == "labels" and cards["random"][1] == "nothing"
    assert options["--attention-mode"] == ["high", "high | low | hint"]
    assert options["--attention-hint-ratio"] == ["0.1", "[0, 1)"]
    assert options["--colornoise-color"] == ["green", "green | red | blue | purple | white"]
    assert options["--learned-hidden-dim"] == ["none", "int >= 1 | None"]
    assert options["--uniform-secondary-in-loss"] == ["false", "bool"]
    expected = {f"--{c.name}-{o.name.replace('_', '-')}" for c in map(policy_card, list_policies()) for o in c.options
                if o.name not in ("ratio", "embed_dim", "num_patches")}  # fmt: skip
    assert set(options) == expected  # the auto-filled ratio / embed_dim / num_patches stay hidden


def test_pretrain_writes_a_complete_run(random_run):
    names = set(snapshot(random_run))
    assert {"config.json", "metrics.jsonl", "model.pt", "summary.json", "checkpoints/checkpoint-0000006.pt"} <= names
    config = json.loads((random_run / "config.json").read_text())
    ds = config["dataset"]
    assert ds["name"] == "digits" and ds["splits"] == {"train": 1257, "val": 179, "test": 361}
    assert sum(ds["splits"].values()) == ds["num_images"] == 1797
    assert config["model"]["patch_size"] == 2 and config["model"]["num_patches"] == 16
    assert config["policy"] == {"name": "random", "options": {}, "learnable": False}
    assert config["train"]["steps"] == 6 and config["train"]["mask_ratio"] == 0.75
    records = metrics(random_run)
    assert [r["step"] for r in records] == [2, 4, 6] and all(np.isfinite(r["loss"]) for r in records)
    summary = json.loads((random_run / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["final"] == records[-1]


def test_same_seed_same_metrics_and_weights(random_run, tmp_path):
    again = tmp_path / "again"
    ok("pretrain", "--policy", "random", "--out", again, *FAST)
    assert metrics(again) == metrics(random_run)
    a, b = load_checkpoint(random_run / "model.pt"), load_checkpoint(again / "model.pt")
    assert all(torch.equal(a["mae"][k], b["mae"][k]) for k in a["mae"])
    other = tmp_path / "other"
    ok("pretrain", "--policy", "random", "--out", other, "--seed", "1", *FAST)
    assert metrics(other) != metrics(random_run)


def test_resume_continues_exactly(random_run, tmp_path):
    # a "crash" after step 3: drop what came later, then resume to the end
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    for name in ("config.json", "metrics.jsonl", "checkpoints/checkpoint-0000003.pt",
                 "checkpoints/checkpoint-0000003.pt.sha256"):
        (crashed / name).parent.mkdir(exist_ok=True)
        (crashed / name).write_bytes((random_run / name).read_bytes())
    ok("pretrain", "--resume", crashed, "--no-progress")
    assert metrics(crashed) == metrics(random_run)  # the line of step 4, 6 rewritten identically
    a, b = load_checkpoint(random_run / "model.pt"), load_checkpoint(crashed / "model.pt")
    assert all(torch.equal(a["mae"][k], b["mae"][k]) for k in a["mae"])


def test_resume_before_the_first_checkpoint_starts_over_with_a_warning(random_run, tmp_path):
    run = tmp_path / "early"  # killed after step 2, before the checkpoint of step 3
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_bytes((random_run / "config.json").read_bytes())
    (run / "metrics.jsonl").write_text((random_run / "metrics.jsonl").read_text().splitlines(True)[0])
    (run / "checkpoints" / ".checkpoint-0000003.pt.a1b2.tmp").write_bytes(b"half")  # its write was cut short
    result = ok("pretrain", "--resume", run, "--no-progress")
    assert result.stderr.splitlines() == [
        f"Warning: {run} has no checkpoint (it was stopped before its first); starting over from step 0"]
    assert metrics(run) == metrics(random_run)  # the same run, from step 0
    a, b = load_checkpoint(random_run / "model.pt"), load_checkpoint(run / "model.pt")
    assert all(torch.equal(a["mae"][k], b["mae"][k]) for k in a["mae"])
    assert json.loads((run / "summary.json").read_text())["steps_this_call"] == 6


def test_resume_skips_a_corrupt_newest_checkpoint_with_a_warning(random_run, tmp_path):
    run = tmp_path / "fallback"
    run.mkdir()
    (run / "checkpoints").mkdir()
    for name in ("config.json", "metrics.jsonl", "checkpoints/checkpoint-0000003.pt",
                 "checkpoints/checkpoint-0000003.pt.sha256", "checkpoints/checkpoint-0000006.pt",
                 "checkpoints/checkpoint-0000006.pt.sha256"):
        (run / name).write_bytes((random_run / name).read_bytes())
    newest = run / "checkpoints/checkpoint-0000006.pt"
    newest.write_bytes(newest.read_bytes()[:-10])
    result = ok("pretrain", "--resume", run, "--no-progress")
    assert "Warning: skipped checkpoint" in result.stderr and "checksum mismatch" in result.stderr
    assert metrics(run) == metrics(random_run)  # continued from step 3 to the same end


def test_evaluate_uses_the_newest_checkpoint_without_model_pt(random_run, tmp_path):
    run = tmp_path / "unfinished"
    run.mkdir()
    (run / "checkpoints").mkdir()
    for name in ("config.json", "checkpoints/checkpoint-0000003.pt", "checkpoints/checkpoint-0000003.pt.sha256"):
        (run / name).write_bytes((random_run / name).read_bytes())
    ok("evaluate", run, "--epochs", "2")
    record = json.loads((run / "eval.json").read_text())["linear"]
    assert record["step"] == 3 and record["weights"].endswith("checkpoint-0000003.pt")


def test_default_run_directory_is_dated_and_unique(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ok("pretrain", "--policy", "random", *FAST)
    ok("pretrain", "--policy", "random", *FAST)
    made = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(made) == 2 and all((tmp_path / "runs" / m / "model.pt").is_file() for m in made)


def test_learned_policy_runs_the_mlo_engine(tmp_path):
    run = tmp_path / "learned"
    ok("pretrain", "--policy", "learned", "--out", run, "--hypergrad", "darts", "--learned-hidden-dim", "16", *FAST)
    config = json.loads((run / "config.json").read_text())
    assert config["policy"]["name"] == "learned" and config["policy"]["options"] == {"hidden_dim": 16}
    records = metrics(run)
    assert all(0 < r["mask_prob_mean"] < 1 and "val_acc" in r for r in records)
    weights = load_checkpoint(run / "model.pt")
    assert "head" in weights and weights["policy"]["net.0.weight"].shape[0] == 16
    ok("visualize", run, "-o", tmp_path / "learned.png", "--num-images", "2")
    assert Image.open(tmp_path / "learned.png").size[0] == 4 + 5 * (96 + 4)  # five columns: heat-map added


def test_frozen_masker_control_keeps_the_initial_masker(tmp_path):
    # the study's control: same masker, selection and loss weighting as `learned`, no MLO feedback
    args = ["--learned-hidden-dim", "16", "--hypergrad", "darts", *FAST]
    frozen, longer, learned = tmp_path / "frozen", tmp_path / "longer", tmp_path / "learned"
    ok("pretrain", "--policy", "learned", "--out", frozen, "--freeze-masker", *args)
    ok("pretrain", "--policy", "learned", "--out", longer, "--freeze-masker", *args[:-len(FAST)], *FAST[:1], "12", *FAST[2:])
    ok("pretrain", "--policy", "learned", "--out", learned, *args)
    a, b, c = (load_checkpoint(run / "model.pt") for run in (frozen, longer, learned))
    assert "head" not in a and "head" in c
    # 6 or 12 MAE steps: the masker is bit-identical (its initialisation); MLO moved it
    assert all(torch.equal(a["policy"][k], b["policy"][k]) for k in a["policy"])
    assert not all(torch.equal(a["policy"][k], c["policy"][k]) for k in a["policy"])
    assert not all(torch.equal(a["mae"][k], b["mae"][k]) for k in a["mae"])  # the MAE did train


def test_masker_start_and_weighting_reach_the_engine(tmp_path):
    run = tmp_path / "warm"
    ok("pretrain", "--policy", "learned", "--out", run, "--learned-hidden-dim", "16", "--masker-start", "4", "--learned-weighting",
       "straight", *FAST)
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["mlo"]["masker_start"] == 4 and config["policy"]["options"]["weighting"] == "straight"
    updated = {r["step"]: r["masker_updated"] for r in metrics(run)}  # means over 2-step windows
    assert updated == {2: 0.0, 4: 0.0, 6: 0.5}  # masker steps end iterations 2, 4, 6: only the last learns
    assert all(r["mask_prob_mean"] < 0.9 for r in metrics(run))  # probabilities, not the straight weights (1)
    fails("--level2 ridge needs --hypergrad darts", "pretrain", "--policy", "learned", "--out", tmp_path / "bad", "--level2", "ridge",
          "--hypergrad", "unroll", *FAST)
    fails("--masker-start must be a non-negative integer", "pretrain", "--policy", "learned", "--out", tmp_path / "bad",
          "--masker-start", "-1", *FAST)
    assert not (tmp_path / "bad").exists()
    # options of the MLO training are refused with a policy that has no masker, not silently ignored
    fails("--masker-lr, --freeze-masker only apply to a learnable policy", "pretrain", "--policy", "random",
          "--masker-lr", "1e-4", "--freeze-masker", "--out", tmp_path / "bad", *FAST)
    assert not (tmp_path / "bad").exists()


def test_learned_run_resumes_exactly(tmp_path):
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    args = ["--learned-hidden-dim", "16", *FAST]
    ok("pretrain", "--policy", "learned", "--out", full, *args)
    ok("pretrain", "--policy", "learned", "--out", crashed, *args)
    for name in ("checkpoints/checkpoint-0000006.pt", "checkpoints/checkpoint-0000006.pt.sha256", "model.pt"):
        (crashed / name).unlink()  # as if killed between steps 3 and 6
    ok("pretrain", "--resume", crashed, "--no-progress")
    assert metrics(crashed) == metrics(full)
    a, b = load_checkpoint(full / "model.pt"), load_checkpoint(crashed / "model.pt")
    for part in ("mae", "policy", "head"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part])


def test_unrolled_hypergradient_checkpoints_between_masker_cycles(tmp_path):
    run = tmp_path / "unroll"
    ok("pretrain", "--policy", "learned", "--out", run, "--hypergrad", "unroll", "--masker-every", "2", "--unroll-steps", "2",
       "--learned-hidden-dim", "16", *FAST)
    # checkpoints are due at 3 and 6; step 3 is inside an open unroll window, so it is written at 4
    assert [p.name for p in sorted((run / "checkpoints").glob("*.pt"))] == [
        "checkpoint-0000004.pt", "checkpoint-0000006.pt"]
    assert json.loads((run / "config.json").read_text())["train"]["mlo"]["hypergrad"] == "unroll"


@pytest.mark.slow
def test_bench_policy_rows(tmp_path):
    out = tmp_path / "bench.json"
    ok("bench", "--preset", "tiny", "--device", "cpu", "--repeats", "2", "--skip-mlo", "--json", out)
    payload = json.loads(out.read_text())
    assert payload["device"] == "cpu" and payload["torch"] == torch.__version__
    rows = {r["name"]: r for r in payload["rows"]}
    zoo = ("adamae", "block", "colornoise", "hpm", "learned", "simmim", "tube", "uniform")  # frame, motion: clips only
    assert list(rows) == ["mae_random_masking", "random_policy", "attention_policy", *(f"{n}_policy" for n in zoo),
                          "random_plan_unchecked", "random_plan_checked", "weighted_plan_unchecked",
                          "weighted_plan_checked", "source_read_unchecked", "source_read_checked",
                          "masker_grads_check"]  # fmt: skip
    assert all(rows[f"{n}_policy"]["baseline"] == "random_policy" for n in zoo)
    assert rows["random_policy"]["baseline"] == "mae_random_masking"
    assert rows["random_policy"]["ratio"] == pytest.approx(
        rows["random_policy"]["seconds"] / rows["mae_random_masking"]["seconds"])
    fails("--preset must be one of", "bench", "--preset", "huge")


def test_attention_options_pass_through(tmp_path):
    run = tmp_path / "att"
    ok("pretrain", "--policy", "attention", "--attention-mode", "hint", "--policy-opt", "hint_ratio=0.25",
       "--out", run, *FAST)
    config = json.loads((run / "config.json").read_text())
    assert config["policy"]["options"] == {"mode": "hint", "hint_ratio": 0.25}


def test_hpm_pretrains_resumes_and_pictures_its_guided_patches(tmp_path):
    full, crashed = tmp_path / "hpm", tmp_path / "crashed"
    args = ["--policy", "hpm", "--hpm-hidden-dim", "16", *FAST]
    ok("pretrain", "--policy", "learned", "--out", full, *args)
    records = metrics(full)
    assert all({"hpm_rank_corr", "mask_iou", "mask_pos_entropy", "logit_spread", "policy_loss"} <= set(r)
               for r in records)
    weights = load_checkpoint(full / "model.pt")
    assert weights["policy"]["scorer.net.0.weight"].shape[0] == 16 and "head" not in weights
    start = load_checkpoint(sorted((full / "checkpoints").glob("*.pt"))[0])["policy"]
    assert not all(torch.equal(start[k], weights["policy"][k]) for k in start)  # the scorer trained
    ok("pretrain", "--policy", "learned", "--out", crashed, *args)
    for name in ("checkpoints/checkpoint-0000006.pt", "checkpoints/checkpoint-0000006.pt.sha256", "model.pt"):
        (crashed / name).unlink()
    ok("pretrain", "--resume", crashed, "--no-progress")
    assert metrics(crashed) == records
    ok("visualize", full, "-o", tmp_path / "hpm.png", "--num-images", "2")
    assert Image.open(tmp_path / "hpm.png").size[0] == 4 + 5 * (96 + 4)  # five columns: the scores' heat map


def test_guided_fraction_passes_through_and_masker_reg_reaches_the_engine(tmp_path):
    run = tmp_path / "att"
    ok("pretrain", "--policy", "attention", "--attention-guided-fraction", "0.5", "--attention-guided-ramp", "1",
       "--out", run, *FAST)
    config = json.loads((run / "config.json").read_text())
    assert config["policy"]["options"] == {"guided_fraction": 0.5, "guided_ramp": 1.0}
    reg = tmp_path / "reg"
    ok("pretrain", "--policy", "learned", "--out", reg, "--learned-hidden-dim", "16", "--learned-guided-fraction", "0.5",
       "--learned-selection", "gumbel", "--masker-reg", "0.5", *FAST)
    assert json.loads((reg / "config.json").read_text())["train"]["mlo"]["masker_reg"] == 0.5
    assert all(r["masker_prior_kl"] > 0 for r in metrics(reg))
    fails("--masker-reg must be a non-negative number", "pretrain", "--policy", "learned", "--out", tmp_path / "bad", "--masker-reg", "-1",
          *FAST)
    fails("--masker-reg only apply to a learnable policy", "pretrain", "--out", tmp_path / "bad", "--policy", "hpm",
          "--masker-reg", "0.1", *FAST)
    fails("guided_fraction must lie in [0, 1]", "pretrain", "--out", tmp_path / "bad", "--policy", "hpm",
          "--hpm-guided-fraction", "2", *FAST)
    assert not (tmp_path / "bad").exists()


def test_policy_option_spellings_and_types():
    from maskkit.cli.options import policy_extras
    from maskkit.policies import coerce_policy_options

    def parse(policy, extra, pairs):
        return coerce_policy_options(policy, *policy_extras(policy, extra, pairs))

    opts = parse("learned", ["--learned-detach-input", "--learned-hidden-dim=none", "--learned-temperature", "0.5"],
                 ["selection=gumbel"])  # fmt: skip
    assert opts == {"detach_input": True, "hidden_dim": None, "temperature": 0.5, "selection": "gumbel"}
    assert parse("learned", ["--learned-detach-input", "off"], []) == {"detach_input": False}
    with pytest.raises(ValueError, match="--learned-temperature expects float, got 'warm'"):
        parse("learned", ["--learned-temperature", "warm"], [])
    with pytest.raises(ValueError, match="set from --mask-ratio"):
        parse("random", [], ["ratio=0.5"])
    with pytest.raises(ValueError, match="--attention-mode needs a value"):
        parse("attention", ["--attention-mode"], [])
    # typed values (a RunConfig read from JSON) pass through; unknown names are refused
    assert coerce_policy_options("learned", {"temperature": 0.5}) == {"temperature": 0.5}
    with pytest.raises(ValueError, match="has no option 'tempo'"):
        coerce_policy_options("learned", {"tempo": 1})


def test_npz_run_evaluate_and_visualize(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 40)
    images = np.zeros((120, 12, 12, 3), np.uint8)
    for i, label in enumerate(labels):  # a bright square whose place depends on the class, plus noise
        images[i, 4 * label : 4 * label + 4, 2:10, label] = 200
        images[i] += rng.integers(0, 40, size=(12, 12, 3), dtype=np.uint8)
    np.savez(tmp_path / "toy.npz", images=images, labels=labels)
    run = tmp_path / "npz-run"
    ok("pretrain", "--dataset", f"npz:{tmp_path / 'toy.npz'}", "--policy", "random", "--patch-size", "3",
       "--out", run, *FAST)
    config = json.loads((run / "config.json").read_text())
    assert config["dataset"]["splits"] == {"train": 84, "val": 12, "test": 24}
    assert config["model"]["in_chans"] == 3 and config["model"]["num_patches"] == 16
    ok("evaluate", run, "--protocol", "linear", "--epochs", "20")
    ok("evaluate", run, "--protocol", "finetune", "--epochs", "2")
    val = ok("evaluate", run, "--protocol", "linear", "--epochs", "20", "--split", "val")
    assert "val top-1" in val.output
    results = json.loads((run / "eval.json").read_text())
    assert set(results) == {"linear", "finetune", "linear@val"} and results["linear"]["num_test"] == 24
    assert results["linear@val"]["num_test"] == 12  # scored on the 12 validation images, test result kept
    ok("visualize", run, "-o", tmp_path / "npz.png", "--num-images", "3", "--tile", "48")
    png = np.asarray(Image.open(tmp_path / "npz.png").convert("RGB"))
    assert png.shape == (18 + 4 + 3 * (48 + 4), 4 + 4 * (48 + 4), 3) and png.std() > 20


@pytest.mark.slow
def test_pretrained_encoder_beats_random_init_on_digits(tmp_path):
    run = tmp_path / "probe"
    # 100 steps of random masking at ratio 0.5 (on 16 patches, 0.75 leaves only 4 visible: too hard this briefly);
    # measured: 0.789 vs 0.670 with seed 2 (other seeds: margins of 0.05 to 0.09 at 100-200 steps)
    ok("pretrain", "--policy", "random", "--mask-ratio", "0.5", "--steps", "100", "--seed", "2", "--out", run,
       "--ckpt-every", "100", "--no-progress")
    ok("evaluate", run, "--protocol", "linear")
    ok("evaluate", run, "--protocol", "linear", "--init", "random")
    results = json.loads((run / "eval.json").read_text())
    pretrained, scratch = results["linear"]["top1"], results["linear-random"]["top1"]
    assert results["linear"]["num_test"] == 361 and results["linear"]["step"] == 100
    assert pretrained > scratch + 0.06, (pretrained, scratch)


def test_visualize_png_shows_masked_and_visible_patches(random_run, tmp_path):
    out = tmp_path / "masks.png"
    result = ok("visualize", random_run, "-o", out, "--num-images", "4", "--tile", "64")
    assert "wrote" in result.output
    png = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert png.shape == (18 + 4 + 4 * (64 + 4), 4 + 4 * (64 + 4), 3)
    hidden = png[22:22 + 64, 4 + 68:4 + 68 + 64]  # row 0, column "hidden"
    grey = np.array([115, 115, 140])  # HIDDEN_RGB
    is_grey = (hidden == grey).all(axis=-1)
    cells = is_grey.reshape(4, 16, 4, 16).all(axis=(1, 3))  # 4x4 patches of 16x16 pixels
    assert cells.sum() == 12  # 75% of 16 patches hidden, whole patches only
    image = png[22:22 + 64, 4:4 + 64]
    assert (image[~is_grey] == hidden[~is_grey]).all()  # visible patches equal the input picture


def test_visualize_policy_gallery(random_run, tmp_path):
    from maskkit import list_policies

    out, names = tmp_path / "policies.png", list_policies()
    result = ok("visualize", "--policies", "all", "-o", out, "--num-images", "2", "--tile", "32")
    # every policy but the two that need clips (frame, motion: a note each) draws on images
    assert f"{len(names) - 2} of {len(names)} policies at ratio 0.75" in result.output
    assert "frame: not drawn (" in result.output and "motion: not drawn (" in result.output
    assert Image.open(out).size[0] == 4 + (1 + len(names)) * (32 + 4)  # the image, then one column per policy
    result = ok("visualize", "--policies", "random, uniform,random", "--mask-ratio", "0.5", "-o", out, "--tile", "32")
    assert "1 of 2 policies at ratio 0.5" in result.output and "uniform: not drawn (uniform masking hides" in result.output
    assert Image.open(out).size[0] == 4 + 3 * (32 + 4)
    ok("visualize", random_run, "--policies", "attention,hpm", "-o", out, "--num-images", "2", "--tile", "32")
    assert Image.open(out).size[0] == 4 + 3 * (32 + 4)  # on the run's trained MAE and test images
    fails("give RUN_DIR (a run's masks) or --policies", "visualize", "-o", out)
    fails("unknown policy 'nope'; registered: adamae, attention", "visualize", "--policies", "random,nope", "-o", out)
    fails("--policies expects 'all' or comma-separated policy names", "visualize", "--policies", ",", "-o", out)
    fails("--dataset, --data-dir and --model are for a gallery without RUN_DIR", "visualize", random_run,
          "--policies", "all", "--model", "micro", "-o", out)
    fails("--dataset, --data-dir and --model are for a gallery without RUN_DIR", "visualize", random_run,
          "--dataset", "digits", "-o", out)
    fails("mask ratio must lie in (0, 1)", "visualize", "--policies", "all", "--mask-ratio", "1.5", "-o", out)


@pytest.mark.slow
def test_module_entry_point():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "maskkit.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "pretrain" in result.stdout


# ---- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [(["--policy", "nope"], "unknown policy 'nope'"),
     (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
     (["--model", "vit-huge"], "unknown MAE preset 'vit-huge'"),
     (["--patch-size", "3"], "image size 8x8 is not divisible by patch size 3"),
     (["--mask-ratio", "1.5"], "mask ratio must lie in (0, 1)"),
     (["--mask-ratio", "0"], "mask ratio must lie in (0, 1)"),
     (["--policy", "random", "--attention-mode", "hint"], "option --attention-mode is for policy 'attention'"),
     (["--policy", "attention", "--attention-color", "red"], "policy 'attention' has no option 'color'"),
     (["--policy", "attention", "--attention-mode", "sideways"], "attention mode must be one of"),
     (["--policy", "random", "--bogus"], "no such option: --bogus"),
     (["--optimizer", "nadamx"], "unknown optimizer 'nadamx'"),
     (["--optimizer", "lars"], "darts hypergradient needs the derivative of the MAE optimizer's update"),
     (["--optimizer", "lamb", "--hypergrad", "unroll"], "torch_optimizer.lamb.Lamb is not supported"),
     (["--steps", "5", "--epochs", "1"], "give --steps or --epochs, not both")],
)
def test_bad_pretrain_options(tmp_path, args, message):
    out = tmp_path / "run"
    fails(message, "pretrain", "--policy", "learned", "--out", out, *FAST[:2], *args)
    assert not out.exists()  # validated before anything was written


def test_bad_data(tmp_path):
    fails("data directory", "pretrain", "--policy", "learned", "--dataset", "mnist", "--data-dir", tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    fails(f"data directory {tmp_path / 'empty'} is empty", "pretrain", "--policy", "learned", "--dataset", "mnist",
          "--data-dir", tmp_path / "empty")
    fails("is empty", "pretrain", "--policy", "learned", "--dataset", f"imagefolder:{tmp_path / 'empty'}")
    np.savez(tmp_path / "noimages.npz", pixels=np.zeros((4, 8, 8), np.uint8))
    fails("has no array 'images'", "pretrain", "--policy", "learned", "--dataset", f"npz:{tmp_path / 'noimages.npz'}")
    np.savez(tmp_path / "short.npz", images=np.zeros((4, 8, 8), np.uint8), labels=np.zeros(3, np.int64))
    fails("has 4 images but 3 labels", "pretrain", "--policy", "learned", "--dataset", f"npz:{tmp_path / 'short.npz'}")
    np.savez(tmp_path / "unlabeled.npz", images=np.random.default_rng(0).random((40, 8, 8)))
    fails("policy 'learned' learns from labels, but dataset", "pretrain",
          "--dataset", f"npz:{tmp_path / 'unlabeled.npz'}", "--policy", "learned")


def test_unwritable_output_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    fails("cannot write to output directory", "pretrain", "--policy", "random", "--out", blocker / "run", *FAST)
    fails("cannot write to output directory", "pretrain", "--policy", "random", "--out", blocker, *FAST)
    assert blocker.read_text() == "not a directory"


def test_existing_run_is_never_overwritten(random_run):
    before = snapshot(random_run)
    fails("already holds a run", "pretrain", "--policy", "random", "--out", random_run, *FAST)
    fails("--resume takes its settings from the run's config.json; drop --lr", "pretrain",
          "--resume", random_run, "--lr", "0.1")
    assert snapshot(random_run) == before


def test_corrupt_checkpoint_on_resume(random_run, tmp_path):
    run = tmp_path / "corrupt"
    run.mkdir()
    (run / "checkpoints").mkdir()
    for name in ("config.json", "metrics.jsonl", "checkpoints/checkpoint-0000003.pt",
                 "checkpoints/checkpoint-0000003.pt.sha256"):
        (run / name).write_bytes((random_run / name).read_bytes())
    ckpt = run / "checkpoints/checkpoint-0000003.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])  # truncated
    before = snapshot(run)
    fails("checkpoint-0000003.pt is corrupt", "pretrain", "--resume", run)
    assert snapshot(run) == before
    fails("is not a run directory", "pretrain", "--resume", tmp_path)
    fails("does not exist", "evaluate", tmp_path / "nowhere")


@pytest.mark.slow
def test_evaluate_shows_a_progress_bar_of_its_optimizer_steps(tmp_path, monkeypatch):
    from io import StringIO

    from rich.console import Console

    import maskkit.cli.app as cli_app

    run = tmp_path / "run"
    ok("pretrain", "--dataset", "digits", "--out", run, *FAST)
    frames = Console(file=StringIO(), width=200, color_system=None, force_terminal=False)
    monkeypatch.setattr(cli_app, "console", frames)
    ok("evaluate", run, "--epochs", "2")
    text = frames.file.getvalue()
    done = re.search(r"evaluate linear.*?(\d+)/(\d+) steps", text)
    assert done and done[1] == done[2] and int(done[1]) >= 2  # the bar's last frame: every optimizer step done


def test_pretrain_bar_shows_no_loss_before_the_first_step():
    from io import StringIO

    from rich.console import Console

    from maskkit.cli.app import pretrain_progress, step_fields

    def frame(bar) -> str:
        out = Console(file=StringIO(), width=200, color_system=None)
        out.print(bar.get_renderable())
        return out.file.getvalue()

    bar, task = pretrain_progress(Console(file=StringIO()), total=10, completed=4)  # e.g. a resumed run
    first = frame(bar)
    assert "4/10" in first and "loss -" in first and "- img/s" in first
    assert "nan" not in first.lower()
    bar.update(task, completed=5, **step_fields(0.123456, 1234.4))
    assert "loss 0.1235" in frame(bar) and "1234 img/s" in frame(bar)


def test_evaluate_help_and_docs_state_the_defaults_the_code_uses():
    from maskkit import evaluate as ev

    result = runner.invoke(app, ["evaluate", "--help"], terminal_width=100)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.replace("│", " ").split())  # help text, unwrapped
    for phrase in (f"linear {ev.LINEAR_EPOCHS}, finetune {ev.FINETUNE_EPOCHS}",
                   f"at least {ev.MIN_DEFAULT_STEPS} linear or {ev.MIN_FINETUNE_STEPS} fine-tune steps",
                   f"linear {ev.LINEAR_BATCH_SIZE}, finetune {ev.FINETUNE_BATCH_SIZE}",
                   f"linear LARS {ev.LINEAR_BASE_LR} x batch/256, finetune AdamW {ev.FINETUNE_LR}",
                   "--no-progress"):
        assert phrase in text, phrase
    docs = " ".join((Path(__file__).parents[1] / "docs" / "cli.md").read_text().split())
    for phrase in (f"batch {ev.LINEAR_BATCH_SIZE}, lr {ev.LINEAR_BASE_LR} x batch / 256, {ev.LINEAR_EPOCHS} epochs",
                   f"at least {ev.MIN_DEFAULT_STEPS} steps",
                   f"batch {ev.FINETUNE_BATCH_SIZE}, lr {ev.FINETUNE_LR}", f"{ev.FINETUNE_EPOCHS} epochs"):
        assert phrase in docs, phrase



def write_pngs(folder: Path, count: int, side: int = 8, value: int = 0) -> None:
    """`count` small grey PNGs with a little noise in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    for i in range(count):
        pixels = np.clip(value + rng.integers(0, 60, size=(side, side)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")


def test_one_class_is_refused_by_the_learned_policy_and_by_evaluate(tmp_path):
    write_pngs(tmp_path / "one" / "cats", 20)
    data = f"imagefolder:{tmp_path / 'one'}"
    out = tmp_path / "learned"
    fails("policy 'learned' needs labels of at least 2 classes, but dataset", "pretrain", "--policy", "learned", "--dataset", data,
          "--out", out, *FAST)
    assert not out.exists()  # refused before anything was written
    labels = np.zeros(30, np.int64)
    np.savez(tmp_path / "one.npz", images=np.zeros((30, 8, 8), np.uint8), labels=labels)
    fails("has 1 (0)", "pretrain", "--policy", "learned", "--dataset", f"npz:{tmp_path / 'one.npz'}", "--out", out, *FAST)
    assert not out.exists()
    run = tmp_path / "random"
    ok("pretrain", "--dataset", data, "--policy", "random", "--out", run, *FAST)  # label-free: fine
    before = snapshot(run)
    fails("evaluation needs labels of at least 2 classes, but dataset", "evaluate", run, "--epochs", "1")
    assert snapshot(run) == before and not (run / "eval.json").exists()


def test_pretrain_on_the_official_mae_layout_pretrains_on_train_and_reports_on_val(tmp_path):
    root = tmp_path / "mae"
    for split, count in (("train", 24), ("val", 6)):
        for value, name in ((40, "cats"), (180, "dogs")):
            write_pngs(root / split / name, count, value=value)
    run = tmp_path / "run"
    result = ok("pretrain", "--dataset", f"imagefolder:{root}", "--policy", "random", "--out", run, *FAST)
    banner = " ".join(result.output.split())
    assert "layout: train/val folders, 2 classes" in banner
    assert "pretrain 48 (the train folder)" in banner and "test 12 (the val folder)" in banner
    ds = json.loads((run / "config.json").read_text())["dataset"]
    assert ds["layout"] == "train/val folders" and ds["num_classes"] == 2 and ds["num_images"] == 60
    # the whole train folder pretrains; train and val are carved from it 7:1; the val folder is the test split
    assert ds["splits"] == {"pretrain": 48, "train": 42, "val": 6, "test": 12}
    assert ds["split_rule"].startswith("train folder pretrains")
    ok("evaluate", run, "--epochs", "1", "--no-progress")
    entry = json.loads((run / "eval.json").read_text())["linear"]
    assert entry["num_test"] == 12 and entry["scored_on"] == "the val folder"
