"""Image folders (issue 30, item 4): the layout rule (train/ + val/ wins, what beside them is named and
ignored, mixed or empty folders refused), special files skipped at listing (a FIFO must not hang the
reader), symlinks followed and loops refused, a fingerprint that sees a file replaced at the same size
(mtime by default, content SHA-256 as the source option `hash=content`) and says what it covers, runs
recorded with the older names-and-sizes index still checked, and names that are not UTF-8 or hold a
newline shown escaped. Digests are computed here with hashlib; the runs are `maskkit` commands (CliRunner)."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_cli import invoke, one_thread  # noqa: F401 - one torch thread for the module, the CLI runner

from maskkit.data import DataError, DataWarning, FolderIndex, load_dataset
from maskkit.data.folder_index import INDEX_FILE
from maskkit.data.sources.imagefolder import load_imagefolder, open_folder

RUN = ["--img-size", "8", "--model", "micro", "--batch-size", "4", "--steps", "2", "--log-every", "1",
       "--no-progress", "--device", "cpu", "--num-workers", "0"]  # fmt: skip


def bmps(folder: Path, values: list[int], side: int = 8) -> list[Path]:
    """Grey BMPs of one value each: a BMP's byte size depends only on its side, so pixels can change in place."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, value in enumerate(values):
        path = folder / f"{i:03d}.bmp"
        Image.fromarray(np.full((side, side), value, np.uint8)).save(path)
        paths.append(path)
    return paths


def split_folder(root: Path) -> Path:
    """root/train/{a,b} + root/val/{a,b}, 3 + 1 images per class."""
    for part, count in (("train", 3), ("val", 1)):
        for c, name in enumerate("ab"):
            bmps(root / part / name, [10 * c + i for i in range(count)])
    return root


def listed(path: Path, **kwargs):
    """(the folder opened now, the DataWarnings it gave)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = load_imagefolder(path, **kwargs)
    return data, [str(w.message) for w in caught if issubclass(w.category, DataWarning)]


def same_size_replace(path: Path, value: int, keep_mtime: bool) -> None:
    """New pixels in `path` at the same byte size; its mtime then set 1 s later, or back to what it was."""
    before = path.stat()
    side = Image.open(path).size[0]
    Image.fromarray(np.full((side, side), value, np.uint8)).save(path)
    assert path.stat().st_size == before.st_size
    mtime = before.st_mtime_ns if keep_mtime else before.st_mtime_ns + 1_000_000_000
    os.utime(path, ns=(before.st_atime_ns, mtime))


# ---- the layout rule ------------------------------------------------------------------------------------


def test_docs_and_macosx_beside_train_and_val_are_ignored_and_only_docs_is_named(tmp_path):
    root = split_folder(tmp_path / "d")
    (root / "docs").mkdir()  # empty
    bmps(root / "__MACOSX" / "train" / "a", [1])  # archive debris: passed over quietly
    bmps(root / "extra", [99])  # a folder of images beside the split folders
    data, said = listed(root)
    assert data.layout == "train/val folders" and data.classes == ["a", "b"] and data.index.parts == ["train", "val"]
    assert len(data) == 8 and all(f.split("/")[0] in ("train", "val") for f in data.index.files)
    assert said == [f"image folder {root}: ignoring 2 entries beside the split folders train, val: docs, extra"]
    # the same rule from the dataset spec, and the files it lists are exactly train/ and val/
    with pytest.warns(DataWarning, match="ignoring 2 entries"):
        data = load_dataset(f"imagefolder:{root}")
    assert sorted(data.index.files) == sorted(
        p.relative_to(root).as_posix() for part in ("train", "val") for p in (root / part).rglob("*.bmp")
    )


def test_images_beside_class_folders_or_a_class_folder_without_images_is_refused_naming_it(tmp_path):
    root = tmp_path / "mixed"
    bmps(root / "cats", [1, 2])
    bmps(root / "dogs", [3, 4])
    bmps(root, [5])  # an image beside the class folders
    with pytest.raises(DataError) as err:
        load_imagefolder(root)
    assert str(err.value) == (f"image folder {root} holds both image files (000.bmp) and sub-folders (cats, dogs); "
                              "put every image in a class folder, or remove the sub-folders")  # fmt: skip
    (root / "000.bmp").unlink()
    (root / "eels").mkdir()  # a class without images would silently drop out of the labels
    with pytest.raises(DataError, match=f"^class folder {root / 'eels'} holds no images"):
        load_imagefolder(root)
    (root / "eels").rmdir()
    bmps(root / "__MACOSX", [9])  # debris at the top of a class-folder layout is no class
    data, said = listed(root)
    assert data.layout == "class folders" and data.classes == ["cats", "dogs"] and len(data) == 4 and said == []
    split = split_folder(tmp_path / "split")
    bmps(split / "val", [7])  # loose images beside val's class folders
    with pytest.raises(DataError, match=f"^image folder {split / 'val'} holds both image files"):
        load_imagefolder(split)


# ---- special files and symlinks ------------------------------------------------------------------------------

def list_with_a_watchdog(root: Path, fifos: list[Path]) -> tuple[list[str], list[str]]:
    """(the files `load_imagefolder(root)` lists, its DataWarnings), listed in a thread: if it is still at it
    after 60 s, the FIFOs get a writer (which ends the blocked read) and the test fails as a hang."""
    got: dict[str, object] = {}

    def work() -> None:
        try:
            data, said = listed(root)
            got["result"] = (data.index.files, said)
        except BaseException as err:  # handed to the test
            got["error"] = err

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(60)
    if thread.is_alive():
        for fifo in fifos:
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(30)
        pytest.fail(f"listing {root} hangs on a FIFO")
    if "error" in got:
        raise got["error"]  # type: ignore[misc]
    return got["result"]  # type: ignore[return-value]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_in_a_class_folder_is_skipped_at_listing_not_read(tmp_path):
    root = tmp_path / "d"
    bmps(root / "a", [1, 2])
    bmps(root / "b", [3, 4])
    fifos = [root / "a" / "pipe.png", root / "top.png"]
    os.mkfifo(fifos[0])  # opening it to read waits for a writer for ever
    (root / "b" / "link.bmp").symlink_to(root / "a" / "000.bmp")  # a symlink to an image is that image
    files, said = list_with_a_watchdog(root, fifos)
    assert files == ["a/000.bmp", "a/001.bmp", "b/000.bmp", "b/001.bmp", "b/link.bmp"]
    assert said == [f"image folder {root}: skipped 1 entry that is not a regular file: a/pipe.png (FIFO)"]
    (root / "b" / "dangling.png").symlink_to(root / "nowhere.png")  # skipped and named as well
    os.mkfifo(fifos[1])  # beside the class folders
    files, said = list_with_a_watchdog(root, fifos)
    assert len(files) == 5 and said == [
        f"image folder {root}: skipped 3 entries that are not regular files: top.png (FIFO), a/pipe.png (FIFO), "
        "b/dangling.png (broken symlink)"
    ]


def test_a_symlink_loop_is_refused_in_one_line_naming_the_link(tmp_path):
    root = tmp_path / "d"
    bmps(root / "a", [1, 2])
    bmps(root / "b", [3, 4])
    (root / "a" / "again").symlink_to(root / "a")  # a/again/again/... : the same two images without end
    with pytest.raises(DataError) as err:
        load_imagefolder(root)
    assert str(err.value) == f"image folder {root / 'a' / 'again'} is a symlink loop (it leads back to a folder above it)"
    (root / "a" / "again").unlink()
    (root / "b" / "more").symlink_to(root / "a")  # a symlinked folder that is no loop is walked
    assert load_imagefolder(root).index.files == ["a/000.bmp", "a/001.bmp", "b/000.bmp", "b/001.bmp",
                                                  "b/more/000.bmp", "b/more/001.bmp"]  # fmt: skip


# ---- what the fingerprint covers -----------------------------------------------------------------------------


def test_a_same_size_replacement_is_seen_by_mtime_and_one_with_its_mtime_set_back_by_content(tmp_path):
    root = tmp_path / "d"
    target = bmps(root / "a", [1, 2])[1]
    bmps(root / "b", [3, 4])
    by_mtime = FolderIndex.scan(root)
    by_content = FolderIndex.scan(root, content=True)
    stats = [(root / f).stat() for f in by_mtime.files]
    lines = b"".join(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode() for f, st in zip(by_mtime.files, stats, strict=True))
    assert by_mtime.fingerprint() == {"kind": "files", "covers": "names, sizes, mtimes", "count": 4,
                                      "digest": hashlib.sha256(lines).hexdigest()}  # fmt: skip
    shas = [hashlib.sha256((root / f).read_bytes()).hexdigest() for f in by_content.files]
    lines = b"".join(f"{f}\0{st.st_size}\0{sha}\n".encode() for f, st, sha in zip(by_content.files, stats, shas, strict=True))
    assert by_content.fingerprint() == {"kind": "files", "covers": "names, sizes, content sha256", "count": 4,
                                        "digest": hashlib.sha256(lines).hexdigest()}  # fmt: skip
    assert by_mtime.changes() is None and by_content.changes() is None

    same_size_replace(target, 200, keep_mtime=False)  # every pixel new, the byte size unchanged
    assert by_mtime.changes() == ("1 file(s) modified at the same size (new mtime) (a/001.bmp) "
                                  "(the check covers names, sizes, mtimes)")  # fmt: skip
    assert by_content.changes() == "1 file(s) with new content (a/001.bmp) (the check covers names, sizes, content sha256)"
    same_size_replace(target, 100, keep_mtime=True)  # new pixels again, and the mtime set back
    fresh = FolderIndex.scan(root)
    same_size_replace(target, 50, keep_mtime=True)
    assert fresh.changes() is None  # what mtimes cannot see ...
    assert by_content.changes() == "1 file(s) with new content (a/001.bmp) (the check covers names, sizes, content sha256)"


def test_the_content_option_is_recorded_and_a_run_refuses_what_changed_saying_what_it_covers(tmp_path):
    root, content_root = tmp_path / "d", tmp_path / "c"
    for folder in (root, content_root):
        bmps(folder / "a", list(range(0, 12)))
        bmps(folder / "b", list(range(100, 112)))
    runs = {"mtime": (tmp_path / "run", f"imagefolder:{root}"),
            "content": (tmp_path / "crun", f"imagefolder,hash=content:{content_root}")}  # fmt: skip
    for run, spec in runs.values():
        result = invoke("pretrain", "--dataset", spec, *RUN, "--out", run)
        assert result.exit_code == 0, result.output
    recorded = json.loads((runs["content"][0] / "config.json").read_text())["dataset"]
    assert recorded["name"] == f"imagefolder,hash=content:{content_root}"  # what --resume replays
    assert recorded["fingerprint"]["covers"] == "names, sizes, content sha256"
    assert json.loads((runs["mtime"][0] / "config.json").read_text())["dataset"]["fingerprint"]["covers"] == (
        "names, sizes, mtimes"
    )
    for run, _ in runs.values():  # unchanged: both go on
        result = invoke("pretrain", "--resume", run, "--steps", "3", "--no-progress")
        assert result.exit_code == 0 and "Warning" not in result.stderr, result.output
    same_size_replace(root / "a" / "003.bmp", 250, keep_mtime=False)
    same_size_replace(content_root / "b" / "004.bmp", 250, keep_mtime=True)
    for (run, _), folder, what in (
        (runs["mtime"], root, "1 file(s) modified at the same size (new mtime) (a/003.bmp) (the check covers names, "
                              "sizes, mtimes)"),
        (runs["content"], content_root, "1 file(s) with new content (b/004.bmp) (the check covers names, sizes, "
                                        "content sha256)"),
    ):  # fmt: skip
        before = (run / "metrics.jsonl").read_bytes()
        result = invoke("pretrain", "--resume", run, "--steps", "4", "--no-progress")
        assert result.exit_code == 1 and result.stderr.strip().splitlines() == [
            f"Error: data folder {folder} changed since the run listed it: {what}; pass --trust-data-change to use "
            "it anyway"
        ], result.output
        assert (run / "metrics.jsonl").read_bytes() == before


def test_a_run_recorded_with_the_older_names_and_sizes_index_is_still_checked_that_way(tmp_path):
    root = tmp_path / "d"
    bmps(root / "a", list(range(0, 12)))
    bmps(root / "b", list(range(100, 112)))
    run = tmp_path / "run"
    result = invoke("pretrain", "--dataset", f"imagefolder:{root}", *RUN, "--out", run)
    assert result.exit_code == 0, result.output
    # rewrite the run as the maskkit before this one wrote it: index format 1, fingerprint of names and sizes
    with gzip.open(run / INDEX_FILE, "rt", encoding="utf-8") as f:
        raw = json.load(f)
    lines = "".join(f"{name}\t{size}\n" for name, size in zip(raw["files"], raw["sizes"], strict=True))
    old = {"kind": "files", "count": len(raw["files"]), "digest": hashlib.sha256(lines.encode()).hexdigest()}
    raw.update(format=1, fingerprint=old)
    raw.pop("mtimes", None), raw.pop("hashes", None)
    with gzip.open(run / INDEX_FILE, "wt", encoding="utf-8") as f:
        json.dump(raw, f)
    record = json.loads((run / "config.json").read_text())
    record["dataset"]["fingerprint"] = old
    (run / "config.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")

    result = invoke("pretrain", "--resume", run, "--steps", "3", "--no-progress")  # unchanged: it goes on
    assert result.exit_code == 0 and "Warning" not in result.stderr, result.output
    assert json.loads((run / "config.json").read_text())["dataset"]["fingerprint"] == old  # the record is kept
    same_size_replace(root / "a" / "001.bmp", 250, keep_mtime=False)  # what such an index cannot see
    result = invoke("pretrain", "--resume", run, "--steps", "4", "--no-progress")
    assert result.exit_code == 0, result.output
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(root / "b" / "002.bmp")  # a new size: seen as before
    result = invoke("pretrain", "--resume", run, "--steps", "5", "--no-progress")
    assert result.exit_code == 1 and result.stderr.strip().splitlines() == [
        f"Error: data folder {root} changed since the run listed it: 1 file(s) changed size (b/002.bmp) (the check "
        "covers names, sizes); pass --trust-data-change to use it anyway"
    ], result.output
    index = open_folder(root, cache_dir=run, check=False).index
    assert index.covers == "names, sizes" and index.fingerprint() == old
    index.save(tmp_path / "again.json.gz")  # saved again, it stays what it was
    assert FolderIndex.load(tmp_path / "again.json.gz").fingerprint() == old


# ---- names in messages, and the spec's options ----------------------------------------------------------


@pytest.mark.skipif(sys.platform != "linux", reason="needs a file system that takes any bytes in a name")
def test_names_that_are_not_utf8_or_hold_a_newline_are_listed_and_shown_escaped(tmp_path):
    root = tmp_path / "d"
    bmps(root / "a", [1, 2])
    bmps(root / "b", [3, 4])
    odd = [os.fsdecode(b"a/bad\xffname.bmp"), "b/new\nline.bmp"]
    for name in odd:
        (root / name).write_bytes((root / "a" / "000.bmp").read_bytes())
    index = FolderIndex.scan(root)
    assert sorted(odd) == sorted(set(index.files) - {"a/000.bmp", "a/001.bmp", "b/000.bmp", "b/001.bmp"})
    lines = b"".join(os.fsencode(f) + f"\0{st.st_size}\0{st.st_mtime_ns}\n".encode()
                     for f, st in ((f, (root / f).stat()) for f in index.files))  # fmt: skip
    assert index.fingerprint()["digest"] == hashlib.sha256(lines).hexdigest()  # the names' own bytes
    index.save(tmp_path / "index.json.gz")
    assert FolderIndex.load(tmp_path / "index.json.gz").files == index.files
    for name in odd:
        (root / name).unlink()
    assert index.changes() == ("2 file(s) missing (a/bad\\xffname.bmp, b/new\\nline.bmp) "
                               "(the check covers names, sizes, mtimes)")  # fmt: skip
    (root / odd[1]).write_bytes(b"not an image")
    data = open_folder(root)
    with pytest.raises(DataError) as err:
        data.read(data.index.files.index(odd[1]))
    assert "\n" not in str(err.value) and f"cannot read image {root}/b/new\\nline.bmp: " in str(err.value)


def test_source_options_in_the_spec_are_checked_in_one_line(tmp_path):
    root = tmp_path / "d"
    bmps(root / "a", [1, 2])
    bmps(root / "b", [3, 4])
    assert load_dataset(f"imagefolder,hash=content:{root}").index.covers == "names, sizes, content sha256"
    for spec, message in (
        (f"imagefolder,hash=sha1:{root}", "imagefolder option hash must be one of mtime, content, got 'sha1'"),
        (f"imagefolder,colour=red:{root}", f"dataset 'imagefolder,colour=red:{root}': 'imagefolder' takes no option "
                                           "'colour' (its options: hash)"),
        (f"imagefolder,hash:{root}", f"dataset 'imagefolder,hash:{root}': option 'hash' is not KEY=VALUE "
                                     "(NAME,KEY=VALUE[:ARG])"),
        (f"imagefolder,hash=content,hash=mtime:{root}", "gives option 'hash' twice"),
        ("digits,check=false", "dataset 'digits,check=false': 'digits' takes no option 'check' (it takes none)"),
    ):  # fmt: skip
        with pytest.raises(DataError) as err:
            load_dataset(spec)
        assert str(err.value).endswith(message) and "\n" not in str(err.value)


def test_fingerprints_that_cover_different_things_are_not_compared_as_changed_data():
    from maskkit.data import fingerprint_change

    old = {"kind": "files", "count": 2, "digest": "a" * 64}  # a run recorded before "covers"
    new = {"kind": "files", "covers": "names, sizes, mtimes", "count": 2, "digest": "b" * 64}
    assert fingerprint_change(old, new) == (
        "the recorded fingerprint covers what an older maskkit saw, this one covers names, sizes, mtimes: they "
        "cannot be compared (the source is read another way now)"
    )
    assert fingerprint_change(new, {**new, "count": 3, "digest": "c" * 64}) == (
        "file count 2 -> 3, content changed (digest bbbbbbbb... -> cccccccc...) (the fingerprint covers names, "
        "sizes, mtimes)"
    )
    assert fingerprint_change(new, dict(new)) is None
