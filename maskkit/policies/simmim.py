"""SimMIM masking: hide random square groups of patches (Xie et al., CVPR 2022)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from maskkit.plan import MaskPlan
from maskkit.policies.base import MaskPolicy
from maskkit.policies.card import CardInfo
from maskkit.policies.learned import grid_side
from maskkit.policies.registry import register_policy

UNITS = ("tokens", "pixels")


@register_policy("simmim")
class SimMIMPolicy(MaskPolicy):
    """SimMIM masking: hide random square groups of patches (default ratio 0.6).

    Xie et al., "SimMIM: a Simple Framework for Masked Image Modeling", CVPR 2022.
    The square patch grid (S x S, N = S * S) is cut into square groups of g x g patches (SimMIM's
    "mask patch"; its default is 32 px, i.e. g = 2 tokens of a ViT-B/16), and whole groups are
    hidden at random. Grids that g does not divide get smaller edge groups: groups start at
    multiples of g, so the last row and column of groups are S mod g patches high or wide.

    Exact count. SimMIM hides ceil(G * ratio) whole groups, so its hidden count is a multiple of
    g * g; here exactly N - K patches are hidden (K = int(N * (1 - ratio)), as every policy):
    the groups are put in a random order (descending `noise`, one uniform per group) and hidden
    whole, in that order, while they fit; the first group that does not fit is hidden partly, its
    patches taken in row-major order (so the partial piece stays contiguous), until exactly N - K
    are hidden. The hidden set is therefore a union of whole groups plus at most one partial group;
    when g divides S and g * g divides N - K it is exactly (N - K) / g^2 uniformly drawn groups,
    SimMIM's own distribution. With g = 1 the plan equals `RandomPolicy`'s for the same noise.
    Visible patches are listed (`ids_keep`) in reverse draw order.

    Args:
        ratio: fraction of patches hidden, in (0, 1). Default 0.6 (SimMIM).
        mask_patch_size: side of a mask group, in `mask_patch_unit`. Default 2 (tokens).
        mask_patch_unit: "tokens" (default) or "pixels"; "pixels" (SimMIM's own unit, e.g. 32)
            needs `patch_size` and must be a multiple of it: the group side is then
            mask_patch_size // patch_size tokens.
        patch_size: the model's patch side in pixels, for mask_patch_unit="pixels". Default None.

    Randomness: `noise` fixes the draw, either [B, G] (uniforms, one per group, G = ceil(S / g)^2,
    groups row-major) or [B, N] (one per patch, as the other policies take it: each group then
    uses the value of its top-left patch); otherwise [B, G] uniforms are drawn from `generator`
    (or torch's global generator). The group side must be
    smaller than S (one group would hide the same patches every time).
    """

    card_info = CardInfo(
        paper="Xie et al., CVPR 2022",
        idea="SimMIM: hide random square groups of g x g patches",
        learns="nothing",
        allowed={"mask_patch_size": "int >= 1", "mask_patch_unit": "tokens | pixels",
                 "patch_size": "int >= 1 | None"},
    )

    def __init__(
        self,
        ratio: float = 0.6,
        mask_patch_size: int = 2,
        mask_patch_unit: str = "tokens",
        patch_size: int | None = None,
    ) -> None:
        super().__init__(ratio)
        if mask_patch_unit not in UNITS:
            raise ValueError(f"mask_patch_unit must be one of {UNITS}, got {mask_patch_unit!r}")
        if not _positive_int(mask_patch_size):
            raise ValueError(f"mask_patch_size must be a positive integer, got {mask_patch_size!r}")
        if mask_patch_unit == "pixels":
            if patch_size is None:
                raise ValueError(
                    "mask_patch_unit='pixels' needs patch_size (the model's patch side in pixels)"
                )
            if not _positive_int(patch_size):
                raise ValueError(f"patch_size must be a positive integer, got {patch_size!r}")
            if mask_patch_size % patch_size:
                raise ValueError(
                    f"mask_patch_size {mask_patch_size} px is not a multiple of patch_size {patch_size} px"
                )
            group = mask_patch_size // patch_size
        else:
            if patch_size is not None and not _positive_int(patch_size):
                raise ValueError(f"patch_size must be a positive integer, got {patch_size!r}")
            group = mask_patch_size
        self.mask_patch_size = mask_patch_size
        self.mask_patch_unit = mask_patch_unit
        self.patch_size = patch_size
        self.group_side = group  # g, in tokens

    def groups(self, side: int) -> Tensor:
        """Group index of each patch of a side x side grid, row-major: [side * side] (long)."""
        g = self.group_side
        if g >= side:
            raise ValueError(
                f"SimMIM group side {g} tokens must be smaller than the grid side {side} "
                "(lower mask_patch_size)"
            )
        per_side = math.ceil(side / g)
        coords = torch.arange(side) // g  # [S] group row / column of each patch row / column
        return (coords[:, None] * per_side + coords[None, :]).reshape(-1)  # [N]

    def anchors(self, side: int) -> Tensor:
        """Row-major index of each group's top-left patch, in group order: [G] (long)."""
        starts = torch.arange(0, side, self.group_side)  # [ceil(S / g)]
        return (starts[:, None] * side + starts[None, :]).reshape(-1)

    def make_plan(self, tokens: Tensor, ratio: float, *, noise: Tensor | None = None,
                  generator: torch.Generator | None = None, **context: Any) -> MaskPlan:
        batch, n = tokens.shape[:2]  # tokens: [B, N, D]
        self.refuse_space_time(context.get("grid"))
        side = grid_side(n)
        group_of = self.groups(side).to(tokens.device)  # [N]
        num_groups = math.ceil(side / self.group_side) ** 2  # G
        if noise is None:
            noise = torch.rand(batch, num_groups, device=tokens.device, generator=generator)  # [B, G]
        elif tuple(noise.shape) == (batch, n) and n != num_groups:
            noise = noise[:, self.anchors(side).to(noise.device)]  # [B, G] each group's top-left patch
        elif tuple(noise.shape) != (batch, num_groups):
            raise ValueError(
                f"noise must have shape {(batch, num_groups)} (one uniform per {self.group_side}x"
                f"{self.group_side} group) or {(batch, n)} (one per patch), got {tuple(noise.shape)}"
            )
        noise = noise.to(tokens.device)
        order = torch.argsort(noise, dim=1, descending=True)  # [B, G] groups in draw order
        group_rank = torch.argsort(order, dim=1)  # [B, G] draw position of each group
        patch_ids = torch.arange(n, device=tokens.device)  # [N]
        key = group_rank[:, group_of] * n + patch_ids  # [B, N] draw order, row-major inside a group
        position = torch.argsort(torch.argsort(key, dim=1), dim=1)  # [B, N] place of each patch in it
        scores = -position.to(torch.get_default_dtype())  # the first N - K drawn sort last: hidden
        return MaskPlan.from_scores(scores, ratio)

    def extra_repr(self) -> str:
        unit = self.mask_patch_unit
        extra = f", patch_size={self.patch_size}" if unit == "pixels" else ""
        return (
            f"ratio={self.ratio}, mask_patch_size={self.mask_patch_size}, mask_patch_unit={unit!r}{extra}, "
            f"group_side={self.group_side}"
        )


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0
