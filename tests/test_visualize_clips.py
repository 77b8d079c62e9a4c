"""maskkit.visualize_clips: the rows of a clip picture checked pixel by pixel against the plan and the prediction,
the composed PNG, the policy gallery on clips, and `maskkit visualize` on a video run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from maskkit import list_policies
from maskkit.adapters.video_mae import create_video_mae
from maskkit.cli.app import app
from maskkit.mae import mae_forward
from maskkit.policies import RandomPolicy
from maskkit.visualize import GUIDED_RGB, HIDDEN_RGB
from maskkit.visualize_clips import (
    DECODED_RGB,
    compose_clip_grid,
    frame_box,
    render_clip_gallery,
    render_clip_panels,
)  # fmt: skip

MEAN, STD = [0.4], [0.3]


@pytest.fixture(scope="module")
def setup():
    # micro: clips 1 x 8 x 16 x 16, tubelets 2 x 4 x 4, grid (4, 4, 4), 64 tokens
    mae = create_video_mae("micro", seed=0).eval()
    clips = torch.rand(3, 1, 8, 16, 16, generator=torch.Generator().manual_seed(5))  # [B, C, T, H, W] in [0, 1]
    return mae, (clips - MEAN[0]) / STD[0]


def every_other_hidden(plan, context):
    """A decoder subset by hand: every second hidden token of each clip (ascending)."""
    ids = torch.stack([row.nonzero().flatten()[::2] for row in plan.mask > 0.5])  # [B, M]
    return plan.with_decoder_ids(ids)


def tubelet(frames: np.ndarray, b: int, n: int, grid=(4, 4, 4), t: int = 2, p: int = 4) -> np.ndarray:
    """The pixels [t, p, p, 3] of token n of clip b: its t frames and its p x p square (token order: time slowest)."""
    ti, hi, wi = np.unravel_index(n, grid)
    return frames[b, ti * t : (ti + 1) * t, hi * p : (hi + 1) * p, wi * p : (wi + 1) * p]


def panels_for(mae, clips, decoder=None):
    return render_clip_panels(mae, RandomPolicy(0.75), clips, MEAN, STD, ratio=0.75,
                              generator=torch.Generator().manual_seed(0), decoder=decoder)  # fmt: skip


def test_mask_rows_show_exactly_the_plans_hidden_tubelets(setup):
    mae, clips = setup
    panels = panels_for(mae, clips, every_other_hidden)
    assert list(panels.rows) == ["clip", "hidden", "decoder subset", "reconstruction"]
    # the plan, drawn independently: the random policy with the same seeded generator
    mask = RandomPolicy(0.75)(mae.patch_tokens(clips), generator=torch.Generator().manual_seed(0)).mask.numpy()
    np.testing.assert_array_equal(panels.mask, mask)
    assert mask.sum(axis=1).tolist() == [48, 48, 48]
    decoded = np.zeros_like(mask)
    np.put_along_axis(decoded, panels.decoder_ids, 1.0, axis=1)
    assert decoded.sum(axis=1).tolist() == [24, 24, 24] and (decoded <= mask).all()
    original = clips.mul(STD[0]).add(MEAN[0]).clamp(0, 1).permute(0, 2, 3, 4, 1).repeat(1, 1, 1, 1, 3).numpy()
    np.testing.assert_allclose(panels.rows["clip"], original, atol=1e-6)
    for b in range(3):
        for n in range(64):
            shown, subset = tubelet(panels.rows["hidden"], b, n), tubelet(panels.rows["decoder subset"], b, n)
            if mask[b, n]:
                np.testing.assert_array_equal(shown, np.broadcast_to(HIDDEN_RGB, shown.shape))
                colour = DECODED_RGB if decoded[b, n] else HIDDEN_RGB
                np.testing.assert_array_equal(subset, np.broadcast_to(colour, subset.shape))
            else:
                np.testing.assert_allclose(shown, tubelet(original, b, n), atol=1e-6)
                np.testing.assert_allclose(subset, tubelet(original, b, n), atol=1e-6)


def test_reconstruction_is_the_prediction_unpatchified_with_visible_pixels_pasted(setup):
    mae, clips = setup
    for decoder in (None, every_other_hidden):
        panels = panels_for(mae, clips, decoder)
        assert ("decoder subset" in panels.rows) == (decoder is not None)
        plan = RandomPolicy(0.75)(mae.patch_tokens(clips), generator=torch.Generator().manual_seed(0))
        plan = plan if decoder is None else decoder(plan, {})
        with torch.no_grad():
            pred = mae_forward(mae, clips, plan).pred  # [B, N, P], P ordered (t, p, p, C)
        target = set(range(64)) if decoder is None else None
        original = panels.rows["clip"]
        for b in range(3):
            decoded = target or set(plan.decoder_ids[b].tolist())
            for n in range(64):
                shown = tubelet(panels.rows["reconstruction"], b, n)
                if not plan.mask[b, n]:
                    np.testing.assert_allclose(shown, tubelet(original, b, n), atol=1e-6)
                elif n in decoded:  # the token's predicted pixels, un-normalised, grey as RGB
                    pixels = (pred[b, n].reshape(2, 4, 4, 1) * STD[0] + MEAN[0]).clamp(0, 1).repeat(1, 1, 1, 3)
                    np.testing.assert_allclose(shown, pixels.numpy(), atol=1e-6)
                else:  # not reconstructed by the decoder: left hidden
                    np.testing.assert_array_equal(shown, np.broadcast_to(HIDDEN_RGB, shown.shape))


def test_png_frames_are_the_rows_upscaled_and_the_picture_is_deterministic(setup):
    mae, clips = setup
    panels = panels_for(mae, clips, every_other_hidden)
    image = compose_clip_grid(panels, tile=32)
    png = np.asarray(image.convert("RGB")).astype(int)
    for clip, row, frame in ((0, "hidden", 0), (2, "decoder subset", 5), (1, "reconstruction", 7)):
        left, top, right, bottom = frame_box(panels.rows, clip, row, frame, tile=32)
        expected = (np.clip(panels.rows[row][clip, frame], 0, 1) * 255).round()
        np.testing.assert_array_equal(png[top:bottom, left:right], np.kron(expected, np.ones((2, 2, 1))))
    again = compose_clip_grid(panels_for(mae, clips, every_other_hidden), tile=32)
    assert again.tobytes() == image.tobytes()
    other = render_clip_panels(mae, RandomPolicy(0.75), clips, MEAN, STD, ratio=0.75,
                               generator=torch.Generator().manual_seed(1))  # fmt: skip
    assert not np.array_equal(other.mask, panels.mask)


def test_mask_grid_draws_a_video_mae_as_the_clip_picture(setup):
    """`mask_grid` (what `maskkit visualize` and the TensorBoard mask pictures call) gives a video MAE's frames x rows."""
    from maskkit.data import Batcher, load_dataset
    from maskkit.visualize import mask_grid
    from maskkit.visualize_clips import clip_mask_grid

    mae, _ = setup
    data = load_dataset("movingdigits,count=12,side=16", num_frames=8)
    batcher = Batcher(data, MEAN, STD, torch.device("cpu"))
    pool = np.arange(12)
    image = mask_grid(mae, RandomPolicy(0.75), batcher, pool, ratio=0.75, num_images=2, tile=16, seed=4)
    expected = clip_mask_grid(mae, RandomPolicy(0.75), batcher, pool, ratio=0.75, num_images=2, tile=16, seed=4)
    assert image.size == (100 + 4 + 8 * 20, 18 + 4 + 2 * (3 * 20 + 8) + 30)
    assert image.tobytes() == expected.tobytes()


def test_gallery_rows_are_each_policys_tubes_or_its_one_line_refusal(setup):
    mae, clips = setup
    names = list_policies()
    gallery = render_clip_gallery(mae, clips, MEAN, STD, names, ratio=0.75, seed=3)
    assert list(gallery.rows) == ["clip", *names]
    assert set(gallery.masks) | set(gallery.notes) == set(names) and not set(gallery.masks) & set(gallery.notes)
    original = gallery.rows["clip"]
    for name, note in gallery.notes.items():
        assert note and "\n" not in note, name
        assert (gallery.rows[name] == 1).all()
    for name, mask in gallery.masks.items():
        assert mask.shape == (3, 64) and mask.sum(axis=1).tolist() == [48, 48, 48], name
        guided = gallery.guided[name]
        for b in range(3):
            for n in range(64):
                shown = tubelet(gallery.rows[name], b, n)
                if not mask[b, n]:
                    np.testing.assert_allclose(shown, tubelet(original, b, n), atol=1e-6)
                else:
                    colour = GUIDED_RGB if guided is not None and guided[b, n] else HIDDEN_RGB
                    np.testing.assert_array_equal(shown, np.broadcast_to(colour, shown.shape))
    expected = RandomPolicy(0.75)(mae.patch_tokens(clips), generator=torch.Generator().manual_seed(3)).mask
    np.testing.assert_array_equal(gallery.masks["random"], expected.numpy())


# ---- maskkit visualize on a video run ------------------------------------------------------------

runner = CliRunner()
DATA = ["--dataset", "movingdigits,count=40,side=16", "--num-frames", "8"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.slow
def test_visualize_draws_a_video_runs_frames_and_refuses_bad_decoder_options(tmp_path):
    torch.set_num_threads(1)
    run = tmp_path / "video"
    result = invoke("pretrain", *DATA, "--model", "video:micro", "--steps", "2", "--batch-size", "4",
                    "--no-progress", "--out", run)  # fmt: skip
    assert result.exit_code == 0, result.output
    out = tmp_path / "clips.png"
    result = invoke("visualize", run, "-o", out, "--num-images", "2", "--tile", "32")
    assert result.exit_code == 0, result.output
    width, height = Image.open(out).size
    # 8 frames of 16x16 upscaled x2, a label column; 2 clips of 3 rows (clip, hidden tubes, reconstruction)
    assert width == 100 + 4 + 8 * (32 + 4) and height == 18 + 4 + 2 * (3 * (32 + 4) + 8) + 30
    again = tmp_path / "again.png"
    assert invoke("visualize", run, "-o", again, "--num-images", "2", "--tile", "32").exit_code == 0
    assert again.read_bytes() == out.read_bytes()
    for args, message in (
        (["--decoder-ratio", "1.5"], "--decoder-ratio must lie in [0, 1)"),
        (["--decoder-rule", "random"], "--decoder-rule only applies with --decoder-ratio"),
        (["--decoder-ratio", "0.5", "--decoder-rule", "nope"], "--decoder-rule must be one of"),
        (["--policies", "random", "--decoder-ratio", "0.5"], "give RUN_DIR, not --policies"),
    ):
        result = invoke("visualize", run, "-o", tmp_path / "bad.png", *args)
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 1 and len(lines) == 1 and message in lines[0], result.output
    assert not (tmp_path / "bad.png").exists()
    image_run = tmp_path / "image"
    result = invoke("pretrain", "--steps", "2", "--batch-size", "8", "--no-progress", "--out", image_run)
    assert result.exit_code == 0, result.output
    result = invoke("visualize", image_run, "-o", tmp_path / "bad.png", "--decoder-ratio", "0.5")
    assert result.exit_code == 1 and "drawn on a video MAE's clips only" in result.stderr.strip(), result.output
    assert not (tmp_path / "bad.png").exists()


@pytest.mark.slow
def test_a_run_pretrained_with_decoder_masking_shows_its_subset(tmp_path):
    pytest.importorskip("maskkit.policies.decoder")
    torch.set_num_threads(1)
    run = tmp_path / "video"
    result = invoke("pretrain", *DATA, "--model", "video:micro", "--steps", "2", "--batch-size", "4", "--no-progress",
                    "--mask-ratio", "0.75", "--decoder-ratio", "0.5", "--out", run)  # fmt: skip
    assert result.exit_code == 0, result.output
    heights = {}
    for name, extra in (("own", []), ("random", ["--decoder-rule", "random"]), ("more", ["--decoder-ratio", "0.25"])):
        out = tmp_path / f"{name}.png"
        result = invoke("visualize", run, "-o", out, "--num-images", "2", "--tile", "32", *extra)
        assert result.exit_code == 0, result.output
        heights[name] = Image.open(out).size[1]
    # 2 clips of 4 rows: clip, hidden tubes, decoder subset, reconstruction
    assert set(heights.values()) == {18 + 4 + 2 * (4 * (32 + 4) + 8) + 30}
    own, more = (np.asarray(Image.open(tmp_path / f"{n}.png").convert("RGB")) for n in ("own", "more"))
    green = np.round(np.array(DECODED_RGB) * 255)
    # the subset row of the first clip: a decoder ratio of 0.25 reconstructs more of the hidden tokens than 0.5
    top = 18 + 4 + 2 * (32 + 4)
    count = lambda png: (png[top : top + 32, 104:] == green).all(axis=-1).sum()  # noqa: E731
    assert 0 < count(own) < count(more)
