"""`clipfolder:PATH` and `maskkit.data.video_augment`: VideoMAE's temporal sampling and multi-scale crop against
reimplementations of the published rules, the evaluation view, the list layout, one-line errors naming the
file, skip-bad counting, the fingerprint's check, workers, and `maskkit pretrain` on a clip folder."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from maskkit.data import Batcher, DataChangedError, DataError, DataWarning, Loader, frames_of, load_dataset
from maskkit.data.augment import key_draws
from maskkit.data.make_clips import clip_frames, make_clips, write_clip
from maskkit.data.video_augment import FLIP, OFFSET, PAIR, START, frame_indices, multiscale_box

CPU = torch.device("cpu")


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def lossless(root: Path, classes: int = 2, per_class: int = 2, frames: int = 10, side: int = 8) -> list[np.ndarray]:
    """ffv1 clips root/c<c>/<k>.mkv; their frames [T, H, W, 3] in listing order."""
    written = []
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            video = clip_frames(c, k, frames, side, seed=1)
            write_clip(root / f"c{c}" / f"{k}.mkv", video, "ffv1")
            written.append(video)
    return written


# ---- temporal sampling ------------------------------------------------------------------------------------


def videomae_indices(n: int, clip_len: int, rate: int, u: float | None) -> list[int]:
    """VideoMAE's one-segment rule, in closed form: start s (random in [0, n - clip_len*rate] or centred), the
    1-based position 1 + s advances by `rate` while the next one stays below n, frame = position - 1."""
    room = n - clip_len * rate + 1
    s = 0 if room <= 0 else (room - 1) // 2 if u is None else min(int(np.floor(u * room)), room - 1)
    steps = max(0, -(-(n - 1 - s) // rate) - 1)  # the largest k with 1 + s + k * rate < n
    return [s + rate * min(i, steps) for i in range(clip_len)]


@pytest.mark.parametrize("n", [1, 3, 6, 15, 16, 17, 40, 64, 65, 100])
@pytest.mark.parametrize(("clip_len", "rate"), [(16, 4), (4, 2), (8, 1), (3, 5)])
def test_frame_indices_follow_videomaes_sampling(n, clip_len, rate):
    for u in [None, 0.0, 0.3, 0.5, 0.999]:
        got = frame_indices(n, clip_len, rate, u)
        assert got == videomae_indices(n, clip_len, rate, u)
        assert len(got) == clip_len and all(0 <= i < n for i in got)
    assert frame_indices(6, 4, 2) == [0, 2, 4, 4]  # the docstring's example


def test_every_start_is_reachable_and_evaluation_is_centred():
    starts = {frame_indices(70, 16, 4, u)[0] for u in np.linspace(0, 1, 200, endpoint=False)}
    assert starts == set(range(70 - 64 + 1))
    assert frame_indices(70, 16, 4)[0] == 3 and frame_indices(70, 16, 4)[-1] == 63


# ---- multi-scale crop ------------------------------------------------------------------------------------


def published_crops(width: int, height: int, out_h: int, out_w: int) -> tuple[list, dict]:
    """GroupMultiScaleCrop's candidates by its published description: sides int(short * s), s in (1, .875, .75,
    .66), snapped to the output side within 2 px; (w, h) pairs with scale indices at most 1 apart; 13 fixed
    offsets at quarter steps of the free room (4 corners, centre, 4 edge centres, 4 quarter points)."""
    short = min(width, height)
    sides = [int(short * s) for s in (1, 0.875, 0.75, 0.66)]
    hs = [out_h if abs(v - out_h) <= 2 else v for v in sides]
    ws = [out_w if abs(v - out_w) <= 2 else v for v in sides]
    pairs = [(ws[j], hs[i]) for i, j in itertools.product(range(4), range(4)) if abs(i - j) <= 1]
    grid = [(0, 0), (4, 0), (0, 4), (4, 4), (2, 2), (0, 2), (4, 2), (2, 4), (2, 0), (1, 1), (3, 1), (1, 3), (3, 3)]
    offsets = {(w, h): [(a * ((width - w) // 4), b * ((height - h) // 4)) for a, b in grid] for w, h in pairs}
    return pairs, offsets


@pytest.mark.parametrize(("width", "height", "size"), [(160, 120, (112, 112)), (64, 64, (56, 56)), (40, 30, (16, 24))])
def test_multiscale_box_is_the_published_choice_for_each_draw(width, height, size):
    pairs, offsets = published_crops(width, height, *size)
    seen = set()
    for a in np.linspace(0, 1, 11, endpoint=False):
        for b in np.linspace(0, 1, 13, endpoint=False):
            u = [0.0] * 41
            u[PAIR], u[OFFSET] = float(a), float(b)
            w, h = pairs[int(a * len(pairs))]
            assert multiscale_box(u, width, height, size) == (*offsets[(w, h)][int(b * 13)], w, h)
            seen.add((w, h))
    assert seen == set(pairs)


def test_one_crop_and_flip_for_every_frame(tmp_path):
    videos = lossless(tmp_path / "clips", 1, 1, frames=8, side=20)
    data = load_dataset(f"clipfolder:{tmp_path / 'clips'}", num_frames=4, sampling_rate=2, img_size=12)
    u = key_draws((5, 1, 0))
    u[START], u[PAIR], u[OFFSET] = 0.0, 0.0, 0.999  # scale pair (20, 20)->(17, 20) etc.: read the box back
    for flip in (0.9, 0.1):
        u[FLIP] = flip
        got = data.pixels(0, u)  # [3, 4, 12, 12]
        left, top, w, h = multiscale_box(u, 20, 20, (12, 12))
        from PIL import Image

        want = []
        for j in frame_indices(8, 4, 2, u[START]):
            f = Image.fromarray(videos[0][j]).crop((left, top, left + w, top + h)).resize((12, 12), Image.BILINEAR)
            want.append(np.asarray(f.transpose(Image.FLIP_LEFT_RIGHT) if flip < 0.5 else f))
        assert np.array_equal(got.numpy(), np.stack(want).transpose(3, 0, 1, 2))


def test_the_evaluation_view_is_deterministic_and_centred(tmp_path):
    videos = lossless(tmp_path / "clips", 1, 2, frames=30, side=8)
    data = load_dataset(f"clipfolder:{tmp_path / 'clips'}", num_frames=4, sampling_rate=3)
    assert frames_of(data) == 4 and data.image_size == (8, 8)
    for i in range(2):
        assert torch.equal(data.pixels(i), data.pixels(i))
        picks = videomae_indices(30, 4, 3, None)
        assert np.array_equal(data.pixels(i).numpy(), videos[i][picks].transpose(3, 0, 1, 2))


# ---- layouts ---------------------------------------------------------------------------------------------


def test_train_val_folders_and_list_files_mean_what_they_mean(tmp_path):
    for part in ("train", "val"):
        lossless(tmp_path / "split" / part, 2, 2 if part == "train" else 1, frames=4)
    data = load_dataset(f"clipfolder:{tmp_path / 'split'}", num_frames=2, sampling_rate=1)
    assert data.given_splits["train"].tolist() == [0, 1, 2, 3] and data.given_splits["test"].tolist() == [4, 5]
    root = tmp_path / "lists"
    lossless(root / "videos", 2, 2, frames=4)
    (root / "train.csv").write_text(f"videos/c0/0.mkv 1\nvideos/c1/0.mkv 0\n\n{root / 'videos/c0/1.mkv'} 2\n")
    (root / "val.csv").write_text("videos/c1/1.mkv 0\n")
    data = load_dataset(f"clipfolder:{root}", num_frames=2, sampling_rate=1)
    assert data.labels.tolist() == [1, 0, 2, 0] and data.classes == ["0", "1", "2"]
    assert set(data.given_splits) == {"train", "test"}
    assert data.given_splits["train"].tolist() == [0, 1, 2] and data.given_splits["test"].tolist() == [3]
    single = load_dataset(f"clipfolder:{root / 'train.csv'}", num_frames=2, sampling_rate=1)
    assert len(single) == 3 and single.given_splits is None
    assert torch.equal(single.pixels(2), data.pixels(2))


# ---- errors, skipping, fingerprint -----------------------------------------------------------------------


def bad_files(folder: Path) -> dict[str, str]:
    """name -> the phrase its error must hold: undecodable, truncated, no video stream, zero frames."""
    import av

    write_clip(folder / "full.mkv", clip_frames(0, 0, 6, 8), "ffv1")
    header_only = (folder / "full.mkv").read_bytes()
    (folder / "noframes.mkv").write_bytes(header_only[: header_only.find(bytes.fromhex("1F43B675"))])
    (folder / "full.mkv").unlink()
    make_clips(folder / "tmp", 1, 1, frames=6, side=16)
    whole = (folder / "tmp" / "c0" / "c0_0.mp4").read_bytes()
    (folder / "truncated.mp4").write_bytes(whole[: len(whole) // 2])
    (folder / "garbage.avi").write_bytes(b"not a video " * 50)
    with av.open(str(folder / "audio.mkv"), "w") as c:
        s = c.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), dtype=np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in [*s.encode(frame), *s.encode()]:
            c.mux(packet)
    import shutil

    shutil.rmtree(folder / "tmp")
    return {"noframes.mkv": "truncated, or no frame", "truncated.mp4": "Invalid data", "garbage.avi": "",
            "audio.mkv": "no video stream"}  # fmt: skip


def test_each_bad_clip_is_one_line_naming_the_file(tmp_path):
    folder = tmp_path / "bad" / "c"
    folder.mkdir(parents=True)
    expected = bad_files(folder)
    data = load_dataset(f"clipfolder:{tmp_path / 'bad'}", num_frames=2, sampling_rate=1, img_size=8)
    for i, name in enumerate(data.index.files):
        with pytest.raises(DataError) as err:
            data.pixels(i)
        text = one_line(err)
        assert text.startswith(f"cannot read clip {data.index.root / name}") and expected[Path(name).name] in text


@pytest.mark.parametrize(("line", "message"), [
    ("videos/c0/0.mkv", "line 2: expected 'path label'"),
    ("videos/c0/0.mkv cat", "line 2: the label must be an integer >= 0, got 'cat'"),
    ("videos/c0/0.mkv -1", "line 2: the label must be an integer >= 0"),
    ("videos/none.mkv 0", "line 2: clip"),
])  # fmt: skip
def test_a_bad_list_line_is_one_line_naming_the_list_and_line(tmp_path, line, message):
    lossless(tmp_path / "videos", 1, 1, frames=3)
    (tmp_path / "train.csv").write_text(f"videos/c0/0.mkv 0\n{line}\n")
    with pytest.raises(DataError) as err:
        load_dataset(f"clipfolder:{tmp_path}")
    assert one_line(err).startswith(f"list file {tmp_path / 'train.csv'} {message}")
    with pytest.raises(DataError) as err:
        load_dataset(f"clipfolder:{tmp_path / 'absent'}")
    assert one_line(err) == f"clipfolder: {tmp_path / 'absent'} does not exist"


def test_bad_clips_are_skipped_and_counted(tmp_path):
    lossless(tmp_path / "mixed" / "c", 1, 3, frames=4)
    (tmp_path / "mixed" / "c" / "c0").rename(tmp_path / "mixed" / "good")
    (tmp_path / "mixed" / "c").rmdir()
    (tmp_path / "mixed" / "bad").mkdir()
    (tmp_path / "mixed" / "bad" / "x.mp4").write_bytes(b"junk" * 100)
    data = load_dataset(f"clipfolder:{tmp_path / 'mixed'}", num_frames=2, sampling_rate=1)
    strict = Loader(Batcher(data, [0.5] * 3, [0.25] * 3, CPU, "crop-flip"), np.arange(4), 4, seed=0)
    with pytest.raises(DataError) as err:
        strict.next()
    assert "x.mp4" in one_line(err) and "--skip-bad-images" in one_line(err)
    loader = Loader(Batcher(data, [0.5] * 3, [0.25] * 3, CPU, "crop-flip", skip_bad=True), np.arange(4), 4, seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batch = loader.next()
    assert tuple(batch.images.shape) == (4, 3, 2, 8, 8)
    assert len(loader.skipped) == 1 and "x.mp4" in loader.skipped[0]
    assert sum(issubclass(w.category, DataWarning) for w in caught) == 1


def test_the_saved_index_notices_a_changed_clip_and_a_changed_list(tmp_path):
    lossless(tmp_path / "clips", 2, 1, frames=4)
    run = tmp_path / "run"
    run.mkdir()
    data = load_dataset(f"clipfolder:{tmp_path / 'clips'}", cache_dir=run)
    data.save_index(run)
    again = load_dataset(f"clipfolder:{tmp_path / 'clips'}", cache_dir=run)
    assert again.fingerprint() == data.fingerprint()
    target = tmp_path / "clips" / "c1" / "0.mkv"
    os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 10**9))
    with pytest.raises(DataChangedError) as err:
        load_dataset(f"clipfolder:{tmp_path / 'clips'}", cache_dir=run)
    assert "modified at the same size" in one_line(err) and "c1/0.mkv" in one_line(err)
    assert load_dataset(f"clipfolder:{tmp_path / 'clips'}").fingerprint() != data.fingerprint()
    (tmp_path / "train.csv").write_text("clips/c0/0.mkv 0\nclips/c1/0.mkv 1\n")
    lists = tmp_path / "listrun"
    lists.mkdir()
    load_dataset(f"clipfolder:{tmp_path}", cache_dir=lists).save_index(lists)
    (tmp_path / "train.csv").write_text("clips/c0/0.mkv 1\nclips/c1/0.mkv 1\n")
    with pytest.raises(DataChangedError) as err:
        load_dataset(f"clipfolder:{tmp_path}", cache_dir=lists)
    assert "list files name other clips or labels" in one_line(err)


@pytest.mark.slow
def test_clip_batches_are_the_same_for_0_and_2_workers_and_after_a_resume(tmp_path):
    make_clips(tmp_path / "clips", classes=2, per_class=5, frames=10, side=16)
    data = load_dataset(f"clipfolder:{tmp_path / 'clips'}", num_frames=4, sampling_rate=2)

    def run(workers: int, n: int, state=None):
        batcher = Batcher(data, [0.5] * 3, [0.25] * 3, CPU, "crop-flip", num_workers=workers)
        loader = Loader(batcher, np.arange(len(data)), 4, seed=3)
        if state is not None:
            loader.load_state_dict(state)
        got = [loader.next() for _ in range(n)]
        out = loader.state_dict()
        loader.close()
        return got, out

    whole, _ = run(0, 5)
    with_workers, _ = run(2, 5)
    head, state = run(0, 3)
    tail, _ = run(2, 2, state)
    for a, b, c in zip(whole, with_workers, head + tail, strict=True):
        assert np.array_equal(a.index, b.index) and np.array_equal(a.index, c.index)
        assert torch.equal(a.images, b.images) and torch.equal(a.images, c.images)


@pytest.mark.slow
def test_maskkit_pretrain_runs_on_a_clip_folder(tmp_path):
    make_clips(tmp_path / "clips", classes=2, per_class=10, frames=12, side=32)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "maskkit.cli", "pretrain", "--dataset", f"clipfolder:{tmp_path / 'clips'}",
               "--model", "video:micro", "--steps", "2", "--batch-size", "2", "--num-frames", "4",
               "--sampling-rate", "2", "--no-progress", "--out", "run"]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "run" / "model.pt").is_file() and (tmp_path / "run" / "data-index.json.gz").is_file()
