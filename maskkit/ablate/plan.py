"""The runs of a study: every (arm, seed) as one run directory, with its `maskkit` commands.

The selection runs (each grid value on its selection seeds, scored on the validation split only) come
first; the study runs follow seed by seed (every arm of seed 0, then of seed 1, ...), so that a study
stopped half-way leaves a balanced table. A run's directory is `<DIR>/runs/<arm>-s<seed>`, a grid
value's `<arm>@<option>=<value>-s<seed>`; a chosen grid value's study run is that same directory.
"""

from __future__ import annotations

from dataclasses import dataclass

from .study import Study, check_name_part

__all__ = ["CALIBRATED", "CHOSEN", "RunSpec", "run_name", "selection_runs", "study_runs"]

#: placeholders of a dry run's commands for what is not known yet
CHOSEN = "<chosen on val>"
CALIBRATED = "<calibrated steps>"


@dataclass(frozen=True)
class RunSpec:
    """One run: its arm, seed, grid value, directory name, pretrain options and evaluations (protocol, split)."""

    arm: str
    seed: int
    name: str
    args: tuple[str, ...]  # `maskkit pretrain` options, --out excepted
    evaluations: tuple[tuple[str, str], ...]
    value: str | None = None


def run_name(arm: str, seed: int, option: str | None = None, value: str | None = None) -> str:
    """`<arm>-s<seed>`, or `<arm>@<option>=<value>-s<seed>` for a grid value; StudyError unless it is one
    folder name (a study file's names are checked at load: this is the last guard)."""
    name = f"{arm}-s{seed}" if option is None or value is None else f"{arm}@{option.lstrip('-')}={value}-s{seed}"
    check_name_part(name, "run name")
    return name


def _budget_args(steps: int | str | None, epochs: float | None) -> list[str]:
    return ["--steps", str(steps)] if steps is not None else ["--epochs", str(epochs)]


def selection_runs(study: Study) -> list[RunSpec]:
    """Every grid value of every `select` arm on its selection seeds, evaluated on val by `by` only."""
    out = []
    seeds = sorted({s for a in study.arms.values() if a.select is not None for s in a.select.seeds})
    for seed in seeds:
        for name, arm in study.arms.items():
            if arm.select is None or seed not in arm.select.seeds:
                continue
            steps, epochs = study.budget(name)
            for value in arm.select.values:
                args = [*study.options(name, value), *_budget_args(steps, epochs), "--seed", str(seed)]
                out.append(RunSpec(name, seed, run_name(name, seed, arm.select.option, value), tuple(args),
                                   ((arm.select.by, "val"),), value))  # fmt: skip
    return out


def study_runs(
    study: Study, chosen: dict[str, str] | None = None, equal_steps: dict[str, int] | None = None
) -> list[RunSpec]:
    """Every (arm, seed) of the study, seed by seed, evaluated on test by every evaluation.

    `chosen`: each select arm's chosen value (else the CHOSEN placeholder); `equal_steps`: each
    equal-cost arm's steps (else the CALIBRATED placeholder).
    """
    chosen, equal_steps = chosen or {}, equal_steps or {}
    out = []
    for seed in study.seeds:
        for name, arm in study.arms.items():
            value = None
            if arm.select is not None:
                value = chosen.get(name, CHOSEN)
            if arm.equal_cost is not None:
                budget = _budget_args(equal_steps.get(name, CALIBRATED), None)
            else:
                budget = _budget_args(*study.budget(name))
            args = [*study.options(name, value), *budget, "--seed", str(seed)]
            option = arm.select.option if arm.select is not None else None
            evaluations = tuple((protocol, "test") for protocol in study.evaluations)
            out.append(RunSpec(name, seed, run_name(name, seed, option, value), tuple(args), evaluations, value))
    return out
