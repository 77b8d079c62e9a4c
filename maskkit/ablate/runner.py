"""Running a study: every (arm, seed) as an ordinary run directory, made by `maskkit pretrain` and scored
by `maskkit evaluate` in local processes.

    runner = StudyRunner(load_study("study.toml"), Path("runs/ablate"), jobs=2)
    runner.dry_run()     # every command, in order
    runner.run()         # selection on val, calibration, then the study runs seed by seed

The study directory holds `study.toml` (the file as run), `plan.json` (each run's options: a run made
with other options is refused, never mixed in), `selection.json` (each grid's validation scores and
choice), `calibration.json` (measured step costs and equal-cost budgets, reused on a rerun),
`runs/<run>/` (one `maskkit pretrain` run directory each) and `logs/<run>.log` (the commands' output).

Resumable: a run with model.pt and summary.json is not pretrained again, one with a checkpoint is
continued with `maskkit pretrain --resume`, one stopped before its first checkpoint starts over, and an
evaluation already in eval.json is not repeated. `jobs` processes run at once, each with
`threads` torch threads (OMP_NUM_THREADS / MKL_NUM_THREADS; default: the cores split between them).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .calibrate import calibrate
from .plan import RunSpec, selection_runs, study_runs
from .select import Choice, choose
from .study import Study, StudyError

__all__ = [
    "CALIBRATION", "LAUNCHERS", "PLAN", "SELECTION", "STUDY_FILE", "RunFailed", "StudyRunner", "eval_key",
    "shown", "subprocess_launcher",
]  # fmt: skip

STUDY_FILE, PLAN, SELECTION, CALIBRATION = "study.toml", "plan.json", "selection.json", "calibration.json"
RUNS, LOGS = "runs", "logs"
#: launchers a study can use; "slurm" is not one yet (single runs: `maskkit pretrain --slurm-...`, maskkit.slurm)
LAUNCHERS = ("local",)

#: (maskkit subcommand arguments, environment, log file) -> None; raises RunFailed
Launcher = Callable[[list[str], dict[str, str], Path], None]


class RunFailed(RuntimeError):
    """A `maskkit` command of the study failed; one line naming it and its error."""


def shown(args: list[str]) -> str:
    """A command as a user would type it."""
    return "maskkit " + shlex.join(args)


def eval_key(protocol: str, split: str) -> str:
    """The key of a score in eval.json: `linear`, or `linear@val` on the validation split."""
    return protocol if split == "test" else f"{protocol}@{split}"


def subprocess_launcher(args: list[str], env: dict[str, str], log: Path) -> None:
    """Run `maskkit ARGS` as a child process of this Python, its output appended to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as out:
        out.write(f"$ {shown(args)}\n")
        out.flush()
        done = subprocess.run([sys.executable, "-m", "maskkit.cli", *args], env=env, stdout=out,
                              stderr=subprocess.PIPE, text=True)  # fmt: skip
        out.write(done.stderr)
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        raise RunFailed(f"{shown(args[:2])} failed ({lines[-1].strip() if lines else f'exit {done.returncode}'}); "
                        f"see {log}")  # fmt: skip


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _write_json(path: Path, value: Any) -> None:
    from maskkit.checkpoint import atomic_write_text

    atomic_write_text(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


@dataclass
class StudyRunner:
    """Runs (or prints) a study's commands into the study directory `out`."""

    study: Study
    out: Path
    jobs: int = 1
    threads: int | None = None
    launch: Launcher = subprocess_launcher
    on_state: Callable[[str, str], None] | None = None
    _plan_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.jobs < 1:
            raise StudyError(f"--jobs must be a positive integer, got {self.jobs}")
        if self.threads is None:
            self.threads = max(1, (os.cpu_count() or 1) // self.jobs)
        if self.threads < 1:
            raise StudyError(f"--threads must be a positive integer, got {self.threads}")

    # ---- where things are --------------------------------------------------------------------------

    def run_dir(self, spec: RunSpec) -> Path:
        return self.out / RUNS / spec.name

    def log(self, spec: RunSpec) -> Path:
        return self.out / LOGS / f"{spec.name}.log"

    def env(self) -> dict[str, str]:
        return dict(os.environ, OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads))

    # ---- a run's state -----------------------------------------------------------------------------

    def pretrained(self, spec: RunSpec) -> bool:
        d = self.run_dir(spec)
        return (d / "summary.json").is_file() and (d / "model.pt").is_file()

    def scored(self, spec: RunSpec, protocol: str, split: str) -> bool:
        return eval_key(protocol, split) in _read_json(self.run_dir(spec) / "eval.json")

    def complete(self, spec: RunSpec) -> bool:
        return self.pretrained(spec) and all(self.scored(spec, p, s) for p, s in spec.evaluations)

    def progress(self, spec: RunSpec) -> tuple[int, int | None]:
        """(step reached, steps asked) of a run, from its metrics.jsonl and config.json."""
        d = self.run_dir(spec)
        total = _read_json(d / "config.json").get("train", {}).get("steps")
        step = 0
        try:
            lines = (d / "metrics.jsonl").read_text().splitlines()
            step = int(json.loads(lines[-1]).get("step", 0)) if lines else 0
        except (OSError, ValueError, IndexError):
            pass
        return step, total

    def commands(self, spec: RunSpec) -> list[list[str]]:
        """The `maskkit` commands that make and score this run from scratch."""
        d = str(self.run_dir(spec))
        out = [["pretrain", *spec.args, "--out", d, "--no-progress"]]
        for protocol, split in spec.evaluations:
            out.append(["evaluate", d, *self.study.evaluations[protocol].args(), "--split", split, "--no-progress"])
        return out

    # ---- dry run -----------------------------------------------------------------------------------

    def dry_run(self) -> list[str]:
        """Every command of the study, in order; finished ones marked `# done:`; nothing is run or written."""
        lines = []
        for spec in selection_runs(self.study):
            lines += self._shown(spec)
        chosen = self._recorded_choices()
        if any(a.equal_cost is not None for a in self.study.arms.values()):
            recorded = _read_json(self.out / CALIBRATION).get("steps", {})
            lines.append(f"# calibration: interleaved step costs in this process ({CALIBRATION}), "
                         + ("recorded" if recorded else "to be measured"))  # fmt: skip
        else:
            recorded = {}
        for spec in study_runs(self.study, chosen, recorded):
            lines += self._shown(spec)
        return lines

    def _shown(self, spec: RunSpec) -> list[str]:
        mark = "# done: " if self.complete(spec) else ""
        return [mark + shown(cmd) for cmd in self.commands(spec)]

    def _recorded_choices(self) -> dict[str, str]:
        recorded = _read_json(self.out / SELECTION)
        return {arm: entry["chosen"] for arm, entry in recorded.items() if arm in self.study.arms}

    # ---- running -----------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Selection runs and choices, calibration, then every study run; RunFailed lists what failed."""
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / STUDY_FILE).write_text(self.study.source, encoding="utf-8")
        choices = self.select()
        chosen = {arm: c.chosen for arm, c in choices.items()}
        equal = self.calibration(chosen).get("steps", {})
        specs = study_runs(self.study, chosen, equal)
        self._execute(specs)
        return {"selection": {a: c.to_dict() for a, c in choices.items()}, "equal_steps": equal,
                "runs": [s.name for s in specs]}  # fmt: skip

    def select(self) -> dict[str, Choice]:
        """Run every grid value on its selection seeds (val only), then choose; writes selection.json."""
        specs = selection_runs(self.study)
        if not specs:
            return {}
        self._execute(specs)
        by_name = {(s.arm, s.value, s.seed): s for s in specs}
        choices = {}
        for name, arm in self.study.arms.items():
            if arm.select is None:
                continue

            def score(value: str, seed: int, split: str, name: str = name, by: str = arm.select.by) -> float:
                from .files import read_score  # (files reads runner's names)

                return read_score(self.run_dir(by_name[(name, value, seed)]), eval_key(by, split))

            choices[name] = choose(arm.select, score)
        _write_json(self.out / SELECTION, {a: c.to_dict() for a, c in choices.items()})
        for name, choice in choices.items():
            self._state(f"{name} (select)", f"chose {choice.option} {choice.chosen} on val")
        return choices

    def calibration(self, chosen: dict[str, str]) -> dict[str, Any]:
        """The equal-cost budgets: recorded in calibration.json if measured for these options, else measured."""
        pairs = {n: a.equal_cost for n, a in self.study.arms.items() if a.equal_cost is not None}
        if not pairs:
            return {}
        options = {arm: self.study.options(arm, chosen.get(arm)) for n, eq in pairs.items() for arm in (n, eq.of)}
        recorded = _read_json(self.out / CALIBRATION)
        if recorded.get("options") == options and set(recorded.get("steps", {})) == set(pairs):
            return recorded
        self._state("calibration", f"measuring the step cost of {', '.join(sorted(options))}")
        result = {**calibrate(self.study, chosen, threads=self.threads), "options": options}
        _write_json(self.out / CALIBRATION, result)
        self._state("calibration", ", ".join(f"{a}: {n} steps" for a, n in result["steps"].items()))
        return result

    def _check_plan(self, specs: list[RunSpec]) -> None:
        """Record each run's options in plan.json; refuse a run directory made with other options."""
        with self._plan_lock:
            plan = _read_json(self.out / PLAN)
            for spec in specs:
                before = plan.get(spec.name)
                if before is not None and before != list(spec.args) and self.run_dir(spec).exists():
                    raise StudyError(f"{self.run_dir(spec)} was made with other options than the study now gives "
                                     f"({shown(['pretrain', *before])}); remove it or use another --out")  # fmt: skip
                plan[spec.name] = list(spec.args)
            _write_json(self.out / PLAN, plan)

    def _execute(self, specs: list[RunSpec]) -> None:
        self._check_plan(specs)
        for spec in specs:
            self._state(spec.name, "done (kept)" if self.complete(spec) else "waiting")
        failed: list[str] = []
        with ThreadPoolExecutor(max_workers=self.jobs) as pool:
            futures = [(spec, pool.submit(self._one, spec)) for spec in specs]
            for spec, future in futures:
                try:
                    future.result()
                except RunFailed as err:
                    failed.append(str(err))
                    self._state(spec.name, f"failed: {err}")
        if failed:
            more = f" (and {len(failed) - 1} more; rerun to retry)" if len(failed) > 1 else " (rerun to retry)"
            raise RunFailed(failed[0] + more)

    def _one(self, spec: RunSpec) -> None:
        """Pretrain (or resume) one run, then every evaluation it lacks."""
        if self.complete(spec):
            return
        d, env, log = self.run_dir(spec), self.env(), self.log(spec)
        if not self.pretrained(spec):
            if self._resumable(spec):
                self._state(spec.name, "resuming")
                self.launch(["pretrain", "--resume", str(d), "--no-progress"], env, log)
            else:
                if d.exists():
                    shutil.rmtree(d)  # stopped before its first checkpoint: nothing to keep
                self._state(spec.name, "pretraining")
                self.launch(self.commands(spec)[0], env, log)
        for (protocol, split), cmd in zip(spec.evaluations, self.commands(spec)[1:], strict=True):
            if not self.scored(spec, protocol, split):
                self._state(spec.name, f"evaluating {eval_key(protocol, split)}")
                self.launch(cmd, env, log)
        self._state(spec.name, "done")

    def _resumable(self, spec: RunSpec) -> bool:
        """Whether the run has a checkpoint before its last step (one at the last step, with no model.pt or
        summary.json, was stopped while writing them: `--resume` would call it complete, so it starts over)."""
        steps = []
        for path in (self.run_dir(spec) / "checkpoints").glob("checkpoint-*.pt"):
            try:
                steps.append(int(path.stem.split("-")[-1]))
            except ValueError:
                continue
        total = self.progress(spec)[1]
        return bool(steps) and (total is None or max(steps) < total)

    def _state(self, name: str, state: str) -> None:
        if self.on_state is not None:
            self.on_state(name, state)

    def all_specs(self) -> list[RunSpec]:
        """The selection runs, then the study runs as far as they are known."""
        recorded = _read_json(self.out / CALIBRATION).get("steps", {})
        return selection_runs(self.study) + study_runs(self.study, self._recorded_choices(), recorded)
