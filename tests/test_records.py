"""Strict run records (issue 25, item 2): metrics.jsonl, config.json and checkpoints are checked, never
silently trusted. Every case is a real file on disk; through the CLI a bad one is exactly one line
naming the file (and the line or field), and a good run resumes to the uninterrupted result."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from test_cli import invoke, one_thread  # noqa: F401 - one torch thread for the module, the CLI runner
from typer.testing import CliRunner

from maskkit.checkpoint import (
    CheckpointError,
    UnverifiedCheckpointError,
    checkpoint_path,
    is_verified,
    load_checkpoint,
    load_latest,
    save_checkpoint,
)
from maskkit.run import (
    CONFIG,
    DataConfig,
    PolicyConfig,
    RunConfig,
    RunError,
    RunRecord,
    create_run,
    resume_run,
)
from maskkit.train import TrainSettings
from maskkit.train.metrics import MetricsError, MetricsLog

runner = CliRunner()
GOLDEN = Path(__file__).resolve().parent / "golden" / "run-v2"
#: the default micro model on 8x8 digits: a line every step, checkpoints at 3 and 6
FAST = ["--steps", "6", "--batch-size", "32", "--log-every", "1", "--ckpt-every", "3", "--no-progress"]




def ok(*args):
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result


def fails(message: str, *args) -> None:
    """Exit 1 with exactly one line on stderr, 'Error: ...' containing `message`, no traceback."""
    result = invoke(*args)
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.output


def snapshot(directory: Path) -> dict[str, str]:
    """Every file of the run but its lock file (which names the last process that took the lock)."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != ".lock"}  # fmt: skip


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """A finished 6-step run: the uninterrupted reference."""
    run = tmp_path_factory.mktemp("runs") / "full"
    ok("pretrain", "--policy", "random", "--out", run, *FAST)
    return run


def crashed(full: Path, where: Path, *, metrics_lines: int = 6, newest: bool = True) -> Path:
    """A copy of `full` as if killed after step 6's checkpoint (`newest`) or step 3's: no model.pt, no summary."""
    shutil.copytree(full, where)
    (where / "model.pt").unlink()
    (where / "model.pt.sha256").unlink()
    (where / "summary.json").unlink()
    if not newest:
        for name in ("checkpoint-0000006.pt", "checkpoint-0000006.pt.sha256"):
            (where / "checkpoints" / name).unlink()
    lines = (full / "metrics.jsonl").read_bytes().splitlines(keepends=True)
    (where / "metrics.jsonl").write_bytes(b"".join(lines[:metrics_lines]))
    return where


# ---- metrics.jsonl ---------------------------------------------------------------------------


def write_lines(path: Path, *lines: str, newline: bool = True) -> Path:
    path.write_text("\n".join(lines) + ("\n" if newline else ""))
    return path


def test_truncate_keeps_exactly_the_lines_up_to_the_step_byte_for_byte(tmp_path):
    lines = ['{"loss": 1.0, "step": 1}', '{"step": 2, "x": 0.1}', '{"loss": 0.30000000000000004, "step": 3}',
             '{"step": 4}']  # fmt: skip
    log = MetricsLog(write_lines(tmp_path / "metrics.jsonl", *lines))
    assert [r["step"] for r in log.read()] == [1, 2, 3, 4]
    assert log.truncate_after(3) == []
    assert log.path.read_text() == "\n".join(lines[:3]) + "\n"
    assert log.truncate_after(0) == [] and log.path.read_bytes() == b""


def test_a_corrupt_middle_line_is_an_error_naming_file_and_line_not_a_silent_drop(tmp_path):
    path = write_lines(tmp_path / "metrics.jsonl", '{"step": 1}', '{"step": 2, "lo', '{"step": 3}')
    before = path.read_bytes()
    with pytest.raises(MetricsError, match=r"metrics.jsonl line 2 is not a metrics record: not JSON"):
        MetricsLog(path).truncate_after(3)
    assert path.read_bytes() == before  # the valid line 3 is still there


@pytest.mark.parametrize(
    "line, why",
    [("[1, 2]", "a JSON list, not an object"), ('"step"', "a JSON str, not an object"),
     ('{"loss": 1.0}', "no integer 'step'"), ('{"step": "2"}', "'step' is \"2\", not an integer"),
     ('{"step": 2.0}', "'step' is 2.0, not an integer"), ('{"step": true}', "'step' is true, not an integer"),
     ("", "not JSON")],
)  # fmt: skip
def test_a_line_that_is_no_record_is_an_error_unless_it_is_a_torn_last_line(tmp_path, line, why):
    path = write_lines(tmp_path / "metrics.jsonl", '{"step": 1}', line, '{"step": 3}')
    with pytest.raises(MetricsError, match=f"line 2 is not a metrics record: {why}") as info:
        MetricsLog(path).read()
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    # the same text as the last line of a file that ends with a newline: still an error
    write_lines(path, '{"step": 1}', line)
    if line:  # (an empty last line before the final newline would be two newlines: a blank line 2)
        with pytest.raises(MetricsError, match="line 2 is not a metrics record"):
            MetricsLog(path).read()


def test_a_torn_last_line_is_dropped_with_a_warning(tmp_path):
    path = write_lines(tmp_path / "metrics.jsonl", '{"step": 1}', '{"step": 2}', '{"loss": 0.5, "st', newline=False)
    log = MetricsLog(path)
    assert [r["step"] for r in log.read()] == [1, 2]
    warnings = log.truncate_after(5)
    assert len(warnings) == 1 and f"{path} line 3 was cut short by a crash" in warnings[0]
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
    # a complete record whose newline was not written is kept (and gets its newline)
    write_lines(path, '{"step": 1}', '{"step": 2}', newline=False)
    assert log.truncate_after(5) == [] and path.read_text() == '{"step": 1}\n{"step": 2}\n'
    # non-UTF-8 bytes: torn at the end is dropped, in the middle it is an error
    path.write_bytes(b'{"step": 1}\n{"st\xff\xfe')
    assert log.read() == [{"step": 1}]
    path.write_bytes(b'{"step": 1}\n\xff\xfe\n{"step": 3}\n')
    with pytest.raises(MetricsError, match="line 2 is not a metrics record: not UTF-8 text"):
        log.read()


def test_interleaved_steps_of_two_writers_are_an_error(tmp_path):
    path = write_lines(tmp_path / "metrics.jsonl", *(json.dumps({"step": s}) for s in (5, 10, 15, 15, 20, 20)))
    with pytest.raises(MetricsError, match="line 4 has step 15 after step 15"):
        MetricsLog(path).truncate_after(20)


def test_resume_refuses_a_corrupt_middle_line_in_one_line_and_changes_nothing(full, tmp_path):
    run = crashed(full, tmp_path / "run", newest=False)
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    lines[1] = "[1, 2]\n"  # a JSON list: a traceback before
    (run / "metrics.jsonl").write_text("".join(lines))
    before = snapshot(run)
    fails(f"{run / 'metrics.jsonl'} line 2 is not a metrics record: a JSON list, not an object",
          "pretrain", "--resume", run)  # fmt: skip
    assert snapshot(run) == before
    lines[1] = '{"epoch": 0.05, "lo\n'  # not JSON, with the valid lines after it
    (run / "metrics.jsonl").write_text("".join(lines))
    before = snapshot(run)
    fails(f"{run / 'metrics.jsonl'} line 2 is not a metrics record: not JSON", "pretrain", "--resume", run)
    assert snapshot(run) == before


def test_resume_after_a_torn_metrics_write_drops_it_with_a_warning_and_matches_the_full_run(full, tmp_path):
    run = crashed(full, tmp_path / "run", metrics_lines=4, newest=False)  # killed while writing step 5's line
    line5 = (full / "metrics.jsonl").read_bytes().splitlines(keepends=True)[4]
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(line5[: len(line5) // 2])
    result = ok("pretrain", "--resume", run)
    assert f"Warning: {run / 'metrics.jsonl'} line 5 was cut short by a crash" in result.stderr
    assert (run / "metrics.jsonl").read_bytes() == (full / "metrics.jsonl").read_bytes()
    assert load_checkpoint(run / "model.pt")["mae"].keys() == load_checkpoint(full / "model.pt")["mae"].keys()
    a, b = load_checkpoint(run / "model.pt")["mae"], load_checkpoint(full / "model.pt")["mae"]
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---- config.json -----------------------------------------------------------------------------


def edit_config(run: Path, change) -> None:
    raw = json.loads((run / CONFIG).read_text())
    change(raw)
    (run / CONFIG).write_text(json.dumps(raw, indent=2))


def drop(*keys):
    def change(raw):
        for key in keys[:-1]:
            raw = raw[key]
        del raw[keys[-1]]

    return change


def put(value, *keys):
    def change(raw):
        for key in keys[:-1]:
            raw = raw[key]
        raw[keys[-1]] = value

    return change


def test_a_40_step_run_with_train_steps_deleted_does_not_resume_toward_1000(tmp_path):
    run = tmp_path / "forty"
    create_run(RunConfig(data=DataConfig("digits"), policy=PolicyConfig("random"),
                         train=TrainSettings(steps=40, batch_size=16, ckpt_every=10)), run)  # fmt: skip
    assert resume_run(run).trainer.config.steps == 40  # intact: it would start over toward 40
    edit_config(run, drop("train", "steps"))
    before = snapshot(run)
    fails(f"{run / CONFIG}: field train.steps is missing", "pretrain", "--resume", run)
    with pytest.raises(RunError, match="field train.steps is missing"):
        resume_run(run)
    assert snapshot(run) == before


@pytest.mark.parametrize(
    "change, message",
    [
        (drop("config", "train", "lr"), "field config.train.lr is missing"),
        (drop("config", "data"), "field config.data is missing"),
        (drop("dataset", "splits"), "field dataset.splits is missing"),
        (drop("model", "patch_size"), "field model.patch_size is missing"),
        (drop("policy", "learnable"), "field policy.learnable is missing"),
        (drop("train", "mlo", "masker_lr"), "field train.mlo.masker_lr is missing"),
        (drop("device"), "field device is missing"),
        (drop("versions"), "field versions is missing"),
        (drop("command"), "field command is missing"),
        (put("forty", "train", "steps"), 'field train.steps must be an integer, got "forty"'),
        (put(40.0, "train", "steps"), "field train.steps must be an integer, got 40.0"),
        (put(True, "train", "seed"), "field train.seed must be an integer, got true"),
        (put(None, "train", "lr"), "field train.lr must be a finite number, got null"),
        (put(float("inf"), "config", "train", "lr"), "field config.train.lr must be a finite number or null, got Infinity"),
        (put("0.1", "config", "train", "weight_decay"), "field config.train.weight_decay must be a finite number"),
        (put(7, "config", "data", "dataset"), "field config.data.dataset must be a string, got 7"),
        (put("8", "model", "patch_size"), "field model.patch_size must be an integer, got \"8\""),
        (put([8, "8"], "dataset", "image_size"), "field dataset.image_size must be a list of integers"),
        (put({"train": "x"}, "dataset", "splits"), "field dataset.splits must be an object of integers"),
        (put("yes", "policy", "learnable"), "field policy.learnable must be true or false"),
        (put([], "train", "mlo"), "field train.mlo must be an object, got []"),
        (put("cpu", "command"), "field command must be a list of strings"),
        (put(1, "dataset", "fingerprint"), "field dataset.fingerprint must be an object, got 1"),
        (put(1, "dataset", "extra"), "unknown field dataset.extra"),
        (put(1, "config", "train", "extra"), "unknown field config.train.extra"),
        (put(3, "config", "version"), "field config.version is 3, not 2"),
    ],
)  # fmt: skip
def test_every_field_of_format_2_is_required_and_typed(full, tmp_path, change, message):
    run = tmp_path / "run"
    shutil.copytree(full, run)
    RunRecord.read(run)
    edit_config(run, change)
    with pytest.raises(RunError) as info:
        RunRecord.read(run)
    text = str(info.value)
    assert text.startswith(f"{run / CONFIG}: ") and message in text and "\n" not in text, text


def test_evaluate_and_visualize_refuse_a_mistyped_config_in_one_line(full, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(full, run)
    edit_config(run, put("32", "train", "batch_size"))
    before = snapshot(run)
    fails(f"{run / CONFIG}: field train.batch_size must be an integer", "evaluate", run, "--epochs", "1")
    fails(f"{run / CONFIG}: field train.batch_size must be an integer", "visualize", run, "-o", tmp_path / "m.png")
    assert snapshot(run) == before


def test_a_binary_config_json_is_one_line_naming_the_file(full, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(full, run)
    (run / CONFIG).write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe" + bytes(range(256)))
    fails(f"{run / CONFIG} is not a maskkit run configuration: not UTF-8 text", "pretrain", "--resume", run)
    fails(f"{run / CONFIG} is not a maskkit run configuration: not UTF-8 text", "evaluate", run)


def test_the_golden_format_2_run_still_reads_and_only_later_fields_may_be_absent(tmp_path):
    record = RunRecord.read(GOLDEN)  # written before mlo.hypergrad_options existed
    assert record.format_version == 2 and "hypergrad_options" not in record.train["mlo"]
    assert record.train_config.mlo.hypergrad_options == {}
    run = tmp_path / "old"
    shutil.copytree(GOLDEN, run)
    edit_config(run, drop("train", "mlo", "head_lr"))  # present from the start: required
    with pytest.raises(RunError, match="field train.mlo.head_lr is missing"):
        RunRecord.read(run)


def test_format_1_runs_read_as_before(full, tmp_path):
    run = tmp_path / "v1"
    shutil.copytree(full, run)

    def as_format_1(raw):
        raw.pop("config"), raw.pop("format_version")
        raw["train"].update(raw["train"].pop("mlo"))
        raw["train"].pop("steps")  # format 1 never checked its fields: still its default
        raw["model"]["preset"], raw["model"]["overrides"] = raw["model"].pop("name"), raw["model"].pop("options")

    edit_config(run, as_format_1)
    record = RunRecord.read(run)
    assert record.format_version == 1 and record.train_config.steps == 1000


def format_1(raw):
    """config.json as format 1 wrote it: no `config`, `mlo` flat in `train`, the model's old key names."""
    raw.pop("config"), raw.pop("format_version")
    raw["train"].update(raw["train"].pop("mlo"))
    raw["model"]["preset"], raw["model"]["overrides"] = raw["model"].pop("name"), raw["model"].pop("options")


def rename(section, old, new):
    def change(raw):
        raw[section][new] = raw[section].pop(old)

    return change


@pytest.mark.parametrize("section, old, new, message", [
    ("dataset", "name", "dataset", "field dataset.name is missing"),
    ("dataset", "split_seed", "seed", "field dataset.split_seed is missing"),
    ("dataset", "splits", "split_sizes", "field dataset.splits is missing"),
    ("policy", "name", "policy", "field policy.name is missing"),
    ("train", "mask_ratio", "ratio", "unknown training setting(s): ratio"),
])  # fmt: skip
def test_a_renamed_field_of_a_format_1_run_is_one_line_naming_the_file_and_the_field(full, tmp_path, section, old,
                                                                                      new, message):
    """Format 1 records no schema, but what the code reads is read into typed objects once, by name: a field
    renamed is refused where the file is read, naming it, not a KeyError (or a default) later."""
    run = tmp_path / "v1"
    shutil.copytree(full, run)
    edit_config(run, format_1)
    assert RunRecord.read(run).resolved.data.name == "digits"  # format 1 itself reads
    edit_config(run, rename(section, old, new))
    before = snapshot(run)
    with pytest.raises(RunError) as info:
        RunRecord.read(run)
    assert str(info.value) == f"{run / CONFIG}: {message}"
    fails(f"{run / CONFIG}: {message}", "evaluate", run, "--epochs", "1", "--no-progress")
    fails(f"{run / CONFIG}: {message}", "pretrain", "--resume", run)
    assert snapshot(run) == before


def test_the_typed_record_mirrors_the_format_2_schema_field_by_field():
    """A field renamed in the typed objects but not in the schema (or back) fails here, not in a user's run."""
    from typing import get_type_hints

    from maskkit.run import FORMAT_2, DatasetRecord, PolicyRecord

    for kind, section in ((DatasetRecord, "dataset"), (PolicyRecord, "policy")):
        hints = get_type_hints(kind)
        for name, hint in hints.items():
            assert name in FORMAT_2[section], f"{kind.__name__}.{name} is not config.json's {section}.{name}"
            assert hint == FORMAT_2[section][name] or hint == FORMAT_2[section][name] | None, name
    record = RunRecord.read(GOLDEN)
    data = record.resolved.data
    assert all(getattr(data, key) == value for key, value in record.dataset.items())  # every field as recorded
    assert "split_rule" not in record.dataset and data.split_rule is None  # added since: what the run ran with
    assert record.asked == RunConfig.from_dict(record.config)
    typed = record.resolved.train.to_dict()  # the typed view keeps every number (and adds the later defaults)
    assert all(typed[k] == v for k, v in record.train.items() if k != "mlo")
    assert all(typed["mlo"][k] == v for k, v in record.train["mlo"].items())
    assert record.to_json() == (GOLDEN / CONFIG).read_text()  # and the file is written back byte for byte


# ---- checkpoints without their .sha256 -------------------------------------------------------


def test_load_checkpoint_refuses_a_file_without_its_sidecar_unless_trusted(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"step": 1, "w": torch.ones(4)})
    Path(f"{path}.sha256").unlink()
    assert not is_verified(path)
    with pytest.raises(UnverifiedCheckpointError, match=r"c.pt is unverified: its checksum file c.pt.sha256 is missing"):
        load_checkpoint(path)
    assert torch.equal(load_checkpoint(path, trust_unverified=True)["w"], torch.ones(4))
    # its tensors overwritten (and the sidecar deleted): refused all the same
    torch.save({"step": 1, "w": torch.zeros(4)}, path)
    with pytest.raises(UnverifiedCheckpointError):
        load_checkpoint(path)
    # trusting skips only the missing sidecar: a sidecar that disagrees is still a corrupt file
    Path(f"{path}.sha256").write_text("0" * 64 + "\n")
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_checkpoint(path, trust_unverified=True)
    Path(f"{path}.sha256").write_bytes(b"\xff\xfe\x00")  # a binary sidecar: a mismatch, not a codec error
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_checkpoint(path)


def test_load_latest_falls_back_to_the_newest_verified_checkpoint(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(checkpoint_path(tmp_path, step), {"step": step})
    Path(f"{checkpoint_path(tmp_path, 3)}.sha256").unlink()
    path, state, skipped = load_latest(tmp_path)
    assert state["step"] == 2 and len(skipped) == 1 and "checkpoint-0000003.pt is unverified" in skipped[0]
    path, state, skipped = load_latest(tmp_path, trust_unverified=True)
    assert state["step"] == 3 and skipped == []
    for step in (1, 2):
        Path(f"{checkpoint_path(tmp_path, step)}.sha256").unlink()
    with pytest.raises(UnverifiedCheckpointError, match="checkpoint-0000003.pt is unverified"):
        load_latest(tmp_path)


def test_resume_skips_a_newest_checkpoint_without_its_sidecar_and_matches_the_full_run(full, tmp_path):
    run = crashed(full, tmp_path / "run")
    newest = run / "checkpoints" / "checkpoint-0000006.pt"
    Path(f"{newest}.sha256").unlink()
    result = ok("pretrain", "--resume", run)
    assert f"Warning: skipped checkpoint {newest} is unverified" in result.stderr
    assert "from checkpoint-0000003.pt (step 3)" in " ".join(result.stdout.split())
    assert (run / "metrics.jsonl").read_bytes() == (full / "metrics.jsonl").read_bytes()
    assert is_verified(newest)  # rewritten with its sidecar


def test_resume_with_only_unverified_checkpoints_refuses_unless_trusted(full, tmp_path):
    run = crashed(full, tmp_path / "run", metrics_lines=3, newest=False)
    ckpt = run / "checkpoints" / "checkpoint-0000003.pt"
    Path(f"{ckpt}.sha256").unlink()
    before = snapshot(run)
    fails(f"cannot resume {run}: checkpoint {ckpt} is unverified: its checksum file checkpoint-0000003.pt.sha256 "
          "is missing, so it is not trusted (--trust-unverified uses it)", "pretrain", "--resume", run)  # fmt: skip
    assert snapshot(run) == before
    fails("--trust-unverified only applies with --resume", "pretrain", "--trust-unverified", "--out",
          tmp_path / "new", *FAST)  # fmt: skip
    assert not (tmp_path / "new").exists()
    result = ok("pretrain", "--resume", run, "--trust-unverified")
    assert "Warning: trusting checkpoint-0000003.pt without its checksum file" in result.stderr
    assert (run / "metrics.jsonl").read_bytes() == (full / "metrics.jsonl").read_bytes()
    with pytest.raises(RunError, match="is complete"):
        resume_run(run, trust_unverified=True)


def test_evaluate_and_visualize_refuse_a_model_pt_without_its_sidecar(full, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(full, run)
    (run / "model.pt.sha256").unlink()
    before = snapshot(run)
    message = f"checkpoint {run / 'model.pt'} is unverified: its checksum file model.pt.sha256 is missing"
    fails(message, "evaluate", run, "--epochs", "1")
    fails(message, "visualize", run, "-o", tmp_path / "m.png")
    assert snapshot(run) == before and not (tmp_path / "m.png").exists()
