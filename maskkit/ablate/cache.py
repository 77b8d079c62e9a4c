"""The study directory's own records, read strictly: `plan.json`, `selection.json`, `calibration.json`.

They decide which runs and scores a rerun reuses, so a damaged one must never pass for an empty one:
a file that is not JSON, holds the wrong types or lacks a field is refused with one `StudyError` line
naming the file and the field, and saying how to rebuild it. A missing file is simply not made yet.

`plan.json` (format 2) records, per run, the `maskkit pretrain` options it was made with and, per
score in its eval.json, the `maskkit evaluate` options that score was made with:

    {"format": 2, "runs": {"random-s0": {"pretrain": ["--dataset", ...], "scored": {"linear": [...]}}}}

A plan.json of the first format (run -> pretrain options) is read with no score settings recorded,
so its scores are evaluated again once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .study import Study, StudyError

__all__ = ["PLAN_FORMAT", "PlanEntry", "plan_to_json", "read_calibration", "read_plan", "read_selection"]

PLAN_FORMAT = 2


@dataclass
class PlanEntry:
    """What one run was made with: its pretrain options, and the evaluate options of each recorded score."""

    pretrain: tuple[str, ...]
    scored: dict[str, tuple[str, ...]] = field(default_factory=dict)


def _load(path: Path, remedy: str) -> Any:
    """The JSON value of `path` (None when absent); StudyError naming the file when it cannot be read."""
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        reason = getattr(err, "strerror", None) or str(err).splitlines()[0]
        raise StudyError(f"{path} cannot be read ({reason}); {remedy}") from None


def _bad(path: Path, where: str, wants: str, got: Any, remedy: str) -> StudyError:
    shown = repr(got)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return StudyError(f"{path}: {where} must be {wants}, got {shown}; {remedy}")


def _strings(value: Any, path: Path, where: str, remedy: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _bad(path, where, "a list of strings", value, remedy)
    return tuple(value)


def _object(value: Any, path: Path, where: str, remedy: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _bad(path, where, "a JSON object", value, remedy)
    return value


def read_plan(path: Path) -> dict[str, PlanEntry]:
    """Each run's recorded options (empty when the file is absent); StudyError on a damaged file."""
    remedy = "remove it to rebuild it from the runs' config.json (their scores are then evaluated again)"
    raw = _load(path, remedy)
    if raw is None:
        return {}
    raw = _object(raw, path, "the file", remedy)
    if "format" not in raw:  # the first format: run -> pretrain options
        return {name: PlanEntry(_strings(args, path, name, remedy)) for name, args in raw.items()}
    if raw["format"] != PLAN_FORMAT:
        raise _bad(path, "format", str(PLAN_FORMAT), raw["format"], remedy)
    if "runs" not in raw:
        raise StudyError(f"{path}: field runs is missing; {remedy}")
    out = {}
    for name, entry in _object(raw["runs"], path, "runs", remedy).items():
        entry = _object(entry, path, f"runs.{name}", remedy)
        if "pretrain" not in entry:
            raise StudyError(f"{path}: field runs.{name}.pretrain is missing; {remedy}")
        scored = _object(entry.get("scored", {}), path, f"runs.{name}.scored", remedy)
        out[name] = PlanEntry(
            _strings(entry["pretrain"], path, f"runs.{name}.pretrain", remedy),
            {key: _strings(args, path, f"runs.{name}.scored.{key}", remedy) for key, args in scored.items()},
        )
    return out


def plan_to_json(plan: dict[str, PlanEntry]) -> dict[str, Any]:
    """The plan as plan.json holds it (format 2)."""
    runs = {name: {"pretrain": list(e.pretrain), "scored": {k: list(v) for k, v in e.scored.items()}}
            for name, e in plan.items()}  # fmt: skip
    return {"format": PLAN_FORMAT, "runs": runs}


def read_selection(path: Path, study: Study) -> dict[str, str]:
    """Each select arm's recorded choice, for the arms of `study` (empty when the file is absent).

    A choice must be one of the arm's grid values now: a value from elsewhere would name a run the
    study never planned (or a path outside it).
    """
    remedy = "remove it to choose again (the selection runs are kept)"
    raw = _load(path, remedy)
    if raw is None:
        return {}
    out = {}
    for arm, entry in _object(raw, path, "the file", remedy).items():
        entry = _object(entry, path, arm, remedy)
        if "chosen" not in entry:
            raise StudyError(f"{path}: field {arm}.chosen is missing; {remedy}")
        chosen = entry["chosen"]
        if arm not in study.arms:
            continue  # an arm the study no longer has: not read
        grid = study.arms[arm].select
        if grid is None:
            continue
        if not isinstance(chosen, str) or chosen not in grid.values:
            raise _bad(path, f"{arm}.chosen", f"one of the grid's values ({', '.join(grid.values)})", chosen, remedy)
        out[arm] = chosen
    return out


def read_calibration(path: Path) -> dict[str, Any]:
    """The recorded calibration (empty when the file is absent): `steps` arm -> steps >= 1, `options` arm ->
    the pretrain options measured; StudyError on a damaged file."""
    remedy = "remove it to measure again"
    raw = _load(path, remedy)
    if raw is None:
        return {}
    raw = _object(raw, path, "the file", remedy)
    for key in ("steps", "options"):
        if key not in raw:
            raise StudyError(f"{path}: field {key} is missing; {remedy}")
    for arm, steps in _object(raw["steps"], path, "steps", remedy).items():
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise _bad(path, f"steps.{arm}", "an integer >= 1", steps, remedy)
    for arm, args in _object(raw["options"], path, "options", remedy).items():
        _strings(args, path, f"options.{arm}", remedy)
    return raw
