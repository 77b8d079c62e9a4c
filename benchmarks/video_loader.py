"""The clip loader's throughput: maskkit's `Loader` over `clipfolder:` against a plain `torch.utils.data.DataLoader`
over the same decoder (`ClipFolder.pixels`, the same keyed draws), with 0 and 2 worker processes.

    OMP_NUM_THREADS=1 python benchmarks/video_loader.py [--clips 32] [--frames 48] [--side 128] [--batches 8]

A script, not a test: it prints clips/s; it writes a generated clip folder (`maskkit.data.make_clips`) in a
temporary directory first.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from maskkit.data import Batcher, Loader, load_dataset
from maskkit.data.augment import key_draws, key_seed
from maskkit.data.make_clips import make_clips


class Plain(torch.utils.data.Dataset):
    """Clip i with the draws of key (seed, i): the decoder and crop the loader uses, nothing else."""

    def __init__(self, data) -> None:  # noqa: ANN001
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.data.pixels(i, key_draws((0, i))).float() / 255.0  # [C, T, H, W]


def plain(data, workers: int, batch: int, batches: int) -> float:  # noqa: ANN001
    loader = torch.utils.data.DataLoader(Plain(data), batch_size=batch, shuffle=True, num_workers=workers,
                                         generator=torch.Generator().manual_seed(key_seed((0,))))  # fmt: skip
    start, seen = time.perf_counter(), 0
    while seen < batches:
        for _ in loader:
            seen += 1
            if seen == batches:
                break
    return batches * batch / (time.perf_counter() - start)


def ours(data, workers: int, batch: int, batches: int) -> float:  # noqa: ANN001
    batcher = Batcher(data, [0.45] * 3, [0.225] * 3, torch.device("cpu"), "crop-flip", num_workers=workers)
    loader = Loader(batcher, np.arange(len(data)), batch, seed=0)
    start = time.perf_counter()
    for _ in range(batches):
        loader.next()
    rate = batches * batch / (time.perf_counter() - start)
    loader.close()
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=32)
    parser.add_argument("--frames", type=int, default=48)
    parser.add_argument("--side", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--num-frames", type=int, default=16)
    parser.add_argument("--sampling-rate", type=int, default=2)
    parser.add_argument("--img-size", type=int, default=112)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "clips"
        make_clips(folder, classes=2, per_class=args.clips // 2, frames=args.frames, side=args.side)
        data = load_dataset(f"clipfolder:{folder}", num_frames=args.num_frames, sampling_rate=args.sampling_rate,
                            img_size=args.img_size)  # fmt: skip
        print(f"{len(data)} clips of {args.frames} frames {args.side}x{args.side} (.mp4, MPEG-4); samples "
              f"[3, {args.num_frames}, {args.img_size}, {args.img_size}], batch {args.batch}, {args.batches} batches")
        for workers in (0, 2):
            a = plain(data, workers, args.batch, args.batches)
            b = ours(data, workers, args.batch, args.batches)
            print(f"workers {workers}: plain DataLoader {a:7.1f} clips/s   maskkit Loader {b:7.1f} clips/s")


if __name__ == "__main__":
    main()
