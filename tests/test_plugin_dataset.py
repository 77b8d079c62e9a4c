"""A data source added without editing maskkit: a module written here, registered with `register_dataset`,
loaded through MASKKIT_PLUGINS, and trained on by a real `maskkit pretrain --dataset tiles:ARG` process.

The plugin's ARG (images per class) is not a path, so the run must record the spec as given; its images
are constant per class, so the train split's channel mean is known without the split itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

PLUGIN = textwrap.dedent(
    '''
    """tiles:N: N 8x8 RGB images per class, each filled with its class's colour (a test plugin)."""

    import torch

    from maskkit.data import Source, register_dataset
    from maskkit.registry import Card

    COLOURS = [(0.1, 0.9, 0.5), (0.4, 0.2, 0.7), (0.8, 0.6, 0.0), (0.3, 0.5, 1.0)]  # class -> RGB


    @register_dataset("tiles", card=Card(idea="flat colour tiles", allowed={"arg": "images per class"}), arg="value")
    class Tiles(Source):
        """Flat colour tiles, read one at a time."""

        def __init__(self, *, arg, data_dir=None, download=False, img_size=None):
            self.per_class = int(arg)
            self.name = f"tiles:{arg}"
            self.classes = [f"c{k}" for k in range(len(COLOURS))]
            self.labels = torch.arange(len(self)) // self.per_class  # [N] int64

        def __len__(self):
            return self.per_class * len(COLOURS)

        @property
        def image_size(self):
            return (8, 8)

        @property
        def in_chans(self):
            return 3

        def read(self, i):
            colour = torch.tensor(COLOURS[int(self.labels[i])], dtype=torch.float32)
            return colour.view(3, 1, 1).expand(3, 8, 8).clone()  # [C, H, W]
    '''
)
COLOURS = np.array([(0.1, 0.9, 0.5), (0.4, 0.2, 0.7), (0.8, 0.6, 0.0), (0.3, 0.5, 1.0)])


def _maskkit(tmp_path, *args):
    env = {**os.environ, "MASKKIT_PLUGINS": "tiles_plugin", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "maskkit.cli", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


@pytest.mark.slow
def test_plugin_source_trains_through_pretrain(tmp_path):
    (tmp_path / "tiles_plugin.py").write_text(PLUGIN)
    proc = _maskkit(tmp_path, "pretrain", "--dataset", "tiles:10", "--steps", "3", "--batch-size", "8",
                    "--out", str(tmp_path / "run"), "--no-progress")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    ds = json.loads((tmp_path / "run" / "config.json").read_text())["dataset"]
    assert ds["name"] == "tiles:10"  # kept as given: the ARG is not a path
    assert ds["num_images"] == 40 and ds["num_classes"] == 4 and ds["in_chans"] == 3 and ds["image_size"] == [8, 8]
    assert ds["splits"] == {"train": 28, "val": 4, "test": 8}  # 10 per class: 7 / 1 / 2 of each
    # every class gives the train split 7 images, so its pixels are the colours in equal shares
    images = np.repeat(COLOURS, 7, axis=0)[:, :, None, None] * np.ones((1, 1, 8, 8))  # [28, 3, 8, 8]
    np.testing.assert_allclose(ds["mean"], images.mean(axis=(0, 2, 3)), rtol=0, atol=1e-6)
    np.testing.assert_allclose(ds["std"], images.std(axis=(0, 2, 3)), rtol=0, atol=1e-6)
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) >= 1


@pytest.mark.slow
def test_plugin_source_is_listed_when_a_spec_is_wrong(tmp_path):
    (tmp_path / "tiles_plugin.py").write_text(PLUGIN)
    proc = _maskkit(tmp_path, "pretrain", "--dataset", "tiles", "--steps", "1", "--out", str(tmp_path / "run"))
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown dataset 'tiles'" in lines[0] and "tiles:ARG" in lines[0], proc.stderr
    assert "npz:PATH" in lines[0] and "Traceback" not in proc.stderr
