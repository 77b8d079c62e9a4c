"""The tubelet layout of the MAE protocol for clips: one token per t x p x p block, its pixels ordered (t, p, p, C).

VideoMAE's `b c (t p0) (h p1) (w p2) -> b (t h w) (p0 p1 p2 c)`, which transformers' `VideoMAEForPreTraining` and
the official VideoMAE loop also use for their targets; every video adapter's `patchify` / `unpatchify` is this.
"""

from __future__ import annotations

from torch import Tensor


def patchify_clips(clips: Tensor, tubelet_size: int, patch_size: int) -> Tensor:
    """[B, C, T, H, W] -> [B, N, t*p*p*C], tokens row-major over (T/t, H/p, W/p) (time slowest)."""
    b, c, frames, h, w = clips.shape
    t, p = tubelet_size, patch_size
    x = clips.reshape(b, c, frames // t, t, h // p, p, w // p, p)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # [B, T', H', W', t, p, p, C]
    return x.reshape(b, (frames // t) * (h // p) * (w // p), t * p * p * c)


def unpatchify_clips(patches: Tensor, grid: tuple[int, int, int], tubelet_size: int, patch_size: int,
                     in_chans: int) -> Tensor:
    """Inverse of `patchify_clips`: [B, N, t*p*p*C] on the token grid (T', H', W') -> [B, C, T, H, W]."""
    (gt, gh, gw), t, p, c = grid, tubelet_size, patch_size, in_chans
    x = patches.reshape(patches.shape[0], gt, gh, gw, t, p, p, c)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # [B, C, T', t, H', p, W', p]
    return x.reshape(patches.shape[0], c, gt * t, gh * p, gw * p)
