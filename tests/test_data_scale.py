"""Data at scale: the lazy image folder (index, fingerprint, crops at the file's resolution, MAE's evaluation
view), worker processes whose number changes nothing, exact mid-epoch resume with workers (real processes:
SIGKILL, SIGTERM, torchrun), the official layout's meaning, and unreadable files skipped and counted."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from maskkit.checkpoint import load_checkpoint
from maskkit.data import Batcher, DataError, FolderIndex, Loader, load_dataset, make_splits
from maskkit.data.augment import crop_box, key_draws
from maskkit.data.sources.imagefolder import DEFAULT_SIDE, default_size, open_folder

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
ENV.pop("MASKKIT_INJECT_NAN", None)
TORCHRUN = shutil.which("torchrun")
CPU = torch.device("cpu")


def photo_folder(root: Path, per_class: dict[str, int], seed: int = 0, sides: tuple[int, int] = (18, 40)) -> Path:
    """An official-layout folder of RGB PNGs of different sizes: {split: images per class}, classes a/b/c."""
    rng = np.random.default_rng(seed)
    for split, count in per_class.items():
        for c, name in enumerate("abc"):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                h, w = rng.integers(*sides, size=2)
                base = np.zeros((h, w, 3), np.uint8)
                base[..., c] = 200
                noise = rng.integers(0, 55, (h, w, 3), dtype=np.uint8)
                Image.fromarray(base + noise).save(folder / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return photo_folder(tmp_path_factory.mktemp("data") / "imagenet", {"train": 16, "val": 4})


def batches(data, workers: int, n: int, *, augment: str = "crop-flip", state=None, seed: int = 3):
    batcher = Batcher(data, [0.5] * data.in_chans, [0.25] * data.in_chans, CPU, augment, num_workers=workers)
    loader = Loader(batcher, np.arange(len(data)), 8, seed, labels=True)
    if state is not None:
        loader.load_state_dict(state)
    got = [loader.next() for _ in range(n)]
    out = loader.state_dict()
    loader.close()
    return got, out


# ---- the folder and its index ---------------------------------------------------------------------------


def test_the_index_lists_names_sizes_labels_and_split_folders(folder):
    index = FolderIndex.scan(folder)
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))
    assert sorted(index.files) == files and len(index) == 60
    assert index.sizes.tolist() == [(folder / f).stat().st_size for f in index.files]
    assert index.classes == ["a", "b", "c"] and index.parts == ["train", "val"]
    assert [index.classes[lab] for lab in index.labels] == [Path(f).parts[1] for f in index.files]
    assert [index.parts[p] for p in index.part_of] == [Path(f).parts[0] for f in index.files]
    import hashlib

    stats = [(folder / f).stat() for f in index.files]
    assert index.mtimes.tolist() == [st.st_mtime_ns for st in stats]
    lines = "".join(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n" for f, st in zip(index.files, stats, strict=True))
    assert index.fingerprint() == {"kind": "files", "covers": "names, sizes, mtimes", "count": 60,
                                   "digest": hashlib.sha256(lines.encode()).hexdigest()}  # fmt: skip


def test_the_index_round_trips_and_a_damaged_one_is_refused(folder, tmp_path):
    index = FolderIndex.scan(folder)
    index.save(tmp_path / "index.json.gz")
    back = FolderIndex.load(tmp_path / "index.json.gz")
    assert back.files == index.files and np.array_equal(back.sizes, index.sizes)
    assert np.array_equal(back.labels, index.labels) and back.fingerprint() == index.fingerprint()
    import gzip

    raw = json.loads(gzip.decompress((tmp_path / "index.json.gz").read_bytes()))
    raw["sizes"][0] += 1
    (tmp_path / "bad.json.gz").write_bytes(gzip.compress(json.dumps(raw).encode()))
    with pytest.raises(DataError, match="bad.json.gz is damaged"):
        FolderIndex.load(tmp_path / "bad.json.gz")


def test_images_of_different_sizes_get_one_size_by_the_default_rule(folder, tmp_path):
    data = open_folder(folder)
    assert data.image_size == (18, 18)  # the headers differ: a square of the smallest short side (< 224)
    assert default_size(data.index, 32) == (32, 32)
    same = tmp_path / "same"
    same.mkdir()
    for i in range(3):
        Image.fromarray(np.zeros((12, 20, 3), np.uint8)).save(same / f"{i}.png")
    assert open_folder(same).image_size == (12, 20)  # one shared size within 224: kept as it is
    big = tmp_path / "big"
    big.mkdir()
    for i, side in enumerate((300, 400)):
        Image.fromarray(np.zeros((side, side + 50, 3), np.uint8)).save(big / f"{i}.png")
    assert open_folder(big).image_size == (DEFAULT_SIDE, DEFAULT_SIDE)


def one_picture(folder: Path, shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """A folder holding one random RGB PNG of `shape` (H, W, 3); returns its pixels."""
    pixels = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    folder.mkdir()
    Image.fromarray(pixels).save(folder / "x.png")
    return pixels


def test_the_evaluation_view_is_mae_resize_then_centre_crop(tmp_path):
    pixels = one_picture(tmp_path / "d", (375, 500, 3), seed=1)
    data = open_folder(tmp_path / "d", img_size=224)
    # independent: the short side to 256 (224 / 0.875), the long side in proportion, then the central 224
    resized = Image.fromarray(pixels).resize((341, 256), Image.BICUBIC)
    top, left = int(round((256 - 224) / 2)), int(round((341 - 224) / 2))
    expected = np.asarray(resized)[top : top + 224, left : left + 224].transpose(2, 0, 1)
    assert np.array_equal(data.pixels(0).numpy(), expected)
    assert torch.equal(data.read(0), data.pixels(0).float() / 255)


def test_the_training_crop_is_the_keyed_box_at_the_files_resolution(tmp_path):
    pixels = one_picture(tmp_path / "d", (90, 120, 3), seed=2)
    data = open_folder(tmp_path / "d", img_size=32)
    for key in [(0, 0, 0), (0, 1, 5), (7, 3, 2)]:
        u = key_draws(key)
        top, left, h, w = crop_box(u, 90, 120)
        crop = Image.fromarray(pixels[top : top + h, left : left + w]).resize((32, 32), Image.BICUBIC)
        if u[40] < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        assert np.array_equal(data.pixels(0, u).numpy(), np.asarray(crop).transpose(2, 0, 1)), key


def test_the_official_layout_pretrains_on_train_and_tests_on_val(folder):
    data = open_folder(folder, img_size=16)
    splits = make_splits(data, seed=0)
    train_folder = np.flatnonzero(data.index.part_of == 0)
    val_folder = np.flatnonzero(data.index.part_of == 1)
    assert np.array_equal(splits["pretrain"], train_folder) and np.array_equal(splits["test"], val_folder)
    assert np.array_equal(np.sort(np.concatenate([splits["train"], splits["val"]])), train_folder)
    assert not set(splits["train"]) & set(splits["val"])
    assert {k: len(v) for k, v in splits.items()} == {"train": 42, "val": 6, "test": 12, "pretrain": 48}
    labels = data.labels.numpy()
    assert np.bincount(labels[splits["val"]]).tolist() == [2, 2, 2]  # stratified: 16 per class, cut 7:1
    assert make_splits(data, seed=1)["test"].tolist() == val_folder.tolist()  # the test split is not drawn


# ---- workers ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["folder", "memory"])
def test_the_batches_do_not_depend_on_the_number_of_workers(folder, source):
    data = open_folder(folder, img_size=16) if source == "folder" else load_dataset(f"imagefolder:{folder}")
    if source == "memory":  # the in-memory path: the same images held as one tensor
        from maskkit.data import ImageData

        data = ImageData("memory", torch.stack([data.pixels(i) for i in range(len(data))]), data.labels)
    reference, _ = batches(data, 0, 9)
    for workers in (1, 4):
        got, _ = batches(data, workers, 9)
        for a, b in zip(reference, got, strict=True):
            assert np.array_equal(a.index, b.index) and torch.equal(a.images, b.images)
            assert torch.equal(a.labels, b.labels)


def test_a_loader_state_mid_epoch_continues_exactly_with_any_number_of_workers(folder):
    data = open_folder(folder, img_size=16)
    whole, _ = batches(data, 0, 12)  # 60 images, 7 batches of 8 an epoch: crosses an epoch
    for first, then in ((0, 2), (2, 0), (2, 3)):
        head, state = batches(data, first, 5)
        tail, _ = batches(data, then, 7, state=state)
        for a, b in zip(whole, head + tail, strict=True):
            assert torch.equal(a.images, b.images), (first, then)


def test_an_unreadable_file_is_one_line_or_skipped_and_counted(tmp_path):
    root = photo_folder(tmp_path / "d", {"train": 4, "val": 2})
    (root / "train" / "a" / "000.png").write_bytes(b"not a picture")
    data = open_folder(root, img_size=16)
    bad = data.index.files.index("train/a/000.png")
    batcher = Batcher(data, [0.5] * 3, [0.25] * 3, CPU, "none", num_workers=2)
    loader = Loader(batcher, np.array([bad, bad + 1, bad + 2, bad + 3]), 4, 0)
    with pytest.raises(DataError, match=r"000\.png.*--skip-bad-images") as err:
        loader.next()
    assert "\n" not in str(err.value)
    loader.close()
    batcher.skip_bad = True
    loader = Loader(batcher, np.array([bad, bad + 1, bad + 2, bad + 3]), 4, 0)
    with pytest.warns(UserWarning, match="skipped: cannot read image .*000.png"):
        got = loader.next()
    loader.close()
    assert loader.skipped and "000.png" in loader.skipped[0]
    position = got.index.tolist().index(bad)
    replaced = got.images[position]
    assert any(torch.equal(replaced, got.images[k]) for k in range(4) if k != position)  # another of its batch


def test_a_file_changed_after_listing_is_refused_naming_it(tmp_path):
    root = photo_folder(tmp_path / "d", {"train": 3, "val": 1})
    data = open_folder(root, img_size=16)
    Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(root / "train" / "b" / "001.png")
    with pytest.raises(DataError, match=r"train/b/001\.png changed since the folder was listed"):
        data.read(data.index.files.index("train/b/001.png"))


# ---- real runs -------------------------------------------------------------------------------------------

RUN = ["--img-size", "16", "--model", "micro", "--batch-size", "8", "--augment", "crop-flip", "--log-every", "1",
       "--no-progress"]  # fmt: skip


def pretrain(*args: object) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "maskkit.cli", "pretrain", *map(str, args)]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip


def finish(proc: subprocess.Popen) -> str:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-2000:]
    return err.decode()


def lines(run: Path) -> int:
    path = run / "metrics.jsonl"
    return path.read_text().count("\n") if path.is_file() else 0


def wait_for(run: Path, logged: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 240
    while lines(run) < logged and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)


def assert_same_run(a: Path, b: Path) -> None:
    assert (a / "metrics.jsonl").read_bytes() == (b / "metrics.jsonl").read_bytes()
    wa, wb = load_checkpoint(a / "model.pt"), load_checkpoint(b / "model.pt")
    for part in ("mae", "policy"):
        assert all(torch.equal(wa[part][k], wb[part][k]) for k in wa[part]), part


@pytest.mark.slow
def test_pretraining_with_0_or_2_workers_is_bit_identical(folder, tmp_path):
    runs = {w: tmp_path / f"w{w}" for w in (0, 2)}
    procs = [pretrain("--dataset", f"imagefolder:{folder}", *RUN, "--steps", "8", "--num-workers", w, "--out", run)
             for w, run in runs.items()]  # fmt: skip
    for proc in procs:
        finish(proc)
    assert_same_run(runs[0], runs[2])
    record = json.loads((runs[2] / "config.json").read_text())
    assert record["config"]["data"]["num_workers"] == 2 and record["dataset"]["splits"]["pretrain"] == 48


@pytest.mark.slow
def test_sigkill_then_sigterm_mid_epoch_with_workers_resume_bit_identically(folder, tmp_path):
    args = ["--dataset", f"imagefolder:{folder}", *RUN, "--steps", "40", "--ckpt-every", "3", "--num-workers", "2"]
    full, run = tmp_path / "full", tmp_path / "run"
    reference = pretrain(*args, "--out", full)
    proc = pretrain(*args, "--out", run)
    wait_for(run, 8, proc)  # 6 steps an epoch: the kill lands inside the second epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "model.pt").exists()
    proc = pretrain("--resume", run, "--no-progress")
    wait_for(run, lines(run) + 5, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143 and "Stopped by SIGTERM" in err.decode(), err.decode()[-2000:]
    assert not (run / "model.pt").exists()
    finish(pretrain("--resume", run, "--no-progress"))
    finish(reference)
    assert_same_run(full, run)


@pytest.mark.skipif(TORCHRUN is None or not Path("/proc/self/task").is_dir(), reason="needs torchrun and /proc")
@pytest.mark.slow
def test_torchrun_with_workers_killed_mid_epoch_resumes_bit_identically(folder, tmp_path):
    from test_distributed import kill_tree

    def torchrun(*args: object) -> subprocess.Popen:
        cmd = [TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "maskkit.cli", "pretrain", *map(str, args)]
        return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    # the learned masker at all three levels (MAE, head, hypergradient), each rank reading its shard by workers
    args = ["--dataset", f"imagefolder:{folder}", *RUN, "--batch-size", "4", "--steps", "12", "--ckpt-every", "2",
            "--num-workers", "2", "--policy", "learned", "--learned-hidden-dim", "8", "--hypergrad", "darts",
            "--labeled-batch-size", "2"]  # fmt: skip
    full, run = tmp_path / "full", tmp_path / "run"
    reference = torchrun(*args, "--out", full)
    proc = torchrun(*args, "--out", run)
    wait_for(run, 8, proc)  # 6 global batches of 8 an epoch
    kill_tree(proc.pid)  # torchrun, both ranks and their workers at once, as a power cut would
    proc.wait()
    assert not (run / "model.pt").exists(), "the run finished before it could be killed"
    for p in (reference, torchrun("--resume", run, "--no-progress")):
        finish(p)
    assert_same_run(full, run)
    a, b = load_checkpoint(full / "model.pt"), load_checkpoint(run / "model.pt")
    assert all(torch.equal(a["head"][k], b["head"][k]) for k in a["head"])
    last = load_checkpoint(sorted((run / "checkpoints").glob("*.pt"))[-1])
    assert last["world_size"] == 2 and [r["loaders"]["train"] for r in last["ranks"]] == [last["streams"]["train"]] * 2


@pytest.mark.slow
def test_a_changed_folder_is_refused_by_resume_and_evaluate_naming_what_changed(tmp_path):
    root = photo_folder(tmp_path / "d", {"train": 6, "val": 2})
    run = tmp_path / "run"
    finish(pretrain("--dataset", f"imagefolder:{root}", *RUN, "--steps", "2", "--num-workers", "0", "--out", run))
    assert (run / "data-index.json.gz").is_file()
    (root / "train" / "a" / "000.png").unlink()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(root / "train" / "c" / "new.png")
    for cmd in (["pretrain", "--resume", run, "--steps", "4"], ["evaluate", run, "--epochs", "1"]):
        proc = subprocess.run([sys.executable, "-m", "maskkit.cli", *map(str, cmd), "--no-progress"], env=ENV,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
        said = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(said) == 1, proc.stderr
        assert "changed since the run listed it" in said[0]
        assert "1 file(s) missing (train/a/000.png)" in said[0] and "1 file(s) new (train/c/new.png)" in said[0]
