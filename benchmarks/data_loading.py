"""Data loading at scale: memory and start-up of `maskkit pretrain` on generated ImageNet-layout folders, and
the loader's images per second against torchvision's ImageFolder + MAE's transforms + a plain DataLoader.

    python benchmarks/data_loading.py --sizes 1000 10000 --workers 2 --out docs/bench-data-cpu.json

For each folder size (224 x 224 JPEGs, made by `make_imagefolder.py` under --root unless there):
- `maskkit pretrain --dataset imagefolder:DIR --model tiny --steps 30 --num-workers W`, run as its own
  process: its peak RSS (VmHWM of the main process), the peak PSS of the whole process tree (main plus
  workers; shared pages counted once, polled every 0.5 s), and the time from launch to the first
  metrics line (--log-every 1: the first step done);
- the loaders alone, in this one process, interleaved round by round: maskkit's `Loader` (crop + flip in
  the workers, uint8 samples) and the official MAE pipeline (torchvision `ImageFolder` with
  RandomResizedCrop(224, scale=(0.2, 1.0), bicubic) + RandomHorizontalFlip + ToTensor + Normalize, and a
  `DataLoader` with shuffle, drop_last and the same workers): images per second over --batches batches
  after --warmup batches, per round, and the median.
Writes one JSON file and prints a table. A benchmark, not a test: run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from make_imagefolder import make_imagefolder  # noqa: E402


def _tree(pid: int) -> list[int]:
    """`pid` and all its descendants (from /proc/<pid>/task/*/children)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            continue
    return found


def _kb(path: str, key: str) -> int:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def measure_pretrain(folder: Path, workers: int, steps: int, batch_size: int, out: Path) -> dict[str, Any]:
    """Peak RSS (main), peak PSS (tree) and the time to the first step of one `maskkit pretrain` process."""
    cmd = ["maskkit", "pretrain"]
    cmd += ["--dataset", f"imagefolder:{folder}", "--model", "tiny", "--steps", str(steps), "--batch-size",
            str(batch_size), "--num-workers", str(workers), "--log-every", "1", "--ckpt-every", str(steps),
            "--out", str(out)]  # fmt: skip
    metrics = out / "metrics.jsonl"
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    hwm = pss = 0
    first = None
    polls = 0
    while proc.poll() is None:
        hwm = max(hwm, _kb(f"/proc/{proc.pid}/status", "VmHWM:"))
        if polls % 5 == 0:  # PSS is costly to read for a large process: every 0.5 s
            pss = max(pss, sum(_kb(f"/proc/{p}/smaps_rollup", "Pss:") for p in _tree(proc.pid)))
        if first is None and metrics.is_file() and metrics.stat().st_size > 0:
            first = time.perf_counter() - start
        polls += 1
        time.sleep(0.1)
    total = time.perf_counter() - start
    err = proc.stderr.read() if proc.stderr else ""
    if proc.returncode != 0:
        raise SystemExit(f"maskkit pretrain failed ({proc.returncode}): {err.strip().splitlines()[-1:]}")
    return {"peak_rss_main_mb": round(hwm / 1024, 1), "peak_pss_tree_mb": round(pss / 1024, 1),
            "first_step_s": None if first is None else round(first, 2), "total_s": round(total, 2)}  # fmt: skip


def _maskkit_batches(folder: Path, workers: int, batch_size: int, seed: int) -> Any:
    import numpy as np
    import torch

    from maskkit.data import Batcher, Loader, load_dataset
    from maskkit.run.builder import IMAGENET_MEAN, IMAGENET_STD

    data = load_dataset(f"imagefolder:{folder}")
    train = data.given_splits["train"] if data.given_splits else np.arange(len(data))
    batcher = Batcher(data, IMAGENET_MEAN, IMAGENET_STD, torch.device("cpu"), "crop-flip", num_workers=workers)
    loader = Loader(batcher, train, batch_size, seed, labels=True)
    try:
        while True:
            yield loader.next().images
    finally:
        loader.close()


def _official_batches(folder: Path, workers: int, batch_size: int, seed: int) -> Any:
    import torch
    from torchvision import datasets, transforms

    tf = transforms.Compose([
        transforms.RandomResizedCrop(224, scale=(0.2, 1.0), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(), transforms.ToTensor(),
        transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ])  # fmt: skip
    dataset = datasets.ImageFolder(str(folder / "train"), transform=tf)
    gen = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                                         num_workers=workers, generator=gen, persistent_workers=workers > 0)  # fmt: skip
    while True:
        for images, _ in loader:
            yield images


def loader_rates(folder: Path, workers: int, batch_size: int, batches: int, warmup: int, rounds: int
                 ) -> dict[str, Any]:  # fmt: skip
    """Images per second of both pipelines, interleaved round by round in this process."""
    import torch

    torch.set_num_threads(1)
    pipes = {"maskkit": _maskkit_batches(folder, workers, batch_size, 0),
             "torchvision": _official_batches(folder, workers, batch_size, 0)}  # fmt: skip
    for it in pipes.values():
        for _ in range(warmup):
            next(it)
    rates: dict[str, list[float]] = {name: [] for name in pipes}
    for _ in range(rounds):
        for name, it in pipes.items():
            start = time.perf_counter()
            for _ in range(batches):
                x = next(it)
            rates[name].append(batches * batch_size / (time.perf_counter() - start))
            assert tuple(x.shape[1:]) == (3, 224, 224), x.shape
    for it in pipes.values():
        it.close()
    return {name: {"images_per_s": round(statistics.median(r), 1), "rounds": [round(v, 1) for v in r]}
            for name, r in rates.items()}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8, help="pretrain batch (tiny at 224 px: ~5 s a step on 2 cores)")
    parser.add_argument("--loader-batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=15, help="batches per round of the loader comparison")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "maskkit-bench-folders"))
    parser.add_argument("--out", default=None, help="write the JSON here")
    parser.add_argument("--loaders-only", action="store_true",
                        help="measure the loaders again and update --out's file, keeping its pretrain figures")
    args = parser.parse_args()
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                               "args": vars(args), "sizes": {}}  # fmt: skip
    if args.loaders_only:
        results = json.loads(Path(args.out).read_text())
    for n in args.sizes:
        folder = Path(args.root) / f"imagenet-{n}"
        if not (folder / "train").is_dir():
            make_imagefolder(folder, n)
        if args.loaders_only:
            row = results["sizes"][str(n)]
        else:
            with tempfile.TemporaryDirectory() as tmp:
                row = measure_pretrain(folder, args.workers, args.steps, args.batch_size, Path(tmp) / "run")
        row["loaders"] = loader_rates(folder, args.workers, args.loader_batch_size, args.batches, args.warmup, args.rounds)
        results["sizes"][str(n)] = row
        print(json.dumps({n: row}))
    text = json.dumps(results, indent=2) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    print("| images | peak RSS main (MB) | peak PSS tree (MB) | first step (s) | maskkit img/s | torchvision img/s |")
    print("|---|---|---|---|---|---|")
    for n, row in results["sizes"].items():
        lo = row["loaders"]
        print(f"| {n} | {row['peak_rss_main_mb']} | {row['peak_pss_tree_mb']} | {row['first_step_s']} | "
              f"{lo['maskkit']['images_per_s']} | {lo['torchvision']['images_per_s']} |")


if __name__ == "__main__":
    main()
