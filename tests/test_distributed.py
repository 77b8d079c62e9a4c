"""Data parallel pretraining on CPU (gloo, 2 processes): ranks stay identical at all three levels
(MAE, head, masker), 2 processes x batch B match 1 process x batch 2B with fixed masks, and a
`torchrun ... maskkit pretrain` killed with SIGKILL, or stopped by a SIGTERM sent to the torchrun
launcher, resumes bit-identically under torchrun."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from maskkit import run as runs
from maskkit.checkpoint import load_checkpoint
from maskkit.data import Batcher, channel_stats, load_dataset, make_splits
from maskkit.distributed import SINGLE, DistContext, cleanup, init_from_env
from maskkit.policies import create_policy
from maskkit.train import Pretrainer, TrainConfig

TORCHRUN = shutil.which("torchrun")
STEPS = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build(policy: str, batch: int, dist: DistContext, **train) -> Pretrainer:
    """A micro MAE on digits with `policy`, as `maskkit pretrain` builds it."""
    torch.manual_seed(0)
    data = load_dataset("digits", None)
    splits = make_splits(data, 0)
    mean, std = channel_stats(data, splits["train"])
    device = torch.device("cpu")
    mae = runs.build_mae({"preset": "micro", "img_size": 8, "patch_size": 2, "in_chans": 1,
                          "norm_pix_loss": False, "init_seed": 0}).to(device)
    kwargs = {"ratio": 0.75, **({"embed_dim": mae.embed_dim, "hidden_dim": 8} if policy == "learned" else {})}
    pol = create_policy(policy, **kwargs)
    cfg = TrainConfig.from_dict({"steps": STEPS, "batch_size": batch, "world_size": dist.world_size, "log_every": 1, **train})
    return Pretrainer(mae, pol, Batcher(data, mean, std, device), splits, cfg, device, dist)


def weights(trainer: Pretrainer) -> dict[str, dict[str, torch.Tensor]]:
    out = {"mae": trainer.mae.state_dict(), "policy": trainer.policy.state_dict()}
    if trainer.head is not None:
        out["head"] = trainer.head.state_dict()
    return {k: {n: t.detach().clone() for n, t in v.items()} for k, v in out.items()}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist = init_from_env("cpu")
    try:
        result = {}
        for name, policy, train in (("learned", "learned", {"hypergrad": "darts", "masker_every": 2}),
                                    ("unroll", "learned", {"hypergrad": "unroll", "masker_every": 2, "unroll_steps": 2}),
                                    ("random", "random", {"mask_noise": "sample", "optimizer": "sgd", "lr": 0.05})):
            trainer = build(policy, 8, dist, **train)
            init = weights(trainer)
            losses = [trainer.step()["loss"] for _ in range(STEPS)]
            result[name] = {"init": init, "final": weights(trainer), "losses": losses,
                            "mask_seed": trainer.generators["mask"].initial_seed()}
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        cleanup(dist)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.mark.parametrize("method", ["learned", "unroll"], ids=["darts", "unroll"])
@pytest.mark.slow
def test_ranks_stay_identical_at_all_three_levels(two_ranks, method):
    a, b = two_ranks[0][method], two_ranks[1][method]
    assert a["mask_seed"] != b["mask_seed"]  # every rank draws its own masks
    assert a["losses"] == b["losses"]  # logged metrics are the ranks' mean
    for level in ("mae", "policy", "head"):
        for name, t in a["final"][level].items():
            assert torch.equal(t, b["final"][level][name]), (level, name)
        assert any(not torch.equal(t, a["init"][level][n]) for n, t in a["final"][level].items()), level


def test_two_processes_of_b_match_one_process_of_2b(two_ranks):
    torch.set_num_threads(1)
    single = build("random", 16, SINGLE, mask_noise="sample", optimizer="sgd", lr=0.05)
    losses = [single.step()["loss"] for _ in range(STEPS)]
    ddp = two_ranks[0]["random"]
    np.testing.assert_allclose(ddp["losses"], losses, rtol=1e-5)
    for name, t in weights(single)["mae"].items():
        torch.testing.assert_close(ddp["final"]["mae"][name], t, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(t, ddp["init"]["mae"][n]) for n, t in ddp["final"]["mae"].items())


def test_a_world_size_mismatch_is_refused_before_any_collective():
    two = DistContext(rank=0, world_size=2)  # no process group: the refusal must come first
    with pytest.raises(ValueError, match="set up for 1 processes but 2 are running"):
        Pretrainer(*_parts(), TrainConfig(steps=1, batch_size=8), torch.device("cpu"), two)


def _parts():
    trainer = build("random", 8, SINGLE)
    splits = {"train": trainer.streams["train"].indices, "val": trainer.streams["train"].indices}
    return trainer.mae, trainer.policy, trainer.batcher, splits


# ---- torchrun + maskkit pretrain: kill and resume ------------------------------------------------

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
ENV.pop("MASKKIT_INJECT_NAN", None)
ARGS = ["--policy", "learned", "--learned-hidden-dim", "8", "--hypergrad", "darts", "--steps", "10", "--batch-size", "16",
        "--log-every", "1", "--ckpt-every", "2", "--no-progress"]


def descendants(pid: int) -> list[int]:
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    return [d for c in map(int, children) for d in (c, *descendants(c))]


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` and everything below it at once, as a power cut would."""
    for p in [pid, *descendants(pid)]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def torchrun(*args: object) -> subprocess.Popen:
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "maskkit.cli", "pretrain", *map(str, args)]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for_lines(metrics: Path, lines: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    """Wait until the run has logged `lines` metrics lines (or ended, or `timeout` seconds passed)."""
    deadline = time.monotonic() + timeout
    while (not metrics.is_file() or metrics.read_text().count("\n") < lines) and proc.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.005)


# a torchrun run killed with SIGKILL and resumed (learned darts, workers): tests/test_data_scale.py


#: torchrun's own exit status after a SIGTERM: its agent forwards the signal to the workers, waits for
#: them (up to --shutdown-timeout, 30 s by default) and then re-raises a SignalException (torch 2.x)
TORCHRUN_SIGTERM_EXIT = 1


#: 90 steps on an image folder read by 2 worker processes per rank: a stop lands inside an epoch (3 global batches)
def folder_args(folder: Path, workers: int = 2) -> list[str]:
    return ["--policy", "random", "--steps", "90", "--batch-size", "8", "--log-every", "3", "--ckpt-every", "1000",
            "--no-progress", "--dataset", f"imagefolder:{folder}", "--img-size", "16", "--augment", "crop-flip",
            "--num-workers", str(workers)]  # fmt: skip


@pytest.fixture(scope="module")
def folder_reference(tmp_path_factory) -> tuple[Path, Path]:
    """(the folder, an uninterrupted 1 node x 2 process run on it): what the stopped runs must end as."""
    from test_data_scale import photo_folder

    root = tmp_path_factory.mktemp("torchrun")
    folder = photo_folder(root / "data", {"train": 16, "val": 2})
    out, err = (proc := torchrun("--out", root / "full", *folder_args(folder))).communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-2000:]
    banner = " ".join(out.decode().split())  # the banner says where it runs: processes, per-process and global batch
    assert "of global batch 16 (8 per process x 2 processes)," in banner, banner
    return folder, root / "full"


def assert_same_as(full: Path, run: Path) -> None:
    assert (full / "metrics.jsonl").read_bytes() == (run / "metrics.jsonl").read_bytes()
    a, b = load_checkpoint(full / "model.pt"), load_checkpoint(run / "model.pt")
    for level in ("mae", "policy"):
        assert all(torch.equal(a[level][k], b[level][k]) for k in a[level]), level


def stopped_at(errs: list[str], resume: str) -> int:
    """The step of rank 0's one 'Stopped by SIGTERM' line (on any launcher's stderr), which names `resume`."""
    said = [line for err in errs for line in err.splitlines() if "--resume" in line]
    assert len(said) == 1 and said[0].startswith("Stopped by SIGTERM at step "), errs
    assert said[0].endswith(f"continue with: {resume}"), said[0]
    return int(said[0].split("at step ")[1].split(",")[0])


def assert_collective_checkpoint(run: Path, step: int) -> None:
    ckpt = load_checkpoint(run / "checkpoints" / f"checkpoint-{step:07d}.pt")  # written by both ranks together
    assert ckpt["step"] == step and ckpt["world_size"] == 2 and len(ckpt["ranks"]) == 2
    assert step < 90 and not (run / "model.pt").exists()


@pytest.mark.skipif(TORCHRUN is None, reason="needs torchrun")
@pytest.mark.slow
def test_torchrun_stopped_by_sigterm_checkpoints_and_resumes_bit_identically(tmp_path, folder_reference):
    folder, full = folder_reference
    run = tmp_path / "stopped"
    proc = torchrun("--out", run, *folder_args(folder))
    wait_for_lines(run / "metrics.jsonl", 2, proc)
    proc.send_signal(signal.SIGTERM)  # to the launcher only, as a scheduler would; it forwards it to the workers
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == TORCHRUN_SIGTERM_EXIT, err.decode()[-2000:]
    step = stopped_at([err.decode()], f"torchrun --nproc_per_node 2 -m maskkit.cli pretrain --resume {run}")
    assert_collective_checkpoint(run, step)
    _, err = (proc := torchrun("--resume", run, "--no-progress")).communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert_same_as(full, run)


# ---- two nodes: two torchrun launchers on this machine, c10d rendezvous on localhost -----------------


def two_node_launch(rdzv_port: int, run_id: str, *args: object) -> list[subprocess.Popen]:
    """Two launchers of one process each (`--nnodes 2`), as two machines would start them."""
    cmd = [TORCHRUN, "--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"127.0.0.1:{rdzv_port}", "--rdzv-id", run_id, "-m", "maskkit.cli", "pretrain",
           *map(str, args)]  # fmt: skip
    return [subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]


@pytest.mark.skipif(TORCHRUN is None, reason="needs torchrun")
@pytest.mark.slow
def test_two_nodes_run_as_one_node_does_and_a_stop_on_one_node_stops_both_at_one_step(tmp_path, folder_reference):
    """2 nodes x 1 process (no workers) end as 1 node x 2 processes (2 workers each), byte for byte,
    after a SIGTERM to ONE node's launcher (a preempted machine): every rank stops at the same step
    (the stop flag is all-reduced), and the run resumes on two nodes."""
    folder, full = folder_reference
    run = tmp_path / "nodes"
    nodes = two_node_launch(free_port(), "stop", "--out", run, *folder_args(folder, workers=0))
    wait_for_lines(run / "metrics.jsonl", 2, nodes[0])
    nodes[1].send_signal(signal.SIGTERM)  # one machine only
    outs, errs = zip(*[(o.decode(), e.decode()) for o, e in (p.communicate(timeout=300) for p in nodes)], strict=True)
    assert all(p.returncode != 0 for p in nodes), errs
    banners = [" ".join(o.split()) for o in outs if "maskkit pretrain" in o]  # rank 0's, on either node
    assert len(banners) == 1 and "of global batch 16 (8 per process x 2 processes on 2 nodes)," in banners[0], outs
    step = stopped_at(errs, "torchrun --nnodes 2 --nproc_per_node 1 --rdzv-backend c10d --rdzv-endpoint HOST:PORT "
                            f"-m maskkit.cli pretrain --resume {run} (on every node)")  # fmt: skip
    assert_collective_checkpoint(run, step)
    for p in two_node_launch(free_port(), "resume", "--resume", run, "--no-progress"):
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-2000:]
    assert_same_as(full, run)
