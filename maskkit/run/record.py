"""The run directory's files and its record, config.json: the `RunConfig` asked for and what it resolved to.

A run directory holds `config.json` (`RunRecord`), `metrics.jsonl`, `checkpoints/checkpoint-<step>.pt`
(+ `.sha256`), `model.pt` (final weights), `summary.json`, and later `eval.json` and pictures. This
module names those files and reads and writes the record; runs of format 1 (before `RunConfig`)
still read.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from maskkit.checkpoint import atomic_write_text
from maskkit.train import TrainConfig

from .config import FORMAT_VERSION, RunError

__all__ = [
    "CHECKPOINTS", "CONFIG", "EVAL", "METRICS", "MODEL", "SUMMARY", "RunRecord", "check_writable",
    "fresh_run_dir", "merge_json",
]  # fmt: skip

CONFIG = "config.json"
METRICS = "metrics.jsonl"
MODEL = "model.pt"
SUMMARY = "summary.json"
EVAL = "eval.json"
CHECKPOINTS = "checkpoints"


@dataclass
class RunRecord:
    """The content of config.json: the `RunConfig` asked for and the sections it resolved to.

    `dataset` (statistics, splits), `model` (builder, sizes, init seed), `policy` (name, typed
    options), `train` (`TrainConfig`), `device`, `versions`, `command`. Runs written before
    format 2 have no `config`; they load and resume all the same.
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
        return TrainConfig.from_dict(self.train)

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
        except json.JSONDecodeError as err:
            raise RunError(f"{path} is not a maskkit run configuration: {err}") from None
        if not isinstance(raw, dict):
            raise RunError(f"{path} is not a maskkit run configuration")
        version = raw.get("format_version", 1)
        if version not in (1, FORMAT_VERSION):
            raise RunError(f"{path} has run format {version!r}; this maskkit reads formats 1 and {FORMAT_VERSION}")
        unknown = sorted(set(raw) - {f.name for f in fields(cls)})
        missing = sorted({"dataset", "model", "policy", "train"} - set(raw))
        if unknown or missing:
            what = f"unknown keys {', '.join(unknown)}" if unknown else f"missing {', '.join(missing)}"
            raise RunError(f"{path} is not a maskkit run configuration of format {version} ({what})")
        return cls(**raw)

    def write(self, run_dir: Path) -> None:
        """Write config.json into `run_dir`, atomically."""
        atomic_write_text(run_dir / CONFIG, self.to_json())


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


def fresh_run_dir(base: Path) -> Path:
    """`base`, or base-2, base-3, ... if it is taken (two runs started in the same second)."""
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def write_json(path: Path, value: Any) -> None:
    """`value` as indented, key-sorted JSON at `path`, written atomically."""
    atomic_write_text(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


def merge_json(path: Path, key: str, value: Any) -> dict[str, Any]:
    """Set `key` in the JSON object at `path` (created if absent), written atomically."""
    current: dict[str, Any] = {}
    if path.is_file():
        try:
            current = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            raise RunError(f"{path} is not valid JSON; move it away to write new results") from None
    current[key] = value
    write_json(path, current)
    return current
