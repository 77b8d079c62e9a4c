"""Small helpers the adapter kinds share when they parse a spec and build a model: absolute paths, a
seeded build that leaves the caller's RNG alone, the check of a built MAE's sizes, one-line messages."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from maskkit.mae import is_video_mae

from .adapter import BuildRequest


def absolute(path: str) -> Path:
    """`path` with ~ expanded, made absolute (a spec records absolute paths)."""
    return Path(path).expanduser().resolve()


def positive_int(value: Any) -> bool:
    """Whether `value` is an int > 0 (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    """`build()` right after `torch.manual_seed(seed)`, leaving the caller's CPU RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def check_built(req: BuildRequest, mae: Any) -> None:
    """One-line ValueError when the built model does not fit the requested patch size, images or channels."""
    spec, sizes, in_chans, patch_size = req.spec, req.sizes, req.in_chans, req.patch_size
    p = int(mae.patch_size)
    if patch_size is not None and p != patch_size:
        raise ValueError(
            f"{spec} builds patch size {p}, not the requested {patch_size} "
            "(a callable that does not name patch_size in its signature keeps its own)"
        )
    if is_video_mae(mae):
        frames, tube = mae.num_frames, mae.tubelet_size
        if req.num_frames is not None and frames != req.num_frames:
            raise ValueError(f"{spec} builds a model for clips of {frames} frames, not {req.num_frames}; pass "
                             f"--num-frames {frames} or a model for {req.num_frames}")  # fmt: skip
        if any(s % p for s in sizes) or frames % tube or mae.num_patches != (frames // tube) * (sizes[0] // p) * (
            sizes[1] // p
        ):
            raise ValueError(f"{spec} builds {mae.num_patches} tokens of {tube}x{p}x{p}, which does not fit clips of "
                             f"{frames} frames of {sizes[0]}x{sizes[1]}")  # fmt: skip
    elif any(s % p for s in sizes) or mae.num_patches != (sizes[0] // p) * (sizes[1] // p):
        raise ValueError(
            f"{spec} builds {mae.num_patches} patches of size {p}, which does not fit {sizes[0]}x{sizes[1]} images"
        )
    if mae.in_chans != in_chans:
        raise ValueError(f"{spec} builds a model for {mae.in_chans} channels, not {in_chans}")


def one_line(err: BaseException) -> str:
    """The first line of an error's message (its type's name when empty)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
