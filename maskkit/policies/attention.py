"""Attention-guided masking after AttMask ("What to Hide from Your Students", ECCV 2022).

Patches are ranked by the CLS-to-patch attention of an encoder's last block (averaged over
heads): `high` hides the most-attended patches, `low` the least-attended, and `hint` hides the
most-attended but reveals a random few of them as hints.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from maskkit.plan import num_visible
from maskkit.policies.base import check_fraction
from maskkit.policies.card import CardInfo
from maskkit.policies.registry import register_policy
from maskkit.policies.scored import ScoredPolicy, uniform_noise

MODES = ("high", "low", "hint")


def num_hints(num_patches: int, keep: int, hint_ratio: float) -> int:
    """Hints revealed by `hint` mode: round(hint_ratio * (N - K)), at most K (the swap partners)."""
    return min(round(hint_ratio * (num_patches - keep)), keep)


@register_policy("attention")
class AttentionPolicy(ScoredPolicy):
    """Attention-guided masking (AttMask): hide the most (`high`) or least (`low`) attended patches.

    Scores come from `attention` [B, N] if given (CLS-to-patch attention averaged over heads),
    else from `encoder.cls_attention(images)`, computed without grad. The policy knows nothing of
    models beyond that one method.

    `hint` mode, with H = N - K hidden and h = round(hint_ratio * H) hints (at most K): the top-H
    attended patches are the candidates; h of them, drawn uniformly at random, are revealed, and
    the h most-attended of the remaining patches (attention ranks H .. H + h - 1) are hidden
    instead, so exactly N - K patches stay hidden. AttMask itself reveals int(show_ratio * N)
    random patches of the top `show_max` fraction and lets the hidden count drop; keeping the
    count exact keeps the MAE's K fixed and the loss comparable across policies.

    Args:
        ratio: fraction of patches hidden, in (0, 1). Default 0.75 (MAE).
        mode: "high", "low" or "hint". Default "high" (AttMask-High).
        hint_ratio: fraction of the hidden patches revealed as hints in `hint` mode, in [0, 1).
            Default 0.1 (AttMask's hint setting).
        guided_fraction: share of the hidden patches chosen by attention, in [0, 1]; the rest are
            uniformly random (`ScoredPolicy`). Default 1.0 (AttMask: all of them).
        guided_ramp: the guided share rises from 0 over this first fraction of training, in [0, 1].
            Default 0.0 (no ramp).
    """

    card_info = CardInfo(
        paper="Kakogeorgiou et al., ECCV 2022",
        idea="AttMask: hide the patches the encoder's CLS token attends to most (high), least (low), or most with hints",
        learns="nothing",
        allowed={"mode": "high | low | hint", "hint_ratio": "[0, 1)"},
    )

    def __init__(
        self,
        ratio: float = 0.75,
        mode: str = "high",
        hint_ratio: float = 0.1,
        guided_fraction: float = 1.0,
        guided_ramp: float = 0.0,
    ) -> None:
        super().__init__(ratio, guided_fraction, guided_ramp)
        if mode not in MODES:
            raise ValueError(f"attention mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.hint_ratio = check_fraction("hint_ratio", hint_ratio, include_one=False)

    def score(
        self,
        tokens: Tensor,
        *,
        attention: Tensor | None = None,
        encoder: Any = None,
        images: Tensor | None = None,
        **context: Any,
    ) -> Tensor:
        """CLS attention [B, N] (`high`, `hint`) or its negative (`low`): the hidden-first ranking."""
        batch, n = self.token_grid(tokens)  # tokens: [B, N, D]
        attn = self._scores(batch, n, attention, encoder, images)  # [B, N]
        return -attn if self.mode == "low" else attn

    def selection_key(self, scores: Tensor, *, ratio: float, noise: Tensor | None,
                      generator: torch.Generator | None) -> Tensor:
        if self.mode == "hint":
            return self._hint_scores(scores, ratio, generator, noise)
        return scores

    def _scores(
        self, batch: int, n: int, attention: Tensor | None, encoder: Any, images: Tensor | None
    ) -> Tensor:
        """CLS-to-patch attention [B, N], given or read from the encoder without grad."""
        if attention is None:
            if encoder is None or images is None:
                raise ValueError(
                    "the attention policy needs `attention` [B, N] or both `encoder` "
                    "(with cls_attention(images)) and `images` in its context"
                )
            if not callable(getattr(encoder, "cls_attention", None)):
                raise TypeError(f"encoder {type(encoder).__name__} has no cls_attention(images) method")
            with torch.no_grad():
                attention = encoder.cls_attention(images)
        if not isinstance(attention, Tensor) or tuple(attention.shape) != (batch, n):
            shape = tuple(attention.shape) if isinstance(attention, Tensor) else type(attention).__name__
            raise ValueError(f"attention must be a tensor of shape {(batch, n)}, got {shape}")
        attention = attention.detach()
        return attention if attention.is_floating_point() else attention.float()

    def _hint_scores(
        self, attn: Tensor, ratio: float, generator: torch.Generator | None, noise: Tensor | None
    ) -> Tensor:
        """Scores [B, N] that sort kept patches first under the exact-count hint rule."""
        batch, n = attn.shape
        keep = num_visible(n, ratio)
        hidden = n - keep
        hints = num_hints(n, keep, self.hint_ratio)
        noise = uniform_noise(noise, batch, n, attn.device, generator)  # [B, N]
        order = torch.argsort(attn, dim=1, descending=True)  # [B, N] most attended first
        rank = torch.argsort(order, dim=1)  # [B, N] attention rank of each patch (0 = most)
        is_hidden = rank < hidden  # [B, N] AttMask-High set
        if hints > 0:
            # reveal the `hints` candidates with the lowest noise ...
            cand_noise = noise.to(attn.device).masked_fill(~is_hidden, float("inf"))
            revealed = torch.topk(cand_noise, hints, dim=1, largest=False).indices  # [B, h]
            is_hidden = is_hidden.scatter(1, revealed, False)
            # ... and hide the next-most-attended patches instead, keeping N - K hidden
            is_hidden = is_hidden | ((rank >= hidden) & (rank < hidden + hints))
        # hidden patches sort last; within each group the less attended sort first (exact integers)
        dtype = attn.dtype if attn.dtype in (torch.float32, torch.float64) else torch.float32
        return (is_hidden.long() * n + (n - 1 - rank)).to(dtype)

    def extra_repr(self) -> str:
        hint = f", hint_ratio={self.hint_ratio}" if self.mode == "hint" else ""
        return f"ratio={self.ratio}, mode={self.mode!r}{hint}, {self.guided_repr()}"
