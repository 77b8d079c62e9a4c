"""`movingdigits`: clips of two handwritten digits moving across a small canvas, labelled by the direction of
their motion; generated from scikit-learn's 8x8 digits, in memory, no download: maskkit's embedded video default.

A single frame tells nothing of the label (every frame of every class has the same distribution: each digit
lies anywhere on the canvas, uniformly); only the frames together do. So a probe on features of a video MAE
measures what pretraining learnt from the motion, not from one picture.

Generation rule (`moving_digits(count, frames, side, seed, rate)`), exactly; the sklearn digits are
`sklearn.datasets.load_digits().images` (1797 glyphs of 8x8 values 0..16), and every draw comes, in this
order, from one `numpy.random.default_rng(seed)`:

1. labels = rng.permutation(arange(count) % 4): balanced classes (each `count // 4` or one more), classes
   0 "left" (row, column step (0, -1)), 1 "right" (0, +1), 2 "up" (-1, 0), 3 "down" (+1, 0);
2. glyphs = rng.integers(0, 1797, size=(count, 2)): which two digits a clip shows;
3. speeds = rng.integers(1, 3, size=(count, 2)): each digit's speed, 1 or 2 pixels a frame;
4. starts = rng.integers(0, side, size=(count, 2, 2)): each digit's top-left corner (row, column) in frame 0.

In frame t (0..frames-1), digit k's top-left corner is (starts[k] + speeds[k] * t * rate * step) mod side,
and its pixel (a, b) lands at ((row + a) mod side, (column + b) mod side): the canvas is a torus (a digit
leaving one edge comes back at the other; so each digit crosses the canvas at its own speed, and the start
positions span it). `rate` (--sampling-rate, default 1) is VideoMAE's sampling rate: the clip shows every
rate-th step of the motion (a step of side / 2 or more pixels a frame, 2 * rate >= side / 2, reads on the
torus as a motion the other way, or none: keep 4 * rate < side). A pixel of the clip is the larger of the two digits' values there (0 where neither
is), as 8-bit value * 255 // 16. Clips are uint8 [count, 1, frames, side, side], read as float in [0, 1].

Settings: `--num-frames` (frames, default 16) and `--sampling-rate` (rate, 1) as for every video source; the
spec's options `count` (2000), `side` (32) and `seed` (0): `--dataset movingdigits,side=16,count=400`.

Splits: as every in-memory source, `make_splits`' seeded stratified split of all clips (the classes are
balanced, so every split is too); the label is the motion, not the digit, so sharing a glyph between two
clips of different splits tells nothing of the test label.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from maskkit.data.load import register_dataset
from maskkit.data.source import DataError, ImageData
from maskkit.registry import Card

#: the classes, in label order, and their (row, column) step per frame
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
#: a digit glyph's side (scikit-learn's digits are 8x8); the canvas must be at least this wide
GLYPH = 8
#: the settings' defaults and the least value each takes (`frames`: --num-frames, `rate`: --sampling-rate)
DEFAULTS = {"count": 2000, "frames": 16, "side": 32, "seed": 0, "rate": 1}
LEAST = {"count": len(DIRECTIONS), "frames": 2, "side": GLYPH, "seed": 0, "rate": 1}
#: how a message names each setting
SPELLED = {"count": "option count", "frames": "--num-frames", "side": "option side", "seed": "option seed",
           "rate": "--sampling-rate"}  # fmt: skip

CARD = Card(
    idea="clips of two sklearn digits moving across a canvas (a torus), labelled by the direction of motion "
    "(left, right, up, down), which no single frame tells; generated, no download",
    paper="after Srivastava et al., Moving MNIST (ICML 2015); maskkit's own rule",
    allowed={
        "count": f"int >= {LEAST['count']} (clips)",
        "side": f"int >= {LEAST['side']} (H = W)",
        "seed": "int >= 0 (the generation's seed)",
        "num_frames": f"int >= {LEAST['frames']} (T; --num-frames, default {DEFAULTS['frames']})",
        "sampling_rate": f"int >= 1 (steps of the motion between frames; --sampling-rate, default {DEFAULTS['rate']})",
    },
)


def _option(name: str, value: Any) -> int:
    """Setting `name` as an integer (a spec gives text), at least LEAST[name]; else a one-line DataError."""
    try:
        number = value if isinstance(value, int) and not isinstance(value, bool) else int(str(value), 10)
    except ValueError:
        number = None
    if number is None or number < LEAST[name]:
        raise DataError(f"dataset 'movingdigits': {SPELLED[name]} must be an integer >= {LEAST[name]}, got {value!r}")
    return number


def moving_digits(
    count: int = DEFAULTS["count"], frames: int = DEFAULTS["frames"], side: int = DEFAULTS["side"],
    seed: int = DEFAULTS["seed"], rate: int = DEFAULTS["rate"],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(clips uint8 [count, 1, frames, side, side], labels int64 [count]) by the rule of the module docstring."""
    from sklearn.datasets import load_digits

    given = (count, frames, side, seed, rate)
    count, frames, side, seed, rate = (_option(k, v) for k, v in zip(DEFAULTS, given, strict=True))
    digits = load_digits().images.astype(np.int64)  # [1797, 8, 8] values 0..16
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(count) % len(DIRECTIONS))  # [N]
    glyphs = rng.integers(0, len(digits), size=(count, 2))  # [N, 2]
    speeds = rng.integers(1, 3, size=(count, 2))  # [N, 2]
    starts = rng.integers(0, side, size=(count, 2, 2))  # [N, 2, 2] (digit, row / column)
    steps = np.asarray(list(DIRECTIONS.values()))[labels]  # [N, 2] (row, column) per frame
    pixels = digits * 255 // 16  # [1797, 8, 8] 8-bit
    clips = np.zeros((count, frames, side, side), dtype=np.int64)  # [N, T, S, S]
    t = np.arange(frames) * rate  # the motion's step shown in each frame
    n = np.arange(count)[:, None, None, None]  # [N, 1, 1, 1]
    within = np.arange(GLYPH)
    for k in range(2):
        corner = (starts[:, k, None, :] + speeds[:, k, None, None] * t[None, :, None] * steps[:, None, :]) % side
        rows = (corner[:, :, 0, None, None] + within[None, None, :, None]) % side  # [N, T, 8, 1]
        cols = (corner[:, :, 1, None, None] + within[None, None, None, :]) % side  # [N, T, 1, 8]
        frame = np.arange(frames)[None, :, None, None]  # [1, T, 1, 1]
        glyph = pixels[glyphs[:, k]][:, None]  # [N, 1, 8, 8]
        clips[n, frame, rows, cols] = np.maximum(clips[n, frame, rows, cols], glyph)  # a glyph covers distinct pixels
    images = torch.from_numpy(clips.astype(np.uint8)[:, None])  # [N, 1, T, S, S]
    return images, torch.from_numpy(labels.astype(np.int64))


@register_dataset("movingdigits", card=CARD)
def movingdigits(
    *, count: int | str = DEFAULTS["count"], side: int | str = DEFAULTS["side"], seed: int | str = DEFAULTS["seed"],
    num_frames: int | None = None, sampling_rate: int | None = None, **_: Any,
) -> ImageData:
    """Clips [count, 1, num_frames, side, side] uint8 and their direction labels 0..3 (`moving_digits`): the
    spec's options (`--dataset movingdigits,side=16,count=400,seed=1`), --num-frames and --sampling-rate."""
    frames = DEFAULTS["frames"] if num_frames is None else num_frames
    rate = DEFAULTS["rate"] if sampling_rate is None else sampling_rate
    images, labels = moving_digits(count, frames, side, seed, rate)
    return ImageData("movingdigits", images, labels, list(DIRECTIONS))
