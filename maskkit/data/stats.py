"""Per-channel statistics of a split and the normalisation they define (what the MAE sees).

Images [B, C, H, W] and clips [B, C, T, H, W] alike: channel axis 1, every other axis pooled."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from maskkit.data.source import DataSource


def channel_stats(data: DataSource, index: np.ndarray, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of the images (or clips: over all their frames) at `index`
    (float64 accumulation)."""
    total = torch.zeros(data.in_chans, dtype=torch.float64)
    total_sq = torch.zeros(data.in_chans, dtype=torch.float64)
    count = 0
    for start in range(0, len(index), chunk):
        x = data.floats(index[start : start + chunk]).double()  # [b, C, H, W] or [b, C, T, H, W]
        dims = (0, *range(2, x.dim()))
        total += x.sum(dim=dims)
        total_sq += (x * x).sum(dim=dims)
        count += x.numel() // x.shape[1]
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(1e-12).sqrt()
    return mean.tolist(), std.clamp_min(1e-3).tolist()


def _per_channel(values: list[float], like: Tensor) -> Tensor:
    """`values` [C] shaped to broadcast over channel axis 1 of `like`: [1, C, 1, 1] (clips: [1, C, 1, 1, 1])."""
    return torch.tensor(values, dtype=like.dtype, device=like.device).view(1, -1, *([1] * (like.dim() - 2)))


def normalize(images: Tensor, mean: list[float], std: list[float]) -> Tensor:
    """(x - mean) / std per channel: [B, C, H, W] or clips [B, C, T, H, W]."""
    return (images - _per_channel(mean, images)) / _per_channel(std, images)


def denormalize(images: Tensor, mean: list[float], std: list[float]) -> Tensor:
    """Inverse of `normalize`."""
    return images * _per_channel(std, images) + _per_channel(mean, images)
