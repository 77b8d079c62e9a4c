"""A study file (TOML) -> a validated `Study`: data, shared options, arms, baseline, controls, seeds, budget,
evaluations, selection grids and equal-cost arms.

    [study]
    data = "digits"                      # --dataset of every run
    seeds = [0, 1]
    steps = 30                           # or epochs = ...
    baseline = "random"
    options = { model = "micro" }        # shared `maskkit pretrain` options (a table or an argument list)

    [evaluations.linear]                 # and/or [evaluations.finetune]; keys: epochs, batch-size, lr, seed
    epochs = 20

    [arms.random]
    options = { policy = "random" }
    [arms.hpm]
    options = ["--policy", "hpm"]

Arm keys: `options`, `label` (its name in tables), `control` (the arm it is also compared with, e.g. the
same masker frozen), `baseline` (its own reference instead of the study's; itself: the baseline of a group),
`steps` / `epochs` (its own budget), `select` (a grid: `{option = "masker-reg", values = [0.1, 1.0],
by = "linear", seeds = [0, 1]}`, chosen on the validation split) and `equal_cost` (`{of = "ARM",
basis = "wall time" | "flops"}`: the steps that fit in ARM's budget). `[calibration]` (`steps`,
`warmup`) sizes the step-cost measurement of equal-wall-time arms.

`load_study` validates the whole file before anything runs; every problem is one `StudyError` line
naming its key (`arms.hpm.options: no such option: --bogus`).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .options import OptionError, check_args, to_args

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = [
    "Arm", "EqualCost", "Evaluation", "Selection", "Study", "StudyError", "check_name_part", "load_study", "parse_study",
]  # fmt: skip

#: the keys a study file may hold, by table
TOP_KEYS = {"study", "evaluations", "arms", "calibration"}
STUDY_KEYS = {"name", "data", "seeds", "steps", "epochs", "baseline", "options"}
ARM_KEYS = {"options", "label", "control", "baseline", "steps", "epochs", "select", "equal_cost"}
SELECT_KEYS = {"option", "values", "by", "seeds"}
EQUAL_COST_KEYS = {"of", "basis"}
EVALUATION_KEYS = {"epochs", "batch-size", "lr", "seed"}
CALIBRATION_KEYS = {"steps", "warmup"}
PROTOCOLS = ("linear", "finetune")
BASES = ("wall time", "flops")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class StudyError(ValueError):
    """A study file that cannot run; its message is one line naming the key."""


@dataclass(frozen=True)
class Evaluation:
    """One `maskkit evaluate` protocol and its settings (None: evaluate's default)."""

    protocol: str
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    seed: int = 0

    def args(self) -> list[str]:
        """Its `maskkit evaluate` options."""
        out = ["--protocol", self.protocol, "--seed", str(self.seed)]
        for flag, value in (("--epochs", self.epochs), ("--batch-size", self.batch_size), ("--lr", self.lr)):
            if value is not None:
                out += [flag, str(value)]
        return out


@dataclass(frozen=True)
class Selection:
    """A grid over one option, chosen on the validation split by one evaluation (highest mean over `seeds`)."""

    option: str  # as spelled on the command line: --masker-reg
    values: tuple[str, ...]
    by: str
    seeds: tuple[int, ...]

    def args(self, value: str) -> list[str]:
        return [self.option, value]


@dataclass(frozen=True)
class EqualCost:
    """An arm trained for the steps that fit in `of`'s budget, by measured wall time or by the FLOPs model."""

    of: str
    basis: str  # "wall time" | "flops"


@dataclass(frozen=True)
class Arm:
    """One arm: its `maskkit pretrain` options and where it sits in the comparisons."""

    name: str
    args: tuple[str, ...]
    label: str = ""
    control: str | None = None
    baseline: str | None = None  # its own reference; None: the study's
    steps: int | None = None
    epochs: float | None = None
    select: Selection | None = None
    equal_cost: EqualCost | None = None


@dataclass(frozen=True)
class Study:
    """A validated study file."""

    name: str
    data: str
    seeds: tuple[int, ...]
    baseline: str
    arms: dict[str, Arm]
    evaluations: dict[str, Evaluation]
    base_args: tuple[str, ...] = ()
    steps: int | None = None
    epochs: float | None = None
    calibration: dict[str, int] = field(default_factory=lambda: {"steps": 20, "warmup": 3})
    source: str = ""  # the file's text, copied into the study directory

    def reference(self, arm: str) -> str:
        """The arm an arm is compared with first: its own `baseline`, else the study's."""
        return self.arms[arm].baseline or self.baseline

    def budget(self, arm: str) -> tuple[int | None, float | None]:
        """(steps, epochs) of an arm before any equal-cost adjustment."""
        a = self.arms[arm]
        if a.steps is not None or a.epochs is not None:
            return a.steps, a.epochs
        return self.steps, self.epochs

    def options(self, arm: str, value: str | None = None) -> list[str]:
        """`maskkit pretrain` options of an arm (with a grid's value), without budget, seed and --out."""
        a = self.arms[arm]
        extra = a.select.args(value) if a.select is not None and value is not None else []
        return ["--dataset", self.data, *self.base_args, *a.args, *extra]

    def comparisons(self) -> list[tuple[str, str, str]]:
        """(arm, reference, basis) of every comparison the report makes, in arm order.

        Each arm against its reference (none for a reference itself, or for an equal-cost arm), each
        arm against its control, and each equal-cost arm's partner against it ("equal wall time" or
        "equal FLOPs").
        """
        out = []
        for name, arm in self.arms.items():
            if arm.equal_cost is not None:
                basis = "equal wall time" if arm.equal_cost.basis == "wall time" else "equal FLOPs"
                out.append((arm.equal_cost.of, name, basis))
                continue
            reference = self.reference(name)
            if reference != name:
                out.append((name, reference, self._basis(name, reference)))
            if arm.control is not None and arm.control != reference:
                out.append((name, arm.control, self._basis(name, arm.control)))
        return out

    def _basis(self, arm: str, other: str) -> str:
        mine, theirs = self.budget(arm), self.budget(other)
        if self.arms[other].equal_cost is not None or mine != theirs:
            return "unequal budgets"
        return "equal steps" if mine[0] is not None else "equal epochs"


def load_study(path: str | Path, *, name: str | None = None) -> Study:
    """Read and validate a study file (StudyError naming the file, or the key, in one line).

    Its name is `[study] name`, else `name`, else the file's stem.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise StudyError(f"cannot read study file {path}: {err.strerror or err}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise StudyError(f"{path} is not valid TOML: {err}") from None
    return parse_study(raw, source=text, name=name or path.stem)


def _keys(table: Any, allowed: set[str], where: str) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise StudyError(f"{where} must be a table")
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise StudyError(f"unknown key {where + '.' if where else ''}{unknown[0]} (allowed: {', '.join(sorted(allowed))})")
    return table


def _int(value: Any, where: str, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise StudyError(f"{where} must be an integer >= {low}, got {value!r}")
    return value


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise StudyError(f"{where} must be a positive number, got {value!r}")
    return float(value)


def _budget(table: dict[str, Any], where: str) -> tuple[int | None, float | None]:
    if "steps" in table and "epochs" in table:
        raise StudyError(f"{where}: give steps or epochs, not both")
    steps = _int(table["steps"], f"{where}.steps") if "steps" in table else None
    epochs = _number(table["epochs"], f"{where}.epochs") if "epochs" in table else None
    return steps, epochs


def _seeds(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        raise StudyError(f"{where} must be a non-empty list of seeds")
    seeds = tuple(_int(s, where, low=0) for s in value)
    if len(set(seeds)) != len(seeds):
        raise StudyError(f"{where} lists a seed twice")
    return seeds


def _args(value: Any, where: str) -> list[str]:
    try:
        args = to_args(value, where)
    except OptionError as err:
        raise StudyError(str(err)) from None
    if "--dataset" in args:
        raise StudyError(f"{where}: --dataset is set by study.data")
    return args


def _evaluations(raw: Any) -> dict[str, Evaluation]:
    table = _keys(raw, set(PROTOCOLS), "evaluations")
    if not table:
        raise StudyError("evaluations: name at least one of linear, finetune")
    out = {}
    for protocol, settings in table.items():
        where = f"evaluations.{protocol}"
        settings = _keys(settings, EVALUATION_KEYS, where)
        out[protocol] = Evaluation(
            protocol,
            epochs=_int(settings["epochs"], f"{where}.epochs") if "epochs" in settings else None,
            batch_size=_int(settings["batch-size"], f"{where}.batch-size") if "batch-size" in settings else None,
            lr=_number(settings["lr"], f"{where}.lr") if "lr" in settings else None,
            seed=_int(settings.get("seed", 0), f"{where}.seed", low=0),
        )
    return out


def check_name_part(text: str, where: str) -> None:
    """StudyError naming `where` unless `text` can be part of a run directory's name.

    A run's name is one folder under the study's runs/ (`<arm>@<option>=<value>-s<seed>`): a `/`, `\\`,
    `..`, NUL or other control character, or an empty part, could name a folder outside it.
    """
    bad = ("it is empty" if not text else
           "it holds a path separator" if "/" in text or "\\" in text else
           "it holds '..'" if ".." in text else
           "it holds a control character" if any(ord(c) < 32 or ord(c) == 127 for c in text) else None)  # fmt: skip
    if bad is not None:
        raise StudyError(f"{where}: {text!r} cannot be part of a run directory's name ({bad})")


def _selection(raw: Any, where: str, seeds: tuple[int, ...], evaluations: dict[str, Evaluation]) -> Selection:
    table = _keys(raw, SELECT_KEYS, where)
    for key in ("option", "values", "by"):
        if key not in table:
            raise StudyError(f"{where}.{key} is missing")
    option = table["option"]
    if not isinstance(option, str) or not option.strip("-"):
        raise StudyError(f"{where}.option must name one maskkit pretrain option, got {option!r}")
    values = table["values"]
    if not isinstance(values, list) or len(values) < 2 or not all(isinstance(v, (str, int, float)) for v in values):
        raise StudyError(f"{where}.values must list at least two values")
    if table["by"] not in evaluations:
        raise StudyError(f"{where}.by must name one of the study's evaluations ({', '.join(evaluations)}), "
                         f"got {table['by']!r}")  # fmt: skip
    chosen_seeds = _seeds(table["seeds"], f"{where}.seeds") if "seeds" in table else seeds
    texts = tuple(str(v) for v in values)
    check_name_part(option.lstrip("-"), f"{where}.option")
    for text in texts:
        check_name_part(text, f"{where}.values")
    if len(set(texts)) != len(texts):
        raise StudyError(f"{where}.values lists a value twice")
    return Selection("--" + option.lstrip("-"), texts, table["by"], chosen_seeds)


def parse_study(raw: dict[str, Any], *, source: str = "", name: str = "study") -> Study:
    """Validate a parsed study file (see the module docstring); StudyError naming the first bad key."""
    _keys(raw, TOP_KEYS, "")
    for key in ("study", "evaluations", "arms"):
        if key not in raw:
            raise StudyError(f"[{key}] is missing")
    head = _keys(raw["study"], STUDY_KEYS, "study")
    for key in ("data", "seeds", "baseline"):
        if key not in head:
            raise StudyError(f"study.{key} is missing")
    if not isinstance(head["data"], str) or not head["data"]:
        raise StudyError("study.data must name a data set (maskkit list datasets)")
    seeds = _seeds(head["seeds"], "study.seeds")
    steps, epochs = _budget(head, "study")
    base = _args(head.get("options", []), "study.options")
    evaluations = _evaluations(raw["evaluations"])
    calibration = {"steps": 20, "warmup": 3}
    for key, value in _keys(raw.get("calibration", {}), CALIBRATION_KEYS, "calibration").items():
        calibration[key] = _int(value, f"calibration.{key}", low=0 if key == "warmup" else 1)
    arms_raw = _keys(raw["arms"], set(raw["arms"]) if isinstance(raw["arms"], dict) else set(), "arms")
    if not arms_raw:
        raise StudyError("arms: the study has no arm")
    arms: dict[str, Arm] = {}
    for arm_name, table in arms_raw.items():
        where = f"arms.{arm_name}"
        if not NAME.match(arm_name):
            raise StudyError(f"{where}: an arm's name is letters, digits, '.', '_' and '-'")
        table = _keys(table, ARM_KEYS, where)
        arm_steps, arm_epochs = _budget(table, where)
        select = _selection(table["select"], f"{where}.select", seeds, evaluations) if "select" in table else None
        equal = None
        if "equal_cost" in table:
            eq = _keys(table["equal_cost"], EQUAL_COST_KEYS, f"{where}.equal_cost")
            if "of" not in eq:
                raise StudyError(f"{where}.equal_cost.of is missing")
            basis = eq.get("basis", "wall time")
            if basis not in BASES:
                raise StudyError(f"{where}.equal_cost.basis must be one of {', '.join(map(repr, BASES))}, got {basis!r}")
            if arm_steps is not None or arm_epochs is not None:
                raise StudyError(f"{where}: an equal_cost arm gets its steps from its partner; drop its steps/epochs")
            equal = EqualCost(str(eq["of"]), basis)
        label = table.get("label", "")
        if not isinstance(label, str):
            raise StudyError(f"{where}.label must be a string")
        arms[arm_name] = Arm(
            arm_name, tuple(_args(table.get("options", []), f"{where}.options")), label,
            table.get("control"), table.get("baseline"), arm_steps, arm_epochs, select, equal,
        )  # fmt: skip
    study = Study(head.get("name", name), head["data"], seeds, head["baseline"], arms, evaluations, tuple(base),
                  steps, epochs, calibration, source)  # fmt: skip
    _check_references(study)
    try:
        check_args(["--dataset", study.data, *base], "study.options")
    except OptionError as err:
        raise StudyError(str(err)) from None
    for arm in arms.values():
        values = arm.select.values if arm.select is not None else (None,)
        for value in values:
            _check_options(study, arm.name, value)
    return study


def _check_references(study: Study) -> None:
    named = [("study.baseline", study.baseline)] + [(f"arms.{n}.{key}", getattr(a, key)) for n, a in study.arms.items()
                                                    for key in ("control", "baseline")]  # fmt: skip
    for where, other in named:
        if other is not None and not isinstance(other, str):
            raise StudyError(f"{where} must name an arm, got {other!r}")
    if study.baseline not in study.arms:
        raise StudyError(f"study.baseline: no arm named {study.baseline!r} (arms: {', '.join(study.arms)})")
    if study.arms[study.baseline].equal_cost is not None or study.arms[study.baseline].select is not None:
        raise StudyError("study.baseline: the baseline arm cannot be an equal_cost or select arm")
    for name, arm in study.arms.items():
        for key, other in (("control", arm.control), ("baseline", arm.baseline),
                           ("equal_cost.of", arm.equal_cost and arm.equal_cost.of)):  # fmt: skip
            if other is not None and other not in study.arms:
                raise StudyError(f"arms.{name}.{key}: no arm named {other!r}")
            if other == name and key != "baseline":
                raise StudyError(f"arms.{name}.{key}: an arm cannot be its own {key.split('.')[0]}")
        if arm.equal_cost is not None and study.arms[arm.equal_cost.of].equal_cost is not None:
            raise StudyError(f"arms.{name}.equal_cost.of: {arm.equal_cost.of!r} is itself an equal_cost arm")
    if study.steps is None and study.epochs is None:
        missing = [n for n, a in study.arms.items() if a.steps is None and a.epochs is None and a.equal_cost is None]
        if missing:
            raise StudyError(f"study.steps is missing (or study.epochs; arms.{missing[0]} has no budget of its own)")
    for name, arm in study.arms.items():
        if arm.equal_cost is not None and study.budget(arm.equal_cost.of)[0] is None:
            raise StudyError(f"arms.{name}.equal_cost.of: {arm.equal_cost.of!r} needs a budget in steps")


def _check_options(study: Study, arm: str, value: str | None) -> None:
    where = f"arms.{arm}.options" if value is None else f"arms.{arm}.select ({study.arms[arm].select.option} {value})"
    try:
        check_args(study.options(arm, value), where)
    except OptionError as err:
        raise StudyError(str(err)) from None
