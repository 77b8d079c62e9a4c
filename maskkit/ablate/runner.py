"""Running a study: every (arm, seed) as an ordinary run directory, made by `maskkit pretrain` and scored
by `maskkit evaluate` in local processes.

    runner = StudyRunner(load_study("study.toml"), Path("runs/ablate"), jobs=2)
    runner.dry_run()     # every command, in order
    runner.run()         # selection on val, calibration, then the study runs seed by seed

The study directory holds `study.toml` (the file as run), `plan.json` (each run's options, and the
settings of each of its scores: a run made with other options is refused, never mixed in, and a score
made with other [evaluations] settings is evaluated again), `selection.json` (each grid's validation
scores and choice), `calibration.json` (measured step costs and equal-cost budgets, reused on a rerun),
`runs/<run>/` (one `maskkit pretrain` run directory each) and `logs/<run>.log` (the commands' output).
The records are read strictly (maskkit.ablate.cache): a damaged one is refused, naming it and the field.

One `ablate` per study directory: `run` holds its lock (`<DIR>/.lock`, `maskkit.locking`) for the
whole study, checks everything (names, records, every known run's options and lock) before it writes
anything, and never removes a run directory another process holds.

Resumable: a run with model.pt and summary.json is not pretrained again, one with a checkpoint is
continued with `maskkit pretrain --resume`, one stopped before its first checkpoint starts over, and an
evaluation already in eval.json with the study's settings is not repeated; `dry_run` lists exactly
these steps. `jobs` processes run at once, each with `threads` torch threads (OMP_NUM_THREADS /
MKL_NUM_THREADS; default: the cores split between them). A stop signal reaches the children and
launches nothing more (maskkit.ablate.processes); the same command continues the study.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from maskkit.locking import LOCK_FILE, RunLockedError, run_in_progress
from maskkit.run.lifecycle import take_lock  # a run directory's lock, with its clean abandon

from .cache import PlanEntry, plan_to_json, read_calibration, read_plan, read_selection
from .calibrate import calibrate
from .files import eval_key, read_score
from .plan import CALIBRATED, CHOSEN, RunSpec, selection_runs, study_runs
from .processes import RunFailed, StudyStopped, shown, subprocess_launcher
from .select import Choice, choose
from .study import Study, StudyError

__all__ = [
    "CALIBRATION", "LAUNCHERS", "PLAN", "SELECTION", "STUDY_FILE", "RunFailed", "Step", "StudyRunner", "StudyStopped",
    "eval_key", "shown", "subprocess_launcher",
]  # fmt: skip

STUDY_FILE, PLAN, SELECTION, CALIBRATION = "study.toml", "plan.json", "selection.json", "calibration.json"
RUNS, LOGS = "runs", "logs"
#: launchers a study can use; "slurm" is not one yet (single runs: `maskkit pretrain --slurm-...`, maskkit.slurm)
LAUNCHERS = ("local",)

#: (maskkit subcommand arguments, environment, log file) -> None; raises RunFailed
Launcher = Callable[[list[str], dict[str, str], Path], None]


def _read_json(path: Path) -> dict[str, Any]:
    """A run's own file, read for its state (absent or unreadable: nothing known)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _write_json(path: Path, value: Any) -> None:
    from maskkit.checkpoint import atomic_write_text

    atomic_write_text(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


def _made_with(run_dir: Path) -> tuple[str, ...] | None:
    """The pretrain options a run directory's config.json says it was made with (None: not recorded)."""
    command = _read_json(run_dir / "config.json").get("command")
    if not isinstance(command, list) or "pretrain" not in command or not all(isinstance(c, str) for c in command):
        return None
    args, rest = [], command[command.index("pretrain") + 1:]
    while rest:
        token = rest.pop(0)
        if token == "--out" and rest:
            rest.pop(0)
        elif token not in ("--no-progress", "--progress"):
            args.append(token)
    return tuple(args)


@dataclass(frozen=True)
class Step:
    """One thing a run needs: `action` is reuse, start, resume, restart (its files removed first), evaluate or
    evaluate again (its score was made with other settings); `why` says what a dry run shows beside it."""

    run: str
    action: str
    command: tuple[str, ...]
    why: str = ""
    score: str | None = None  # an evaluation's key in eval.json

    def line(self) -> str:
        """The step as a dry run prints it: a command (a reused one marked `# done:`), a reason after `#`."""
        if self.action == "reuse":
            return "# done: " + shown(list(self.command))
        return shown(list(self.command)) + (f"  # {self.action}: {self.why}" if self.why else "")


@dataclass
class StudyRunner:
    """Runs (or prints) a study's commands into the study directory `out`.

    `stop` (a `maskkit.train.StopSignals`, entered by the caller): once it records a signal, the running
    children get it, nothing more is launched and `run` raises StudyStopped.
    """

    study: Study
    out: Path
    jobs: int = 1
    threads: int | None = None
    launch: Launcher | None = None  # None: `maskkit` child processes (subprocess_launcher)
    on_state: Callable[[str, str], None] | None = None
    stop: Any = None
    launched: list[Step] = field(default_factory=list, repr=False)  # what `run` did, in order
    _plan_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _plan: dict[str, PlanEntry] | None = field(default=None, repr=False)
    _abort: threading.Event = field(default_factory=threading.Event, repr=False)

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
        """`out/runs/<name>`: StudyError unless it is a folder of runs/ itself (not a link out of it)."""
        runs = self.out / RUNS
        path = runs / spec.name
        if os.path.normpath(path).rsplit(os.sep, 1)[0] != os.path.normpath(runs) or path.is_symlink():
            raise StudyError(f"run {spec.name!r}: its directory {path} is not a folder of {runs}")
        return path

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
        return all(step.action == "reuse" for step in self.steps(spec))

    def progress(self, spec: RunSpec) -> tuple[int, int | None]:
        """(step reached, steps asked) of a run, from its metrics.jsonl and config.json."""
        d = self.run_dir(spec)
        train = _read_json(d / "config.json").get("train", {})
        total = train.get("steps") if isinstance(train, dict) else None
        step = 0
        try:
            lines = (d / "metrics.jsonl").read_text().splitlines()
            step = int(json.loads(lines[-1]).get("step", 0)) if lines else 0
        except (OSError, ValueError, IndexError, AttributeError):
            pass
        return step, total if isinstance(total, int) else None

    def eval_args(self, protocol: str, split: str) -> list[str]:
        """The `maskkit evaluate` options of a score (the settings that make it reusable)."""
        return [*self.study.evaluations[protocol].args(), "--split", split]

    def commands(self, spec: RunSpec) -> list[list[str]]:
        """The `maskkit` commands that make and score this run from scratch."""
        d = str(self.run_dir(spec))
        out = [["pretrain", *spec.args, "--out", d, "--no-progress"]]
        for protocol, split in spec.evaluations:
            out.append(["evaluate", d, *self.eval_args(protocol, split), "--no-progress"])
        return out

    def steps(self, spec: RunSpec) -> list[Step]:
        """What the run needs now, in order: its pretraining (reused, started, resumed or restarted), then
        each evaluation (reused only when the run is and its score was made with the study's settings)."""
        d, commands = self.run_dir(spec), self.commands(spec)
        if self.pretrained(spec):
            first = Step(spec.name, "reuse", tuple(commands[0]))
        elif (checkpoint := self._resume_point(spec)) is not None:
            first = Step(spec.name, "resume", ("pretrain", "--resume", str(d), "--no-progress"),
                         f"from {checkpoint}")  # fmt: skip
        elif d.exists():
            first = Step(spec.name, "restart", tuple(commands[0]),
                         f"{d} holds no checkpoint to resume from: its files are removed first")  # fmt: skip
        else:
            first = Step(spec.name, "start", tuple(commands[0]))
        out = [first]
        entry = self._read_plan().get(spec.name)
        for (protocol, split), cmd in zip(spec.evaluations, commands[1:], strict=True):
            key = eval_key(protocol, split)
            if first.action != "reuse" or not self.scored(spec, protocol, split):
                out.append(Step(spec.name, "evaluate", tuple(cmd), score=key))
                continue
            recorded = entry.scored.get(key) if entry is not None else None
            if recorded == tuple(self.eval_args(protocol, split)):
                out.append(Step(spec.name, "reuse", tuple(cmd), score=key))
            else:
                why = (f"{key} in eval.json has no recorded settings" if recorded is None else
                       f"{key} in eval.json was made with other settings ({shown(['evaluate', *recorded])})")
                out.append(Step(spec.name, "evaluate again", tuple(cmd), why, key))  # fmt: skip
        return out

    def _resume_point(self, spec: RunSpec) -> str | None:
        """The newest checkpoint before the run's last step, if any (one at the last step, with no model.pt or
        summary.json, was stopped while writing them: `--resume` would call it complete, so it starts over)."""
        steps = {}
        for path in (self.run_dir(spec) / "checkpoints").glob("checkpoint-*.pt"):
            try:
                steps[int(path.stem.split("-")[-1])] = path.name
            except ValueError:
                continue
        total = self.progress(spec)[1]
        if not steps or (total is not None and max(steps) >= total):
            return None
        return steps[max(steps)]

    def _resumable(self, spec: RunSpec) -> bool:
        return self._resume_point(spec) is not None

    # ---- the study directory's records -------------------------------------------------------------

    def _read_plan(self) -> dict[str, PlanEntry]:
        if self._plan is None:
            self._plan = read_plan(self.out / PLAN)
        return self._plan

    def _recorded_choices(self) -> dict[str, str]:
        return read_selection(self.out / SELECTION, self.study)

    def _recorded_steps(self) -> dict[str, int]:
        if not any(a.equal_cost is not None for a in self.study.arms.values()):
            return {}
        return dict(read_calibration(self.out / CALIBRATION).get("steps", {}))

    def all_specs(self) -> list[RunSpec]:
        """The selection runs, then the study runs as far as they are known."""
        return selection_runs(self.study) + study_runs(self.study, self._recorded_choices(), self._recorded_steps())

    def _known_specs(self) -> list[RunSpec]:
        """The runs whose options are known now (no grid choice or calibration still to come)."""
        return [s for s in self.all_specs() if s.value != CHOSEN and CALIBRATED not in s.args]

    def _check_spec(self, spec: RunSpec) -> None:
        """StudyError unless the run's directory may be this run: made with these options (by plan.json and
        by its own config.json), and written by no other process now."""
        d = self.run_dir(spec)
        if not d.exists():
            return
        holder = run_in_progress(d)
        if holder is not None:
            raise StudyError(f"run directory {d} is in use by {holder}; wait for it to end (maskkit ablate never "
                             "removes or replaces a run another process writes)")  # fmt: skip
        entry = self._read_plan().get(spec.name)
        for made, source in ((entry.pretrain if entry else None, PLAN), (_made_with(d), f"{d / 'config.json'}")):
            if made is not None and made != spec.args:
                raise StudyError(f"{d} was made with other options than the study now gives "
                                 f"({shown(['pretrain', *made])}, by {source}); remove it or use another --out")  # fmt: skip

    def check(self) -> None:
        """Every check a run makes before it writes anything: the records of the study directory (plan.json,
        selection.json, calibration.json) and each run known now (StudyError, one line)."""
        for spec in self._known_specs():
            self._check_spec(spec)
            self.steps(spec)

    # ---- dry run -----------------------------------------------------------------------------------

    def dry_run(self) -> list[str]:
        """What `run` will do, in order, nothing run or written: each command, reused ones marked `# done:`,
        resumed, restarted and re-evaluated ones with the reason after `#`; refused as `run` would be."""
        holder = run_in_progress(self.out)
        if holder is not None:
            raise self._in_use(holder)
        self.check()
        lines = [step.line() for spec in selection_runs(self.study) for step in self.steps(spec)]
        recorded = self._recorded_steps()
        if any(a.equal_cost is not None for a in self.study.arms.values()):
            lines.append(f"# calibration: interleaved step costs in this process ({CALIBRATION}), "
                         + ("recorded" if recorded else "to be measured"))  # fmt: skip
        seen = {s.name for s in selection_runs(self.study)}
        undecided = {s.arm for s in selection_runs(self.study) if not self.complete(s)}  # `run` chooses again
        chosen = {arm: value for arm, value in self._recorded_choices().items() if arm not in undecided}
        for spec in study_runs(self.study, chosen, recorded):
            steps = self.steps(spec)
            grid = self.study.arms[spec.arm].select
            if spec.name in seen or (spec.value == CHOSEN and grid is not None and spec.seed in grid.seeds):
                # a chosen grid value's run on a selection seed: pretrained by the selection already
                steps = [s for s in steps if s.command[0] == "evaluate"]
            lines += [step.line() for step in steps]
        return lines

    # ---- running -----------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Selection runs and choices, calibration, then every study run; RunFailed lists what failed.

        The study directory is this process's for the whole study (its lock); everything is checked
        before anything is written, so a refused study leaves the directory as it was.
        """
        with self._owned():
            self.check()
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / STUDY_FILE).write_text(self.study.source, encoding="utf-8")
            choices = self.select()
            chosen = {arm: c.chosen for arm, c in choices.items()}
            self._check_stop()
            equal = self.calibration(chosen).get("steps", {})
            self._check_stop()
            specs = study_runs(self.study, chosen, equal)
            self._execute(specs)
        return {"selection": {a: c.to_dict() for a, c in choices.items()}, "equal_steps": equal,
                "runs": [s.name for s in specs]}  # fmt: skip

    @contextlib.contextmanager
    def _owned(self) -> Iterator[None]:
        """Hold the study directory's lock (`<out>/.lock`) while the study runs; StudyError naming the holder
        when another process has it. A study refused before its first write leaves no lock file (nor `out`)."""
        existed = self.out.exists()
        before = set(os.listdir(self.out)) if self.out.is_dir() else set()
        record = self.out / LOCK_FILE  # its holder's record, put back by a refused study
        previous = record.read_bytes() if record.is_file() and not record.is_symlink() else None
        try:
            lock = take_lock(self.out, "ablate")
        except RunLockedError:
            raise self._in_use(run_in_progress(self.out) or "another process") from None
        try:
            yield
        except BaseException:
            if set(os.listdir(self.out)) <= before | {LOCK_FILE}:  # nothing written: leave it as it was
                if previous is not None and not lock.created:
                    record.write_bytes(previous)  # still ours: the flock is held until abandon()
                lock.abandon()
                if not existed:
                    with contextlib.suppress(OSError):
                        self.out.rmdir()
            raise
        finally:
            lock.release()

    def _in_use(self, holder: str) -> StudyError:
        return StudyError(f"study directory {self.out} is in use by {holder}; one maskkit ablate per --out: "
                          "wait for it to end or choose another --out")  # fmt: skip

    def _stopping(self) -> bool:
        return (self.stop is not None and self.stop.requested) or self._abort.is_set()

    def _check_stop(self) -> None:
        if self.stop is not None and self.stop.requested:
            raise StudyStopped(self.stop.signum)

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
        recorded = read_calibration(self.out / CALIBRATION)
        if recorded.get("options") == options and set(recorded.get("steps", {})) == set(pairs):
            return recorded
        self._state("calibration", f"measuring the step cost of {', '.join(sorted(options))}")
        result = {**calibrate(self.study, chosen, threads=self.threads), "options": options}
        _write_json(self.out / CALIBRATION, result)
        self._state("calibration", ", ".join(f"{a}: {n} steps" for a, n in result["steps"].items()))
        return result

    def _check_plan(self, specs: list[RunSpec]) -> None:
        """Refuse a run directory made with other options (or in use); record each run's options in plan.json."""
        for spec in specs:
            self._check_spec(spec)
        with self._plan_lock:
            plan = self._read_plan()
            for spec in specs:
                entry = plan.get(spec.name)
                if entry is None or entry.pretrain != spec.args:
                    plan[spec.name] = PlanEntry(spec.args)
            _write_json(self.out / PLAN, plan_to_json(plan))

    def _record(self, spec: RunSpec, step: Step) -> None:
        """After a step succeeded: a new pretraining drops the run's recorded scores, a score records its settings."""
        with self._plan_lock:
            entry = self._read_plan().setdefault(spec.name, PlanEntry(spec.args))
            if step.score is None:
                entry.scored.clear()
            else:
                protocol, split = next((p, s) for p, s in spec.evaluations if eval_key(p, s) == step.score)
                entry.scored[step.score] = tuple(self.eval_args(protocol, split))
            _write_json(self.out / PLAN, plan_to_json(self._read_plan()))
            self.launched.append(step)

    def _execute(self, specs: list[RunSpec]) -> None:
        self._check_stop()
        self._check_plan(specs)
        for spec in specs:
            self._state(spec.name, "done (kept)" if self.complete(spec) else "waiting")
        failed: list[str] = []
        with ThreadPoolExecutor(max_workers=self.jobs) as pool:
            futures = [(spec, pool.submit(self._one, spec)) for spec in specs]
            try:
                for spec, future in futures:
                    try:
                        future.result()
                    except RunFailed as err:
                        failed.append(str(err))
                        self._state(spec.name, f"failed: {err}")
                    except StudyStopped:
                        self._state(spec.name, "stopped")
            except BaseException:  # a second Ctrl-C (KeyboardInterrupt): the children are killed, not waited for
                self._abort.set()
                raise
        self._check_stop()
        if failed:
            more = f" (and {len(failed) - 1} more; rerun to retry)" if len(failed) > 1 else " (rerun to retry)"
            raise RunFailed(failed[0] + more)

    def _launch(self, args: list[str], env: dict[str, str], log: Path) -> None:
        if self.launch is not None:
            self.launch(args, env, log)
        else:
            subprocess_launcher(args, env, log, stop=self.stop, abort=self._abort)

    def _one(self, spec: RunSpec) -> None:
        """Pretrain (start, resume or restart) one run, then every evaluation it lacks; nothing after a stop."""
        env, log = self.env(), self.log(spec)
        for step in self.steps(spec):
            if step.action == "reuse":
                continue
            if self._stopping():
                return
            if step.action == "restart":
                self._clear(self.run_dir(spec))
            state = {"start": "pretraining", "resume": "resuming", "restart": "pretraining (started over)",
                     "evaluate": f"evaluating {step.score}", "evaluate again": f"evaluating {step.score} again"}
            self._state(spec.name, state[step.action])
            self._launch(list(step.command), env, log)
            self._record(spec, step)
        self._state(spec.name, "done")

    def _clear(self, run_dir: Path) -> None:
        """Empty a run directory stopped before its first checkpoint, holding its lock: RunFailed (one line)
        when another process writes it, which is never removed."""
        try:
            lock = take_lock(run_dir, "ablate")
        except RunLockedError:
            holder = run_in_progress(run_dir) or "another process"
            raise RunFailed(f"{run_dir} is in use by {holder}: not removed; rerun when it has ended") from None
        try:
            for entry in run_dir.iterdir():
                if entry.name == LOCK_FILE:
                    continue  # held: the next pretrain takes it over
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        finally:
            lock.release()

    def _state(self, name: str, state: str) -> None:
        if self.on_state is not None:
            self.on_state(name, state)
