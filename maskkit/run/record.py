"""The run directory's files and its record, config.json: the `RunConfig` asked for and what it resolved to.

A run directory holds `config.json` (`RunRecord`), `metrics.jsonl`, `perf.jsonl` (throughput: wall
clock, so kept out of metrics.jsonl, the reproducible record), `checkpoints/checkpoint-<step>.pt`
(+ `.sha256`), `model.pt` (final weights), `summary.json`, with `--log tensorboard` `tensorboard/`, and
later `eval.json` (merged under the lock
`.eval.json.lock`, `merge_json`) and pictures. This
module names those files and reads and writes the record; runs of format 1 (before `RunConfig`)
still read as they always did. A record of format 2 is checked against `FORMAT_2`: every field
present and of its type (a one-line RunError naming it, never a default), except the few fields
added to format 2 after its first runs (`ADDED_IN_FORMAT_2`). Either format is then read once into
typed objects, `RunRecord.asked` (a `RunConfig`) and `RunRecord.resolved` (`DatasetRecord`,
`PolicyRecord`, `TrainConfig`), which the code reads instead of picking keys out of dicts: a field
that is missing or renamed is refused where the file is read, naming the file and the field.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from maskkit.checkpoint import atomic_write_text
from maskkit.locking import locked
from maskkit.train import TrainConfig
from maskkit.train.config import RECORD_KEYS, MLOSettings, Resolved, TrainSettings
from maskkit.train.loggers import TENSORBOARD_DIR
from maskkit.train.trainer import PERF_FILE

from .config import FORMAT_VERSION, SECTIONS, RunConfig, RunError

__all__ = [
    "ADDED_IN_FORMAT_2", "CHECKPOINTS", "CONFIG", "EVAL", "FORMAT_2", "METRICS", "MODEL", "PERF", "SUMMARY",
    "TENSORBOARD", "DatasetRecord", "PolicyRecord", "ResolvedRecord", "RunRecord",
    "check_record", "check_writable", "merge_json",
]  # fmt: skip

CONFIG = "config.json"
METRICS = "metrics.jsonl"
PERF = PERF_FILE  # perf.jsonl
TENSORBOARD = TENSORBOARD_DIR  # tensorboard/
MODEL = "model.pt"
SUMMARY = "summary.json"
EVAL = "eval.json"
CHECKPOINTS = "checkpoints"


@dataclass(frozen=True)
class DatasetRecord:
    """config.json's `dataset`, typed: the data the run resolved to.

    The fields without a default are in every run's record; those with one were added after the first
    runs (format 1, or `ADDED_IN_FORMAT_2`), and a run without one ran with the default. The sizes
    shown by the banner (None: not recorded) were added in format 2.
    """

    name: str
    split_seed: int
    split_fractions: dict[str, float]
    splits: dict[str, int]
    mean: list[float]
    std: list[float]
    augment: str
    data_dir: str | None = None
    img_size_override: int | None = None
    labeled: bool = True
    layout: str | None = None
    split_rule: str | None = None
    stats: str | None = None
    fingerprint: dict[str, Any] | None = None
    image_size: list[int] | None = None
    in_chans: int | None = None
    num_images: int | None = None
    num_classes: int | None = None
    num_frames: int | None = None  # a video source's frames per clip; None: images


@dataclass(frozen=True)
class PolicyRecord:
    """config.json's `policy`, typed: the policy, its options as its constructor takes them."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    learnable: bool = False


@dataclass(frozen=True)
class ResolvedRecord:
    """What a run resolved to, typed: its data, policy and training (`TrainConfig`: steps, mask ratio, ...).

    The model's section stays the builder's spec (`record.model`, read by `maskkit.adapters.models`)."""

    data: DatasetRecord
    policy: PolicyRecord
    train: TrainConfig


@dataclass
class RunRecord:
    """The content of config.json: the `RunConfig` asked for and the sections it resolved to.

    `dataset` (statistics, splits), `model` (builder, sizes, init seed), `policy` (name, typed
    options), `train` (`TrainConfig`), `device`, `versions`, `command`. Runs written before
    format 2 have no `config`; they load and resume all the same.

    The sections are kept as read (`to_json` writes them back byte for byte); the code reads them
    through `asked` (the `RunConfig`) and `resolved` (`ResolvedRecord`), typed objects made once, when the
    file is read, so a field that is missing or renamed is a one-line RunError naming the file and the
    field, never a default picked by a string key.
    """

    dataset: dict[str, Any]
    model: dict[str, Any]
    policy: dict[str, Any]
    train: dict[str, Any]
    device: str = "cpu"
    versions: dict[str, str] = field(default_factory=dict)
    command: list[str] = field(default_factory=list)
    config: dict[str, Any] | None = None
    format_version: int = 1

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @property
    def train_config(self) -> TrainConfig:
        """A fresh `TrainConfig` of the record's `train` (the trainer's own copy: it may extend the steps)."""
        return _train_config(self.train, CONFIG)

    @property
    def asked(self) -> RunConfig:
        """config.json's `config`: the settings as asked for, those the resolved sections do not keep
        included (--blr, --log, --channels-last, --num-workers, ...). A run of format 1 has none: the
        defaults, what such a run ran with for every one of them."""
        return self._views(CONFIG)[0]

    @property
    def resolved(self) -> ResolvedRecord:
        """The resolved sections `dataset`, `policy` and `train`, typed."""
        return self._views(CONFIG)[1]

    def extend_to(self, steps: int) -> None:
        """Set the run's length (config.json's `train.steps`; `write` keeps it)."""
        self.train["steps"] = int(steps)
        self.__dict__.pop("_typed", None)

    def _views(self, path: str | Path) -> tuple[RunConfig, ResolvedRecord]:
        """(asked, resolved), made from the sections once; a one-line RunError naming `path` and the field."""
        cached = self.__dict__.get("_typed")
        if cached is None:
            asked = RunConfig() if self.config is None else _one_line_at(path, RunConfig.from_dict, self.config)
            resolved = ResolvedRecord(_typed(DatasetRecord, self.dataset, path, "dataset"),
                                      _typed(PolicyRecord, self.policy, path, "policy"),
                                      _train_config(self.train, path))  # fmt: skip
            cached = self.__dict__["_typed"] = (asked, resolved)
        return cached

    @classmethod
    def read(cls, run_dir: str | Path) -> RunRecord:
        """config.json of `run_dir`; a one-line RunError for a missing, foreign or newer file."""
        path = Path(run_dir) / CONFIG
        if not Path(run_dir).is_dir():
            raise RunError(f"run directory {run_dir} does not exist")
        if not path.is_file():
            raise RunError(f"{run_dir} is not a run directory (no {CONFIG})")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as err:
            raise RunError(f"{path} is not a maskkit run configuration: not UTF-8 text (byte {err.start})") from None
        except json.JSONDecodeError as err:
            raise RunError(f"{path} is not a maskkit run configuration: {err}") from None
        if not isinstance(raw, dict):
            raise RunError(f"{path} is not a maskkit run configuration")
        version = raw.get("format_version", 1)
        if isinstance(version, bool) or version not in (1, FORMAT_VERSION):
            raise RunError(f"{path} has run format {version!r}; this maskkit reads formats 1 and {FORMAT_VERSION}")
        unknown = sorted(set(raw) - {f.name for f in fields(cls)})
        missing = sorted({"dataset", "model", "policy", "train"} - set(raw))
        if unknown or missing:
            what = f"unknown keys {', '.join(unknown)}" if unknown else f"missing {', '.join(missing)}"
            raise RunError(f"{path} is not a maskkit run configuration of format {version} ({what})")
        if version == FORMAT_VERSION:
            check_record(raw, path)
        record = cls(**raw)
        record._views(path)  # typed once, here: a missing or renamed field is refused naming the file
        return record

    def write(self, run_dir: Path) -> None:
        """Write config.json into `run_dir`, atomically."""
        atomic_write_text(run_dir / CONFIG, self.to_json())


def _typed(kind: type, raw: Any, path: str | Path, section: str) -> Any:
    """The dataclass `kind` of the section `raw`: each of its fields read by name and of its type; a field
    without a default that is missing, or a value of another type, is a one-line RunError naming `path`
    and the field. Other keys (format 1's own) are left to the section's readers."""
    if not isinstance(raw, dict):
        raise RunError(f"{path}: field {section} must be an object, got {_show(raw)}")
    hints, values = typing.get_type_hints(kind), {}
    for f in fields(kind):
        if f.name not in raw:
            if f.default is MISSING and f.default_factory is MISSING:
                raise RunError(f"{path}: field {section}.{f.name} is missing")
            continue
        if not _fits(raw[f.name], hints[f.name]):
            raise RunError(f"{path}: field {section}.{f.name} must be {_describe(hints[f.name])}, "
                           f"got {_show(raw[f.name])}")  # fmt: skip
        values[f.name] = raw[f.name]
    return kind(**values)


def _train_config(raw: Any, path: str | Path) -> TrainConfig:
    """`TrainConfig.from_dict` of config.json's `train`; its refusal one line naming `path`."""
    if not isinstance(raw, dict):
        raise RunError(f"{path}: field train must be an object, got {_show(raw)}")
    return _one_line_at(path, TrainConfig.from_dict, raw)


def _one_line_at(path: str | Path, read: Any, raw: Any) -> Any:
    """`read(raw)`; a ValueError or TypeError raised by it becomes a RunError naming `path`."""
    try:
        return read(raw)
    except (ValueError, TypeError) as err:
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RunError(text if text.startswith(f"{path}") else f"{path}: {text}") from None


# ---- the schema of format 2 ------------------------------------------------------------------

#: a schema: field -> its type (int, str | None, list[float], ...), or the schema of a nested object
Schema = dict[str, Any]


def _section(kind: type) -> Schema:
    """The schema of a settings dataclass: its fields' annotated types."""
    hints = typing.get_type_hints(kind)
    return {f.name: hints[f.name] for f in fields(kind)}


def _train() -> Schema:
    """config.json `train` (`TrainConfig.to_dict`): the settings, what they resolved to, the mlo section."""
    own, resolved = _section(TrainSettings), _section(Resolved)
    return {k: _section(MLOSettings) if k == "mlo" else resolved.get(k, own.get(k)) for k in RECORD_KEYS}


#: format 2's config.json, every field required (but ADDED_IN_FORMAT_2)
FORMAT_2: Schema = {
    "format_version": int,
    "config": {**{name: _section(kind) for name, kind in SECTIONS.items()}, "version": int},
    "dataset": {
        "name": str, "data_dir": str | None, "img_size_override": int | None, "image_size": list[int],
        "in_chans": int, "num_images": int, "num_classes": int, "labeled": bool, "layout": str | None,
        "mean": list[float], "std": list[float], "augment": str, "split_seed": int,
        "split_fractions": dict[str, float], "splits": dict[str, int], "split_rule": str, "stats": str,
        "fingerprint": dict[str, Any], "num_frames": int,
    },
    "model": {
        "name": str, "options": dict[str, Any], "img_size": int | list[int], "patch_size": int, "in_chans": int,
        "norm_pix_loss": bool, "init_seed": int, "num_patches": int, "embed_dim": int, "num_frames": int,
    },
    "policy": {"name": str, "options": dict[str, Any], "learnable": bool},
    "train": _train(),
    "device": str,
    "versions": dict[str, str],
    "command": list[str],
}  # fmt: skip

#: fields added to format 2 after its first runs were written; a run without one ran without that setting
ADDED_IN_FORMAT_2 = frozenset({
    "config.mlo.hypergrad_options", "train.mlo.hypergrad_options", "dataset.fingerprint",
    # the data issue (22): workers, skipped files, the official layout's split rule, the statistics' origin
    "config.data.num_workers", "config.data.skip_bad_images", "dataset.split_rule", "dataset.stats",
    # the official MAE recipe's flags (issue 22): a run without them ran with 1, none, 0 and none
    "config.train.accum_iter", "config.train.blr", "config.train.min_lr", "config.train.warmup_epochs",
    "train.accum_iter", "train.min_lr",
    # the cluster issue (23): a run without them ran in the default (contiguous) layout and logged to
    # metrics.jsonl alone
    "config.train.channels_last", "config.train.log", "config.train.log_images_every",
    # the video issue (31): a run without them decoded every hidden patch, of images (no frames)
    "config.train.decoder_ratio", "config.train.decoder_rule", "train.decoder_ratio", "train.decoder_rule",
    "config.data.num_frames", "config.data.sampling_rate", "dataset.num_frames", "model.num_frames",
})  # fmt: skip

_NAMES = {int: "an integer", float: "a finite number", str: "a string", bool: "true or false",
          type(None): "null", dict: "an object", list: "a list", Any: "anything"}  # fmt: skip


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is list:
        return f"a list of {_describe(args[0]).removeprefix('an ').removeprefix('a ')}s"
    if origin is dict:
        return f"an object of {_describe(args[1]).removeprefix('an ').removeprefix('a ')}s" if args[1] is not Any \
            else "an object"
    return _NAMES[hint]


def _fits(value: Any, hint: Any) -> bool:
    """Whether the JSON `value` is of type `hint` (a bool is no number; a number must be finite)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin is list:
        return isinstance(value, list) and all(_fits(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_fits(v, args[1]) for v in value.values())
    if hint is Any:
        return True
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _show(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_record(raw: dict[str, Any], path: str | Path, schema: Schema = FORMAT_2, where: str = "") -> None:
    """Every field of `schema` present in `raw` and of its type, and no other; a one-line RunError naming it."""
    for key, hint in schema.items():
        name = where + key
        if key not in raw:
            if name in ADDED_IN_FORMAT_2:
                continue
            raise RunError(f"{path}: field {name} is missing (a run of format {FORMAT_VERSION} records every field)")
        if isinstance(hint, dict):
            if not isinstance(raw[key], dict):
                raise RunError(f"{path}: field {name} must be an object, got {_show(raw[key])}")
            check_record(raw[key], path, hint, name + ".")
        elif not _fits(raw[key], hint):
            raise RunError(f"{path}: field {name} must be {_describe(hint)}, got {_show(raw[key])}")
    unknown = sorted(set(raw) - set(schema))
    if unknown:
        raise RunError(f"{path}: unknown field {where}{unknown[0]} (not in run format {FORMAT_VERSION})")
    if where == "" and raw["config"]["version"] != FORMAT_VERSION:
        raise RunError(f"{path}: field config.version is {raw['config']['version']}, not {FORMAT_VERSION}")


def holds_a_run(directory: Path) -> bool:
    """Whether `directory` already holds a run's files."""
    return any((directory / name).exists() for name in (CONFIG, METRICS, MODEL, CHECKPOINTS))


def check_writable(directory: Path) -> None:
    """Create `directory` if needed and prove a file can be written there; RunError otherwise."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        reason = err.strerror or str(err)
        raise RunError(f"cannot write to output directory {directory}: {reason}") from None


def write_json(path: Path, value: Any) -> None:
    """`value` as indented, key-sorted JSON at `path`, written atomically."""
    atomic_write_text(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


def merge_json(path: Path, key: str, value: Any) -> dict[str, Any]:
    """Set `key` in the JSON object at `path` (created if absent), written atomically.

    The read-modify-write holds an exclusive flock on the sibling `.<name>.lock` (`maskkit.locking.locked`),
    so two processes merging into one file (two `evaluate`s of one run) each keep their key.
    """
    path = Path(path)
    with locked(path):
        current: dict[str, Any] = {}
        if path.is_file():
            try:
                current = json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise RunError(f"{path} is not valid JSON; move it away to write new results") from None
            if not isinstance(current, dict):
                raise RunError(f"{path} holds no JSON object; move it away to write new results")
        current[key] = value
        write_json(path, current)
    return current
