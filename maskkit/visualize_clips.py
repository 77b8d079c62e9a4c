"""Pictures of masks on clips: per clip, frames x rows (the clip, its hidden tubes, the decoder's subset, the
reconstruction), or the hidden tubes of many policies on the same clips.

A video MAE's token is a tubelet of t x p x p pixels on a (T/t, H/p, W/p) grid (`maskkit.mae.token_grid`):
a hidden token greys its p x p square in each of its t frames. `render_clip_panels` computes the rows as
arrays [B, T, H, W, 3]; `compose_clip_grid` lays them out, one column per frame, one block of rows per clip.
`clip_gallery` draws many policies' tubes on the same clips (`render_clip_gallery`). The shades and the
shared steps (the plan and prediction, the heat map's values, the gallery's plans) are `maskkit.visualize`'s.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor, nn

from maskkit.data import Batcher, denormalize
from maskkit.mae import is_video_mae
from maskkit.plan import MaskPlan
from maskkit.visualize import (
    FOOTER,
    GUIDED_RGB,
    HEADER,
    HIDDEN_RGB,
    MAX_PICTURE_PIXELS,
    PAD,
    check_picture_size,
    gallery_plans,
    heat_colour,
    heat_values,
    mask_grid,
    masked_prediction,
)  # fmt: skip

#: colour of the hidden tubelets that the decoder reconstructs (`plan.decoder_ids`), in the "decoder subset" row
#: (the others stay HIDDEN_RGB there, and in the reconstruction, which has no prediction for them)
DECODED_RGB = (0.20, 0.65, 0.35)
#: width of the row names left of the frames, in pixels
LABEL = 100
#: extra space between two clips' blocks of rows
GAP = 8


@dataclass
class ClipPanels:
    """Rows per clip, each [B, T, H, W, 3] float in [0, 1] (one picture per frame), with what they show.

    mask [B, N] (1 = hidden), guided [B, N] bool or None (hidden by the policy's rule), decoder_ids [B, M] or
    None (the hidden tokens the decoder reconstructs); labels: a row's name as drawn (a heat row's with its
    range); grid (T', H', W') and tubelet (t, p)."""

    rows: dict[str, np.ndarray]
    mask: np.ndarray
    grid: tuple[int, int, int]
    tubelet: tuple[int, int]
    guided: np.ndarray | None = None
    decoder_ids: np.ndarray | None = None
    labels: dict[str, str] = field(default_factory=dict)


def clip_rgb(clips: Tensor) -> np.ndarray:
    """Clips [B, C, T, H, W] in [0, 1] -> [B, T, H, W, 3] numpy (grey repeated; more than 3 channels cut to 3)."""
    x = clips.clamp(0, 1).detach().cpu().float()
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1, 1)
    return x[:, :3].permute(0, 2, 3, 4, 1).numpy()


def tube_map(values: Tensor, grid: tuple[int, int, int], tubelet: tuple[int, int]) -> np.ndarray:
    """Per-token values [B, N] (tokens row-major over `grid`, time slowest) -> per-pixel [B, T, H, W]: each token's
    value over its t frames and p x p pixels."""
    (t, p), b = tubelet, values.shape[0]
    v = values.detach().float().cpu().reshape(b, *grid)  # [B, T', H', W']
    return v.repeat_interleave(t, 1).repeat_interleave(p, 2).repeat_interleave(p, 3).numpy()


def _paint(frames: np.ndarray, where: np.ndarray, rgb: tuple[float, float, float]) -> np.ndarray:
    """frames [B, T, H, W, 3] with the pixels where `where` [B, T, H, W] (values > 0.5) painted `rgb`."""
    return np.where(where[..., None] > 0.5, np.array(rgb), frames)


def hidden_row(original: np.ndarray, plan: MaskPlan, grid: tuple[int, int, int], tubelet: tuple[int, int]) -> np.ndarray:
    """The clip rows [B, T, H, W, 3] with the plan's hidden tubelets in HIDDEN_RGB and, where it marks them, the
    ones its policy chose by its own rule (`plan.guided`) in GUIDED_RGB."""
    row = _paint(original, tube_map(plan.mask, grid, tubelet), HIDDEN_RGB)
    if plan.guided is not None:
        row = _paint(row, tube_map(plan.guided.bool(), grid, tubelet), GUIDED_RGB)
    return row


@torch.no_grad()
def render_clip_panels(
    mae: nn.Module,
    policy: nn.Module,
    clips: Tensor,
    mean: list[float],
    std: list[float],
    *,
    ratio: float | None = None,
    generator: torch.Generator | None = None,
    decoder: Callable[[MaskPlan, dict[str, Any]], MaskPlan] | None = None,
) -> ClipPanels:
    """Mask normalised `clips` [B, C, T, H, W] with `policy` (then `decoder`, e.g. a run's `DecoderMasking`),
    reconstruct with the video `mae`, and return the rows.

    Rows: clip; hidden (hidden tubelets in HIDDEN_RGB, those the policy chose by its rule in GUIDED_RGB);
    decoder subset, when the plan names one (`decoder_ids` in DECODED_RGB, the other hidden ones HIDDEN_RGB);
    the policy's heat map when it has one ("masker p" or "scores", stretched over the batch's range, given in
    its label); reconstruction: unpatchify of the prediction with the visible pixels pasted back (the hidden
    tubelets the decoder does not reconstruct stay HIDDEN_RGB: it predicts nothing for them).
    """
    was = (mae.training, policy.training)
    mae.eval()
    policy.eval()
    try:
        tokens, plan, pred = masked_prediction(mae, policy, clips, ratio=ratio, generator=generator, decoder=decoder)
    finally:
        mae.train(was[0])
        policy.train(was[1])
    grid = tuple(mae.grid)
    tubelet = (mae.tubelet_size, mae.patch_size)
    original = clip_rgb(denormalize(clips, mean, std))  # [B, T, H, W, 3]
    hidden_px = tube_map(plan.mask, grid, tubelet)  # [B, T, H, W]
    guided = None if plan.guided is None else plan.guided.bool()  # [B, N]
    hidden = _paint(original, hidden_px, HIDDEN_RGB)
    if guided is not None:
        hidden = _paint(hidden, tube_map(guided, grid, tubelet), GUIDED_RGB)
    rows = {"clip": original, "hidden": hidden}
    labels = {"clip": "clip", "hidden": "hidden tubes"}
    prediction = clip_rgb(denormalize(mae.unpatchify(pred), mean, std))  # [B, T, H, W, 3]
    reconstruction = np.where(hidden_px[..., None] > 0.5, prediction, original)
    if plan.decoder_ids is not None:
        decoded_px = tube_map(plan.target_mask, grid, tubelet)  # [B, T, H, W]
        rows["decoder subset"] = _paint(_paint(original, hidden_px, HIDDEN_RGB), decoded_px, DECODED_RGB)
        labels["decoder subset"] = f"decoder subset ({plan.num_decoded} of {plan.num_hidden})"
        reconstruction = _paint(reconstruction, hidden_px - decoded_px, HIDDEN_RGB)
    values, name = heat_values(policy, plan, tokens)
    if values is not None:
        lo, hi = values.min().item(), values.max().item()
        rows[name] = heat_colour(tube_map((values - lo) / max(hi - lo, 1e-6), grid, tubelet))
        labels[name] = f"{name} {lo:.3g}..{hi:.3g}"
    rows["reconstruction"] = reconstruction
    labels["reconstruction"] = "reconstruction"
    return ClipPanels(
        rows, plan.mask.cpu().numpy(), grid, tubelet, None if guided is None else guided.cpu().numpy(),
        None if plan.decoder_ids is None else plan.decoder_ids.cpu().numpy(), labels,
    )  # fmt: skip


# ---- the picture: one column per frame, one block of rows per clip -------------------------------


def _scale(frame_shape: tuple[int, ...], tile: int) -> int:
    """The integer upscale that makes a frame about `tile` pixels wide (at least 1x), as `compose_grid`'s."""
    return max(1, tile // max(frame_shape[0], frame_shape[1]))


def frame_box(rows: dict[str, np.ndarray], clip: int, row: str, frame: int, tile: int = 96) -> tuple[int, int, int, int]:
    """Pixel box (left, top, right, bottom) of one frame of one row of one clip in `compose_frames`' output."""
    first = next(iter(rows.values()))
    h, w = first.shape[2:4]
    scale = _scale((h, w), tile)
    th, tw = h * scale, w * scale
    left = LABEL + PAD + frame * (tw + PAD)
    top = HEADER + PAD + clip * (len(rows) * (th + PAD) + GAP) + list(rows).index(row) * (th + PAD)
    return left, top, left + tw, top + th


def check_clip_picture_size(tile: int, clips: int, rows: int, frames: int) -> None:
    """One-line ValueError for a --tile outside [8, MAX_TILE] or a clip picture above MAX_PICTURE_PIXELS."""
    check_picture_size(tile, 1, 1)  # --tile's range
    pixels = (HEADER + FOOTER + clips * (rows * (tile + PAD) + GAP)) * (LABEL + PAD + frames * (tile + PAD))
    if pixels > MAX_PICTURE_PIXELS:
        raise ValueError(f"a picture of {clips} clips x {rows} rows x {frames} frames at --tile {tile} would have "
                         f"{pixels:,} pixels, more than {MAX_PICTURE_PIXELS:,}; lower --num-images or --tile")  # fmt: skip


def compose_frames(
    rows: dict[str, np.ndarray],
    tile: int = 96,
    *,
    labels: dict[str, str] | None = None,
    legend: list[tuple[tuple[float, float, float], str]] | None = None,
    notes: dict[str, str] | None = None,
) -> Image.Image:
    """Lay rows [B, T, H, W, 3] out: one column per frame (numbered on top), for each clip a block of rows named
    on the left (`labels`, else the row's key); frames upscaled by an integer factor to about `tile` pixels. A
    row with a note (a policy that could not mask the clips) is blank but for the note; `legend` (colour, text)
    entries go in a footer."""
    labels = labels or {}
    notes = notes or {}
    first = next(iter(rows.values()))
    clips, frames, h, w = first.shape[:4]
    scale = _scale((h, w), tile)
    th, tw = h * scale, w * scale
    width = LABEL + PAD + frames * (tw + PAD)
    height = HEADER + PAD + clips * (len(rows) * (th + PAD) + GAP) + (FOOTER if legend else 0)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for f in range(frames):
        draw.text((frame_box(rows, 0, next(iter(rows)), f, tile)[0] + 2, 3), f"t={f}", fill=(0, 0, 0))
    for c in range(clips):
        for name, pictures in rows.items():
            left, top, _, bottom = frame_box(rows, c, name, 0, tile)
            text = textwrap.wrap(labels.get(name, name), max((LABEL - 4) // 6, 1))[: max((bottom - top) // 11, 1)]
            for i, line in enumerate(text):
                draw.text((2, top + 2 + 11 * i), line, fill=(0, 0, 0))
            if name in notes:
                right = frame_box(rows, c, name, frames - 1, tile)[2]
                lines = textwrap.wrap(f"not drawn: {notes[name]}", max((right - left - 4) // 6, 1))
                for i, line in enumerate(lines[: max((bottom - top - 4) // 11, 1)]):
                    draw.text((left + 2, top + 2 + 11 * i), line, fill=(120, 0, 0))
                continue
            for f in range(frames):
                pic = (np.clip(pictures[c, f], 0, 1) * 255).round().astype(np.uint8)
                canvas.paste(Image.fromarray(pic, "RGB").resize((tw, th), Image.NEAREST), frame_box(rows, c, name, f, tile)[:2])
    if legend:
        x, y = PAD, height - FOOTER + 6
        for rgb, text in legend:
            draw.rectangle([x, y, x + 9, y + 9], fill=tuple(int(round(255 * v)) for v in rgb))
            draw.text((x + 13, y - 1), text, fill=(0, 0, 0))
            x += 13 + 6 * len(text) + 12
    return canvas


def _legend(guided: bool, decoded: bool) -> list[tuple[tuple[float, float, float], str]]:
    """The footer's shades: hidden, and guided / decoded when the picture shows them."""
    entries = [(HIDDEN_RGB, "hidden" + (": other" if guided else ""))]
    if guided:
        entries.insert(0, (GUIDED_RGB, "hidden: the top of the policy's scores"))
    if decoded:
        entries.append((DECODED_RGB, "hidden, reconstructed by the decoder"))
    return entries


def compose_clip_grid(panels: ClipPanels, tile: int = 96) -> Image.Image:
    """`compose_frames` of a run's rows, with the legend of the shades they use."""
    guided = panels.guided is not None and bool(panels.guided.any())
    return compose_frames(panels.rows, tile, labels=panels.labels,
                          legend=_legend(guided, panels.decoder_ids is not None))  # fmt: skip


def _draw_index(pool: np.ndarray, num_images: int, seed: int) -> np.ndarray:
    """The clips drawn (seeded) from `pool`, ascending: the image pictures' choice."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(pool, size=min(num_images, len(pool)), replace=False))


def clip_mask_grid(
    mae: nn.Module,
    policy: nn.Module,
    batcher: Batcher,
    pool: np.ndarray,
    *,
    ratio: float | None = None,
    num_images: int = 8,
    tile: int = 96,
    seed: int = 0,
    decoder: Callable[[MaskPlan, dict[str, Any]], MaskPlan] | None = None,
) -> Image.Image:
    """The PNG-ready picture for `num_images` clips drawn (seeded) from the indices `pool`: frames x rows."""
    rows = 4 + (decoder is not None)  # at most: clip, hidden, decoder subset, heat map, reconstruction
    check_clip_picture_size(tile, min(num_images, len(pool)), rows, mae.num_frames)
    generator = torch.Generator(device=batcher.device).manual_seed(seed)
    clips = batcher.images(_draw_index(pool, num_images, seed))  # [B, C, T, H, W]
    panels = render_clip_panels(mae, policy, clips, batcher.mean, batcher.std, ratio=ratio, generator=generator,
                                decoder=decoder)  # fmt: skip
    return compose_clip_grid(panels, tile)


# ---- the policy gallery on clips -------------------------------------------------------------------


@dataclass
class ClipGallery:
    """Rows [B, T, H, W, 3] in [0, 1] ("clip", then one per policy); per drawn policy its mask [B, N] and guided
    tokens [B, N] (or None); per policy that could not mask the clips, a note (its row blank)."""

    rows: dict[str, np.ndarray]
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    guided: dict[str, np.ndarray | None] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)


@torch.no_grad()
def render_clip_gallery(
    mae: nn.Module,
    clips: Tensor,
    mean: list[float],
    std: list[float],
    names: list[str],
    *,
    ratio: float = 0.9,
    seed: int = 0,
) -> ClipGallery:
    """Mask normalised `clips` [B, C, T, H, W] with each policy in `names` as `maskkit.visualize.gallery_plans`
    builds them (the token grid in their context); a policy that refuses a space-time grid gets its note."""
    was = mae.training
    mae.eval()
    grid, tubelet = tuple(mae.grid), (mae.tubelet_size, mae.patch_size)
    original = clip_rgb(denormalize(clips, mean, std))  # [B, T, H, W, 3]
    gallery = ClipGallery(rows={"clip": original})
    try:
        tokens = mae.patch_tokens(clips)  # [B, N, D]
        for name, plan in gallery_plans(mae, tokens, clips, names, ratio=ratio, seed=seed):
            if isinstance(plan, str):
                gallery.notes[name] = plan
                gallery.rows[name] = np.ones_like(original)
                continue
            guided = None if plan.guided is None else plan.guided.bool()  # [B, N]
            gallery.rows[name] = hidden_row(original, plan, grid, tubelet)
            gallery.masks[name] = plan.mask.detach().cpu().numpy()
            gallery.guided[name] = None if guided is None else guided.cpu().numpy()
    finally:
        mae.train(was)
    return gallery


def clip_gallery(
    mae: nn.Module,
    batcher: Batcher,
    pool: np.ndarray,
    names: list[str],
    *,
    ratio: float = 0.9,
    num_images: int = 8,
    tile: int = 96,
    seed: int = 0,
) -> tuple[Image.Image, dict[str, str]]:
    """Frames x rows for `num_images` clips (drawn seeded from `pool`): the clip, then each policy's hidden tubes
    at the same `ratio`; returns the picture and the notes of the policies that could not mask the clips."""
    check_clip_picture_size(tile, min(num_images, len(pool)), len(names) + 1, mae.num_frames)
    clips = batcher.images(_draw_index(pool, num_images, seed))  # [B, C, T, H, W]
    gallery = render_clip_gallery(mae, clips, batcher.mean, batcher.std, names, ratio=ratio, seed=seed)
    guided = any(g is not None and g.any() for g in gallery.guided.values())
    image = compose_frames(gallery.rows, tile, notes=gallery.notes, legend=_legend(guided, False) if guided else None)
    return image, dict(gallery.notes)


def mask_picture(
    mae: nn.Module,
    policy: nn.Module,
    batcher: Batcher,
    pool: np.ndarray,
    *,
    ratio: float | None = None,
    num_images: int = 8,
    tile: int = 96,
    seed: int = 0,
) -> Image.Image:
    """A run's mask picture, whatever it trains on: `clip_mask_grid` (frames x rows) for a video MAE, else the
    image grid of `maskkit.visualize.mask_grid` (what `maskkit visualize` and the TensorBoard pictures draw)."""
    draw = clip_mask_grid if is_video_mae(mae) else mask_grid
    return draw(mae, policy, batcher, pool, ratio=ratio, num_images=num_images, tile=tile, seed=seed)
