"""MaskPolicy: the one interface every masking strategy implements."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from maskkit.plan import MaskPlan, check_ratio


class MaskPolicy(nn.Module):
    """Decides which patches to hide: `policy(tokens [B, N, D], *, ratio=None, **context) -> MaskPlan`.

    An `nn.Module`, so learned policies carry parameters, `state_dict`, `.to()` and DDP.
    `ratio` is set per policy and may be overridden per call. Context keys a policy may read:
    `images` [B, C, H, W], `encoder` (an object with `cls_attention(images) -> [B, N]`),
    `attention` [B, N] (precomputed scores), `generator` (torch.Generator), `noise` [B, N]
    (fixes the random draw, as Hugging Face's ViTMAE `noise=`). Unknown keys are ignored.
    """

    #: whether the policy has parameters trained by downstream feedback (the MLO engine).
    learnable: bool = False

    def __init__(self, ratio: float = 0.75) -> None:
        super().__init__()
        self.ratio = check_ratio(ratio)

    def resolve_ratio(self, ratio: float | None, num_patches: int) -> float:
        """The per-call ratio if given, else the policy's own; validated against N."""
        return check_ratio(self.ratio if ratio is None else ratio, num_patches)

    @staticmethod
    def token_grid(tokens: Tensor) -> tuple[int, int]:
        """(B, N) of patch tokens [B, N, D], or ValueError naming the shape."""
        if not isinstance(tokens, Tensor) or tokens.dim() != 3:
            raise ValueError(f"tokens must be [B, N, D], got shape {tuple(getattr(tokens, 'shape', ()))}")
        return tokens.shape[0], tokens.shape[1]

    def forward(self, tokens: Tensor, *, ratio: float | None = None, **context: Any) -> MaskPlan:  # noqa: D102
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"ratio={self.ratio}"
