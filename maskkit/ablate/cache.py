"""The study directory's own records, read strictly: `plan.json`, `selection.json`, `calibration.json`.

They decide which runs and scores a rerun reuses, so a damaged one must never pass for an empty one:
a file that is not JSON, holds the wrong types or lacks a field is refused with one `StudyError` line
naming the file and the field (maskkit.jsonfile, as the report reads them), and saying how to rebuild
it. A missing file is simply not made yet.

`plan.json` (format 2) records, per run, the `maskkit pretrain` options it was made with and, per
score in its eval.json, the `maskkit evaluate` options that score was made with:

    {"format": 2, "runs": {"random-s0": {"pretrain": ["--dataset", ...], "scored": {"linear": [...]}}}}

A plan.json of the first format (run -> pretrain options) is read with no score settings recorded,
so its scores are evaluated again once.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from maskkit.jsonfile import Fields, read_json, shown_path, shown_value

from .study import Study, StudyError

__all__ = ["PLAN_FORMAT", "PlanEntry", "plan_to_json", "read_calibration", "read_plan", "read_selection"]

PLAN_FORMAT = 2


@dataclass
class PlanEntry:
    """What one run was made with: its pretrain options, and the evaluate options of each recorded score."""

    pretrain: tuple[str, ...]
    scored: dict[str, tuple[str, ...]] = field(default_factory=dict)


@contextmanager
def _saying(remedy: str) -> Iterator[None]:
    """A refusal of the file ends with what removing it does."""
    try:
        yield
    except StudyError as err:
        raise StudyError(f"{err}; {remedy}") from None


def _strings(fields: Fields, key: str) -> tuple[str, ...]:
    value = fields.raw.get(key)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        fields.fail(key, "is missing" if key not in fields.raw else f"must be a list of strings, got {shown_value(value)}")
    return tuple(value)


def read_plan(path: Path) -> dict[str, PlanEntry]:
    """Each run's recorded options (empty when the file is absent); StudyError on a damaged file."""
    if not path.exists():
        return {}
    with _saying("remove it to rebuild it from the runs' config.json (their scores are then evaluated again)"):
        top = Fields(read_json(path, StudyError), shown_path(path), StudyError)
        if "format" not in top:  # the first format: run -> pretrain options
            return {name: PlanEntry(_strings(top, name)) for name in top.keys()}
        top.integer("format", low=PLAN_FORMAT, high=PLAN_FORMAT)
        runs, out = top.object("runs"), {}
        for name in runs.keys():
            entry = runs.object(name)
            scored = entry.object("scored", optional=True)
            out[name] = PlanEntry(_strings(entry, "pretrain"), {key: _strings(scored, key) for key in scored.keys()})
    return out


def plan_to_json(plan: dict[str, PlanEntry]) -> dict[str, Any]:
    """The plan as plan.json holds it (format 2)."""
    runs = {name: {"pretrain": list(e.pretrain), "scored": {k: list(v) for k, v in e.scored.items()}}
            for name, e in plan.items()}  # fmt: skip
    return {"format": PLAN_FORMAT, "runs": runs}


def read_selection(path: Path, study: Study) -> dict[str, str]:
    """Each select arm's recorded choice, for the arms of `study` (empty when the file is absent).

    A choice must be one of the arm's grid values now: a value from elsewhere would name a run the
    study never planned (or a path outside it). The runner chooses again from the scores whenever it
    runs; the report checks the rest of the file (maskkit.ablate.files).
    """
    if not path.exists():
        return {}
    out = {}
    with _saying("remove it to choose again (the selection runs are kept)"):
        top = Fields(read_json(path, StudyError), shown_path(path), StudyError)
        for arm in top.keys():
            entry = top.object(arm)
            chosen = entry.string("chosen")
            grid = study.arms[arm].select if arm in study.arms else None
            if grid is None:
                continue  # an arm the study no longer has (or no longer a grid): not read
            if chosen not in grid.values:
                entry.fail("chosen", f"must be one of the grid's values ({', '.join(grid.values)}), "
                                     f"got {shown_value(chosen)}")  # fmt: skip
            out[arm] = chosen
    return out


def read_calibration(path: Path) -> dict[str, Any]:
    """The recorded calibration (empty when the file is absent): `steps` arm -> steps >= 1, `options` arm ->
    the pretrain options measured; StudyError on a damaged file."""
    if not path.exists():
        return {}
    with _saying("remove it to measure again"):
        top = Fields(read_json(path, StudyError), shown_path(path), StudyError)
        steps, options = top.object("steps"), top.object("options")
        for arm in steps.keys():
            steps.integer(arm, low=1)
        for arm in options.keys():
            _strings(options, arm)
    return top.raw
