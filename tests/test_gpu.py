"""The GPU path: `benchmarks/gpu.sh --smoke` on the CPU (so the script cannot rot), --channels-last, the
one-line error without CUDA, and the CUDA checks themselves, which skip cleanly on a machine without one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from maskkit import run as runs
from maskkit.cli.app import app
from maskkit.run import RunConfig
from maskkit.train import train

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


@pytest.mark.slow
def test_the_gpu_script_runs_on_the_cpu_with_smoke_and_writes_its_figures(tmp_path):
    out = tmp_path / "smoke.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--smoke", "--out", str(out),
                           "--work", str(tmp_path / "work")], env=env, capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["smoke"] is True and result["failed"] == [] and result["environment"]["device"] == "cpu"
    size = result["sizes"]
    row = result["pretrain"]["eager"]
    assert row["returncode"] == 0 and row["windows"] == size["steps"] // size["log_every"] - 1
    assert 0.0 <= row["data_wait"] <= 1.0 and row["images_per_s"] > 0
    assert "peak_mem_mb" not in row  # CPU: no GPU memory to report
    # images per second over a window is the global batch over the mean step time (perf.jsonl's definition)
    perf = [json.loads(line) for line in (tmp_path / "work" / "pretrain-eager" / "perf.jsonl").read_text().splitlines()]
    assert [p["step"] for p in perf] == list(range(size["log_every"], size["steps"] + 1, size["log_every"]))
    for p in perf:
        assert p["images_per_s"] * p["step_s"] == pytest.approx(size["batch"], rel=1e-3)
    bench = result["bench"]["trivial"]
    names = {r["name"] for r in bench["rows"]}
    assert {"random_plan_checked", "random_plan_unchecked"} <= names
    assert any(n.startswith("mlo") for n in names) and any(n.endswith("_policy") for n in names), names
    # on the CPU the same seed repeats itself bit for bit (the learned masker's three levels included)
    assert set(result["determinism"]) == {"learned-darts/deterministic"}
    for name, det in result["determinism"].items():
        assert det["identical"] is True and det["first_differing_line"] is None, name


@pytest.mark.slow
def test_the_gpu_script_refuses_to_run_its_full_sizes_without_cuda(tmp_path):
    if CUDA:
        pytest.skip("this machine has CUDA")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--out", str(tmp_path / "x.json")],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        "Error: no CUDA device here; run with --smoke for the CPU check"]
    assert not (tmp_path / "x.json").exists()


def test_device_cuda_without_a_gpu_is_one_line_naming_the_device(tmp_path):
    if CUDA:
        pytest.skip("this machine has CUDA")
    result = CliRunner().invoke(app, ["pretrain", "--device", "cuda", "--steps", "2", "--out", str(tmp_path / "r"),
                                      "--no-progress"])  # fmt: skip
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == ["Error: --device 'cuda': CUDA is not available on this machine"]
    assert not (tmp_path / "r").exists()


def _losses(tmp_path: Path, name: str, device: str, policy: str = "random", **train_opts: object
            ) -> tuple[list[float], object]:
    config = RunConfig.from_dict({"policy": {"name": policy, "options": {"hidden_dim": 8} if policy == "learned" else {}},
                                  "mlo": {"hypergrad": "darts"},
                                  "train": {"steps": 3, "batch_size": 16, "log_every": 1, "device": device, "seed": 1,
                                            **train_opts}})  # fmt: skip
    prepared = runs.create_run(config, tmp_path / name)
    records = train(prepared.trainer, prepared.out)
    return [r["loss"] for r in records], prepared.trainer


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_channels_last_puts_the_patch_embedding_in_that_layout_and_keeps_the_losses(tmp_path, device):
    torch.set_num_threads(1)
    plain, _ = _losses(tmp_path, "plain", device)
    last, trainer = _losses(tmp_path, "last", device, channels_last=True)
    convs = [m.weight for m in trainer.mae.modules() if isinstance(m, torch.nn.Conv2d)]
    for w in convs:  # [D, C, kh, kw] with the channels innermost (strides checked: C may be 1)
        d, c, kh, kw = w.shape
        assert w.stride() == (c * kh * kw, 1, kw * c, c), w.stride()
    assert json.loads((tmp_path / "last" / "config.json").read_text())["config"]["train"]["channels_last"] is True
    assert last == pytest.approx(plain, rel=1e-4)  # the same numbers up to the convolution's rounding


@needs_cuda
def test_cuda_bf16_repeats_itself_with_deterministic_algorithms(tmp_path):
    torch.use_deterministic_algorithms(True)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    try:
        a, _ = _losses(tmp_path, "a", "cuda", amp="bf16")
        b, trainer = _losses(tmp_path, "b", "cuda", amp="bf16")
    finally:
        torch.use_deterministic_algorithms(False)
    assert a == b and all(torch.isfinite(torch.tensor(a)))
    assert next(trainer.mae.parameters()).device.type == "cuda"


@needs_cuda
def test_cuda_learned_masker_runs_its_three_levels_in_bf16(tmp_path):
    losses, trainer = _losses(tmp_path, "learned", "cuda", policy="learned", amp="bf16")
    assert all(torch.isfinite(torch.tensor(losses))) and trainer.engine is not None


@pytest.mark.parametrize("where", ["missing/x.json", "."])
def test_the_gpu_script_refuses_an_out_it_cannot_write_before_any_work(tmp_path, where):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--smoke", "--only", "bench",
                           "--out", str(tmp_path / where)], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        f"Error: --out {tmp_path / where}: cannot write a file there"], proc.stderr[-2000:]


def test_the_gpu_script_run_again_with_the_same_work_folder_uses_new_run_directories(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))

    def fake_pretrain(out, args, **_):  # as maskkit pretrain: a directory that holds a run is refused
        if out.exists() and any(out.iterdir()):
            return {"wall_s": 0.0, "returncode": 1, "stderr_tail": f"Error: {out} already holds a run"}
        out.mkdir(exist_ok=True)
        for name in ("metrics.jsonl", "model.pt"):
            (out / name).write_text("{}\n")
        return {"wall_s": 0.0, "returncode": 0, "stderr_tail": ""}

    monkeypatch.setattr(gpu, "pretrain", fake_pretrain)
    monkeypatch.setattr(gpu, "perf_summary", lambda run: {})
    size = gpu.SIZES["smoke"]
    first = gpu.pretrain_rows(size, tmp_path / "folder", tmp_path)
    second = gpu.pretrain_rows(size, tmp_path / "folder", tmp_path)
    assert first["eager"]["returncode"] == second["eager"]["returncode"] == 0
    assert first["eager"]["run"] == str(tmp_path / "pretrain-eager")
    assert second["eager"]["run"] == str(tmp_path / "pretrain-eager-2")
    for _ in range(2):
        rows = gpu.determinism_rows({**size, "det_policies": ("random",)}, tmp_path / "folder", tmp_path)
        assert rows["random/deterministic"]["returncode"] == [0, 0]
