"""`clipfolder:PATH`: video files (.mp4 .avi .webm .mkv .mov) read lazily, one clip decoded when a batch needs it.

Layouts (PATH decides):
- a folder of class folders, or `PATH/train/<class>` + `PATH/val/<class>`: exactly as an image folder
  (`maskkit.data.folder_index`, with the video suffixes): `train` is the pretraining set (maskkit's labeled
  train and val splits are carved from it), `val` the test split (`given_splits`); loose clips, unlabeled;
- VideoMAE's list files: `PATH/train.csv` (+ `PATH/val.csv`, the test split) when PATH holds a `train.csv`,
  or PATH itself a list file (no given split). A line is `path label` (the label an integer >= 0, after
  the last space: a path may hold spaces; blank lines are skipped); a relative path is relative to the list's
  folder. Classes are "0" .. max label. A bad line is one DataError naming the list file and line number.

Decoding: PyAV (`av`), because its wheels bundle FFmpeg: `pip install` is enough on a fresh machine, whereas
torchcodec needs the system's FFmpeg libraries and a release matched to the exact torch version. A clip is
decoded whole (RGB 8-bit), then `maskkit.data.video_augment` picks `num_frames` frames `sampling_rate`
apart (random start under crop-flip, centred for evaluation) and crops them (VideoMAE's multi-scale crop +
flip, or evaluation's resize and centre crop) to the run's size: `img_size` square if given, else the clips'
own size when the sampled headers share one with sides <= DEFAULT_SIDE (112, VideoMAE's small input),
else DEFAULT_SIDE square. An undecodable or truncated file, one without a video stream or with no frame is
one DataError naming the file (`--skip-bad-images` skips and counts it).

Like an image folder, the run keeps the index in its directory (cache_dir; checked against the files unless
check is False) and its fingerprint covers every clip's name, size and mtime (`hash=content`: their bytes);
a list layout's check also reads its list files again (a changed line is a change of the data).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from maskkit.data.folder_index import INDEX_FILE, LIST_LAYOUT, FolderIndex, stat_files
from maskkit.data.load import register_dataset
from maskkit.data.source import DataChangedError, DataError
from maskkit.data.sources.imagefolder import HASHES, ImageFolder
from maskkit.data.video_augment import START, clip_view, frame_indices
from maskkit.options import shown_path
from maskkit.registry import Card

__all__ = ["DEFAULT_FRAMES", "DEFAULT_RATE", "DEFAULT_SIDE", "LISTS", "VIDEO_SUFFIXES", "ClipFolder", "decode_clip",
           "open_clips", "read_list"]  # fmt: skip

VIDEO_SUFFIXES = (".mp4", ".avi", ".webm", ".mkv", ".mov")
#: the run's side without --img-size when the clips are larger (VideoMAE's small input size)
DEFAULT_SIDE = 112
#: VideoMAE's clip: 16 frames, 4 apart
DEFAULT_FRAMES, DEFAULT_RATE = 16, 4
#: VideoMAE's list files in PATH: the pretraining set and the test split
LISTS = {"train": "train.csv", "val": "val.csv"}
#: headers read (the first files) to choose the default size
HEADERS = 8

CARD = Card(
    idea="video files read lazily: class folders, train/ + val/ class folders, or VideoMAE's list files "
         "(`path label` lines in train.csv / val.csv, or PATH a list file); PyAV decodes",
    paper="sampling and multi-scale crop after Tong et al., VideoMAE (NeurIPS 2022)",
    allowed={"arg": "PATH of a folder or list file",
             "num_frames": f"int >= 1 (T; --num-frames, default {DEFAULT_FRAMES})",
             "sampling_rate": f"int >= 1 (frames between samples; --sampling-rate, default {DEFAULT_RATE})",
             "img_size": f"int >= 1 | None (default: the clips' own size if they share one of side <= {DEFAULT_SIDE}, "
             f"else {DEFAULT_SIDE})",
             "hash": "mtime (default) | content, as for imagefolder"},
)  # fmt: skip


def decode_clip(path: Path, size: int | None = None) -> list[np.ndarray]:
    """Every frame of the video file `path` as RGB uint8 [H, W, 3]; one-line DataError naming the file if it
    cannot be decoded, has no video stream or no frame (`DataChangedError` if missing or not `size` bytes)."""
    import av

    try:
        found = os.stat(path).st_size
    except FileNotFoundError:
        if size is None:
            raise DataError(f"cannot read clip {shown_path(path)}: it does not exist") from None
        raise DataChangedError(f"clip {shown_path(path)} is missing (the data changed since it was listed)") from None
    if size is not None and found != size:
        raise DataChangedError(f"clip {shown_path(path)} changed since it was listed ({size} -> {found} bytes)")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise DataError(f"cannot read clip {shown_path(path)}: it has no video stream")
            # threads=1: swscale's thread pool, once used in a process, deadlocks the workers forked from it
            frames = [f.reformat(format="rgb24", threads=1).to_ndarray() for f in container.decode(video=0)]
    except DataError:
        raise
    except (av.error.EOFError, EOFError):
        raise DataError(f"cannot read clip {shown_path(path)}: it ends early (truncated, or no frame)") from None
    except (av.error.FFmpegError, OSError, ValueError, MemoryError) as err:
        message = " ".join(str(getattr(err, "strerror", None) or err).split()) or type(err).__name__
        raise DataError(f"cannot read clip {shown_path(path)}: {message}") from None
    if not frames:
        raise DataError(f"cannot read clip {shown_path(path)}: it holds no frame (empty or truncated)")
    return frames


def _headers(root: Path, files: list[str]) -> tuple[str, list[tuple[int, int]]]:
    """("RGB", (width, height) of the first HEADERS clips' video streams); an unreadable one is skipped here."""
    import av

    sizes = []
    for name in files[:HEADERS]:
        try:
            with av.open(str(root / name)) as container:
                stream = container.streams.video[0]
                sizes.append((int(stream.width), int(stream.height)))
        except (av.error.FFmpegError, OSError, ValueError, IndexError):
            continue
    return "RGB", sizes or [(0, 0)]


def read_list(path: Path) -> list[tuple[str, int]]:
    """(path as written, label) of every line of a VideoMAE list file; one-line DataError naming the list and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read list file {shown_path(path)}: {err}") from None
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.strip().rsplit(None, 1)
        where = f"list file {shown_path(path)} line {number}"
        if len(fields) != 2:
            raise DataError(f"{where}: expected 'path label', got {line.strip()!r}")
        name, label = fields
        try:
            value = int(label, 10)
        except ValueError:
            value = -1
        if value < 0:
            raise DataError(f"{where}: the label must be an integer >= 0, got {label!r}")
        if not (path.parent / name).is_file():
            raise DataError(f"{where}: clip {shown_path(path.parent / name)} does not exist")
        out.append((name, value))
    if not out:
        raise DataError(f"list file {shown_path(path)} lists no clip")
    return out


def _list_files(path: Path) -> dict[str, Path] | None:
    """The list files of PATH by part ({"": PATH} for a list file, LISTS in a folder holding train.csv), else None."""
    if path.is_file():
        return {"": path}
    if (path / LISTS["train"]).is_file():
        return {part: path / name for part, name in LISTS.items() if (path / name).is_file()}
    return None


def _list_index(lists: dict[str, Path], content: bool) -> FolderIndex:
    """A FolderIndex (LIST_LAYOUT) of the clips the list files name, labels from their lines."""
    root = next(iter(lists.values())).parent.resolve()
    files, labels, part_of = [], [], []
    for p, path in enumerate(lists.values()):
        for name, label in read_list(path):
            files.append(name)
            labels.append(label)
            part_of.append(p)
    now = stat_files(root, files)
    mode, sample_sizes = _headers(root, files)
    hashes = None
    if content:
        from maskkit.data.fingerprint import sha256_of_file

        hashes = [sha256_of_file(root / f) for f in files]
    return FolderIndex(root, LIST_LAYOUT, list(lists), [str(c) for c in range(max(labels) + 1)], files,
                       np.asarray(now["sizes"], dtype=np.int64), np.asarray(labels, dtype=np.int64),
                       np.asarray(part_of, dtype=np.int64), mode, sample_sizes,
                       np.asarray(now["mtimes"], dtype=np.int64), hashes, VIDEO_SUFFIXES)  # fmt: skip


def _positive(value: Any, option: str, default: int) -> int:
    if value is None:
        return default
    try:
        number = value if isinstance(value, int) and not isinstance(value, bool) else int(str(value), 10)
    except ValueError:
        number = 0
    if number < 1:
        raise DataError(f"dataset 'clipfolder': {option} must be an integer >= 1, got {value!r}")
    return number


def default_size(index: FolderIndex, img_size: int | None) -> tuple[int, int]:
    """(H, W): img_size square if given; else the clips' common size when its sides are <= DEFAULT_SIDE;
    else a square of DEFAULT_SIDE (or the smallest short side)."""
    if img_size is not None:
        return (int(img_size), int(img_size))
    sizes = {s for s in index.sample_sizes if min(s) > 0}
    if len(sizes) == 1 and max(next(iter(sizes))) <= DEFAULT_SIDE:
        width, height = next(iter(sizes))
        return (height, width)
    side = min([DEFAULT_SIDE] + [min(s) for s in sizes])
    return (side, side)


class ClipFolder(ImageFolder):
    """The clips of a `FolderIndex`, decoded one at a time: `num_frames` frames `sampling_rate` apart at `size`.

    `pixels(i, draws)`: uint8 [C, T, H, W] of clip i, VideoMAE's random start + multi-scale crop + flip from
    `draws` (`key_draws`), else the centred window and evaluation's centre crop; `read(i)`: floats in [0, 1].
    Splits, fingerprint and the saved index are the image folder's.
    """

    def __init__(self, index: FolderIndex, size: tuple[int, int], num_frames: int, sampling_rate: int) -> None:
        super().__init__(index, size)
        self.name = f"clipfolder:{index.root}"
        self.num_frames = int(num_frames)
        self.sampling_rate = int(sampling_rate)

    @property
    def in_chans(self) -> int:
        return 3

    @property
    def test_folder(self) -> str | None:
        if self.layout == LIST_LAYOUT:
            return "val" if "train" in self.index.parts and "val" in self.index.parts else None
        return super().test_folder

    def picture(self, i: int) -> Any:
        raise NotImplementedError("a clip has no single picture; use pixels(i)")

    def pixels(self, i: int, draws: list[float] | None = None) -> Tensor:
        """Clip i as uint8 [C, T, H, W]: frames and crop from `draws`, else the evaluation view."""
        from PIL import Image

        frames = decode_clip(self.index.path(int(i)), int(self.index.sizes[i]))
        picks = frame_indices(len(frames), self.num_frames, self.sampling_rate, None if draws is None else draws[START])
        view = clip_view([Image.fromarray(frames[j]) for j in picks], self.size, draws)
        clip = np.stack([np.asarray(f, dtype=np.uint8) for f in view])  # [T, H, W, 3]
        return torch.from_numpy(clip.transpose(3, 0, 1, 2).copy())  # [3, T, H, W]

    def read(self, i: int) -> Tensor:
        return self.pixels(i).float() / 255.0


def open_clips(path: str | Path, img_size: int | None = None, cache_dir: str | Path | None = None,
               check: bool = True, hash: str = "mtime", num_frames: int | None = None,
               sampling_rate: int | None = None) -> ClipFolder:  # fmt: skip
    """The clips at `path` (a folder or list file; module docstring) as a `ClipFolder`: from the index in
    `cache_dir` when there is one (checked against the files, and the list files read again, unless `check`
    is False: DataChangedError naming what changed), else listed now."""
    if hash not in HASHES:
        raise DataError(f"clipfolder option hash must be one of {', '.join(HASHES)}, got {hash!r}")
    frames = _positive(num_frames, "--num-frames", DEFAULT_FRAMES)
    rate = _positive(sampling_rate, "--sampling-rate", DEFAULT_RATE)
    path = Path(path)
    if not path.exists():
        raise DataError(f"clipfolder: {shown_path(path)} does not exist")
    lists = _list_files(path)
    saved = None if cache_dir is None else Path(cache_dir) / INDEX_FILE
    if saved is not None and saved.is_file():
        index = FolderIndex.load(saved)
        root = (path.parent if path.is_file() else path).resolve()
        if index.root != root:
            raise DataError(f"the data index {shown_path(saved)} lists {shown_path(index.root)}, not {shown_path(root)}")
        if check:
            changed = index.changes()
            if lists is not None and changed is None:
                listed = [entry for p in lists.values() for entry in read_list(p)]
                if listed != list(zip(index.files, index.labels.tolist(), strict=True)):
                    changed = "its list files name other clips or labels"
            if changed:
                raise DataChangedError(f"clip data {shown_path(root)} changed since the run listed it: {changed}")
    elif lists is not None:
        index = _list_index(lists, hash == "content")
    else:
        index = FolderIndex.scan(path, hash == "content", VIDEO_SUFFIXES, _headers, "clipfolder")
    return ClipFolder(index, default_size(index, img_size), frames, rate)


@register_dataset("clipfolder", card=CARD, arg="path")
def clipfolder(*, arg: str, img_size: int | None = None, cache_dir: str | Path | None = None, check: bool = True,
               hash: str = "mtime", num_frames: int | None = None, sampling_rate: int | None = None,
               **_: Any) -> ClipFolder:  # fmt: skip
    """The clips at `arg` (`open_clips`): --num-frames (16), --sampling-rate (4), --img-size, the spec's `hash`."""
    return open_clips(arg, img_size, cache_dir, check, hash, num_frames, sampling_rate)
