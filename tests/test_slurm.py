"""SLURM through submitit (maskkit.slurm, `maskkit pretrain --slurm-...`).

The requeue test runs real jobs with submitit's LocalExecutor (`--slurm-cluster local`): a controller
process starts one task process per "GPU" with SLURM-like variables, forwards the time-limit signal,
and starts the tasks again when a task exits with its requeue code (144). A 2-task job is sent
submitit's signal (SIGUSR2) mid-run, and only to rank 1: both ranks stop at the same step, rank 0
requeues through submitit's own handler, the requeued tasks resume from the newest checkpoint, and
the job ends byte-identical to an uninterrupted 2-task job run alongside it. The DebugExecutor is not
used: it runs the job in this process, without submitit's signal handler or any requeue.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from maskkit import slurm
from maskkit.checkpoint import list_checkpoints, load_checkpoint
from maskkit.cli.app import app

submitit = pytest.importorskip("submitit")

cli = CliRunner()
#: a micro MAE on 400 random 8x8 images from an npz (no scikit-learn import in each task: it costs seconds)
TRAIN = ["--policy", "random", "--steps", "60", "--batch-size", "16", "--log-every", "3", "--ckpt-every", "1000",
         "--device", "cpu", "--no-progress"]  # fmt: skip
#: 2 tasks on this machine; a time limit far away (the test sends the signal itself, at a known step)
LOCAL = ["--slurm-cluster", "local", "--gpus-per-node", "2", "--slurm-time", "30"]


def invoke(*args: object):
    return cli.invoke(app, ["pretrain", *map(str, args)])


def one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


# ---- options, dry run, no submitit ------------------------------------------------------------------


def test_without_submitit_the_command_fails_in_one_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "submitit", None)  # `import submitit` raises ImportError
    result = invoke("--slurm-partition", "gpu", "--out", tmp_path / "run", "--dry-run")
    assert one_line_error(result) == 'Error: --slurm-partition needs submitit: pip install "maskkit[slurm]"'
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, message", [
    (["--nodes", "0"], "--nodes must be an integer of at least 1, got 0"),
    (["--gpus-per-node", "-1"], "--gpus-per-node must be an integer of at least 1, got -1"),
    (["--slurm-time", "0"], "--slurm-time must be an integer of at least 1, got 0"),
    (["--slurm-time", "2", "--slurm-signal-delay", "120"],
     "--slurm-signal-delay 120 s must be shorter than --slurm-time 2 min (120 s)"),
    (["--slurm-partition", "a b"], "--slurm-partition must be one word, got 'a b'"),
    (["--slurm-cluster", "lsf"], "--slurm-cluster must be one of slurm, local, got 'lsf'"),
    (["--slurm-cluster", "local", "--nodes", "2"], "--nodes must be 1 with --slurm-cluster local (one machine), got 2"),
    (["--slurm-mem-gb", "0"], "--slurm-mem-gb must be a finite number of at least 1 MB (0.001), got 0.0"),
    (["--slurm-mem-gb", "inf"], "--slurm-mem-gb must be a finite number of at least 1 MB (0.001), got inf"),
    (["--slurm-mem-gb", "0.0001"], "--slurm-mem-gb must be a finite number of at least 1 MB (0.001), got 0.0001"),
    (["--nodes", "1", "--steps", "0"], "--steps must be"),  # the run's own settings are checked before submitting
    (["--nodes", "1", "--dataset", "imagefolder:/no/such/folder"], "/no/such/folder does not exist"),
], ids=["nodes", "gpus", "time", "delay", "partition", "cluster", "local-nodes", "mem", "mem-inf", "mem-tiny", "steps", "dataset"])  # fmt: skip
def test_bad_values_are_one_line_errors_naming_the_option(tmp_path, args, message):
    line = one_line_error(invoke("--out", tmp_path / "run", *args, "--dry-run"))
    assert line.startswith("Error: ") and message in line, line
    assert not (tmp_path / "run").exists()  # nothing written


def recorded(run: Path, *, device: str, steps: int, world_size: int) -> None:
    """A config.json as a run of `world_size` processes writes it (the golden run's, on `device`, `steps` long)."""
    raw = json.loads((Path(__file__).parent / "golden" / "run-v2" / "config.json").read_text())
    raw["device"], raw["train"]["steps"], raw["train"]["world_size"] = device, steps, world_size
    (run / "config.json").write_text(json.dumps(raw))


def test_resume_checks_the_world_size_and_the_options_beside_it(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    recorded(run, device="cpu", steps=10, world_size=8)
    line = one_line_error(invoke("--resume", run, "--nodes", "2", "--gpus-per-node", "2", "--dry-run"))
    assert line == f"Error: run {run} was trained by 8 process(es); resume it with --nodes x --gpus-per-node = 8, not 2 x 2"
    line = one_line_error(invoke("--resume", run, "--gpus-per-node", "8", "--policy", "random", "--dry-run"))
    assert line == "Error: --resume takes its settings from the run's config.json; drop --policy"
    result = invoke("--resume", run, "--gpus-per-node", "8", "--steps", "20", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "#SBATCH --ntasks-per-node=8" in result.stdout and f"job: continue the run {run} " in result.stdout


def test_dry_run_prints_one_task_per_gpu_and_the_signal_ahead_of_the_limit(tmp_path):
    out = tmp_path / "run"
    result = invoke("--out", out, "--partition", "learnfair", "--nodes", "2", "--ngpus", "8", "--timeout", "4320",
                    "--slurm-account", "mae", "--dry-run")  # fmt: skip  (the official script's names)
    assert result.exit_code == 0, result.output
    script = result.stdout
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --signal=USR2@120", "#SBATCH --time=4320", "#SBATCH --partition=learnfair",
                 "#SBATCH --account=mae", f"#SBATCH --output={out}/slurm/%j_0_log.out",
                 f"-u -m submitit.core._submit {out}/slurm"):  # fmt: skip
        assert line in script, script
    assert f"job: new run {out} (2 node(s) x 8 GPU(s), 16 task(s), one per GPU;" in script
    assert not out.exists()  # a dry run writes nothing


def stand_in_slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder first on PATH with stand-ins for `srun` and `sbatch` (which accepts job 4242); returns it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", "exit 0"), ("sbatch", 'echo "Submitted batch job 4242"')):
        (bin_dir / name).write_text(f"#!/bin/sh\n{text}\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin")
    return bin_dir


def test_submitting_writes_the_sbatch_script_and_the_job(tmp_path, monkeypatch):
    """The SlurmExecutor path as far as sbatch, with a stand-in sbatch (it prints what sbatch prints)."""
    out = tmp_path / "run"
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))  # no srun: not a SLURM machine
    line = one_line_error(invoke("--out", out, "--slurm-partition", "gpu"))
    assert line.startswith("Error: cannot submit to SLURM from this machine: ") and "--dry-run" in line, line
    assert not out.exists()
    stand_in_slurm(tmp_path, monkeypatch)
    result = invoke("--out", out, "--slurm-partition", "gpu", "--nodes", "2", "--gpus-per-node", "4", "--steps", "7")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"submitted slurm job 4242: new run {out} (2 node(s) x 4 GPU(s), 8 task(s)")
    script = (out / "slurm" / "4242_submission.sh").read_text()
    assert "#SBATCH --ntasks-per-node=4" in script and "#SBATCH --signal=USR2@120" in script
    job = submitit.helpers.DelayedSubmission.load(out / "slurm" / "4242_submitted.pkl").function
    assert isinstance(job, slurm.SlurmPretrain) and job.out == out and job.config.train.steps == 7
    assert job.resume_command == f"maskkit pretrain --resume {out} --slurm-partition gpu --nodes 2 --gpus-per-node 4 " \
        "--slurm-time 4320"
    assert sorted(p.name for p in out.iterdir()) == ["slurm"]  # the run's files come with the job's first start


def test_a_second_submission_to_a_run_directory_with_a_job_waiting_is_refused(tmp_path, monkeypatch):
    """Queued jobs share nothing but the directory: the second would silently continue the first's run."""
    bin_dir = stand_in_slurm(tmp_path, monkeypatch)
    out = tmp_path / "run"
    (bin_dir / "sbatch").write_text("#!/bin/sh\necho 'sbatch: error: invalid partition' >&2\nexit 1\n")
    result = invoke("--out", out, "--slurm-partition", "bad")
    assert result.exit_code == 1 and result.stderr.strip().splitlines()[-1] == \
        "Error: the submission failed: sbatch: error: invalid partition", result.stderr
    (bin_dir / "sbatch").write_text('#!/bin/sh\necho "Submitted batch job 4242"\n')  # a refused one may be retried
    assert invoke("--out", out, "--slurm-partition", "gpu").exit_code == 0
    line = one_line_error(invoke("--out", out, "--slurm-partition", "gpu", "--policy", "hpm"))
    assert line.startswith(f"Error: --out {out} already has a job submitted to it"), line
    # without --out, two submissions in the same second get two directories
    monkeypatch.setattr(slurm, "default_out", lambda: tmp_path / "runs" / "20260101-000000")
    for _ in range(2):
        assert invoke("--slurm-partition", "gpu").exit_code == 0
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["20260101-000000", "20260101-000000-2"]


def test_the_readme_slurm_commands_pass_every_check(tmp_path):
    """README's "Pretrain on ImageNet": the submission and its resume, as far as they go here (--dry-run)."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = next(b for b in re.findall(r"```bash\n(.*?)```", readme, re.S) if "--slurm-partition" in b)
    commands = [" ".join(line.split("#")[0] for line in c.split("\\\n")).split() for c in block.strip().split("\n\n")]
    assert [c[:3] for c in commands] == [["maskkit", "pretrain", "--dataset"], ["maskkit", "pretrain", "--resume"]]
    data, run = tmp_path / "imagenet", tmp_path / "imagenet-vitb"
    (data / "train").mkdir(parents=True)
    new, resume = ([run if w == "/checkpoint/$USER/imagenet-vitb" else w.replace("/data/imagenet", str(data))
                    for w in c[2:]] for c in commands)  # fmt: skip
    result = invoke(*new, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "#SBATCH --nodes=4" in result.stdout and "#SBATCH --ntasks-per-node=8" in result.stdout
    assert f"job: new run {run} (4 node(s) x 8 GPU(s), 32 task(s), one per GPU;" in result.stdout
    run.mkdir()  # the run as its first job left it: 32 processes
    recorded(run, device="cuda", steps=1000, world_size=32)
    result = invoke(*resume, "--dry-run")
    assert result.exit_code == 0, result.output
    assert f"job: continue the run {run} (4 node(s) x 8 GPU(s), 32 task(s)" in result.stdout


# ---- inside a task -------------------------------------------------------------------------------


def test_the_resume_command_of_a_job_asks_for_every_setting_it_was_submitted_with(tmp_path):
    chosen = slurm.SlurmSettings(partition="gpu", nodes=2, gpus_per_node=4, time_min=60, signal_delay_s=300,
                                 cpus_per_task=6, mem_gb=64.0, job_name="mae", max_requeues=3,
                                 folder=tmp_path / "logs")  # fmt: skip
    assert chosen.flags() == ["--slurm-partition", "gpu", "--nodes", "2", "--gpus-per-node", "4", "--slurm-time", "60",
                              "--slurm-signal-delay", "300", "--slurm-cpus-per-task", "6", "--slurm-mem-gb", "64.0",
                              "--slurm-job-name", "mae", "--slurm-max-requeues", "3",
                              "--slurm-folder", str(tmp_path / "logs")]  # fmt: skip
    assert slurm.SlurmSettings().flags() == ["--nodes", "1", "--gpus-per-node", "1", "--slurm-time", "4320"]


def test_a_job_environment_becomes_torchrun_s_variables():
    env = SimpleNamespace(global_rank=11, num_tasks=16, local_rank=3, num_nodes=2, job_id="4242",
                          hostnames=["gpu-017", "gpu-018"])  # fmt: skip
    assert slurm.distributed_env(env) == {
        "RANK": "11", "WORLD_SIZE": "16", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "8",
        "MASTER_ADDR": "gpu-017", "MASTER_PORT": "32835",
    }  # fmt: skip
    assert slurm.master_port("4242") == 32835 and 20000 <= slurm.master_port("99_3") < 40000


def test_job_stop_signals_record_every_signal_and_prefer_the_requeue_one():
    usr = signal.Signals["SIG" + submitit.JobEnvironment.USR_SIG]
    assert slurm.requeue_signals() == (usr, signal.SIGUSR1)
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, usr)}
    with slurm.JobStopSignals(slurm.requeue_signals()) as stop:
        signal.raise_signal(signal.SIGTERM)  # a preemption: SIGTERM, then the user signal
        assert stop.signum == signal.SIGTERM and not stop.requeue
        signal.raise_signal(usr)  # a second signal does not end the task
        signal.raise_signal(signal.SIGTERM)
        assert stop.signum == usr and stop.requeue and stop.seen == {signal.SIGTERM, usr}
    assert {s: signal.getsignal(s) for s in before} == before


def test_loader_workers_ignore_submitit_s_signal(monkeypatch):
    """SLURM signals every process of a job; a data-loader worker must not die of submitit's signal."""
    from maskkit.data import loader

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2,
                                                signal.SIGHUP)}  # fmt: skip
    try:
        loader._quiet_worker(0)
        assert signal.getsignal(signal.SIGUSR2) is signal.SIG_IGN and signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN
        monkeypatch.setenv("SUBMITIT_PREEMPT_SIGNAL", "HUP")  # submitit told to use another signal
        loader._quiet_worker(0)
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


# ---- a real job: stopped by its signal, requeued, byte-identical ------------------------------------


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _rank_of(pid: int) -> int | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [e.split(b"=", 1)[1] for e in environ if e.startswith(b"SUBMITIT_LOCAL_GLOBALID=")]
    return int(ranks[0]) if ranks else None


def _lines(run: Path) -> int:
    path = run / "metrics.jsonl"
    return path.read_text().count("\n") if path.is_file() else 0


def _submit(out: Path, data: Path) -> str:
    result = invoke("--out", out, "--dataset", f"npz:{data}", *TRAIN, *LOCAL)
    assert result.exit_code == 0, result.output
    return re.search(r"submitted local job (\d+)", result.stdout).group(1)


def _wait(condition, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _finish(out: Path, job_id: str) -> list:
    """The results of the job's tasks, once its controller process is gone."""
    folder = out / "slurm"
    _wait(lambda: all((folder / f"{job_id}_{t}_result.pkl").exists() for t in (0, 1)), f"job {job_id}")
    try:
        os.waitpid(int(job_id), 0)  # the controller: a child of this process (the command ran in it)
    except ChildProcessError:
        pass  # already reaped
    return submitit.LocalJob(folder, job_id, tasks=[0, 1]).results()


@pytest.fixture(scope="module")
def requeued(tmp_path_factory):
    """An uninterrupted 2-task job and one stopped by SIGUSR2 at rank 1 mid-run, then requeued."""
    root = tmp_path_factory.mktemp("slurm")
    full, run, data = root / "full", root / "stopped", root / "images.npz"
    rng = np.random.default_rng(0)
    np.savez(data, images=rng.integers(0, 256, (400, 8, 8), dtype=np.uint8), labels=np.arange(400) % 4)
    controllers = []
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("OMP_NUM_THREADS", "1")  # the tasks inherit it: the same threads in both jobs
            mp.setenv("MKL_NUM_THREADS", "1")
            reference = _submit(full, data)
            controllers.append(int(reference))
            job = _submit(run, data)
            controllers.append(int(job))
        _wait(lambda: _lines(run) >= 3, "3 metrics lines")
        tasks = {_rank_of(p): p for p in _children(int(job))}
        os.kill(tasks[1], submitit.JobEnvironment._usr_sig())  # rank 1 only: rank 0 learns it from the all-reduce
        yield SimpleNamespace(full=full, run=run, job=job, results=_finish(run, job),
                              reference=_finish(full, reference))  # fmt: skip
    finally:  # a failed test leaves no job running on this shared machine
        for pid in controllers:
            try:
                if os.waitpid(pid, os.WNOHANG)[0] != 0:
                    continue  # it had ended (reaped now)
            except ChildProcessError:
                continue  # reaped already: the pid is no longer this test's
            for p in [*_children(pid), pid]:  # still running: its tasks, then the controller itself
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            os.waitpid(pid, 0)


@pytest.mark.slow
def test_a_job_stopped_by_its_signal_is_requeued_and_ends_byte_identical(requeued):
    run, job = requeued.run, requeued.job
    log0 = (run / "slurm" / f"{job}_0_log.err").read_text()
    said = [line for line in log0.splitlines() if line.startswith("maskkit: Stopped by")]
    assert len(said) == 1, log0
    step = int(re.search(r"Stopped by SIGUSR2 at step (\d+), checkpoint checkpoint-\d+\.pt written; requeueing the job$", said[0])
               .group(1))  # fmt: skip
    assert 9 <= step < 60
    ckpt = load_checkpoint(run / "checkpoints" / f"checkpoint-{step:07d}.pt")  # both ranks stopped at this step
    assert ckpt["step"] == step and ckpt["world_size"] == 2 and len(ckpt["ranks"]) == 2
    out0 = (run / "slurm" / f"{job}_0_log.out").read_text()
    assert f"maskkit: resuming {run} from checkpoint-{step:07d}.pt (step {step} of 60; job {job}, 2 task(s))" in out0
    assert "Requeued job" in out0 and out0.count("Starting with JobEnvironment") == 2  # one requeue
    assert [r["steps"] for r in requeued.results] == [60, 60]
    assert (requeued.full / "metrics.jsonl").read_bytes() == (run / "metrics.jsonl").read_bytes()
    a, b = load_checkpoint(requeued.full / "model.pt"), load_checkpoint(run / "model.pt")
    assert a.keys() == b.keys()
    for part in ("mae", "policy"):
        assert a[part].keys() == b[part].keys() and all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part


def test_a_requeue_of_a_finished_job_changes_nothing(requeued, monkeypatch):
    run = requeued.run
    before = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and "slurm" not in p.parts}
    pickled = submitit.helpers.DelayedSubmission.load(run / "slurm" / f"{requeued.job}_submitted.pkl")
    env = SimpleNamespace(global_rank=0, num_tasks=2, local_rank=0, num_nodes=1, job_id=requeued.job,
                          hostnames=["localhost"])  # fmt: skip
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    summary = slurm.run_task(pickled.function, env)  # the job submitit would start again
    assert summary == json.loads((run / "summary.json").read_text()) and summary["steps"] == 60
    after = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and "slurm" not in p.parts}
    assert after == before and "RANK" not in os.environ  # nothing written, no process group joined
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == [p.name for p in before
                                                                       if p.suffix == ".pt" and "checkpoints" in p.parts]
