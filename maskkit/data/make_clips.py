"""A synthetic clip folder for tests and benchmarks: `python -m maskkit.data.make_clips OUT --classes 2
--per-class 4 --frames 12 --side 32` writes OUT/<class>/<class>_<k>.mp4 (PyAV, MPEG-4 part 2).

Rule (`clip_frames`), seeded: clip k of class c shows a bright square of side max(2, side // 4) on a dark
noisy background, moving one pixel a frame in direction DIRECTIONS[c % 4] (right, left, down, up) from a
start drawn with `numpy.random.default_rng([seed, c, k])`; the square wraps around the edges. The label
(the direction) needs two frames to tell. `write_clip` writes any frames [T, H, W, 3] uint8 with a codec of
PyAV's bundled FFmpeg (`ffv1` in .mkv is lossless: tests compare decoded pixels exactly).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

__all__ = ["DIRECTIONS", "clip_frames", "make_clips", "write_clip"]

#: (row, column) step per frame of class c % 4
DIRECTIONS = ((0, 1), (0, -1), (1, 0), (-1, 0))


def clip_frames(label: int, k: int, frames: int, side: int, seed: int = 0) -> np.ndarray:
    """Frames [T, H, W, 3] uint8 of clip k of class `label` (the module's rule)."""
    rng = np.random.default_rng([seed, label, k])
    square = max(2, side // 4)
    top, left = rng.integers(0, side, size=2)
    colour = rng.integers(128, 256, size=3)
    out = rng.integers(0, 48, size=(frames, side, side, 3)).astype(np.uint8)  # [T, H, W, 3]
    step = DIRECTIONS[label % len(DIRECTIONS)]
    for t in range(frames):
        rows = (top + step[0] * t + np.arange(square)) % side
        cols = (left + step[1] * t + np.arange(square)) % side
        out[t][np.ix_(rows, cols)] = colour
    return out


def write_clip(path: str | Path, frames: np.ndarray, codec: str = "mpeg4", fps: int = 25) -> Path:
    """Write frames [T, H, W, 3] uint8 as a video file at `path` (its suffix names the container)."""
    import av

    path = Path(path)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = int(frames.shape[2]), int(frames.shape[1])
        stream.pix_fmt = "bgr0" if codec == "ffv1" else "yuv420p"
        if codec == "mpeg4":
            stream.options = {"qscale": "2"}
            stream.codec_context.qscale = 2
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def make_clips(out: str | Path, classes: int = 2, per_class: int = 4, frames: int = 12, side: int = 32,
               seed: int = 0, suffix: str = ".mp4", codec: str = "mpeg4") -> list[Path]:  # fmt: skip
    """Write the class-folder tree (class names c0, c1, ...) under `out`; the written paths, sorted."""
    written = []
    for c in range(classes):
        folder = Path(out) / f"c{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            written.append(write_clip(folder / f"c{c}_{k}{suffix}", clip_frames(c, k, frames, side, seed), codec))
    return sorted(written)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m maskkit.data.make_clips", description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--classes", type=int, default=2)
    parser.add_argument("--per-class", type=int, default=4)
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--side", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    paths = make_clips(args.out, args.classes, args.per_class, args.frames, args.side, args.seed)
    print(f"wrote {len(paths)} clips under {args.out}")


if __name__ == "__main__":
    main()
