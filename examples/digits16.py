"""The examples' data: scikit-learn's bundled 8x8 digits (offline), upsampled to 16x16."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset


def digits_dataset(num_samples: int) -> TensorDataset:
    """sklearn's 8x8 digits, scaled to [0, 1] and upsampled 2x to 16x16 grey images [M, 1, 16, 16]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images[:num_samples], dtype=torch.float32) / 16.0  # [M, 8, 8]
    images = images.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2).unsqueeze(1)  # [M, 1, 16, 16]
    return TensorDataset(images, torch.tensor(digits.target[:num_samples]))
