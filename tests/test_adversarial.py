"""Bad inputs an adversarial user tries (issue 25, items 4-6): each case asserts its class of outcome.

- a clean error: exit code 1, ONE `Error: ...` line on stderr naming the option or file, no traceback,
  and (for a pretrain option) nothing written: the options are range-checked before any file;
- a refusal by the library: a one-line ValueError (DataError) naming the split, file or input;
- a correct run: what ran is what config.json records, or the pixels are converted, not clipped.

Plugin policies returning an inverted or keep-all plan, and every broken-plan check, are covered by
tests/test_plan_validation.py; non-finite batches stopping a run by tests/test_nonfinite.py.
"""

from __future__ import annotations

import json
import shlex
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_cli import invoke, one_thread  # noqa: F401 - one torch thread for the module, the CLI runner
from typer.testing import CliRunner

from maskkit.data import DataError, make_splits, stratified_split
from maskkit.data.sources.imagefolder import load_imagefolder

runner = CliRunner()
#: the quickest pretraining there is: micro on 8x8 digits, one or two steps
FAST = ["--steps", "2", "--batch-size", "16", "--log-every", "1", "--ckpt-every", "1", "--no-progress",
        "--device", "cpu"]  # fmt: skip




def pixels_of(folder):
    """Every image of a lazy folder source as uint8 [N, C, H, W] (what the eager loader used to hold)."""
    return torch.stack([folder.pixels(i) for i in range(len(folder))])


def clean_error(result, *words: str) -> str:
    """Exit code 1, one `Error: ...` line on stderr holding every word, no traceback; returns the line."""
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: "), lines[0]
    for word in words:
        assert word in lines[0], lines[0]
    assert "Traceback" not in result.output
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A two-step run, for the evaluate / visualize / resume cases."""
    run = tmp_path_factory.mktemp("adv") / "run"
    result = invoke("pretrain", "--out", run, *FAST)
    assert result.exit_code == 0, result.output
    return run


# ---- pretrain options: range-checked before any file is written ------------------------------------

#: name | the options, as shell words (`~` after a flag: drop FAST's own value of it) | what the one line names
OPTION_TABLE = """
img-size-0                 | --img-size 0                                                                 | --img-size
img-size-100000            | --img-size 100000                                                            | --img-size
img-size-negative          | --img-size -3                                                                | --img-size
num-heads-0                | --model-opt num_heads=0                                                      | num_heads
num-heads-not-dividing     | --model-opt num_heads=5                                                      | num_heads=5 does not divide
width-not-divided          | --model-opt embed_dim=66                                                     | does not divide the width embed_dim=66
decoder-heads-not-dividing | --model-opt decoder_num_heads=3                                              | decoder_num_heads=3
depth-0                    | --model-opt depth=0                                                          | depth
heads-not-an-int           | --model-opt num_heads=two                                                    | num_heads
model-opt-no-equals        | --model-opt foo                                                              | key=value
hf-heads-0                 | --model hf:tiny --model-opt num_attention_heads=0                            | num_attention_heads
hf-heads-not-dividing      | --model hf:tiny --model-opt hidden_size=50 --model-opt num_attention_heads=4 | does not divide the width hidden_size=50
keep-checkpoints-0         | --keep-checkpoints 0                                                         | --keep-checkpoints
masker-reg-inf             | --policy learned --masker-reg inf                                            | --masker-reg
lr-inf                     | --lr inf                                                                     | --lr
lr-nan                     | --lr nan                                                                     | --lr
lr-negative                | --lr -1                                                                      | --lr
weight-decay-nan           | --weight-decay nan                                                           | --weight-decay
weight-decay-negative      | --weight-decay -0.1                                                          | --weight-decay
masker-lr-nan              | --policy learned --masker-lr nan                                             | --masker-lr
head-lr-inf                | --policy learned --head-lr inf                                               | --head-lr
epochs-inf                 | --epochs inf --steps ~                                                       | --epochs
seed-negative              | --seed -1                                                                    | --seed
seed-too-large             | --seed 18446744073709551616                                                  | --seed
steps-0                    | --steps 0                                                                    | --steps
batch-size-0               | --batch-size 0                                                               | --batch-size
mask-ratio-1.5             | --mask-ratio 1.5                                                             | ratio
mask-ratio-nan             | --mask-ratio nan                                                             | ratio
patch-size-3               | --patch-size 3                                                               | image size 8x8 is not divisible by patch size 3
unknown-policy             | --policy nope                                                                | unknown policy 'nope'
unknown-augment            | --augment bogus                                                              | --augment
steps-and-epochs           | --epochs 1                                                                   | --steps or --epochs
unknown-device             | --device bogus                                                               | device
missing-npz                | --dataset npz:/nonexistent/x.npz                                             | /nonexistent/x.npz
unknown-dataset            | --dataset nosuchset                                                          | nosuchset
unknown-model              | --model nosuchmodel                                                          | nosuchmodel
"""
OPTION_CASES = {
    name.strip(): ([None if word == "~" else word for word in shlex.split(opts)], words.strip())
    for name, opts, words in (line.split(" | ") for line in OPTION_TABLE.strip().splitlines())
}


def _with_fast(extra: list) -> list:
    """FAST with `extra` layered on (a None value drops FAST's own option of that name)."""
    args = list(FAST)
    for key, value in zip(extra[::2], extra[1::2], strict=True):
        if key in args and key != "--model-opt":
            i = args.index(key)
            del args[i : i + 2]
        if value is not None:
            args += [key, value]
    return args


@pytest.mark.parametrize("extra, words", OPTION_CASES.values(), ids=OPTION_CASES.keys())
def test_a_bad_option_is_one_line_before_anything_is_written(tmp_path, extra, words):
    out = tmp_path / "run"
    if extra[0] == "--device":
        args = [*[a for a in FAST if a not in ("--device", "cpu")], *extra]
    else:
        args = _with_fast(extra)
    clean_error(invoke("pretrain", "--out", out, *args), words)
    assert not out.exists()


def test_lr_1e6_names_no_checkpoints_folder_that_does_not_exist(tmp_path):
    out = tmp_path / "run"
    line = clean_error(invoke("pretrain", "--out", out, *_with_fast(["--lr", "1e6", "--ckpt-every", "100"])),
                       "non-finite")  # fmt: skip
    assert "no checkpoint was written before it" in line
    assert not (out / "checkpoints").exists() or not list((out / "checkpoints").glob("*.pt"))


@pytest.mark.slow
def test_a_batch_larger_than_the_split_is_clamped_with_one_warning_and_recorded(tmp_path):
    out = tmp_path / "run"
    result = invoke("pretrain", "--out", out, *_with_fast(["--batch-size", "100000", "--steps", "1"]))
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("Warning: ")]
    assert len(warnings) == 1 and "--batch-size 100000" in warnings[0] and "1257" in warnings[0], result.stderr
    record = json.loads((out / "config.json").read_text())
    assert record["train"]["batch_size"] == 1257 == record["config"]["train"]["batch_size"]
    resumed = invoke("pretrain", "--resume", out, "--steps", "2", "--no-progress")  # what ran is what resumes
    assert resumed.exit_code == 0 and "Warning" not in resumed.stderr, resumed.output


def test_resume_of_a_missing_run_and_resume_with_options_are_one_line(tmp_path, trained):
    clean_error(invoke("pretrain", "--resume", tmp_path / "nothing", "--no-progress"))
    clean_error(invoke("pretrain", "--resume", trained, "--lr", "0.1", "--no-progress"), "--lr")


def test_a_corrupt_checkpoint_is_never_a_traceback(tmp_path, trained):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(trained, run)
    for ckpt in (run / "checkpoints").glob("*.pt"):
        ckpt.write_bytes(b"not a checkpoint")
    result = invoke("pretrain", "--resume", run, "--steps", "3", "--no-progress")
    clean_error(result)


def test_a_binary_config_json_is_one_line(tmp_path, trained):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(trained, run)
    (run / "config.json").write_bytes(bytes(range(256)))
    clean_error(invoke("evaluate", run))


# ---- visualize ----------------------------------------------------------------------------------------

VISUALIZE_CASES = {
    "tile-20000": (["--policies", "random", "--tile", "20000"], "--tile"),
    "tile-4": (["--policies", "random", "--tile", "4"], "--tile"),
    "num-images-0": (["--policies", "random", "--num-images", "0"], "--num-images"),
    "no-run-no-gallery": ([], "RUN_DIR"),
    "unknown-gallery-policy": (["--policies", "nope"], "nope"),
}


@pytest.mark.parametrize("extra, words", VISUALIZE_CASES.values(), ids=VISUALIZE_CASES.keys())
def test_a_bad_visualize_option_is_one_line_and_writes_nothing(tmp_path, extra, words):
    output = tmp_path / "x.png"
    clean_error(invoke("visualize", "-o", output, "--device", "cpu", *extra), words)
    assert not output.exists()


def test_visualize_refuses_a_jpeg_and_a_missing_run(tmp_path, trained):
    clean_error(invoke("visualize", trained, "-o", tmp_path / "x.jpg"), ".png")
    clean_error(invoke("visualize", tmp_path / "nothing", "-o", tmp_path / "x.png"))
    clean_error(invoke("visualize", trained, "-o", tmp_path / "y.png", "--tile", "20000"), "--tile")
    assert not (tmp_path / "y.png").exists()


def test_a_picture_too_large_is_refused_before_drawing():
    from maskkit.visualize import MAX_PICTURE_PIXELS, check_picture_size

    check_picture_size(96, 8, 4)
    with pytest.raises(ValueError, match="--num-images or --tile"):
        check_picture_size(1024, 10_000, 4)
    assert MAX_PICTURE_PIXELS < 2**31


def test_evaluate_of_a_missing_run_is_one_line(tmp_path):
    clean_error(invoke("evaluate", tmp_path / "nothing"))


# ---- data files ---------------------------------------------------------------------------------------


def _digits_folder(root: Path, per_class: int, classes: int = 3, side: int = 8) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (side, side), dtype=np.uint8)).save(root / f"c{c}" / f"{i}.png")
    return root


def _png_bomb(path: Path, side: int = 20000) -> None:
    """A 1-bit side x side PNG of zeros, written cheaply (a few tens of kB)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" * (1 + (side + 7) // 8)
    body = zlib.compressobj(9)
    data = b"".join(body.compress(row) for _ in range(side)) + body.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def test_a_decompression_bomb_is_one_line_naming_the_file(tmp_path):
    root = _digits_folder(tmp_path / "data", 10)
    bomb = root / "c0" / "bomb.png"
    _png_bomb(bomb)
    clean_error(invoke("pretrain", "--dataset", f"imagefolder:{root}", "--out", tmp_path / "run", *FAST),
                "bomb.png")  # fmt: skip
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("content", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"],
                         ids=["empty", "text", "truncated-png"])  # fmt: skip
def test_an_undecodable_image_is_one_line_naming_the_file(tmp_path, content):
    root = _digits_folder(tmp_path / "data", 10)
    (root / "c1" / "broken.png").write_bytes(content)
    clean_error(invoke("pretrain", "--dataset", f"imagefolder:{root}", "--out", tmp_path / "run", *FAST),
                "broken.png")  # fmt: skip
    folder = load_imagefolder(root)  # listing opens no file: the error comes when the file is read
    with pytest.raises(DataError, match="broken.png"):
        folder.read(folder.index.files.index("c1/broken.png"))


def test_an_empty_folder_is_one_line_and_mixed_sizes_are_cropped_to_one(tmp_path):
    (tmp_path / "empty").mkdir()
    clean_error(invoke("pretrain", "--dataset", f"imagefolder:{tmp_path / 'empty'}", *FAST), "empty")
    root = _digits_folder(tmp_path / "data", 10)
    Image.fromarray(np.zeros((9, 9), np.uint8)).save(root / "c0" / "odd.png")
    result = invoke("pretrain", "--dataset", f"imagefolder:{root}", "--out", tmp_path / "run", "--img-size", "8",
                    *_with_fast(["--steps", "1"]))  # fmt: skip
    assert result.exit_code == 0, result.output
    folder = load_imagefolder(root, img_size=8)
    odd = folder.index.files.index("c0/odd.png")
    assert tuple(folder.pixels(odd).shape) == (1, 8, 8)  # a 9x9 image brought to the run's 8x8


def test_npz_with_mismatched_labels_or_objects_is_one_line(tmp_path):
    bad = tmp_path / "toy.npz"
    np.savez(bad, images=np.zeros((120, 1, 8, 8), np.uint8), labels=np.zeros(119, np.int64))
    clean_error(invoke("pretrain", "--dataset", f"npz:{bad}", *FAST), "120 images but 119 labels")
    objects = tmp_path / "objects.npz"
    np.savez(objects, images=np.array([object(), object()], dtype=object))
    clean_error(invoke("pretrain", "--dataset", f"npz:{objects}", *FAST), "objects.npz")


def _truncated_npz(path: Path) -> None:
    np.savez(path, images=np.zeros((120, 8, 8), np.uint8))
    path.write_bytes(path.read_bytes()[:-40])  # the zip's central directory cut off


@pytest.mark.parametrize("make, words", [
    (lambda p: p.write_bytes(b""), "the file is empty"),
    (_truncated_npz, "not a complete .npz (zip) archive"),
    (lambda p: p.write_bytes(b"PK\x03\x04" + bytes(60)), "not a complete .npz (zip) archive"),
], ids=["empty", "truncated", "zip-header-only"])  # fmt: skip
def test_an_empty_or_truncated_npz_is_one_line_naming_the_file(tmp_path, make, words):
    path = tmp_path / "broken.npz"
    make(path)
    out = tmp_path / "run"
    result = invoke("pretrain", "--dataset", f"npz:{path}", "--out", out, *FAST)
    clean_error(result, f"npz file {path}", words)
    assert not out.exists()


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    values = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000 + 535).astype(np.uint16)
    for i in range(2):
        Image.fromarray(values).save(root / f"{i}.png")
    assert Image.open(root / "0.png").mode == "I;16"
    data = load_imagefolder(root)
    expected = np.round(values.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert pixels_of(data).shape == (2, 1, 8, 8)
    assert np.array_equal(pixels_of(data)[0, 0].numpy(), expected)
    assert int(pixels_of(data).max()) == int(expected.max()) < 255  # not clipped to 255


def test_float_tiff_in_unit_range_keeps_its_values(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    values = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    Image.fromarray(values).save(root / "a.tif")
    data = load_imagefolder(root)
    assert np.array_equal(pixels_of(data)[0, 0].numpy(), np.round(values.astype(np.float64) * 255).astype(np.uint8))
    assert int(pixels_of(data).max()) == 255 and int(pixels_of(data).min()) == 0  # not all zeros


@pytest.mark.parametrize("bad", [2.5, -0.5, float("nan")], ids=["above-1", "negative", "nan"])
def test_float_tiff_outside_unit_range_is_refused_naming_the_file(tmp_path, bad):
    root = tmp_path / "data"
    root.mkdir()
    values = np.full((8, 8), 0.5, dtype=np.float32)
    values[0, 0] = bad
    Image.fromarray(values).save(root / "bad.tif")
    with pytest.raises(DataError, match="bad.tif"):
        load_imagefolder(root).read(0)  # listing reads no pixels: the file is refused when it is read


def test_palette_and_alpha_images_are_converted(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[:, :4] = (200, 10, 30)
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=4).save(root / "p.png")
    rgba = np.dstack([rgb, np.full((8, 8), 255, np.uint8)])
    rgba[:, 4:, 3] = 0  # transparent right half (its colour under the alpha is white)
    rgba[:, 4:, :3] = 255
    Image.fromarray(rgba, "RGBA").save(root / "a.png")
    data = load_imagefolder(root)
    assert pixels_of(data).shape == (2, 3, 8, 8)
    a, p = pixels_of(data)[0].numpy(), pixels_of(data)[1].numpy()  # sorted: a.png, p.png
    assert np.array_equal(p[:, 0, 0], [200, 10, 30]) and np.array_equal(p[:, 0, 7], [0, 0, 0])
    assert np.array_equal(a[:, 0, 0], [200, 10, 30]) and np.array_equal(a[:, 0, 7], [0, 0, 0])  # over black


def test_grey_with_alpha_stays_grey(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    la = np.stack([np.full((8, 8), 120, np.uint8), np.full((8, 8), 255, np.uint8)], axis=-1)
    Image.fromarray(la, "LA").save(root / "la.png")
    data = load_imagefolder(root)
    assert pixels_of(data).shape == (1, 1, 8, 8) and int(pixels_of(data)[0, 0, 0, 0]) == 120


def test_pretrain_runs_on_16bit_images(tmp_path):
    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(10):
            Image.fromarray(rng.integers(0, 65536, (8, 8), dtype=np.uint16)).save(root / f"c{c}" / f"{i}.png")
    out = tmp_path / "run"
    result = invoke("pretrain", "--dataset", f"imagefolder:{root}", "--out", out, *_with_fast(["--steps", "1"]))
    assert result.exit_code == 0, result.output
    record = json.loads((out / "config.json").read_text())
    assert record["dataset"]["in_chans"] == 1 and 0.3 < record["dataset"]["mean"][0] < 0.7  # not clipped to 1


# ---- splits too small to be splits ----------------------------------------------------------------------


def test_stratified_split_refuses_an_empty_subset_naming_it_and_the_counts():
    labels = np.repeat(np.arange(10), 2)  # two images per class
    with pytest.raises(DataError, match=r"split 'val' would be empty \(train 20, val 0; 20 samples in 10 classes\)"):
        stratified_split(labels, {"train": 0.8, "val": 0.2}, seed=0)
    parts = stratified_split(labels, {"train": 0.8, "val": 0.2}, seed=0, allow_empty=True)
    assert {k: len(v) for k, v in parts.items()} == {"train": 20, "val": 0}
    assert {k: len(v) for k, v in stratified_split(labels, {"a": 0.5, "b": 0.5}).items()} == {"a": 10, "b": 10}


def test_make_splits_of_two_images_per_class_names_the_empty_split():
    from maskkit.data import ImageData

    data = ImageData("tiny", torch.zeros(20, 1, 8, 8, dtype=torch.uint8), torch.arange(10).repeat(2))
    with pytest.raises(DataError, match=r"'val' split: train \d+, val 0, test \d+"):
        make_splits(data, 0)


def test_pretrain_on_two_images_per_class_is_one_line_naming_the_split(tmp_path):
    root = _digits_folder(tmp_path / "data", 2, classes=10)
    out = tmp_path / "run"
    clean_error(invoke("pretrain", "--dataset", f"imagefolder:{root}", "--out", out, *FAST), "'val'", "val 0")
    assert not out.exists()


# ---- non-finite inputs reaching a policy (maskkit/policies/base.py) -------------------------------------


@pytest.mark.parametrize("name, key", [("random", "noise"), ("uniform", "noise"), ("attention", "attention")])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_noise_or_attention_is_refused_naming_it(name, key, bad):
    from maskkit.policies import create_policy

    policy = create_policy(name, ratio=0.75)
    tokens = torch.randn(2, 16, 8)
    value = torch.rand(2, 16)
    value[1, 2] = bad
    with pytest.raises(ValueError, match=f"{key} holds non-finite values"):
        policy(tokens, **{key: value})
