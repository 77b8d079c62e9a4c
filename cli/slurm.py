"""`maskkit pretrain`'s SLURM options: any of them submits the run as a SLURM job instead of running it here.

Parsing and printing only: the job, its checks, the executor and the requeue are maskkit.slurm's.
The options are flags on `pretrain` rather than a `maskkit submit` command: the run's settings are
pretrain's own (every option, `--resume` included, means the same on a laptop and on a cluster),
and the SLURM flags only say where it runs, as the official MAE's submitit_pretrain.py takes
main_pretrain.py's arguments plus --nodes/--ngpus/--timeout/--partition (accepted here as aliases).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console

from maskkit.slurm import DEFAULT_TIME_MIN, MAX_REQUEUES, SIGNAL_DELAY_S

from .options import given_on_command_line

PANEL = "SLURM (submitit; any of these submits the run as a job)"


def _opt(default: Any, *flags: str, help: str) -> Any:
    return typer.Option(default, *flags, help=help, rich_help_panel=PANEL)


#: the options (parameter name -> (type, typer option)); every one of them may go with --resume
OPTIONS: dict[str, tuple[Any, Any]] = {
    "slurm_partition": (Optional[str], _opt(None, "--slurm-partition", "--partition",
                                            help="SLURM partition (default: the cluster's).")),
    "nodes": (int, _opt(1, "--nodes", help="Nodes of the job.")),
    "gpus_per_node": (int, _opt(1, "--gpus-per-node", "--ngpus",
                                help="GPUs per node; one task (process) per GPU.")),
    "slurm_time": (int, _opt(DEFAULT_TIME_MIN, "--slurm-time", "--timeout",
                             help="Time limit of the job in minutes; it is requeued when it runs out.")),
    "slurm_signal_delay": (int, _opt(SIGNAL_DELAY_S, "--slurm-signal-delay",
                                     help="Seconds ahead of the time limit that SLURM signals the job to "
                                     "checkpoint and requeue.")),
    "slurm_cpus_per_task": (int, _opt(10, "--slurm-cpus-per-task", help="CPUs per task (data loading).")),
    "slurm_mem_gb": (Optional[float], _opt(None, "--slurm-mem-gb", help="Memory per node in GB (default: the "
                                           "partition's).")),
    "slurm_account": (Optional[str], _opt(None, "--slurm-account", help="SLURM account.")),
    "slurm_qos": (Optional[str], _opt(None, "--slurm-qos", help="SLURM quality of service.")),
    "slurm_constraint": (Optional[str], _opt(None, "--slurm-constraint", help="SLURM node constraint (e.g. a GPU "
                                             "type).")),
    "slurm_job_name": (str, _opt("maskkit", "--slurm-job-name", help="The job's name in squeue.")),
    "slurm_max_requeues": (int, _opt(MAX_REQUEUES, "--slurm-max-requeues",
                                     help="Requeues after a time-out before the job gives up (preemptions do not "
                                     "count).")),
    "slurm_folder": (Optional[Path], _opt(None, "--slurm-folder",
                                          help="submitit's folder: sbatch script, logs (default RUN/slurm).")),
    "slurm_cluster": (str, _opt("slurm", "--slurm-cluster",
                                help="slurm (sbatch), or local: this machine, through submitit's local "
                                "executor (the same tasks, time limit, signal and requeue), to try a job.")),
    "dry_run": (bool, _opt(False, "--dry-run", help="Print the sbatch script and the job; submit nothing, write "
                           "nothing.")),
}


def say(console: Console, text: str) -> None:
    """Print `text` as it is: no markup, no highlighting, no wrapping (a script must stay runnable)."""
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def requested(ctx: typer.Context) -> list[str]:
    """The SLURM options typed on the command line (as typed: --nodes, ...); empty: run here."""
    return [_flag(name) for name in OPTIONS if given_on_command_line(ctx, name)]


def _flag(name: str) -> str:
    return OPTIONS[name][1].param_decls[0]


def settings(values: dict[str, Any], given: list[str]) -> Any:
    """The checked `SlurmSettings` of the parsed values (submitit first: nothing works without it)."""
    from maskkit import slurm

    slurm.require_submitit(given[0])
    chosen = slurm.SlurmSettings(
        partition=values["slurm_partition"], nodes=values["nodes"], gpus_per_node=values["gpus_per_node"],
        time_min=values["slurm_time"], signal_delay_s=values["slurm_signal_delay"],
        cpus_per_task=values["slurm_cpus_per_task"], mem_gb=values["slurm_mem_gb"], account=values["slurm_account"],
        qos=values["slurm_qos"], constraint=values["slurm_constraint"], job_name=values["slurm_job_name"],
        max_requeues=values["slurm_max_requeues"], folder=values["slurm_folder"], cluster=values["slurm_cluster"],
    )  # fmt: skip
    chosen.check()
    return chosen


def submit(job: Any, chosen: Any, dry_run: bool, console: Console) -> Any:
    """Submit `job` (or only show it) and say what happened; returns maskkit.slurm.Submitted."""
    from maskkit import slurm

    done = slurm.submit(job, chosen, dry_run=dry_run)
    what = "new run" if done.new else "continue the run"
    shape = (f"{chosen.nodes} node(s) x {chosen.gpus_per_node} GPU(s), {chosen.world_size} task(s), one per GPU; "
             f"{chosen.time_min} min, signalled {chosen.signal_delay_s} s ahead, requeued up to {chosen.max_requeues} "
             "times")  # fmt: skip
    if dry_run:
        say(console, f"dry run ({chosen.cluster}): nothing submitted, nothing written\n")
        say(console, done.text.rstrip())
        say(console, f"\njob: {what} {done.out} ({shape}); submitit's folder {done.folder}")
        return done
    say(console, f"submitted {chosen.cluster} job {done.job_id}: {what} {done.out} ({shape})")
    if done.logs is not None:
        out, err = done.logs
        say(console, f"logs: {out} (rank 0; errors in {err.name}); a requeued job resumes from the run's newest "
            "verified checkpoint")  # fmt: skip
    return done
