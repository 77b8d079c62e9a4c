"""The report's mask gallery: every arm's trained policy (its first seed's run) on the same test images.

One column per arm after the images: the patches each arm's policy hides, those it chose by its own
scores in one shade and the random ones in another (maskkit.visualize's two hidden shades). The images
are drawn (seeded) from the test split of the first arm's run; the runs of one seed share their splits.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from .report import Report

__all__ = ["draw_gallery"]


def draw_gallery(
    report: Report, path: str | Path, *, num_images: int = 6, tile: int | None = None, seed: int = 0
) -> Path | None:
    """Write the gallery PNG (None when no arm has a finished run directory); `tile` defaults to a side that
    fits the longest arm name in its column header (PIL's font: about 6 pixels a character)."""
    from maskkit.mae import is_video_mae
    from maskkit.run import load_run
    from maskkit.visualize import Gallery, check_picture_size, compose_gallery, render_panels

    runs = {}
    for arm in report.arms:
        first = next((r for r in sorted(arm.rows, key=lambda r: r.seed) if r.source != "recorded"), None)
        if first is not None and (Path(first.source) / "model.pt").is_file():
            runs[arm.arm] = Path(first.source)
    if not runs:
        return None
    device = torch.device("cpu")
    if tile is None:
        tile = min(160, max(72, 6 * max(len(name) for name in runs) + 8))
    first = load_run(next(iter(runs.values())), device, weights=False)
    pool = first.splits["test"]
    count = min(num_images, len(pool))
    check_picture_size(tile, count, len(runs) + 1)
    index = np.sort(np.random.default_rng(seed).choice(pool, size=count, replace=False))
    if is_video_mae(first.mae):
        return _draw_clip_gallery(runs, index, path, tile, seed)
    gallery = Gallery(columns={})
    for name, run_dir in runs.items():
        run = load_run(run_dir, device)
        generator = torch.Generator(device=device).manual_seed(seed)
        images = run.batcher.images(index)
        panels = render_panels(run.mae, run.policy, images, run.batcher.mean, run.batcher.std,
                               ratio=run.record.resolved.train.resolved.mask_ratio, generator=generator)  # fmt: skip
        gallery.columns.setdefault("image", panels.columns["image"])
        gallery.columns[name] = panels.columns["hidden"]
        gallery.masks[name] = panels.mask
        gallery.guided[name] = panels.guided
    return _save(compose_gallery(gallery, tile), path)


def _save(image: Any, path: str | Path) -> Path:
    """Write a PIL image as PNG, atomically."""
    from io import BytesIO

    from maskkit.checkpoint import atomic_write_bytes

    buffer = BytesIO()
    image.save(buffer, format="PNG")
    path = Path(path)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _draw_clip_gallery(runs: dict[str, Path], index: np.ndarray, path: str | Path, tile: int, seed: int) -> Path:
    """The gallery of a study on clips: frames x rows, the clips, then each arm's hidden tubes on them (its first
    seed's run and policy, at its run's ratio); guided tubes in the second shade."""
    from maskkit.data import denormalize
    from maskkit.mae import policy_context
    from maskkit.run import load_run
    from maskkit.visualize_clips import (
        _legend,
        check_clip_picture_size,
        clip_rgb,
        compose_frames,
        hidden_row,
    )

    device = torch.device("cpu")
    rows: dict[str, np.ndarray] = {}
    guided_any = False
    for name, run_dir in runs.items():
        run = load_run(run_dir, device)
        check_clip_picture_size(tile, len(index), len(runs) + 1, run.mae.num_frames)
        clips = run.batcher.images(index)  # [B, C, T, H, W]
        original = clip_rgb(denormalize(clips, run.batcher.mean, run.batcher.std))  # [B, T, H, W, 3]
        rows.setdefault("clip", original)
        generator = torch.Generator(device=device).manual_seed(seed)
        with torch.no_grad():
            tokens = run.mae.patch_tokens(clips)  # [B, N, D]
            plan = run.policy(tokens, ratio=run.record.resolved.train.resolved.mask_ratio,
                              **policy_context(run.mae, clips, generator=generator))  # fmt: skip
        grid, tubelet = tuple(run.mae.grid), (run.mae.tubelet_size, run.mae.patch_size)
        guided_any = guided_any or (plan.guided is not None and bool(plan.guided.any()))
        rows[name] = hidden_row(original, plan, grid, tubelet)
    image = compose_frames(rows, tile, legend=_legend(guided_any, False) if guided_any else None)
    return _save(image, path)
