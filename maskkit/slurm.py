"""Pretraining as a SLURM job through submitit (the optional extra: `pip install "maskkit[slurm]"`).

    job = SlurmPretrain("/ckpt/mae-vitb", config)            # or SlurmPretrain(run_dir) to continue a run
    settings = SlurmSettings(partition="gpu", nodes=2, gpus_per_node=8, time_min=4320)
    submitted = submit(job, settings)                        # sbatch, through submitit; one task per GPU

**The job.** `SlurmPretrain` is the picklable callable submitit runs in every task. A task first
looks at the run directory: a run there already complete, it does nothing and returns the run's
summary; no run there yet, it will create the run (`create_run`); a run there, it will continue it
exactly as `maskkit pretrain --resume RUN` does (`resume_run`: the newest *verified* checkpoint,
whatever its step or name, metrics.jsonl cut back to it). To train, it maps submitit's
`JobEnvironment` onto the variables torchrun would set (`distributed_env`: RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR = the job's first host, MASTER_PORT from the job id) and
joins the process group with `maskkit.distributed.init_from_env`. So the job is the same on every
start: the submission creates the directory, the job's first start writes the run, and any requeue (submitit's, SLURM's own after a preemption or a node failure, or
`scontrol requeue` by hand) resumes it, never starts over and never refuses because the directory
exists. The lock on the directory (`RUN/.lock`) is the kernel's flock, released when the previous
start's process died, so a requeued task takes it again.

**Signals and requeue.** submitit asks SLURM for `--signal=USR2@<delay>` (its `JobEnvironment.USR_SIG`,
USR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise: NCCL may catch USR1) and, before it calls the job,
installs a handler for that signal that would call `checkpoint()` and requeue at once, from inside
whatever the task is doing. maskkit does not let that happen mid-step: while the job trains,
`JobStopSignals` owns SIGTERM, SIGINT, SIGUSR1 and submitit's signal; a signal is only recorded; the
trainer finishes the step, all-reduces the stop flag (every rank stops at the same step), writes the
checkpoint and raises `TrainingStopped`. Only then does the job hand over to submitit: if a requeue
signal (submitit's, or SIGUSR1, the signal of `--signal=USR1@...` and of Lightning) reached any rank
(all-reduced again: the ranks agree), rank 0 calls submitit's own handler, which calls `checkpoint()` (which resubmits the same
job: the checkpoint is already on disk, and the job finds it by itself), requeues (`scontrol requeue`;
the local executor: exit 144) and exits; the other ranks wait at a barrier until rank 0 has requeued,
then exit. A stop on SIGTERM or SIGINT alone (`scancel`, or a preemption on a cluster that sends no user
signal, where SLURM requeues by itself) checkpoints and ends the job with an error naming the resume
command, without requeueing. submitit counts requeues after a time-out (`max_requeues`); a preemption
does not count.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import shlex
import signal
import sys
import zlib
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

from maskkit.train.signals import STOP_SIGNALS, StopSignals, TrainingStopped

__all__ = [
    "CLUSTERS", "DEFAULT_TIME_MIN", "MAX_REQUEUES", "SIGNAL_DELAY_S", "JobStopSignals", "SlurmError",
    "SlurmPretrain", "SlurmSettings", "Submitted", "distributed_env", "master_port", "require_submitit",
    "new_job", "requeue_signals", "resume_job", "submit",
]  # fmt: skip

#: seconds between SLURM's signal and the time limit (the official MAE's submitit_pretrain.py: 120)
SIGNAL_DELAY_S = 120
#: the job's time limit in minutes (the official script's --timeout: 3 days)
DEFAULT_TIME_MIN = 4320
#: requeues after a time-out before submitit gives up (the official script's slurm_max_num_timeout)
MAX_REQUEUES = 30
#: where the job runs: a SLURM cluster (sbatch), or this machine through submitit's LocalExecutor
#: (real processes, one per task, with the time limit, the signal and the requeue of a SLURM job)
CLUSTERS = ("slurm", "local")
#: submitit's folder (sbatch script, pickles, logs) inside the run directory unless told otherwise
SLURM_FOLDER = "slurm"
INSTALL = 'pip install "maskkit[slurm]"'


class SlurmError(ValueError):
    """A SLURM submission that cannot be made; its message is one line."""


def require_submitit(what: str = "--slurm") -> Any:
    """The submitit module; SlurmError (one line, saying how to install it) when it is missing."""
    try:
        import submitit
    except ImportError:
        raise SlurmError(f"{what} needs submitit: {INSTALL}") from None
    return submitit


# ---- the settings -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SlurmSettings:
    """Where and how long the job runs; one task per GPU (`tasks_per_node = gpus_per_node`).

    `mem_gb` is per node (None: the partition's default); `folder` is submitit's (default RUN/slurm).
    """

    partition: str | None = None
    nodes: int = 1
    gpus_per_node: int = 1
    time_min: int = DEFAULT_TIME_MIN
    signal_delay_s: int = SIGNAL_DELAY_S
    cpus_per_task: int | None = 10
    mem_gb: float | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    job_name: str = "maskkit"
    max_requeues: int = MAX_REQUEUES
    folder: Path | None = None
    cluster: str = "slurm"

    @property
    def tasks_per_node(self) -> int:
        return self.gpus_per_node

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    def check(self) -> None:
        """One-line SlurmError naming the option of the first bad value; nothing is read or submitted."""
        if self.cluster not in CLUSTERS:
            raise SlurmError(f"--slurm-cluster must be one of {', '.join(CLUSTERS)}, got {self.cluster!r}")
        for option, value, least in (("--nodes", self.nodes, 1), ("--gpus-per-node", self.gpus_per_node, 1),
                                     ("--slurm-time", self.time_min, 1), ("--slurm-signal-delay", self.signal_delay_s, 0),
                                     ("--slurm-max-requeues", self.max_requeues, 0)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise SlurmError(f"{option} must be an integer of at least {least}, got {value!r}")
        if self.cpus_per_task is not None and (isinstance(self.cpus_per_task, bool) or self.cpus_per_task < 1):
            raise SlurmError(f"--slurm-cpus-per-task must be a positive integer, got {self.cpus_per_task!r}")
        # finite and at least 1 MB: sbatch's --mem=0 (what a smaller value would round to) means all the node's memory
        if self.mem_gb is not None and not (math.isfinite(self.mem_gb) and self.mem_gb * 1024 >= 1):
            raise SlurmError(f"--slurm-mem-gb must be a finite number of at least 1 MB (0.001), got {self.mem_gb!r}")
        if self.signal_delay_s >= self.time_min * 60:
            raise SlurmError(f"--slurm-signal-delay {self.signal_delay_s} s must be shorter than --slurm-time "
                             f"{self.time_min} min ({self.time_min * 60} s)")  # fmt: skip
        for option, value in (("--slurm-partition", self.partition), ("--slurm-account", self.account),
                              ("--slurm-qos", self.qos), ("--slurm-constraint", self.constraint),
                              ("--slurm-job-name", self.job_name)):  # fmt: skip
            if value is not None and (not value.strip() or any(c.isspace() for c in value)):
                raise SlurmError(f"{option} must be one word, got {value!r}")
        if self.cluster == "local" and self.nodes != 1:
            raise SlurmError(f"--nodes must be 1 with --slurm-cluster local (one machine), got {self.nodes}")

    def sbatch_parameters(self) -> dict[str, Any]:
        """submitit's SlurmExecutor parameters (sbatch's own names); unset ones left to the cluster."""
        params: dict[str, Any] = {
            "job_name": self.job_name, "partition": self.partition, "time": self.time_min, "nodes": self.nodes,
            "ntasks_per_node": self.tasks_per_node, "gpus_per_node": self.gpus_per_node,
            "cpus_per_task": self.cpus_per_task, "signal_delay_s": self.signal_delay_s, "account": self.account,
            "qos": self.qos, "constraint": self.constraint,
            "mem": None if self.mem_gb is None else _mem_text(self.mem_gb),
        }  # fmt: skip
        return {k: v for k, v in params.items() if v is not None}

    def local_parameters(self) -> dict[str, Any]:
        """submitit's LocalExecutor parameters: the same tasks, time limit and signal, on this machine."""
        return {"timeout_min": self.time_min, "tasks_per_node": self.tasks_per_node,
                "gpus_per_node": self.gpus_per_node, "signal_delay_s": self.signal_delay_s}  # fmt: skip

    def flags(self) -> list[str]:
        """The command-line options that ask for these settings (for the resume command a job names)."""
        out = [] if self.partition is None else ["--slurm-partition", self.partition]
        out += ["--nodes", str(self.nodes), "--gpus-per-node", str(self.gpus_per_node), "--slurm-time", str(self.time_min)]
        for option, value, default in (("--slurm-cluster", self.cluster, "slurm"),
                                       ("--slurm-account", self.account, None), ("--slurm-qos", self.qos, None),
                                       ("--slurm-constraint", self.constraint, None),
                                       ("--slurm-signal-delay", self.signal_delay_s, SIGNAL_DELAY_S),
                                       ("--slurm-cpus-per-task", self.cpus_per_task, 10),
                                       ("--slurm-mem-gb", self.mem_gb, None),
                                       ("--slurm-job-name", self.job_name, "maskkit"),
                                       ("--slurm-max-requeues", self.max_requeues, MAX_REQUEUES),
                                       ("--slurm-folder", None if self.folder is None else Path(self.folder).absolute(),
                                        None)):  # fmt: skip
            if value != default and value is not None:  # None: the cluster's default, which no flag asks for
                out += [option, str(value)]
        return out


def _mem_text(gb: float) -> str:
    return f"{int(gb)}GB" if gb == int(gb) else f"{int(gb * 1024)}MB"


# ---- inside a task: the process group -----------------------------------------------------------


def master_port(job_id: str) -> int:
    """The rendezvous port of a job: 20000-39999, from its id (the same on every task and every requeue)."""
    return 20000 + zlib.crc32(str(job_id).encode()) % 20000


def distributed_env(env: Any) -> dict[str, str]:
    """What torchrun would set, from a submitit `JobEnvironment` (global_rank, num_tasks, local_rank,
    num_nodes, hostnames, job_id): the master is the job's first host."""
    per_node = max(1, int(env.num_tasks) // max(1, int(env.num_nodes)))
    return {
        "RANK": str(int(env.global_rank)),
        "WORLD_SIZE": str(int(env.num_tasks)),
        "LOCAL_RANK": str(int(env.local_rank)),
        "LOCAL_WORLD_SIZE": str(per_node),
        "MASTER_ADDR": str(env.hostnames[0]),
        "MASTER_PORT": str(master_port(env.job_id)),
    }


def requeue_signals() -> tuple[int, ...]:
    """The signals that mean "time is nearly up, requeue": submitit's (USR2 by default) and SIGUSR1."""
    submitit = require_submitit()
    name = "SIG" + str(submitit.JobEnvironment.USR_SIG)
    ours = getattr(signal, name, None)
    if ours is None:
        raise SlurmError(f"unknown submitit signal {name} (SUBMITIT_PREEMPT_SIGNAL)")
    return tuple(dict.fromkeys((int(ours), int(signal.SIGUSR1))))


class JobStopSignals(StopSignals):
    """`StopSignals` for a task: SIGTERM, SIGINT, SIGUSR1 and submitit's signal are all only recorded.

    Unlike a terminal's second Ctrl-C, a second signal here is the scheduler's (a preemption sends
    SIGTERM and the user signal together): it never ends the task mid-step. A requeue signal received
    after another signal still becomes `signum` (until the ranks have agreed on the stop), and `requeue`
    says whether one was received at all.
    """

    def __init__(self, requeue: tuple[int, ...]) -> None:
        super().__init__(tuple(dict.fromkeys(STOP_SIGNALS + tuple(requeue))))
        self.requeue_signals = frozenset(requeue)
        self.seen: set[int] = set()

    @property
    def requeue(self) -> bool:
        return bool(self.seen & self.requeue_signals)

    def _handle(self, signum: int, frame: Any) -> None:
        self.seen.add(signum)
        if self.signum is None or (signum in self.requeue_signals and self.signum not in self.requeue_signals):
            self.signum = signum


# ---- the job --------------------------------------------------------------------------------------


@dataclass
class SlurmPretrain:
    """The job submitit runs in each task: create the run in `out`, or continue it, or (complete) do nothing.

    `config` (a `maskkit.run.RunConfig`) is the new run's; None continues the run already in `out`
    (`steps` then extends it, as `--resume --steps`). `resume_command` is what a stop that is not
    requeued tells the user to run. See the module's docstring for the signals and the requeue.
    """

    out: Path
    config: Any = None
    steps: int | None = None
    device: str = "auto"
    trust_unverified: bool = False
    trust_data_change: bool = False
    command: list[str] = field(default_factory=list)
    resume_command: str = ""

    def __call__(self) -> dict[str, Any]:
        submitit = require_submitit()
        return run_task(self, submitit.JobEnvironment())

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit's requeue hook: the same job again (the run's checkpoint is already written; the job
        resumes from the newest verified one by itself)."""
        submitit = require_submitit()
        return submitit.helpers.DelayedSubmission(self)


def _say(text: str, *, err: bool = False) -> None:
    print(f"maskkit: {text}", file=sys.stderr if err else sys.stdout, flush=True)


def _plan(job: SlurmPretrain) -> tuple[str, str]:
    """(what the task does: 'new' | 'resume' | 'complete', the device it runs on), from the run directory."""
    from maskkit.run import CONFIG, MODEL, SUMMARY, RunError, RunRecord
    from maskkit.run.record import holds_a_run

    out = Path(job.out)
    if not holds_a_run(out):
        if job.config is None:
            raise RunError(f"cannot resume {out}: it holds no run")
        return "new", job.device if job.device != "auto" else job.config.train.device
    if not (out / CONFIG).is_file():  # a run stopped before config.json: a new one would refuse it too
        raise RunError(f"{out} holds a run's files but no {CONFIG}: cannot continue it")
    record = RunRecord.read(out)
    device = job.device if job.device != "auto" else record.device
    target = job.steps if job.steps is not None else record.resolved.train.steps
    try:
        done = int(json.loads((out / SUMMARY).read_text(encoding="utf-8"))["steps"]) if (out / MODEL).is_file() else -1
    except (OSError, ValueError, KeyError, TypeError):
        done = -1
    return ("complete" if done >= target else "resume"), device


def run_task(job: SlurmPretrain, env: Any) -> dict[str, Any]:
    """One task of the job (see the module's docstring); returns the run's summary."""
    from maskkit.distributed import any_flag, barrier, broadcast_object, cleanup, init_from_env
    from maskkit.run import SUMMARY, create_run, resolve_device, resume_run, train_run

    requeue = requeue_signals()
    handler = signal.getsignal(requeue[0])  # submitit's, installed before it called the job
    out = Path(job.out)
    # every task reads the directory before any joins the group (a rendezvous), so before anything is
    # written; and the group's backend (gloo or nccl) needs the device before the group exists
    plan, device = _plan(job)
    if plan == "complete":  # a requeue of a finished job: touch nothing
        if int(env.global_rank) == 0:
            _say(f"{out} is complete: nothing to do (job {env.job_id})")
        return json.loads((out / SUMMARY).read_text(encoding="utf-8"))
    os.environ.update(distributed_env(env))
    with JobStopSignals(requeue) as stop:  # from the start: a signal during the set-up stops after one step
        dist = init_from_env(resolve_device(device).type)
        try:
            plan = broadcast_object(plan, dist)  # rank 0's reading, on every rank
            if plan == "new":
                prepared = create_run(job.config, out, dist=dist, command=list(job.command))
            else:
                prepared = resume_run(out, steps=_extension(out, job.steps), device=job.device, dist=dist,
                                      trust_unverified=job.trust_unverified,
                                      trust_data_change=job.trust_data_change)  # fmt: skip
                for warning in prepared.warnings if dist.is_main else ():
                    _say(f"Warning: {warning}", err=True)
            if dist.is_main:
                _say(f"{'new run' if plan == 'new' else 'resuming'} {out} from {prepared.source} (step "
                     f"{prepared.trainer.step_count} of {prepared.trainer.config.steps}; job {env.job_id}, "
                     f"{dist.world_size} task(s))")  # fmt: skip
            try:
                summary = train_run(prepared, stop=stop)
            except TrainingStopped as stopped:
                # every rank stopped at this step (the trainer all-reduced the stop); now they agree on the
                # requeue too, though the signal may have reached only some of them
                again = any_flag(stop.requeue or stopped.signum in stop.requeue_signals, dist)
                _stopped(job, stopped, again, handler, dist, barrier, cleanup)
            if dist.is_main:
                _say(f"done: {out} at step {summary['steps']}")
            if dist.enabled:  # see maskkit.cli.app.main: a gloo thread may abort the interpreter's shutdown
                atexit.register(_exit_now, 0)
            return summary
        finally:
            cleanup(dist)


def _extension(out: Path, steps: int | None) -> int | None:
    """`steps` if it changes the run's length in config.json (the job's first start), else None."""
    from maskkit.run import RunRecord

    if steps is None or steps == RunRecord.read(out).resolved.train.steps:
        return None
    return steps


def _exit_now(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _stopped(job: SlurmPretrain, stopped: TrainingStopped, requeue: bool, handler: Any, dist: Any, barrier: Any,
             cleanup: Any) -> NoReturn:
    """After a stop's checkpoint: requeue through submitit's handler (rank 0), or end the job with the resume line."""
    head = f"Stopped by {stopped.signal_name} at step {stopped.step}, checkpoint {stopped.checkpoint.name} written"
    resume = job.resume_command or f"maskkit pretrain --resume {job.out}"
    if not requeue or not callable(handler):  # scancel (SIGTERM), or not in a submitit job (called directly)
        why = "not requeued" if not requeue else "cannot requeue outside a submitit job"
        if dist.is_main:
            _say(f"{head}; {why}; continue with: {resume}", err=True)
        raise SlurmError(f"{head[0].lower()}{head[1:]}; {why}")
    code, declined = stopped.exit_code, None
    if dist.is_main:
        _say(f"{head}; requeueing the job", err=True)
        try:
            handler(requeue_signals()[0], None)  # submitit: checkpoint() -> the job again, requeue, exit
        except SystemExit as done:  # requeued
            code = done.code if isinstance(done.code, int) else 1
            _say("requeued: the job resumes from the run's newest verified checkpoint", err=True)
        except Exception as err:  # submitit declined: out of requeues
            declined = err
            _say(f"not requeued ({str(err).strip().splitlines()[0]}); continue with: {resume}", err=True)
        finally:
            barrier(dist)  # the other ranks exit once the job is requeued (a bad exit may end the step)
    else:
        barrier(dist)
    cleanup(dist)
    if declined is not None:
        raise declined  # submitit records it as the job's error
    if dist.enabled:
        _exit_now(code)
    raise SystemExit(code)


# ---- submitting ---------------------------------------------------------------------------------


@dataclass
class Submitted:
    """A submission: its job id, submitit's folder and the first task's log files (or the dry run's text)."""

    out: Path
    job_id: str | None
    folder: Path
    new: bool
    text: str = ""  # --dry-run: the sbatch script (or the local executor's parameters)
    job: Any = field(default=None, repr=False)  # submitit's Job

    @property
    def logs(self) -> tuple[Path, Path] | None:
        if self.job_id is None:
            return None
        return self.folder / f"{self.job_id}_0_log.out", self.folder / f"{self.job_id}_0_log.err"


def default_out() -> Path:
    """runs/<date-time> under the current directory, as `maskkit pretrain` names a run."""
    return Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")


def _unused(base: Path) -> Path:
    """`base`, or `base-2`, `base-3`, ... the first that does not exist (two submissions in the same second)."""
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def new_job(config: Any, out: str | Path | None, *, command: list[str] | None = None) -> SlurmPretrain:
    """The job of a new run of `config` in `out` (default runs/<date-time>), checked as far as it can be
    without its data (that is read by the job): the settings, the model's name, the directory."""
    from maskkit.data import parse_dataset
    from maskkit.run import model_kind, refuse_inside_data
    from maskkit.run.lifecycle import _refuse_taken

    config.check()
    model_kind(config.model.name)
    _, source = parse_dataset(config.data.dataset)
    if source is not None and not os.path.exists(source):  # the job reads it at the same path
        raise SlurmError(f"--dataset {config.data.dataset}: {source} does not exist")
    target = _unused(default_out().absolute()) if out is None else Path(out).absolute()
    refuse_inside_data(target, config.data.dataset, "--out")
    _refuse_taken(target)  # in use, or already holding a run: --resume it instead
    # a job submitted there (submitit's <id>_submitted.pkl; a submission sbatch refused leaves none), not started
    # yet: it would take this job's run
    if any((target / SLURM_FOLDER).glob("*_submitted.pkl")):
        raise SlurmError(f"--out {target} already has a job submitted to it ({target / SLURM_FOLDER}); --resume it "
                         "once that job has started, or choose another --out (or remove that folder if the job is gone)")
    return SlurmPretrain(target, config, command=list(sys.argv if command is None else command))


def resume_job(
    run_dir: str | Path, settings: SlurmSettings, *, steps: int | None = None, device: str = "auto",
    trust_unverified: bool = False, trust_data_change: bool = False,
) -> SlurmPretrain:
    """The job that continues the run in `run_dir` (`--resume`), checked: not in use, the same world size
    (--nodes x --gpus-per-node), something left to train."""
    from maskkit.checkpoint import list_checkpoints
    from maskkit.locking import run_in_progress
    from maskkit.run import CHECKPOINTS, RunError, RunRecord, is_complete

    run_dir = Path(run_dir).absolute()
    record = RunRecord.read(run_dir)
    holder = run_in_progress(run_dir)
    if holder is not None:
        raise SlurmError(f"run directory {run_dir} is in use by {holder}; wait for it to end")
    world = record.resolved.train.world_size
    if world != settings.world_size:
        raise SlurmError(f"run {run_dir} was trained by {world} process(es); resume it with --nodes x "
                         f"--gpus-per-node = {world}, not {settings.nodes} x {settings.gpus_per_node}")  # fmt: skip
    total = record.resolved.train.steps
    newest = list_checkpoints(run_dir / CHECKPOINTS)
    step = int(newest[-1].stem.split("-")[-1]) if newest else 0
    if steps is None and step >= total and is_complete(run_dir):  # else the resume writes its final files
        raise RunError(f"run {run_dir} is complete ({step} of {total} steps); extend it with --steps N")
    if steps is not None and steps <= step:
        raise RunError(f"--steps {steps} does not go beyond the checkpoint's step {step}")
    return SlurmPretrain(run_dir, None, steps=steps, device=device, trust_unverified=trust_unverified,
                         trust_data_change=trust_data_change, command=list(sys.argv))  # fmt: skip


def make_executor(settings: SlurmSettings, folder: Path) -> Any:
    """submitit's executor for `settings.cluster`, its parameters set (one task per GPU)."""
    submitit = require_submitit()
    if settings.cluster == "local":
        executor = submitit.LocalExecutor(folder=folder, max_num_timeout=settings.max_requeues)
        executor.update_parameters(**settings.local_parameters())
        return executor
    try:
        executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=settings.max_requeues)
    except RuntimeError as err:  # no srun here
        raise SlurmError(f"cannot submit to SLURM from this machine: {_first_line(err)} (--dry-run shows the job)") from None
    executor.update_parameters(**settings.sbatch_parameters())
    return executor


def sbatch_text(settings: SlurmSettings, folder: Path) -> str:
    """The sbatch script submitit would submit (or, for the local cluster, its parameters).

    submitit's own script writer (private in submitit 1.5, the one SlurmExecutor uses), so that what is
    shown is what would be submitted; no srun is needed to show it.
    """
    require_submitit()
    if settings.cluster == "local":
        return "\n".join(f"{k}: {v}" for k, v in settings.local_parameters().items())
    from submitit.slurm.slurm import _make_sbatch_string

    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=folder, **settings.sbatch_parameters())


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def submit(job: SlurmPretrain, settings: SlurmSettings, *, dry_run: bool = False) -> Submitted:
    """Check, then submit `job` (or, `dry_run`, only say what would be submitted: nothing is written)."""
    require_submitit()
    settings.check()
    out = Path(job.out).absolute()
    job.out = out
    folder = (out / SLURM_FOLDER if settings.folder is None else Path(settings.folder)).absolute()
    new = job.config is not None
    job.resume_command = job.resume_command or shlex.join(["maskkit", "pretrain", "--resume", str(out), *settings.flags()])
    if dry_run:
        return Submitted(out, None, folder, new, sbatch_text(settings, folder))
    executor = make_executor(settings, folder)  # before anything is written: no srun here is one line
    if new:
        from maskkit.run import check_writable

        check_writable(out)  # the run's directory exists from now on (its files come with the job's first start)
    try:
        submitted = executor.submit(job)
    except Exception as err:  # sbatch's refusal (a partition, a time limit, an account...)
        raise SlurmError(f"the submission failed: {_first_line(err)}") from None
    return Submitted(out, str(submitted.job_id), folder, new, job=submitted)
