"""Pictures of masks: per image, the input, its hidden patches, the learned masker's probabilities
(when the policy has them) and the MAE's reconstruction, composed into one readable PNG grid.

`render_panels` computes the pictures as arrays (one per column); `compose_grid` lays them out
with column titles, upscaling small images with nearest-neighbour so every pixel stays visible.
`policy_gallery` draws many policies' masks side by side on the same images (`render_gallery`,
`compose_gallery`).
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor, nn

from maskkit.data import Batcher, denormalize
from maskkit.mae import is_video_mae, mae_forward, policy_context
from maskkit.plan import MaskPlan
from maskkit.policies import create_sized_policy

#: colour of hidden patches in the "hidden" column (RGB in [0, 1]): the uniformly random ones ...
HIDDEN_RGB = (0.45, 0.45, 0.55)
#: ... and those the policy chose by its own rule (`plan.guided`).
GUIDED_RGB = (0.95, 0.55, 0.10)
PAD = 4
HEADER = 18
FOOTER = 30  # room for the colour bar and the hidden-patch legend
#: largest --tile (pixels per picture side)
MAX_TILE = 1024
#: largest picture, in pixels (3 bytes each): --tile and --num-images beyond it are refused before drawing
MAX_PICTURE_PIXELS = 2**27


@dataclass
class Panels:
    """Pictures per column, each [B, H, W, 3] float in [0, 1], plus the mask [B, N] (1 = hidden).

    guided: [B, N] bool, the hidden patches the policy chose by its rule, or None. heat: the heat
    map's column name and the (low, high) values its colours span, or None.
    """

    columns: dict[str, np.ndarray]
    mask: np.ndarray
    patch_size: int
    guided: np.ndarray | None = None
    heat: tuple[str, float, float] | None = None


def _rgb(images: Tensor) -> np.ndarray:
    """[B, C, H, W] in [0, 1] -> [B, H, W, 3] numpy (grey repeated; 4 channels cut to 3)."""
    x = images.clamp(0, 1).detach().cpu().float()
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    return x[:, :3].permute(0, 2, 3, 1).numpy()


def heat_colour(p: np.ndarray) -> np.ndarray:
    """Probabilities in [0, 1] -> RGB: dark blue (0) through teal and yellow to red (1). [...] -> [..., 3]."""
    stops = np.array([[0.10, 0.10, 0.45], [0.10, 0.60, 0.65], [0.95, 0.85, 0.20], [0.85, 0.15, 0.10]])
    pos = np.clip(p, 0, 1) * (len(stops) - 1)
    lo = np.clip(np.floor(pos).astype(int), 0, len(stops) - 2)
    frac = (pos - lo)[..., None]
    return stops[lo] * (1 - frac) + stops[lo + 1] * frac


def _patch_map(values: Tensor, grid: tuple[int, int], patch: int) -> Tensor:
    """Per-patch values [B, N] -> per-pixel [B, H, W] (each patch's value over its p x p pixels)."""
    b = values.shape[0]
    v = values.reshape(b, grid[0], grid[1])
    return v.repeat_interleave(patch, dim=1).repeat_interleave(patch, dim=2)


def _hidden_picture(
    original: np.ndarray, mask: Tensor, guided: Tensor | None, grid: tuple[int, int], patch: int
) -> np.ndarray:
    """original [B, H, W, 3] with hidden patches (mask [B, N], 1 = hidden) in HIDDEN_RGB, guided ones in GUIDED_RGB."""
    pixel_mask = _patch_map(mask.float(), grid, patch).cpu().numpy()[..., None] > 0.5  # [B, H, W, 1]
    hidden = np.where(pixel_mask, np.array(HIDDEN_RGB), original)
    if guided is not None:
        pixel_guided = _patch_map(guided.float(), grid, patch).cpu().numpy()[..., None] > 0.5  # [B, H, W, 1]
        hidden = np.where(pixel_guided, np.array(GUIDED_RGB), hidden)
    return hidden


def masked_prediction(
    mae: nn.Module,
    policy: nn.Module,
    images: Tensor,
    *,
    ratio: float | None = None,
    generator: torch.Generator | None = None,
    decoder: Callable[[MaskPlan, dict[str, Any]], MaskPlan] | None = None,
) -> tuple[Tensor, MaskPlan, Tensor]:
    """The policy's plan for `images` (or clips) and the MAE's prediction in pixel space (norm_pix_loss undone
    with each target patch's own statistics): (tokens [B, N, D], plan, pred [B, N, P]). `decoder(plan, context)`
    (e.g. a run's `DecoderMasking`) names the hidden patches the decoder reconstructs, drawing after the policy."""
    tokens = mae.patch_tokens(images)  # [B, N, D]
    context = policy_context(mae, images, generator=generator)
    plan = policy(tokens, ratio=ratio, **context)
    if decoder is not None:
        plan = decoder(plan, context)
    out = mae_forward(mae, images, plan, tokens=tokens)
    target = mae.patchify(images)  # [B, N, P]
    pred = out.pred
    if getattr(mae, "norm_pix_loss", False):  # predictions are per-patch normalised: undo with the target's stats
        mu = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        pred = pred * (var + 1e-6) ** 0.5 + mu
    return tokens, plan, pred


def heat_values(policy: nn.Module, plan: MaskPlan, tokens: Tensor) -> tuple[Tensor | None, str]:
    """The heat map's per-patch values [B, N] and name: the learned masker's probabilities ("masker p"), a scored
    policy's own scores ("scores"), or (None, "") for a policy with neither."""
    if callable(getattr(policy, "probabilities", None)):
        return policy.probabilities(tokens).float(), "masker p"  # [B, N]
    if plan.scores is not None and hasattr(policy, "selection_key"):  # a ScoredPolicy's own scores
        return plan.scores.detach().float(), "scores"  # [B, N]
    return None, ""


@torch.no_grad()
def render_panels(
    mae: nn.Module,
    policy: nn.Module,
    images: Tensor,
    mean: list[float],
    std: list[float],
    *,
    ratio: float | None = None,
    generator: torch.Generator | None = None,
) -> Panels:
    """Mask `images` (normalised [B, C, H, W]) with `policy`, reconstruct with `mae`, return the columns.

    Columns: image, hidden (random hidden patches filled with HIDDEN_RGB, those the policy chose by
    its rule with GUIDED_RGB), a heat map of the policy's scores ("masker p" for a policy with
    `probabilities`, else "scores" for a scored policy such as attention or hpm; colours stretched
    over the batch's range, given by the colour bar), prediction (the decoder's output everywhere),
    prediction + visible (MAE's reconstruction picture: predicted hidden patches, original visible ones).
    """
    was = (mae.training, policy.training)
    mae.eval()
    policy.eval()
    tokens, plan, pred = masked_prediction(mae, policy, images, ratio=ratio, generator=generator)
    mask = plan.mask  # [B, N]
    patch = mae.patch_size
    h, w = images.shape[-2:]
    grid = (h // patch, w // patch)

    original = _rgb(denormalize(images, mean, std))
    pixel_mask = _patch_map(mask, grid, patch).cpu().numpy()[..., None] > 0.5  # [B, H, W, 1]
    guided = None if plan.guided is None else plan.guided.bool()  # [B, N]
    hidden = _hidden_picture(original, mask, guided, grid, patch)
    prediction = _rgb(denormalize(mae.unpatchify(pred), mean, std))
    pasted = np.where(pixel_mask, prediction, original)
    columns = {"image": original, "hidden": hidden}
    heat = None
    values, name = heat_values(policy, plan, tokens)
    if values is not None:
        lo, hi = values.min().item(), values.max().item()
        stretched = (values - lo) / max(hi - lo, 1e-6)  # colours span this batch's range: see the colour bar
        columns[name] = heat_colour(_patch_map(stretched, grid, patch).cpu().numpy())
        heat = (name, lo, hi)
    columns["prediction"] = prediction
    columns["prediction + visible"] = pasted
    mae.train(was[0])
    policy.train(was[1])
    return Panels(columns, mask.cpu().numpy(), patch, None if guided is None else guided.cpu().numpy(), heat)


def _has_legend(panels: Panels) -> bool:
    """Whether the grid gets a footer: a heat map's colour bar, or a mask with guided hidden patches."""
    return panels.heat is not None or (panels.guided is not None and bool(panels.guided.any()))


def _draw_legend(draw: ImageDraw.ImageDraw, panels: Panels, names: list[str], tw: int, top: int) -> None:
    """Under the heat map, a colour bar from its low to its high value; under the mask, the two shades."""
    if panels.heat is not None:
        name, lo, hi = panels.heat
        x0 = PAD + names.index(name) * (tw + PAD)
        for i in range(tw):
            colour = tuple(int(round(255 * c)) for c in heat_colour(np.array(i / max(tw - 1, 1))))
            draw.line([(x0 + i, top), (x0 + i, top + 8)], fill=colour)
        low, high = f"{lo:.3g}", f"{hi:.3g}"
        draw.text((x0, top + 10), low, fill=(0, 0, 0))
        # the high end under the bar's right end; on a second line when a narrow tile cannot hold both
        overlap = 6 * (len(low) + len(high)) + 4 > tw
        draw.text((x0 + tw - 6 * len(high), top + (19 if overlap else 10)), high, fill=(0, 0, 0))
    if panels.guided is not None and panels.guided.any():
        x0 = PAD + names.index("hidden") * (tw + PAD)
        for row, (rgb, text) in enumerate(((GUIDED_RGB, "guided"), (HIDDEN_RGB, "random"))):
            y = top + row * 13
            draw.rectangle([x0, y, x0 + 9, y + 9], fill=tuple(int(round(255 * c)) for c in rgb))
            draw.text((x0 + 13, y - 1), text, fill=(0, 0, 0))


def compose_grid(panels: Panels, tile: int = 96) -> Image.Image:
    """Lay the panels out as rows (images) x columns, titles on top; upscale by an integer factor
    so each picture is about `tile` pixels wide (at least 1x). A footer holds the heat map's colour
    bar and the legend of guided and random hidden patches, when the panels have them."""
    first = next(iter(panels.columns.values()))
    rows, h, w = first.shape[:3]
    scale = max(1, tile // max(h, w))
    th, tw = h * scale, w * scale
    names = list(panels.columns)
    width = PAD + len(names) * (tw + PAD)
    height = HEADER + PAD + rows * (th + PAD) + (FOOTER if _has_legend(panels) else 0)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(names):
        x0 = PAD + c * (tw + PAD)
        draw.text((x0 + 2, 3), name, fill=(0, 0, 0))
        for r in range(rows):
            pic = (np.clip(panels.columns[name][r], 0, 1) * 255).round().astype(np.uint8)
            tile_img = Image.fromarray(pic, "RGB").resize((tw, th), Image.NEAREST)
            canvas.paste(tile_img, (x0, HEADER + PAD + r * (th + PAD)))
    if _has_legend(panels):
        _draw_legend(draw, panels, names, tw, HEADER + PAD + rows * (th + PAD))
    return canvas


def tile_box(panels: Panels, row: int, column: str, tile: int = 96) -> tuple[int, int, int, int]:
    """Pixel box (left, top, right, bottom) of one picture in `compose_grid`'s output."""
    first = next(iter(panels.columns.values()))
    h, w = first.shape[1:3]
    scale = max(1, tile // max(h, w))
    c = list(panels.columns).index(column)
    left = PAD + c * (w * scale + PAD)
    top = HEADER + PAD + row * (h * scale + PAD)
    return left, top, left + w * scale, top + h * scale


def check_picture_size(tile: int, rows: int, columns: int) -> None:
    """One-line ValueError for a --tile outside [8, MAX_TILE] or a picture above MAX_PICTURE_PIXELS."""
    if not 8 <= tile <= MAX_TILE:
        raise ValueError(f"--tile must be an integer in [8, {MAX_TILE}], got {tile}")
    pixels = (rows * (tile + PAD) + HEADER + FOOTER) * (columns * (tile + PAD) + PAD)
    if pixels > MAX_PICTURE_PIXELS:
        raise ValueError(f"a picture of {rows} rows x {columns} columns at --tile {tile} would have {pixels:,} "
                         f"pixels, more than {MAX_PICTURE_PIXELS:,}; lower --num-images or --tile")  # fmt: skip


def mask_grid(
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
    """The PNG-ready grid for `num_images` images drawn (seeded) from the indices `pool`; for a video MAE, the clip
    picture of `maskkit.visualize_clips.clip_mask_grid` (frames x rows)."""
    if is_video_mae(mae):
        from maskkit.visualize_clips import clip_mask_grid

        return clip_mask_grid(mae, policy, batcher, pool, ratio=ratio, num_images=num_images, tile=tile, seed=seed)
    check_picture_size(tile, min(num_images, len(pool)), 4)
    rng = np.random.default_rng(seed)
    index = np.sort(rng.choice(pool, size=min(num_images, len(pool)), replace=False))
    generator = torch.Generator(device=batcher.device).manual_seed(seed)
    panels = render_panels(
        mae, policy, batcher.images(index), batcher.mean, batcher.std, ratio=ratio, generator=generator
    )
    return compose_grid(panels, tile)


# ---- the policy gallery: many policies' masks on the same images ---------------------------------


@dataclass
class Gallery:
    """Columns [B, H, W, 3] in [0, 1] ("image", then one per policy); per drawn policy its mask [B, N]
    (1 = hidden) and guided patches [B, N] (or None); per policy that could not mask the images, a note."""

    columns: dict[str, np.ndarray]
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    guided: dict[str, np.ndarray | None] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)


def gallery_plans(
    mae: nn.Module, tokens: Tensor, images: Tensor, names: list[str], *, ratio: float, seed: int
) -> Iterator[tuple[str, MaskPlan | str]]:
    """Per policy in `names`: its plan for `tokens` [B, N, D] of `images` (or clips), the policy built at its
    defaults with `ratio` and `mae`'s sizes (`create_sized_policy`, parameters seeded by `seed`), context from
    `policy_context` with a generator seeded by `seed`; or, for a policy that raises ValueError / TypeError (it
    cannot mask these images, e.g. an image-only policy on a clip's token grid), its one-line reason."""
    for name in names:
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                policy = create_sized_policy(name, ratio=ratio, embed_dim=mae.embed_dim, num_patches=mae.num_patches)
            if isinstance(policy, nn.Module):
                policy = policy.to(images.device).eval()
            generator = torch.Generator(device=images.device).manual_seed(seed)
            plan = policy(tokens, ratio=ratio, **policy_context(mae, images, generator=generator))
        except (ValueError, TypeError) as err:
            yield name, str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            continue
        yield name, plan


@torch.no_grad()
def render_gallery(
    mae: nn.Module,
    images: Tensor,
    mean: list[float],
    std: list[float],
    names: list[str],
    *,
    ratio: float = 0.75,
    seed: int = 0,
) -> Gallery:
    """Mask normalised `images` [B, C, H, W] with each policy in `names`, built at its defaults with `ratio`
    and `mae`'s sizes (`create_sized_policy`, seeded), context `images` and `encoder` = `mae`, a generator
    seeded by `seed`, full guided fraction. A policy that raises ValueError / TypeError (e.g. `uniform`
    at a ratio other than 0.75 or on an odd grid) gets a note instead of a picture."""
    was = mae.training
    mae.eval()
    tokens = mae.patch_tokens(images)  # [B, N, D]
    patch = mae.patch_size
    grid = (images.shape[-2] // patch, images.shape[-1] // patch)
    original = _rgb(denormalize(images, mean, std))  # [B, H, W, 3]
    gallery = Gallery(columns={"image": original})
    try:
        for name, plan in gallery_plans(mae, tokens, images, names, ratio=ratio, seed=seed):
            if isinstance(plan, str):
                gallery.notes[name] = plan
                gallery.columns[name] = np.ones_like(original)
                continue
            guided = None if plan.guided is None else plan.guided.bool()  # [B, N]
            gallery.columns[name] = _hidden_picture(original, plan.mask, guided, grid, patch)
            gallery.masks[name] = plan.mask.detach().cpu().numpy()
            gallery.guided[name] = None if guided is None else guided.cpu().numpy()
    finally:
        mae.train(was)
    return gallery


def compose_gallery(gallery: Gallery, tile: int = 96) -> Image.Image:
    """Lay the gallery out as `compose_grid` does, a policy's note written in its blank column, and a
    footer for the two hidden shades when some policy chose patches by its scores (`plan.guided`)."""
    panels = Panels(gallery.columns, np.zeros(0), 1)
    grid = compose_grid(panels, tile)
    has_guided = any(g is not None and g.any() for g in gallery.guided.values())
    canvas = Image.new("RGB", (grid.width, grid.height + (FOOTER if has_guided else 0)), (255, 255, 255))
    canvas.paste(grid, (0, 0))
    draw = ImageDraw.Draw(canvas)
    rows = next(iter(gallery.columns.values())).shape[0]
    for name, note in gallery.notes.items():
        left, top, right, _ = tile_box(panels, 0, name, tile)
        bottom = tile_box(panels, rows - 1, name, tile)[3]
        width = max((right - left - 4) // 6, 1)  # PIL's default font: about 6 px per character
        lines = textwrap.wrap(f"not drawn: {note}", width)[: max((bottom - top - 4) // 11, 1)]
        box = Image.new("RGB", (right - left, bottom - top), (255, 255, 255))  # clips the text to the column
        box_draw = ImageDraw.Draw(box)
        for i, line in enumerate(lines):
            box_draw.text((2, 2 + 11 * i), line, fill=(120, 0, 0))
        canvas.paste(box, (left, top))
    if has_guided:
        x0, y0 = tile_box(panels, 0, "image", tile)[0], grid.height
        legend = ((GUIDED_RGB, "hidden: the top of the policy's scores"), (HIDDEN_RGB, "hidden: other"))
        for row, (rgb, text) in enumerate(legend):
            y = y0 + row * 13
            draw.rectangle([x0, y, x0 + 9, y + 9], fill=tuple(int(round(255 * c)) for c in rgb))
            draw.text((x0 + 13, y - 1), text, fill=(0, 0, 0))
    return canvas


def policy_gallery(
    mae: nn.Module,
    batcher: Batcher,
    pool: np.ndarray,
    names: list[str],
    *,
    ratio: float = 0.75,
    num_images: int = 8,
    tile: int = 96,
    seed: int = 0,
) -> tuple[Image.Image, dict[str, str]]:
    """The images column and one column per policy in `names`, all masking the same `num_images` images
    (drawn seeded from `pool`) at the same `ratio`; returns the picture and the notes of the policies
    that could not mask them (a note in their column instead of a failed picture; at the defaults of
    `maskkit visualize --policies all`, a 4x4 grid of 8x8 digits at ratio 0.75, every built-in draws)."""
    check_picture_size(tile, min(num_images, len(pool)), len(names) + 1)
    rng = np.random.default_rng(seed)
    index = np.sort(rng.choice(pool, size=min(num_images, len(pool)), replace=False))
    gallery = render_gallery(mae, batcher.images(index), batcher.mean, batcher.std, names, ratio=ratio, seed=seed)
    return compose_gallery(gallery, tile), dict(gallery.notes)
