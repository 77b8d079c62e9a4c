"""The GPU figures in one JSON file: plain MAE throughput on a JPEG folder, MLO against the plain step,
every policy's plan cost, and whether a CUDA run repeats itself bit for bit.

    bash benchmarks/gpu.sh --out docs/bench-gpu.json      # one GPU, about 8 minutes
    bash benchmarks/gpu.sh --smoke --out /tmp/smoke.json  # CPU, tiny sizes, seconds (run by the test suite)

What it measures (the full sizes; --smoke shrinks every one of them and runs on the CPU):
- `pretrain`: `maskkit pretrain --model vit-b --img-size 224 --amp bf16 --batch-size 128 --num-workers 8`
  on a generated ImageNet-layout folder of 224 px JPEGs (`make_imagefolder.py`), as its own process;
  images per second, data-wait fraction and peak GPU memory from its perf.jsonl, the first logged
  window (warm-up) left out. The same again with `--compile inductor`, and with `--channels-last`.
- `bench`: `maskkit bench`'s rows (`maskkit.bench.run_bench`) at vit-b (224 px, 196 patches) and at tiny
  (32 px, 64 patches): each MLO contender (darts, direct, unroll K=1) against the plain MAE step, and
  every policy's plan cost at B=256, N=196 (the vit-b preset's policy rows).
- `determinism`: the same seed twice with `torch.use_deterministic_algorithms(True)` (and
  CUBLAS_WORKSPACE_CONFIG=:4096:8), for random masking and for the learned masker (darts): whether
  metrics.jsonl and model.pt are identical; and twice without it, to say whether the default kernels
  repeat themselves too (--smoke: the learned masker with deterministic algorithms only).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from make_imagefolder import make_imagefolder  # noqa: E402

#: the sizes of a full run (one GPU) and of --smoke (the CPU, in the test suite)
SIZES: dict[str, dict[str, Any]] = {
    "full": {"device": "cuda", "images": 2560, "image_side": 256, "model": "vit-b", "img_size": 224, "batch": 128,
             "workers": 8, "steps": 60, "log_every": 10, "amp": "bf16", "compile": "inductor",
             "bench": ("vit-b", "tiny"), "bench_repeats": None, "det_model": "tiny", "det_img": 32, "det_steps": 20,
             "det_batch": 64, "det_policies": ("random", "learned-darts"), "det_modes": ("deterministic", "default")},
    "smoke": {"device": "cpu", "images": 40, "image_side": 20, "model": "micro", "img_size": 16, "batch": 8,
              "workers": 2, "steps": 4, "log_every": 2, "amp": "none", "compile": None,
              "bench": ("trivial",), "bench_repeats": 1, "det_model": "micro", "det_img": 16, "det_steps": 3,
              "det_batch": 8, "det_policies": ("learned-darts",), "det_modes": ("deterministic",)},
}

#: what a pretrain subprocess runs: maskkit's CLI, optionally with deterministic algorithms switched on first
LAUNCH = ("import sys, torch\n"
          "if sys.argv[1] == 'deterministic': torch.use_deterministic_algorithms(True)\n"
          "sys.argv = ['maskkit', *sys.argv[2:]]\n"
          "from maskkit.cli.app import main\n"
          "main()\n")


def pretrain(out: Path, args: list[str], *, deterministic: bool = False, timeout: float = 900) -> dict[str, Any]:
    """Run `maskkit pretrain --out OUT ARGS` in its own process; its wall time, exit status and stderr tail."""
    env = {**os.environ, "CUBLAS_WORKSPACE_CONFIG": ":4096:8"} if deterministic else dict(os.environ)
    cmd = [sys.executable, "-c", LAUNCH, "deterministic" if deterministic else "default", "pretrain",
           "--out", str(out), "--no-progress", *args]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    return {"wall_s": round(time.perf_counter() - t0, 2), "returncode": proc.returncode,
            "stderr_tail": proc.stderr.strip()[-600:] if proc.returncode else ""}


def fresh(path: Path) -> Path:
    """A new empty run directory: `path`, or `path-2`, `path-3`, ... if an earlier invocation with the same
    --work left a run there (maskkit pretrain refuses a directory holding a run; nothing of the earlier one
    is touched); maskkit's own `make_unique_dir`, as runs without --out get theirs."""
    from maskkit.locking import make_unique_dir

    return make_unique_dir(path)


def perf_summary(run: Path) -> dict[str, Any]:
    """Means over perf.jsonl's windows after the first (warm-up, compilation): images/s, data wait, step time,
    and the largest peak memory."""
    path = run / "perf.jsonl"
    if not path.is_file():
        return {"error": f"{path} missing"}
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    steady = lines[1:] or lines
    mean = lambda key: round(sum(r[key] for r in steady) / len(steady), 4)  # noqa: E731
    summary = {"windows": len(steady), "images_per_s": mean("images_per_s"), "data_wait": mean("data_wait"),
               "step_s": mean("step_s"), "first_window_step_s": lines[0]["step_s"] if lines else None}
    peaks = [r["peak_mem_mb"] for r in lines if "peak_mem_mb" in r]
    if peaks:
        summary["peak_mem_mb"] = max(peaks)
    return summary


def pretrain_rows(size: dict[str, Any], folder: Path, work: Path) -> dict[str, Any]:
    """Plain MAE (random masking) on the folder: eager, compiled, channels-last."""
    base = ["--dataset", f"imagefolder:{folder}", "--model", size["model"], "--img-size", str(size["img_size"]),
            "--batch-size", str(size["batch"]), "--num-workers", str(size["workers"]), "--steps", str(size["steps"]),
            "--log-every", str(size["log_every"]), "--ckpt-every", "100000", "--amp", size["amp"],
            "--device", size["device"], "--policy", "random"]  # fmt: skip
    variants = {"eager": []}
    if size["compile"]:
        variants[f"compile-{size['compile']}"] = ["--compile", size["compile"]]
        variants["channels-last"] = ["--channels-last"]
    rows = {}
    for name, extra in variants.items():
        out = fresh(work / f"pretrain-{name}")
        row = pretrain(out, base + extra)
        row.update(perf_summary(out) if row["returncode"] == 0 else {})
        row["command"] = "maskkit pretrain " + " ".join([*base, *extra])
        row["run"] = str(out)
        rows[name] = row
        print(f"pretrain {name}: {json.dumps(row)}", flush=True)
    return rows


def bench_rows(size: dict[str, Any]) -> dict[str, Any]:
    """`maskkit bench` in this process, for each preset: MLO rows and policy plan rows."""
    from maskkit.bench import run_bench

    out = {}
    for preset in size["bench"]:
        t0 = time.perf_counter()
        payload = run_bench(preset, size["device"], repeats=size["bench_repeats"], rss=False)
        payload["wall_s"] = round(time.perf_counter() - t0, 2)
        out[preset] = payload
        print(f"bench {preset}: {len(payload['rows'])} rows in {payload['wall_s']} s", flush=True)
    return out


def _digest(run: Path) -> str:
    """sha256 of metrics.jsonl and model.pt together."""
    h = hashlib.sha256()
    for name in ("metrics.jsonl", "model.pt"):
        h.update((run / name).read_bytes())
    return h.hexdigest()


def determinism_rows(size: dict[str, Any], folder: Path, work: Path) -> dict[str, Any]:
    """Each (policy, mode): the same seed twice; identical files or not."""
    base = ["--dataset", f"imagefolder:{folder}", "--model", size["det_model"], "--img-size", str(size["det_img"]),
            "--batch-size", str(size["det_batch"]), "--steps", str(size["det_steps"]), "--log-every", "1",
            "--num-workers", str(size["workers"]), "--device", size["device"], "--amp", size["amp"], "--seed", "3"]
    policies = {"random": ["--policy", "random"],
                "learned-darts": ["--policy", "learned", "--hypergrad", "darts", "--learned-hidden-dim", "8"]}
    rows = {}
    for policy in size["det_policies"]:
        extra = policies[policy]
        for mode in size["det_modes"]:
            runs = [fresh(work / f"det-{policy}-{mode}-{i}") for i in range(2)]
            results = [pretrain(r, base + extra, deterministic=mode == "deterministic") for r in runs]
            ok = all(r["returncode"] == 0 for r in results)
            row: dict[str, Any] = {"returncode": [r["returncode"] for r in results]}
            if ok:
                row["identical"] = _digest(runs[0]) == _digest(runs[1])
                first, second = ((r / "metrics.jsonl").read_text().splitlines() for r in runs)
                row["first_differing_line"] = next((i + 1 for i, (a, b) in enumerate(zip(first, second, strict=False)) if a != b),
                                                   None)  # fmt: skip
            else:
                row["stderr_tail"] = next(r["stderr_tail"] for r in results if r["returncode"])
            rows[f"{policy}/{mode}"] = row
            print(f"determinism {policy}/{mode}: {json.dumps(row)}", flush=True)
    return rows


def environment(device: str) -> dict[str, Any]:
    import torch

    env = {"torch": torch.__version__, "python": platform.python_version(), "host": platform.node(),
           "cpus": os.cpu_count(), "device": device}
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (seconds): the script's own test")
    parser.add_argument("--out", default="bench-gpu.json", help="the JSON file to write")
    parser.add_argument("--work", default=None, help="where the folder and the runs go (default: a temporary one)")
    parser.add_argument("--only", nargs="+", choices=("pretrain", "bench", "determinism"), default=None,
                        help="run these parts only")
    args = parser.parse_args(argv)
    size = SIZES["smoke" if args.smoke else "full"]
    out = Path(args.out)
    if out.is_dir() or not out.parent.is_dir() or not os.access(out.parent, os.W_OK) or (
            out.exists() and not os.access(out, os.W_OK)):  # before minutes of work, not after them
        print(f"Error: --out {args.out}: cannot write a file there", file=sys.stderr)
        return 1
    if size["device"] == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("Error: no CUDA device here; run with --smoke for the CPU check", file=sys.stderr)
            return 1
    parts = args.only or ["pretrain", "bench", "determinism"]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="maskkit-gpu-") as scratch:
        work = Path(args.work or scratch)
        work.mkdir(parents=True, exist_ok=True)
        folder = work / "folder"
        if not (folder / "train").is_dir():
            make_imagefolder(folder, size["images"], size=size["image_side"])
        result: dict[str, Any] = {"smoke": args.smoke, "sizes": size, "environment": environment(size["device"])}
        if "pretrain" in parts:
            result["pretrain"] = pretrain_rows(size, folder, work)
        if "bench" in parts:
            result["bench"] = bench_rows(size)
        if "determinism" in parts:
            result["determinism"] = determinism_rows(size, folder, work)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    failed = [f"pretrain {name}" for name, row in result.get("pretrain", {}).items() if row["returncode"]]
    failed += [f"determinism {name}" for name, row in result.get("determinism", {}).items() if any(row["returncode"])]
    result["failed"] = failed
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out} ({result['wall_s']} s)" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
