"""VideoMAE's clip transforms as pure functions of uniform draws (maskkit's own code after the published rules).

A decoded clip is a list of frames; two choices make its sample:
- **which frames** (`frame_indices`): `clip_len` frames `rate` apart. Pretraining takes a random start
  (VideoMAE's `_sample_train_indices` with one segment: start ~ U{0 .. n - clip_len * rate}, from draw
  `u[START]`); evaluation the centred window (start = (n - clip_len * rate) // 2, VideoMAE's one-segment
  choice made deterministic). A clip shorter than `clip_len * rate` starts at 0, and its index stops
  advancing once the next step would reach the last frame (VideoMAE's loader: the 1-based position p
  advances by `rate` only while p + rate < n), so the end of the clip is padded by repeating the last frame
  reached: n = 6, clip_len 4, rate 2 -> 0, 2, 4, 4.
- **which pixels** (`multiscale_box`, pretraining): VideoMAE's GroupMultiScaleCrop: crop sides
  int(short side x s) for s in SCALES (a side within 2 px of the output side snaps to it), a (width, height)
  pair of scale indices at most MAX_DISTORT apart chosen uniformly (draw `u[PAIR]`), placed at one of the 13
  fixed offsets (corners, centre, edge centres, quarter points; draw `u[OFFSET]`), the same box on every
  frame, resized (bilinear) to the run's size; then a horizontal flip when `u[FLIP]` < 0.5 (VideoMAE's
  pretraining pipeline has no flip; its fine-tuning does; maskkit's crop-flip flips images too).
  Evaluation: MAE's resize (the crop covers 0.875 of the short side: VideoMAE's 224 of 256) and centre crop,
  `maskkit.data.augment.picture_center`.
The draws are the loader's `key_draws` (41 uniforms keyed by (seed, step, sample)): any worker count gives
the same clips.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["FLIP", "MAX_DISTORT", "OFFSET", "PAIR", "SCALES", "START", "clip_view", "fixed_offsets",
           "frame_indices", "multiscale_box"]  # fmt: skip

#: GroupMultiScaleCrop's scales of the short side, and how far apart the width and height scales may be
SCALES = (1.0, 0.875, 0.75, 0.66)
MAX_DISTORT = 1
#: which of the draws each choice reads
START, PAIR, OFFSET, FLIP = 0, 1, 2, 3


def _pick(u: float, count: int) -> int:
    """A uniform choice among `count` from one draw in [0, 1)."""
    return min(int(u * count), count - 1)


def frame_indices(num_frames: int, clip_len: int, rate: int, u: float | None = None) -> list[int]:
    """The `clip_len` frame indices (0-based, into a clip of `num_frames`) of one sample: start from the draw `u`
    (pretraining) or centred (u None: evaluation); a short clip padded by its last frame reached (docstring)."""
    span = clip_len * rate
    room = num_frames - span + 1  # the starts that fit
    if room > 0:
        start = (room - 1) // 2 if u is None else _pick(u, room)
    else:
        start = 0
    position = start + 1  # VideoMAE counts 1-based
    out = []
    for _ in range(clip_len):
        out.append(position - 1)
        if position + rate < num_frames:
            position += rate
    return out


def fixed_offsets(width: int, height: int, crop_w: int, crop_h: int) -> list[tuple[int, int]]:
    """The 13 (left, top) offsets of GroupMultiScaleCrop's fix-crop (more_fix_crop) for a crop in an image."""
    ws, hs = (width - crop_w) // 4, (height - crop_h) // 4
    quarters = [(0, 0), (4, 0), (0, 4), (4, 4), (2, 2), (0, 2), (4, 2), (2, 4), (2, 0), (1, 1), (3, 1), (1, 3), (3, 3)]
    return [(a * ws, b * hs) for a, b in quarters]


def multiscale_box(u: Sequence[float], width: int, height: int, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """(left, top, crop_w, crop_h) of GroupMultiScaleCrop for a frame of width x height, output `size` (H, W)."""
    base = min(width, height)
    sides = [int(base * s) for s in SCALES]
    crop_h = [size[0] if abs(x - size[0]) < 3 else x for x in sides]
    crop_w = [size[1] if abs(x - size[1]) < 3 else x for x in sides]
    pairs = [(w, h) for i, h in enumerate(crop_h) for j, w in enumerate(crop_w) if abs(i - j) <= MAX_DISTORT]
    w, h = pairs[_pick(u[PAIR], len(pairs))]
    w, h = min(w, width), min(h, height)  # a side snapped up to the output's may pass a small frame
    offsets = fixed_offsets(width, height, w, h)
    left, top = offsets[_pick(u[OFFSET], len(offsets))]
    return (left, top, w, h)


def clip_view(frames: Sequence[Any], size: tuple[int, int], u: Sequence[float] | None) -> list[Any]:
    """PIL frames of one clip -> frames of `size` (H, W): one multi-scale crop + flip for all (draws `u`), or
    evaluation's resize and centre crop (u None)."""
    from PIL import Image

    from maskkit.data.augment import picture_center

    if u is None:
        return [picture_center(f, size) for f in frames]
    left, top, w, h = multiscale_box(u, frames[0].size[0], frames[0].size[1], size)
    out = [f.crop((left, top, left + w, top + h)).resize((size[1], size[0]), Image.BILINEAR) for f in frames]
    return [f.transpose(Image.FLIP_LEFT_RIGHT) for f in out] if u[FLIP] < 0.5 else out
