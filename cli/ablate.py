"""`maskkit ablate STUDY.toml --out DIR` and `maskkit ablate report DIR`: parsing and printing only.

The work is maskkit.ablate's (study files, the runner, the report); this module turns options into
its calls, draws the progress view (one line per run: its state and step) and prints what comes back.
`maskkit ablate STUDY.toml ...` is `maskkit ablate run STUDY.toml ...` (the group runs `run` when its
first argument names no subcommand).
"""

from __future__ import annotations

import shlex
import threading
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Optional

import click
import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from . import runner
from .options import CheckedGroup
from .runner import CommandError

console = Console()
err_console = Console(stderr=True, soft_wrap=True)


class DefaultToRun(CheckedGroup):
    """A group whose first argument, when it is not a subcommand (nor --help), is `run`'s STUDY."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


ablate_app = typer.Typer(
    cls=DefaultToRun, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Paired masking studies: every (arm, seed) a run, selection on val, controls, equal cost; then a report. "
    "`maskkit ablate STUDY.toml --out DIR` is `maskkit ablate run STUDY.toml --out DIR`; then "
    "`maskkit ablate report DIR`.",
)  # fmt: skip


class ProgressView:
    """Each run's state and step, as a rich table refreshed while the study runs."""

    def __init__(self, study_runner: Any) -> None:
        self.runner = study_runner
        self.specs = {s.name: s for s in study_runner.all_specs()}
        self.states: dict[str, str] = {}
        self.lock = threading.Lock()

    def on_state(self, name: str, state: str) -> None:
        with self.lock:
            self.states[name] = state
            if name not in self.specs and not name.endswith(")") and name != "calibration":
                self.specs = {s.name: s for s in self.runner.all_specs()}  # a grid's choice is known now

    def table(self) -> Table:
        table = Table(title=f"maskkit ablate: {self.runner.study.name} -> {self.runner.out}", expand=False)
        for column in ("run", "state", "step"):
            table.add_column(column, overflow="fold")
        with self.lock:
            states = dict(self.states)
        for name, state in states.items():
            spec = self.specs.get(name)
            step = ""
            if spec is not None and state not in ("waiting",):
                done, total = self.runner.progress(spec)
                step = f"{done} / {total}" if total else ""
            style = "green" if state.startswith("done") else "red" if state.startswith("failed") else ""
            table.add_row(name, f"[{style}]{state}[/{style}]" if style else state, step)
        return table


@ablate_app.command("run")
def run_command(
    study: Path = typer.Argument(..., help="The study file (TOML; see maskkit/ablate/study.py or README 'Ablations')."),
    out: Path = typer.Option(..., "--out", help="The study directory: one run directory per (arm, seed), resumable."),
    jobs: int = typer.Option(1, "--jobs", help="Local processes at once; the cores are split between them."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Torch threads per process (default cores / jobs)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print every command (finished ones marked); run nothing."),
    launcher: str = typer.Option("local", "--launcher", help="local (processes on this machine)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the live table of runs."),
) -> None:
    """Run a study: every (arm, seed) as a `maskkit pretrain` run under DIR, scored by `maskkit evaluate`.

    Selection grids run first (scored on the validation split), then the equal-cost calibration, then
    every arm seed by seed. Rerun the same command to continue an interrupted study.
    """
    with runner.one_line_errors(err_console):
        from maskkit.ablate import LAUNCHERS, RunFailed, StudyRunner, StudyStopped, load_study
        from maskkit.train import StopSignals

        if launcher == "slurm":
            raise CommandError("--launcher slurm is not available yet for studies: use --launcher local (this "
                               "machine's processes), or submit single runs with maskkit pretrain --slurm-partition "
                               "P --nodes N --gpus-per-node G")  # fmt: skip
        if launcher not in LAUNCHERS:
            raise CommandError(f"--launcher must be one of {', '.join(LAUNCHERS)}, got {launcher!r}")
        loaded = load_study(study)
        study_runner = StudyRunner(loaded, out, jobs=jobs, threads=threads)
        if dry_run:
            for line in study_runner.dry_run():
                typer.echo(line)  # unwrapped: each command pastes as it is
            return
        again = shlex.join(["maskkit", "ablate", str(study), "--out", str(out),
                            *(["--jobs", str(jobs)] if jobs != 1 else []),
                            *(["--threads", str(threads)] if threads is not None else [])])  # fmt: skip
        study_runner.dry_run()  # a refusal (lock, records, runs) is its one line before the table is drawn
        view = ProgressView(study_runner)
        if not progress:
            study_runner.on_state = lambda name, state: runner.say(console, f"{name}: {state}")
        else:
            study_runner.on_state = view.on_state
        live = Live(console=console, get_renderable=view.table, refresh_per_second=2) if progress else nullcontext()
        try:
            with StopSignals() as study_runner.stop, live:
                result = study_runner.run()
        except RunFailed as err:
            raise CommandError(f"{err}; continue with: {again}") from None
        except StudyStopped as stopped:
            runner.say(err_console, f"Stopped: {stopped}; continue with: {again}")
            raise typer.Exit(code=stopped.exit_code) from None
        except KeyboardInterrupt:  # a second Ctrl-C: the children were killed, not waited for
            runner.say(err_console, f"Interrupted: the runs in progress were killed; continue with: {again}")
            raise typer.Exit(code=130) from None
        for arm, choice in result["selection"].items():
            runner.say(console, f"{arm}: {choice['option']} {choice['chosen']} chosen on the validation split")
        for arm, steps in result["equal_steps"].items():
            runner.say(console, f"{arm}: {steps} steps (equal cost, {study_runner.out / 'calibration.json'})")
        runner.say(console, f"{len(result['runs'])} runs done in {out}; next: maskkit ablate report {out}")


@ablate_app.command("report")
def report_command(
    study_dir: Path = typer.Argument(..., help="A study directory written by maskkit ablate STUDY.toml --out DIR."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Folder of the outputs (default DIR/report)."),
    chart: bool = typer.Option(True, "--chart/--no-chart", help="Draw chart.png (per-arm scores, paired intervals)."),
    gallery: bool = typer.Option(True, "--gallery/--no-gallery", help="Draw masks.png (every arm on the same images)."),
) -> None:
    """Tables of a study (markdown, CSV, JSON), its verdicts, a chart and a mask gallery.

    Per arm mean ± sd over seeds with every seed; paired differences against the baseline and each
    learned arm's control with the 95% paired t interval; collapse diagnostics; steps and wall time.
    """
    with runner.one_line_errors(err_console):
        from maskkit.ablate import build_report, markdown, write_report
        from maskkit.jsonfile import shown_path

        report = build_report(study_dir)
        written = write_report(report, output or study_dir / "report", chart=chart, gallery=gallery)
        typer.echo(markdown(report))  # unwrapped: the markdown pastes as it is
        runner.say(console, "wrote " + ", ".join(shown_path(p) for p in written.values()))
