"""A study directory's files as `maskkit ablate report` reads them, each checked strictly (maskkit.jsonfile).

An absent file means "not there yet" (a run not finished or not scored, no grid chosen, no budget
calibrated, no recorded rows); a file that is present but damaged (not a regular file, not UTF-8, not
JSON or TOML, a field missing, of the wrong type, not finite or out of range, naming an arm, seed,
evaluation or grid value the study does not have) refuses the whole report in one StudyError line
naming the file and the field: a report never shows a number it could not check, nor silently drops
a run. Scores (top-1) must lie in [0, 1]; counts are integers >= 0; seconds are >= 0.

    study.toml                the study as run (parse_study's checks, the file named)
    selection.json            {arm: {option, by, split, chosen, scores: {value: {seed: top-1}}}}: the
                              study's grid of that arm, every (value, seed) scored, and `chosen` the value
                              those scores choose (maskkit.ablate.select.choose)
    calibration.json          {steps: {arm: n}, basis: {arm: ...}, costs: {...}, threads}: equal_cost arms
    recorded.jsonl            one row a line: arm, seed, scores {evaluation: top-1}, steps, seconds,
                              final_loss, diagnostics; each (arm, seed) once
    runs/<run>/summary.json   steps, steps_this_call, seconds, final {loss, diagnostics}
    runs/<run>/eval.json      {evaluation: {top1, in_progress}}: a score of weights in progress is refused;
                              `maskkit ablate` reads a grid's validation scores with the same checks
                              (`read_score`), so no damaged score steers a choice
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from maskkit.jsonfile import Fields, read_json, read_json_lines, read_text, shown_path, shown_value
from maskkit.run.record import EVAL, SUMMARY

from .select import choose
from .study import Study, StudyError, parse_study


def eval_key(protocol: str, split: str) -> str:
    """The key of a score in eval.json: `linear`, or `linear@val` on the validation split."""
    return protocol if split == "test" else f"{protocol}@{split}"

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["Row", "read_calibration", "read_recorded", "read_run", "read_score", "read_selection", "read_study"]

#: a seed as a JSON key: a decimal integer without leading zeros
SEED_KEY = re.compile(r"^(0|[1-9][0-9]*)$")


@dataclass
class Row:
    """One (arm, seed): scores in [0, 1] by protocol, steps, wall seconds, final loss and diagnostics."""

    arm: str
    seed: int
    source: str  # the run directory, or "recorded"
    scores: dict[str, float] = field(default_factory=dict)
    steps: int | None = None
    seconds: float | None = None
    final_loss: float | None = None
    diagnostics: dict[str, float] = field(default_factory=dict)


def _object(path: Path) -> Fields:
    return Fields(read_json(path, StudyError), shown_path(path), StudyError)


def read_study(path: Path, name: str) -> Study:
    """study.toml: UTF-8 TOML that `parse_study` accepts; every problem one line naming the file."""
    where = shown_path(path)
    text = read_text(path, StudyError)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise StudyError(f"{where}: not valid TOML ({err})") from None
    try:
        return parse_study(raw, source=text, name=name)
    except StudyError as err:
        raise StudyError(f"{where}: {err}") from None


def read_selection(path: Path, study: Study) -> dict[str, dict]:
    """selection.json checked against the study's grids ({} when absent); the entries as written."""
    if not path.exists():
        return {}
    top = _object(path)
    for arm in top.keys():
        entry = top.object(arm)
        grid = study.arms[arm].select if arm in study.arms else None
        if grid is None:
            top.fail(arm, "names no arm of study.toml with a select grid")
        for key, want in (("option", grid.option), ("by", grid.by)):
            got = entry.string(key)
            if got != want:
                entry.fail(key, f"is {shown_value(got)}, but study.toml's arms.{arm}.select gives {shown_value(want)}")
        split = entry.string("split", optional=True)
        if split not in (None, "val"):
            entry.fail("split", f'must be "val" (grids are chosen on the validation split), got {shown_value(split)}')
        chosen = entry.string("chosen")
        if chosen not in grid.values:
            values = ", ".join(grid.values)
            entry.fail("chosen", f"must be one of the grid's values ({values}), got {shown_value(chosen)}")
        table, scores = entry.object("scores"), {}
        for value in table.keys():
            if value not in grid.values:
                table.fail(value, f"is no value of the grid ({', '.join(grid.values)})")
            per = table.object(value)
            scores[value] = {}
            for seed in per.keys():
                if not SEED_KEY.match(seed) or int(seed) not in grid.seeds:
                    per.fail(seed, f"is no selection seed of the grid ({', '.join(map(str, grid.seeds))})")
                scores[value][int(seed)] = per.number(seed, low=0, high=1)
        for value in grid.values:
            for seed in grid.seeds:
                if seed not in scores.get(value, {}):
                    table.fail(value, f"has no score for seed {seed}")
        best = choose(grid, lambda value, seed, split, scores=scores: scores[value][seed]).chosen
        if best != chosen:
            entry.fail("chosen", f"is {shown_value(chosen)}, but its scores choose {shown_value(best)}")
    return top.raw


def read_calibration(path: Path, study: Study) -> dict:
    """calibration.json checked against the study's equal_cost arms ({} when absent); as written."""
    if not path.exists():
        return {}
    top = _object(path)
    steps, basis, costs = top.object("steps"), top.object("basis"), top.object("costs", optional=True)
    top.integer("threads", low=1, optional=True)
    for arm in steps.keys():
        equal = study.arms[arm].equal_cost if arm in study.arms else None
        if equal is None:
            steps.fail(arm, "names no equal_cost arm of study.toml")
        steps.integer(arm, low=1)
        if basis.string(arm) != equal.basis:
            basis.fail(arm, f"is {shown_value(basis.raw[arm])}, but study.toml's arms.{arm}.equal_cost.basis is "
                            f"{shown_value(equal.basis)}")  # fmt: skip
        if equal.basis == "flops":
            for name in (arm, equal.of):
                costs.object(f"{name} (flops)").number("flops_ratio", above=0)
        elif arm in costs and equal.of in costs:
            for name in (arm, equal.of):
                costs.object(name).number("seconds_per_step", above=0)
    return top.raw


def read_recorded(path: Path, study: Study) -> dict[tuple[str, int], Row]:
    """recorded.jsonl's rows by (arm, seed) ({} when absent), each checked against the study."""
    out: dict[tuple[str, int], Row] = {}
    if not path.exists():
        return out
    lines: dict[tuple[str, int], int] = {}
    for number, raw in read_json_lines(path, StudyError):
        row = Fields(raw, f"{shown_path(path)} line {number}", StudyError)
        arm, seed = row.string("arm"), row.integer("seed", low=0)
        if arm not in study.arms:
            row.fail("arm", f"names no arm of study.toml, got {shown_value(arm)}")
        if seed not in study.seeds:
            row.fail("seed", f"is no seed of study.toml ({', '.join(map(str, study.seeds))}), got {seed}")
        if (arm, seed) in lines:
            row.fail("seed", f"repeats arm {arm} seed {seed} of line {lines[arm, seed]}")
        table = row.object("scores")
        for protocol in table.keys():
            if protocol not in study.evaluations:
                table.fail(protocol, f"is no evaluation of study.toml ({', '.join(study.evaluations)})")
        diagnostics = row.object("diagnostics", optional=True)
        lines[arm, seed] = number
        out[arm, seed] = Row(
            arm, seed, "recorded", {p: float(table.number(p, low=0, high=1)) for p in table.keys()},
            row.integer("steps", low=0, optional=True), row.number("seconds", low=0, optional=True),
            row.number("final_loss", optional=True), {k: float(diagnostics.number(k)) for k in diagnostics.keys()},
        )  # fmt: skip
    return out


def read_run(arm: str, seed: int, run_dir: Path, protocols: list[str], diagnostics: list[str]) -> Row | None:
    """A run directory's row: summary.json (None when absent: not finished) and eval.json's test scores.

    A resumed run's summary times its last call only (`steps_this_call`): its seconds are scaled to all
    its steps.
    """
    path = run_dir / SUMMARY
    if not path.exists():
        return None
    summary = _object(path)
    steps = summary.integer("steps", low=0)
    timed = summary.integer("steps_this_call", low=0, high=steps, optional=True)
    seconds = summary.number("seconds", low=0, optional=True)
    final = summary.object("final", optional=True)
    loss = final.number("loss", optional=True)
    shown = {k: final.number(k, optional=True) for k in diagnostics}
    timed = steps if timed is None else timed
    if seconds is not None and timed:
        seconds = seconds * steps / timed
    scores = {}
    if (run_dir / EVAL).exists():
        evals = _object(run_dir / EVAL)
        for protocol in protocols:
            if eval_key(protocol, "test") in evals:
                scores[protocol] = _top1(evals, eval_key(protocol, "test"), run_dir)
    return Row(arm, seed, str(run_dir), scores, steps, seconds, loss,
               {k: float(v) for k, v in shown.items() if v is not None})  # fmt: skip


def _top1(evals: Fields, key: str, run_dir: Path) -> float:
    """eval.json's `key`: an object whose top1 is in [0, 1], scored with the run's final weights."""
    entry = evals.object(key)
    top1 = float(entry.number("top1", low=0, high=1))
    if entry.boolean("in_progress", optional=True):
        entry.fail("in_progress", "is true: a score of weights in progress, not of the run's final "
                   f"weights; score it again: maskkit evaluate {shown_path(run_dir)}")  # fmt: skip
    return top1


def read_score(run_dir: Path, key: str) -> float:
    """The top-1 of `key` (e.g. `linear@val`, a grid's validation score) in the run's eval.json, checked as
    the report checks it: a score out of [0, 1] must not steer a choice."""
    return _top1(_object(run_dir / EVAL), key, run_dir)
