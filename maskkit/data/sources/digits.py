"""`digits`: scikit-learn's bundled 8x8 handwritten digits (1797 greyscale images, 10 classes), in memory."""

from __future__ import annotations

from typing import Any

import torch

from maskkit.data.load import register_dataset
from maskkit.data.source import ImageData
from maskkit.registry import Card


@register_dataset("digits", card=Card(idea="scikit-learn's 8x8 handwritten digits: 1797 greyscale images, 10 classes"))
def digits(**_: Any) -> ImageData:
    """scikit-learn's 8x8 digits scaled to [0, 1]: images [1797, 1, 8, 8] float32, labels 0..9."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images / 16.0).float().unsqueeze(1)  # [1797, 1, 8, 8] in [0, 1]
    labels = torch.from_numpy(bunch.target).long()
    return ImageData("digits", images, labels, [str(c) for c in bunch.target_names])
