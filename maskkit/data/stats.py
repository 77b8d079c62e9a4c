"""Per-channel statistics of a split and the normalisation they define (what the MAE sees)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from maskkit.data.source import DataSource


def channel_stats(data: DataSource, index: np.ndarray, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of the images at `index` (float64 accumulation)."""
    total = torch.zeros(data.in_chans, dtype=torch.float64)
    total_sq = torch.zeros(data.in_chans, dtype=torch.float64)
    count = 0
    for start in range(0, len(index), chunk):
        x = data.floats(index[start : start + chunk]).double()  # [b, C, H, W]
        total += x.sum(dim=(0, 2, 3))
        total_sq += (x * x).sum(dim=(0, 2, 3))
        count += x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(1e-12).sqrt()
    return mean.tolist(), std.clamp_min(1e-3).tolist()


def normalize(images: Tensor, mean: list[float], std: list[float]) -> Tensor:
    """(x - mean) / std per channel: [B, C, H, W]."""
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - m) / s


def denormalize(images: Tensor, mean: list[float], std: list[float]) -> Tensor:
    """Inverse of `normalize`."""
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return images * s + m
