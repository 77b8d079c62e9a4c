"""Floor of the study: MAE's linear probe (same head, optimizer and schedule) on raw pixels.

    python examples/study/raw_pixel_probe.py RUN_DIR    # writes RUN_DIR/raw_pixels.json

Uses the run's data set, normalisation and splits (train for the probe, test for top-1), with the
normalised pixels flattened as the features in place of the encoder's CLS features.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np

from maskkit import run as run_layer
from maskkit.evaluate import LINEAR_BASE_LR, default_epochs, linear_probe


def main(run_dir: Path) -> None:
    run = run_layer.load_run(run_dir, "cpu", weights=False)
    train, test = run.splits["train"], run.splits["test"]
    index = np.concatenate([train, test])
    feats = run.batcher.images(index).flatten(1).float()  # [n, C*H*W]
    labels = run.batcher.labels(index)
    bs = min(256, len(train))
    result = linear_probe(
        feats[: len(train)],
        labels[: len(train)],
        feats[len(train) :],
        labels[len(train) :],
        run.batcher.data.num_classes,
        epochs=default_epochs(90, len(train), bs),
        batch_size=bs,
        lr=LINEAR_BASE_LR * bs / 256,
        seed=0,
    )
    (run_dir / "raw_pixels.json").write_text(json.dumps(asdict(result), indent=2) + "\n")
    print(f"raw pixels: test top-1 {100 * result.top1:.2f}%")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
