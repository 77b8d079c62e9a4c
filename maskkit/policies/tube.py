"""Tube masking (VideoMAE): one spatial mask per clip, the same on every time slice of the token grid."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from maskkit.plan import MaskPlan
from maskkit.policies.base import MaskPolicy
from maskkit.policies.card import CardInfo
from maskkit.policies.registry import register_policy


def tube_counts(grid: tuple[int, ...], ratio: float) -> tuple[int, int, int]:
    """(T', S, h) of a token grid: time slices (1 for an image grid), tokens per slice S = H'W', and the h =
    int(ratio x S) hidden in every slice (VideoMAE's `num_masks_per_frame`), or a one-line ValueError when h
    hides none or all of a slice."""
    frames, space = (grid[0], grid[1] * grid[2]) if len(grid) == 3 else (1, grid[0] * grid[1])
    hidden = int(ratio * space)
    if not 1 <= hidden <= space - 1:
        raise ValueError(f"mask ratio {ratio} hides {hidden} of the {space} tokens of a time slice; tube masking "
                         "needs at least one hidden and one visible")  # fmt: skip
    return frames, space, hidden


def tube_plan(hide: Tensor, frames: int) -> MaskPlan:
    """The plan hiding the spatial positions `hide` [B, S] (bool, the same count per clip) on every one of `frames`
    time slices; the visible tokens are kept in patch order (as VideoMAE's encoder takes `x[~mask]`)."""
    batch, space = hide.shape
    n = frames * space
    hidden_tokens = hide.repeat(1, frames).to(torch.float64)  # [B, N] time slowest: slice t is columns t*S..
    order = torch.arange(n, dtype=torch.float64, device=hide.device) / n  # [N] in [0, 1): patch order
    keep = n - int(hidden_tokens[0].sum())
    plan = MaskPlan.from_scores(2.0 * hidden_tokens + order, 1.0 - (keep + 0.5) / n)  # exactly `keep` visible
    return MaskPlan(plan.ids_keep, plan.ids_restore, plan.mask.to(torch.get_default_dtype()), scores=plan.scores)


def shuffled_slice_masks(rng: Any, batch: int, space: int, hidden: int) -> np.ndarray:
    """VideoMAE's `TubeMaskingGenerator` draw for `batch` clips from a numpy stream: per clip the vector of S - h
    zeros then h ones, shuffled by `rng.shuffle` (pass `numpy.random` for its global stream): [B, S] bool."""
    rows = []
    for _ in range(batch):
        row = np.hstack([np.zeros(space - hidden), np.ones(hidden)])
        rng.shuffle(row)
        rows.append(row)
    return np.stack(rows).astype(bool)


def top_positions(noise: Tensor, count: int) -> Tensor:
    """[B, S] bool: the `count` highest entries of each row of `noise` [B, S]."""
    hide = torch.zeros(noise.shape, dtype=torch.bool, device=noise.device)
    return hide.scatter(1, torch.topk(noise, count, dim=1).indices, True)


def slice_noise(noise: Tensor | None, batch: int, n: int, space: int, device: Any,
                generator: torch.Generator | None) -> Tensor:
    """Uniforms [B, S] ranking a time slice's positions: the first slice of a given `noise` [B, N] (the trainer's
    keyed noise), else a fresh draw from `generator`."""
    if noise is None:
        return torch.rand(batch, space, device=device, generator=generator)  # [B, S]
    if tuple(noise.shape) != (batch, n):
        raise ValueError(f"noise must have shape {(batch, n)}, got {tuple(noise.shape)}")
    return noise[:, :space].to(device)  # [B, S]


@register_policy("tube")
class TubePolicy(MaskPolicy):
    """Tube masking (VideoMAE, Tong et al., NeurIPS 2022): the same h = int(ratio x H'W') spatial positions are
    hidden on every time slice of the (T', H', W') token grid, so a hidden patch cannot be copied from the next
    frame. K = T' x (H'W' - h) tokens stay visible (`num_visible`), as VideoMAE counts them.

    Randomness: the h positions are a uniformly random subset of each clip's slice, drawn from `generator` (or
    ranked by the first slice of a given `noise` [B, N]: the h highest are hidden). To reproduce VideoMAE's own
    masks exactly, pass a numpy stream as the context key `numpy_rng` (e.g. `numpy.random`, or a
    `numpy.random.RandomState`): each clip's mask is then `TubeMaskingGenerator`'s draw, the vector of S - h zeros
    and h ones shuffled by that stream. On an image grid (H', W') it is random masking of h = int(ratio x N).
    """

    card_info = CardInfo(
        paper="Tong et al., NeurIPS 2022 (VideoMAE)",
        idea="VideoMAE's tube masking: one random spatial mask repeated on every time slice",
        learns="nothing",
    )

    def __init__(self, ratio: float = 0.9) -> None:
        super().__init__(ratio)

    def num_visible(self, num_patches: int, ratio: float | None = None, grid: tuple[int, ...] | None = None) -> int:
        """K = T' x (H'W' - int(ratio x H'W')) (a square N without a grid: one slice of N tokens)."""
        ratio = self.resolve_ratio(ratio, num_patches)
        frames, space, hidden = tube_counts(self.grid_of(num_patches, {"grid": grid}), ratio)
        return frames * (space - hidden)

    def make_plan(self, tokens: Tensor, ratio: float, *, noise: Tensor | None = None,
                  generator: torch.Generator | None = None, **context: Any) -> MaskPlan:
        batch, n = tokens.shape[:2]  # tokens: [B, N, D]
        frames, space, hidden = tube_counts(self.grid_of(n, context), ratio)
        rng = context.get("numpy_rng")
        if rng is not None:
            hide = torch.from_numpy(shuffled_slice_masks(rng, batch, space, hidden)).to(tokens.device)  # [B, S]
        else:
            hide = top_positions(slice_noise(noise, batch, n, space, tokens.device, generator), hidden)  # [B, S]
        return tube_plan(hide, frames)
