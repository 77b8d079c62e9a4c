"""maskkit.visualize: the columns of the mask picture and the composed PNG grid."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from maskkit import create_policy
from maskkit.adapters.timm import create_mae
from maskkit.data import Batcher, load_dataset
from maskkit.visualize import HIDDEN_RGB, compose_grid, heat_colour, mask_grid, render_panels, tile_box


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    mae = create_mae("pilot", img_size=8, patch_size=2, in_chans=1, embed_dim=32, depth=1, num_heads=2,
                     decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, seed=0)
    data = load_dataset("digits")
    batcher = Batcher(data, [0.3], [0.4], torch.device("cpu"))
    return mae, batcher


def test_panels_show_hidden_and_visible_patches(setup):
    mae, batcher = setup
    images = batcher.images(np.arange(3))
    panels = render_panels(mae, create_policy("random"), images, batcher.mean, batcher.std, ratio=0.75,
                           generator=torch.Generator().manual_seed(0))
    assert list(panels.columns) == ["image", "hidden", "prediction", "prediction + visible"]
    original = batcher.data.floats(np.arange(3)).permute(0, 2, 3, 1).repeat(1, 1, 1, 3).numpy()
    np.testing.assert_allclose(panels.columns["image"], original, atol=1e-6)
    hidden_px = np.kron(panels.mask.reshape(3, 4, 4), np.ones((2, 2))).astype(bool)  # [B, 8, 8]
    assert panels.mask.sum(axis=1).tolist() == [12, 12, 12]
    np.testing.assert_allclose(panels.columns["hidden"][hidden_px], np.tile(HIDDEN_RGB, (hidden_px.sum(), 1)))
    np.testing.assert_allclose(panels.columns["hidden"][~hidden_px], original[~hidden_px], atol=1e-6)
    pasted = panels.columns["prediction + visible"]
    np.testing.assert_allclose(pasted[~hidden_px], original[~hidden_px], atol=1e-6)
    np.testing.assert_allclose(pasted[hidden_px], panels.columns["prediction"][hidden_px], atol=1e-6)


def test_learned_policy_adds_a_heat_map(setup):
    mae, batcher = setup
    masker = create_policy("learned", embed_dim=32, num_patches=16)
    panels = render_panels(mae, masker, batcher.images(np.arange(2)), batcher.mean, batcher.std, ratio=0.5)
    heat = [k for k in panels.columns if k == "masker p"]
    assert len(heat) == 1 and panels.columns[heat[0]].shape == (2, 8, 8, 3)
    # the hidden patches are the masker's most probable ones
    probs = masker.probabilities(mae.patch_tokens(batcher.images(np.arange(2)))).detach().numpy()
    for b in range(2):
        assert probs[b][panels.mask[b] > 0.5].min() >= probs[b][panels.mask[b] < 0.5].max()


def test_heat_colour_endpoints():
    np.testing.assert_allclose(heat_colour(np.array([0.0, 1.0])), [[0.10, 0.10, 0.45], [0.85, 0.15, 0.10]])


def test_png_grid_size_and_content(setup):
    mae, batcher = setup
    image = mask_grid(mae, create_policy("random"), batcher, np.arange(100, 200), ratio=0.75, num_images=5,
                      tile=64, seed=1)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    png = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    # 4 columns of 8x8 images upscaled x8 = 64 px, 4 px padding, 18 px titles
    assert png.size == (4 + 4 * (64 + 4), 18 + 4 + 5 * (64 + 4))
    pixels = np.asarray(png).astype(int)
    assert pixels.std() > 20  # not blank
    panels = render_panels(mae, create_policy("random"), batcher.images(np.arange(2)), batcher.mean, batcher.std)
    left, top, right, bottom = tile_box(panels, 0, "hidden", tile=64)
    tile = np.asarray(compose_grid(panels, tile=64))[top:bottom, left:right].astype(int)
    hidden_px = np.kron(panels.mask[0].reshape(4, 4), np.ones((16, 16))).astype(bool)
    grey = np.round(np.array(HIDDEN_RGB) * 255)
    assert (tile[hidden_px] == grey).all()  # masked regions show the hidden colour ...
    assert (np.abs(tile[~hidden_px] - grey).sum(axis=1) > 0).mean() > 0.9  # ... visible ones the image


def test_guided_and_random_hidden_patches_in_two_shades_with_a_colour_bar(setup):
    from maskkit.visualize import FOOTER, GUIDED_RGB

    mae, batcher = setup
    hpm = create_policy("hpm", embed_dim=32, num_patches=16, guided_fraction=0.5)
    panels = render_panels(mae, hpm, batcher.images(np.arange(3)), batcher.mean, batcher.std, ratio=0.75,
                           generator=torch.Generator().manual_seed(0))
    assert "scores" in panels.columns and panels.heat[0] == "scores"
    pix = lambda m: np.kron(m.reshape(3, 4, 4), np.ones((2, 2))).astype(bool)  # noqa: E731
    guided_px, hidden_px = pix(panels.guided), pix(panels.mask > 0.5)
    assert panels.guided.sum(axis=1).tolist() == [6, 6, 6]  # half of the 12 hidden
    np.testing.assert_allclose(panels.columns["hidden"][guided_px], np.tile(GUIDED_RGB, (guided_px.sum(), 1)))
    random_px = hidden_px & ~guided_px
    np.testing.assert_allclose(panels.columns["hidden"][random_px], np.tile(HIDDEN_RGB, (random_px.sum(), 1)))
    image = np.asarray(compose_grid(panels, tile=64)).astype(int)
    assert image.shape[0] == 18 + 4 + 3 * (64 + 4) + FOOTER  # the footer holds the legend
    left = tile_box(panels, 0, "scores", tile=64)[0]
    bar = image[18 + 4 + 3 * 68, left : left + 64]  # the colour bar's first line runs low -> high
    np.testing.assert_array_equal(bar[0], np.round(heat_colour(np.array(0.0)) * 255))
    np.testing.assert_array_equal(bar[-1], np.round(heat_colour(np.array(1.0)) * 255))


# ---- the policy gallery ---------------------------------------------------------------------------


def _pixels(mask: np.ndarray, scale: int) -> np.ndarray:
    """Per-patch values [B, 16] of a 4x4 grid -> per-pixel booleans [B, 4 * scale, 4 * scale]."""
    return np.kron(mask.reshape(-1, 4, 4), np.ones((scale, scale))).astype(bool)


def test_gallery_columns_are_each_policys_mask(setup):
    from maskkit import list_policies
    from maskkit.policies import RandomPolicy
    from maskkit.visualize import GUIDED_RGB, render_gallery

    mae, batcher = setup
    images = batcher.images(np.arange(3))
    names = list_policies()
    gallery = render_gallery(mae, images, batcher.mean, batcher.std, names, ratio=0.75, seed=3)
    # every policy draws on images but the two that need a clip: frame (time slices), motion (frame differences)
    assert list(gallery.columns) == ["image", *names] and set(gallery.notes) == {"frame", "motion"}
    assert "time slices" in gallery.notes["frame"] and "clips [B, C, T, H, W]" in gallery.notes["motion"]
    assert all((gallery.columns[name] == 1).all() for name in gallery.notes)  # blank but for the note
    original = gallery.columns["image"]
    for name in gallery.masks:
        mask = gallery.masks[name]
        assert mask.shape == (3, 16) and mask.sum(axis=1).tolist() == [12, 12, 12], name
        hidden = _pixels(mask, 2)
        guided = np.zeros_like(hidden) if gallery.guided[name] is None else _pixels(gallery.guided[name], 2)
        column = gallery.columns[name]
        np.testing.assert_allclose(column[~hidden], original[~hidden], atol=1e-6)  # visible: the image
        np.testing.assert_allclose(column[hidden & ~guided], np.tile(HIDDEN_RGB, ((hidden & ~guided).sum(), 1)))
        np.testing.assert_allclose(column[guided], np.tile(GUIDED_RGB, (guided.sum(), 1)))
    # independent computations: random's draw from the seeded generator, attention's top-12 of the MAE's CLS attention
    tokens = mae.patch_tokens(images)
    expected = RandomPolicy(0.75)(tokens, generator=torch.Generator().manual_seed(3)).mask
    np.testing.assert_array_equal(gallery.masks["random"], expected.numpy())
    attention = mae.cls_attention(images).detach()
    top = torch.zeros(3, 16).scatter(1, attention.topk(12, dim=1).indices, 1.0)
    np.testing.assert_array_equal(gallery.masks["attention"], top.numpy())
    # uniform keeps exactly one patch of every 2x2 block visible
    blocks = gallery.masks["uniform"].reshape(3, 2, 2, 2, 2).transpose(0, 1, 3, 2, 4).reshape(3, 4, 4)
    assert (blocks.sum(axis=-1) == 3).all()
    assert not np.array_equal(gallery.masks["simmim"], gallery.masks["random"])


def test_gallery_png_has_one_column_per_policy_and_notes_for_the_rest(setup):
    from maskkit.visualize import FOOTER, Panels, policy_gallery, render_gallery

    mae, batcher = setup
    names = ["random", "uniform", "hpm"]
    image, notes = policy_gallery(mae, batcher, np.arange(100, 200), names, ratio=0.5, num_images=2, tile=32, seed=1)
    assert list(notes) == ["uniform"] and "ratio 0.75" in notes["uniform"]  # uniform cannot hide half
    png = np.asarray(image.convert("RGB")).astype(int)
    # 1 + 3 columns of 8x8 images upscaled x4 = 32 px; hpm's guided patches add the legend footer
    assert png.shape == (18 + 4 + 2 * (32 + 4) + FOOTER, 4 + 4 * (32 + 4), 3)
    index = np.sort(np.random.default_rng(1).choice(np.arange(100, 200), size=2, replace=False))
    gallery = render_gallery(mae, batcher.images(index), batcher.mean, batcher.std, names, ratio=0.5, seed=1)
    panels = Panels(gallery.columns, np.zeros(0), 2)
    for row in range(2):
        left, top, right, bottom = tile_box(panels, row, "image", tile=32)
        plain = png[top:bottom, left:right]
        for name in ("random", "hpm"):
            left, top, right, bottom = tile_box(panels, row, name, tile=32)
            tile = png[top:bottom, left:right]
            hidden = _pixels(gallery.masks[name][row : row + 1], 8)[0]
            assert gallery.masks[name][row].sum() == 8
            assert (np.abs(tile - plain).sum(axis=-1) > 0)[hidden].all()  # differs wherever the mask hides
            assert (tile[~hidden] == plain[~hidden]).all()  # and nowhere else
        left, top, right, bottom = tile_box(panels, row, "uniform", tile=32)
        note = png[top:bottom, left:right]
        assert (note == 255).all(axis=-1).mean() > 0.5  # blank but for the note's text
    assert ((png[22:22 + 32, 4 + 36:4 + 36 + 32] == 255).all(axis=-1)).mean() < 0.5  # drawn columns are not blank
