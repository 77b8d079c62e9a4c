"""`mnist`, `fashion-mnist`, `cifar10`, `cifar100`: torchvision's data sets, train and test files in one pool.

They are read from `--data-dir` (torchvision's own folder layout), or downloaded into it with
`--download`, and held in memory as uint8 `ImageData`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from maskkit.data.load import register_dataset
from maskkit.data.source import DataError, ImageData, check_dir
from maskkit.registry import Card

#: maskkit name -> (torchvision class, card idea)
TORCHVISION = {
    "mnist": ("MNIST", "torchvision MNIST: 70000 28x28 greyscale handwritten digits, 10 classes"),
    "fashion-mnist": ("FashionMNIST", "torchvision Fashion-MNIST: 70000 28x28 greyscale clothes, 10 classes"),
    "cifar10": ("CIFAR10", "torchvision CIFAR-10: 60000 32x32 colour photos, 10 classes"),
    "cifar100": ("CIFAR100", "torchvision CIFAR-100: 60000 32x32 colour photos, 100 classes"),
}

ALLOWED = {"data_dir": "a folder holding torchvision's files (or where to download them)", "download": "true | false"}


def load_torchvision(kind: str, data_dir: str | Path | None, download: bool) -> ImageData:
    """The torchvision set `kind` (a key of TORCHVISION): train then test images, [N, C, H, W] uint8."""
    from torchvision import datasets

    if download:
        if data_dir is None:
            raise DataError(f"dataset {kind!r} needs --data-dir (where to download it)")
        Path(data_dir).mkdir(parents=True, exist_ok=True)
    else:
        check_dir(data_dir, f"dataset {kind!r}")
    cls = getattr(datasets, TORCHVISION[kind][0])
    parts = []
    for train in (True, False):
        try:
            parts.append(cls(root=str(data_dir), train=train, download=download))
        except RuntimeError as err:
            hint = "" if download else " (pass --download to fetch it)"
            raise DataError(f"dataset {kind!r} not found in {data_dir}{hint}: {str(err).splitlines()[0]}") from None
    images, labels = [], []
    for ds in parts:
        arr = torch.as_tensor(np.asarray(ds.data))
        arr = arr.unsqueeze(1) if arr.dim() == 3 else arr.permute(0, 3, 1, 2)  # [N, C, H, W]
        images.append(arr.to(torch.uint8).contiguous())
        labels.append(torch.as_tensor(np.asarray(ds.targets), dtype=torch.long))
    return ImageData(kind, torch.cat(images), torch.cat(labels), [str(c) for c in parts[0].classes])


def _register(kind: str) -> None:
    def factory(*, data_dir: str | None = None, download: bool = False, **_: Any) -> ImageData:
        return load_torchvision(kind, data_dir, download)

    factory.__name__ = factory.__qualname__ = kind.replace("-", "_")
    factory.__doc__ = TORCHVISION[kind][1]
    register_dataset(kind, card=Card(idea=TORCHVISION[kind][1], allowed=ALLOWED))(factory)


for _kind in TORCHVISION:
    _register(_kind)
