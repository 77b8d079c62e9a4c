"""maskkit.run: the typed RunConfig, create_run / resume_run / train_run, the run-directory format, and the
CLI driving every adapter through it (timm preset, the user's official-MAE file, Hugging Face ViTMAE)."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from maskkit.policies import get_policy_class
from maskkit.run import (
    CONFIG,
    FORMAT_VERSION,
    SECTIONS,
    DataConfig,
    ModelConfig,
    PolicyConfig,
    RunConfig,
    RunError,
    RunRecord,
    TrainSettings,
    create_run,
    evaluate_run,
    load_run,
    resume_run,
    train_run,
)
from maskkit.train import MLOSettings

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
runner = CliRunner()


def cli(*args):
    from maskkit.cli.app import app

    return runner.invoke(app, [str(a) for a in args])


def small(policy: str = "random", steps: int = 6, **policy_options) -> RunConfig:
    return RunConfig(
        data=DataConfig("digits"), model=ModelConfig("micro"), policy=PolicyConfig(policy, policy_options),
        train=TrainSettings(steps=steps, batch_size=16, log_every=2, ckpt_every=4, device="cpu"),
    )  # fmt: skip


# ---- the configuration ------------------------------------------------------------------------


def test_run_config_json_round_trip_is_exact():
    config = small("learned", hidden_dim=8)
    config.mlo = MLOSettings(hypergrad="unroll", masker_lr=1e-4, masker_reg=0.1)
    config.model.options = {"decoder_depth": 1}
    again = RunConfig.from_json(config.to_json())
    assert again == config and again.to_json() == config.to_json()
    assert json.loads(config.to_json())["version"] == FORMAT_VERSION


@pytest.mark.parametrize("raw,message", [
    ({"version": 99}, "version 99 is not"),
    ({"trainer": {}}, "unknown run configuration section(s): trainer"),
    ({"train": {"stepz": 3}}, "unknown key(s) in run configuration section 'train': stepz"),
    ({"mlo": {"masker_lr": 1e-3, "lr_masker": 1}}, "section 'mlo': lr_masker"),
    ({"data": []}, "section 'data' is not an object"),
])  # fmt: skip
def test_run_config_refuses_unknown_keys_and_versions_in_one_line(raw, message):
    with pytest.raises(RunError) as err:
        RunConfig.from_dict(raw)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_every_setting_is_one_cli_option_and_every_option_one_setting():
    from dataclasses import MISSING

    import typer.main

    from maskkit.cli.app import app
    from maskkit.cli.options import EXTRA_OPTIONS
    from maskkit.cli.slurm import OPTIONS as SLURM_OPTIONS

    command = typer.main.get_command(app).commands["pretrain"]
    params = {p.name: p for p in command.params}
    settings = {f.metadata.get("param") or f.name: f for kind in SECTIONS.values() for f in fields(kind)}
    assert set(params) == set(settings) | set(EXTRA_OPTIONS) | set(SLURM_OPTIONS)
    assert not set(SLURM_OPTIONS) & (set(settings) | set(EXTRA_OPTIONS))  # where a job runs is no run setting
    for name, f in settings.items():
        flags = f.metadata.get("flags") or ("--" + f.name.replace("_", "-"),)
        assert params[name].opts[0] == flags[0], name
        assert params[name].help == f.metadata["help"] and f.metadata["help"], name
        if f.default is not MISSING:
            assert params[name].default == f.default, name
        else:  # a dict of options: a repeatable key=value option
            assert params[name].multiple, name


def test_learned_only_settings_are_refused_for_other_policies_before_anything_is_written(tmp_path):
    config = small("random")
    config.mlo.masker_lr = 1e-4
    config.mlo.freeze_masker = True
    with pytest.raises(RunError, match="--masker-lr, --freeze-masker only apply to a learnable policy"):
        create_run(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("change,message", [
    (lambda c: setattr(c.train, "epochs", 1.0), "give --steps or --epochs, not both"),
    (lambda c: setattr(c.train, "amp", "fp8"), "--amp must be one of none, bf16"),
    (lambda c: setattr(c.policy, "mask_ratio", 1.5), "ratio"),
    (lambda c: setattr(c.data, "dataset", "npz:/nonexistent.npz"), "nonexistent"),
    (lambda c: setattr(c.model, "name", "official:/nonexistent/models_mae.py"), "nonexistent"),
    (lambda c: setattr(c.policy, "options", {"speed": 2}), "has no option 'speed'"),
    (lambda c: setattr(c.train, "compile", "turbo"), "--compile must be none or a torch.compile backend"),
    (lambda c: setattr(c.mlo, "darts_paths", "all"), "--darts-paths must be one of both, direct, got 'all'"),
    (lambda c: (setattr(c.mlo, "darts_fd", "forward"), setattr(c.mlo, "hypergrad", "unroll")),
     "--darts-fd: only for --hypergrad darts, got --hypergrad unroll"),
    (lambda c: (setattr(c.mlo, "darts_paths", "direct"), setattr(c.mlo, "level2", "ridge")),
     "--darts-paths applies to --level2 head"),
    (lambda c: setattr(c.mlo, "labeled_batch_size", 0), "--labeled-batch-size must be a positive integer, got 0"),
])  # fmt: skip
def test_bad_configs_fail_in_one_line_and_write_nothing(tmp_path, change, message):
    config = small()
    change(config)
    with pytest.raises(ValueError) as err:
        create_run(config, tmp_path / "run")
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("mlo,labeled", [
    (MLOSettings(), 16),  # the MAE's --batch-size
    (MLOSettings(darts_paths="direct", darts_fd="forward", labeled_batch_size=8), 8),
])  # fmt: skip
def test_the_darts_variant_and_the_labeled_batch_size_reach_the_engine(tmp_path, mlo, labeled):
    config = small("learned", steps=2, hidden_dim=8)
    config.mlo = mlo
    trainer = create_run(config, tmp_path / "run").trainer
    engine = trainer.engine
    assert (engine.config.darts_paths, engine.config.darts_fd) == (mlo.darts_paths, mlo.darts_fd)
    sizes = []

    def counted(source):
        def batch():
            images, labels = source()
            sizes.append((images.shape[0], labels.shape[0]))
            return images, labels
        return batch

    engine.train_batches, engine.val_batches = counted(engine.train_batches), counted(engine.val_batches)
    trainer.step()
    trainer.step()  # the masker step (every 2): one labeled and one validation batch
    assert sizes == [(labeled, labeled)] * 2


# ---- create, train, resume --------------------------------------------------------------------


def test_library_run_equals_the_cli_run_bit_for_bit(tmp_path):
    prepared = create_run(small("learned", hidden_dim=8), tmp_path / "lib")
    summary = train_run(prepared)
    assert summary["steps"] == 6 and (tmp_path / "lib" / "model.pt").is_file()
    result = cli("pretrain", "--dataset", "digits", "--model", "micro", "--policy", "learned", "--learned-hidden-dim",
                 "8", "--steps", 6, "--batch-size", 16, "--log-every", 2, "--ckpt-every", 4, "--device", "cpu",
                 "--out", tmp_path / "cli", "--no-progress")  # fmt: skip
    assert result.exit_code == 0, result.output
    lib, via_cli = (torch.load(tmp_path / d / "model.pt", weights_only=True) for d in ("lib", "cli"))
    for part in ("mae", "policy", "head"):
        assert lib[part].keys() == via_cli[part].keys()
        assert all(torch.equal(lib[part][k], via_cli[part][k]) for k in lib[part])
    record = json.loads((tmp_path / "cli" / CONFIG).read_text())
    assert RunConfig.from_dict(record["config"]) == RunConfig.from_dict(
        json.loads((tmp_path / "lib" / CONFIG).read_text())["config"]
    )


def test_a_stopped_run_resumes_to_the_uninterrupted_result(tmp_path):
    from maskkit.train import StopSignals, TrainingStopped

    train_run(create_run(small("random", steps=8), tmp_path / "whole"))
    stop = StopSignals()
    part = create_run(small("random", steps=8), tmp_path / "part")
    with pytest.raises(TrainingStopped) as stopped:  # a scheduler's SIGTERM after step 5, as the CLI gets it
        train_run(part, stop=stop, on_step=lambda step, metrics: step == 5 and stop.request())
    assert stopped.value.step == 5 and stopped.value.exit_code == 143
    resumed = resume_run(tmp_path / "part")
    assert resumed.source == stopped.value.checkpoint.name and resumed.trainer.step_count == 5
    train_run(resumed)
    a, b = (torch.load(tmp_path / d / "model.pt", weights_only=True)["mae"] for d in ("whole", "part"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "whole" / "metrics.jsonl").read_text() == (tmp_path / "part" / "metrics.jsonl").read_text()
    with pytest.raises(RunError, match="is complete"):
        resume_run(tmp_path / "part")


def _as_format_1(run_dir: Path) -> None:
    """Rewrite config.json as runs written before RunConfig did: flat train section, preset/overrides."""
    raw = json.loads((run_dir / CONFIG).read_text())
    raw.pop("config"), raw.pop("format_version")
    raw["train"].update(raw["train"].pop("mlo"))
    model = raw["model"]
    model["preset"], model["overrides"] = model.pop("name"), model.pop("options")
    (run_dir / CONFIG).write_text(json.dumps(raw))


def test_runs_of_format_1_still_evaluate_and_resume(tmp_path):
    run_dir = tmp_path / "old"
    train_run(create_run(small("learned", steps=4, hidden_dim=8), run_dir))
    _as_format_1(run_dir)
    record = RunRecord.read(run_dir)
    assert record.format_version == 1 and record.config is None and record.train_config.mlo.masker_every == 2
    key, entry = evaluate_run(run_dir, "linear", epochs=1, device="cpu")
    assert key == "linear" and 0 <= entry["top1"] <= 1
    resumed = resume_run(run_dir, steps=6)
    train_run(resumed)
    assert resumed.trainer.step_count == 6


def test_unknown_run_formats_get_one_line(tmp_path):
    run_dir = tmp_path / "future"
    run_dir.mkdir()
    (run_dir / CONFIG).write_text(json.dumps({"format_version": 7, "dataset": {}, "model": {}, "policy": {},
                                              "train": {}}))  # fmt: skip
    with pytest.raises(RunError, match="has run format 7; this maskkit reads formats 1 and 2"):
        RunRecord.read(run_dir)
    (run_dir / CONFIG).write_text(json.dumps({"dataset": {}, "model": {}, "policy": {}, "train": {}, "extra": 1}))
    with pytest.raises(RunError, match="not a maskkit run configuration of format 1 \\(unknown keys extra\\)"):
        RunRecord.read(run_dir)


# ---- the CLI drives every adapter ---------------------------------------------------------------

OFFICIAL = f"official:{EXAMPLES / 'models_mae.py'}:MaskedAutoencoderViT"
OFFICIAL_OPTS = ["--model-opt", "embed_dim=32", "--model-opt", "depth=1", "--model-opt", "num_heads=2",
                 "--model-opt", "decoder_embed_dim=16", "--model-opt", "decoder_depth=1",
                 "--model-opt", "decoder_num_heads=2"]  # fmt: skip
MODELS = {
    "timm": ["--model", "micro"],
    "official": ["--model", OFFICIAL, "--patch-size", "2", *OFFICIAL_OPTS],
    "hf": ["--model", "hf:tiny", "--patch-size", "2"],
}


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.slow
def test_cli_pretrains_resumes_evaluates_and_pictures_every_adapter(tmp_path, kind):
    if kind == "hf":
        pytest.importorskip("transformers")
    run_dir = tmp_path / kind
    common = ["--steps", 4, "--batch-size", 16, "--ckpt-every", 2, "--log-every", 2, "--device", "cpu", "--no-progress"]
    result = cli("pretrain", *MODELS[kind], "--policy", "learned", "--learned-hidden-dim", 8, "--out", run_dir, *common)
    assert result.exit_code == 0, result.output
    record = RunRecord.read(run_dir)
    assert record.model["num_patches"] == 16 and record.format_version == FORMAT_VERSION
    result = cli("pretrain", "--resume", run_dir, "--steps", 6, "--no-progress")
    assert result.exit_code == 0, result.output
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 6
    for protocol in ("linear", "finetune"):
        result = cli("evaluate", run_dir, "--protocol", protocol, "--epochs", 1, "--device", "cpu", "--no-progress")
        assert result.exit_code == 0, result.output
    scores = json.loads((run_dir / "eval.json").read_text())
    assert set(scores) == {"linear", "finetune"}
    result = cli("visualize", run_dir, "-o", tmp_path / f"{kind}.png", "--num-images", 2, "--device", "cpu")
    assert result.exit_code == 0 and (tmp_path / f"{kind}.png").is_file(), result.output
    run = load_run(run_dir, "cpu")  # the trained weights load into a fresh build of the same adapter
    assert run.mae.num_patches == 16


@pytest.mark.parametrize("kind", ["official", "hf"])
def test_cli_other_adapters_with_plain_and_hpm_policies(tmp_path, kind):
    if kind == "hf":
        pytest.importorskip("transformers")
    for policy in ("random", "hpm"):
        result = cli("pretrain", *MODELS[kind], "--policy", policy, "--steps", 3, "--batch-size", 16,
                     "--device", "cpu", "--no-progress", "--out", tmp_path / policy)  # fmt: skip
        assert result.exit_code == 0, result.output


def test_cli_model_errors_are_one_line(tmp_path):
    result = cli("pretrain", "--model", "official:/nonexistent/models_mae.py", "--policy", "random",
                 "--out", tmp_path / "x", "--no-progress")  # fmt: skip
    assert result.exit_code == 1 and "nonexistent" in result.output and "Traceback" not in result.output
    result = cli("pretrain", "--model", "micro", "--model-opt", "depth", "--policy", "random", "--out", tmp_path / "y")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_loaders_give_the_trained_encoder_and_masker(tmp_path):
    from maskkit.run import load_encoder, load_masker

    run_dir = tmp_path / "run"
    train_run(create_run(small("learned", steps=4, hidden_dim=8), run_dir))
    saved = torch.load(run_dir / "model.pt", weights_only=True)
    encoder, masker = load_encoder(run_dir, "cpu"), load_masker(run_dir, "cpu")
    assert all(torch.equal(encoder.state_dict()[k], v) for k, v in saved["mae"].items())
    assert all(torch.equal(masker.state_dict()[k], v) for k, v in saved["policy"].items())
    images = torch.randn(2, 1, 8, 8)
    assert encoder.features(images).shape == (2, encoder.embed_dim)


def test_model_files_are_recorded_by_absolute_path(tmp_path, monkeypatch):
    """official: and hf: specs with relative paths are stored absolute, so the run resumes from anywhere."""
    transformers = pytest.importorskip("transformers")
    transformers.ViTMAEConfig(**{"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                 "intermediate_size": 64, "decoder_hidden_size": 16,
                                 "decoder_num_hidden_layers": 1, "decoder_num_attention_heads": 2,
                                 "decoder_intermediate_size": 32}).to_json_file(tmp_path / "vitmae.json")
    monkeypatch.chdir(tmp_path)
    config = small("random", steps=2)
    config.model = ModelConfig("hf:vitmae.json", patch_size=2)
    train_run(create_run(config, tmp_path / "hf"))
    assert RunRecord.read(tmp_path / "hf").model["name"] == f"hf:{tmp_path / 'vitmae.json'}"
    monkeypatch.chdir(EXAMPLES)  # elsewhere: the run still rebuilds its model
    assert load_run(tmp_path / "hf", "cpu").mae.num_patches == 16


@pytest.mark.parametrize("policy,given,used", [("simmim", None, 0.6), ("simmim", 0.75, 0.75), ("random", None, 0.75)])
def test_the_mask_ratio_defaults_to_the_policy_s_own(tmp_path, policy, given, used):
    from maskkit.run import default_ratio

    config = small(policy)
    config.policy.mask_ratio = given
    prepared = create_run(config, tmp_path / "run")
    assert prepared.record.train["mask_ratio"] == used and prepared.trainer.policy.ratio == used
    assert prepared.record.config["policy"]["mask_ratio"] == given  # the request, as asked
    assert default_ratio(policy) == get_policy_class(policy)().ratio


# ---- the one builder --------------------------------------------------------------------------


def test_a_run_rebuilt_from_its_config_json_is_the_run_that_was_created(tmp_path):
    """create_run (config -> resolved record -> built run) and load_run (config.json -> built run) agree:
    the model's sizes recorded and, from the same global seed, the same untrained MAE and masker."""
    prepared = create_run(small("learned", hidden_dim=8), tmp_path / "run")
    trainer = prepared.trainer
    assert json.loads((tmp_path / "run" / CONFIG).read_text())["model"]["num_patches"] == trainer.mae.num_patches
    torch.manual_seed(0)  # the seed create_run set before it built the policy
    rebuilt = load_run(tmp_path / "run", "cpu", weights=False)
    for made, again in ((trainer.mae, rebuilt.mae), (trainer.policy, rebuilt.policy)):
        assert made.state_dict().keys() == again.state_dict().keys()
        assert all(torch.equal(v, again.state_dict()[k]) for k, v in made.state_dict().items())


def test_the_gallery_s_untrained_run_is_what_pretrain_would_start_from():
    """The policy gallery without a run: the micro MAE initialised from --seed, the train split's statistics
    as computed here independently, no augmentation, random masking at the gallery's ratio."""
    from maskkit.adapters.timm import create_mae
    from maskkit.data import channel_stats, load_dataset, make_splits
    from maskkit.run import untrained_run

    run = untrained_run("digits", None, "micro", 3, 0.6, torch.device("cpu"))
    data = load_dataset("digits")
    splits = make_splits(data, 3)
    assert (run.splits["test"] == splits["test"]).all()
    assert (run.batcher.mean, run.batcher.std) == channel_stats(data, splits["train"])
    assert run.batcher.augment == "none" and run.policy.ratio == 0.6
    mae = create_mae("micro", img_size=8, patch_size=2, in_chans=1, seed=3)
    assert all(torch.equal(v, run.mae.state_dict()[k]) for k, v in mae.state_dict().items())
