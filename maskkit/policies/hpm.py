"""Hard Patches Mining (HPM; Wang et al., "Hard Patches Mining for Masked Image Modeling", CVPR 2023).

A small per-token scorer predicts how hard each patch is to reconstruct; part of every mask hides
the patches predicted hardest, the rest is uniformly random, and the hard part ramps up from 0
over training (HPM: alpha_t rises linearly to 0.5). The scorer learns without labels, from the
MAE's own per-patch losses of the hidden patches (detached), by HPM's relative loss: for hidden
pairs with l_j > l_i, -log sigmoid(s_j - s_i), i.e. it learns the order of the losses, not their
scale. Unlike HPM, the scorer reads the patch tokens (patch + position embedding) rather than the
decoder's output on the full image, so there is no extra encoder pass.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from maskkit.plan import MaskPlan
from maskkit.policies.card import CardInfo
from maskkit.policies.registry import register_policy
from maskkit.policies.scored import ScoredPolicy
from maskkit.policies.token_scorer import TokenScorer

LOSSES = ("rank", "mse")


def hidden_values(values: Tensor, mask: Tensor) -> Tensor:
    """The entries of values [B, N] at each image's hidden patches, in patch order: [B, H]."""
    hidden = int(mask[0].sum().item())
    order = torch.argsort(mask, dim=1, descending=True, stable=True)[:, :hidden]  # [B, H] hidden first
    return torch.gather(values, 1, torch.sort(order, dim=1).values)


def ranking_loss(scores: Tensor, losses: Tensor) -> Tensor:
    """HPM's relative loss: mean over pairs (i, j) of one image with l_j > l_i of -log sigmoid(s_j - s_i).

    scores, losses: [B, H] (hidden patches). Pairs with equal losses do not count; 0 when none is left.
    """
    diff_s = scores.unsqueeze(1) - scores.unsqueeze(2)  # [B, H, H]: s_j - s_i at [b, i, j]
    harder = losses.unsqueeze(1) > losses.unsqueeze(2)  # [B, H, H]: l_j > l_i
    count = harder.sum()
    if count == 0:
        return scores.sum() * 0.0
    return (F.softplus(-diff_s) * harder).sum() / count


def zscore_mse_loss(scores: Tensor, losses: Tensor, eps: float = 1e-6) -> Tensor:
    """HPM's absolute alternative: mean squared error between s and each image's z-scored losses. [B, H]."""
    z = (losses - losses.mean(dim=1, keepdim=True)) / (losses.std(dim=1, keepdim=True) + eps)
    return ((scores - z) ** 2).mean()


def rank_correlation(a: Tensor, b: Tensor) -> float:
    """Spearman's rank correlation of a and b [B, H] along dim 1, averaged over the batch (ties in arbitrary order)."""
    ra = torch.argsort(torch.argsort(a, dim=1), dim=1).double()
    rb = torch.argsort(torch.argsort(b, dim=1), dim=1).double()
    ra = ra - ra.mean(dim=1, keepdim=True)
    rb = rb - rb.mean(dim=1, keepdim=True)
    denom = (ra.norm(dim=1) * rb.norm(dim=1)).clamp_min(1e-12)
    return float(((ra * rb).sum(dim=1) / denom).mean())


@register_policy("hpm")
class HPMPolicy(ScoredPolicy):
    """Hard Patches Mining (HPM, CVPR 2023): hide the patches a scorer predicts hardest, half of each mask random.

    The scorer is a `TokenScorer`, the learned masker's token MLP (LayerNorm(token) + sin-cos
    position code -> Linear -> GELU -> Linear -> one score per patch), reading detached patch tokens. Its `aux_loss`
    is HPM's ranking loss (or the z-scored MSE) on the hidden patches' detached per-patch losses;
    `maskkit pretrain`, `MLOEngine` and `use_policy` add it to the MAE loss and train the scorer.

    Args:
        ratio: fraction of patches hidden, in (0, 1). Default 0.75.
        guided_fraction: share of the hidden patches that are the predicted hardest (top-k of the
            scores), in [0, 1]; the rest are uniformly random. Default 0.5 (HPM's alpha_max).
        guided_ramp: the share rises linearly from 0 over this first fraction of training (context
            `progress`). Default 1.0 (HPM: over the whole run).
        embed_dim: token width D, or None to take it from the MAE (`bind`, called by `use_policy`,
            or the first call). Default None.
        num_patches: N, or None for any square grid. Default None.
        hidden_dim: the scorer's hidden width. Default 128.
        pos_dim: width of the scorer's sin-cos position code (multiple of 4; 0 for none). Default 32.
        loss: "rank" (HPM's relative loss) or "mse" (z-scored losses). Default "rank".
        loss_weight: weight of the scorer's loss added to the reconstruction loss. Default 1.0 (HPM).
    """

    card_info = CardInfo(
        paper="Wang et al., CVPR 2023",
        idea="HPM: a scorer predicts each patch's reconstruction loss; hide the predicted-hardest, the rest random",
        learns="reconstruction",
        allowed={"loss": "rank | mse"},
    )

    learned_scores = True

    def __init__(
        self,
        ratio: float = 0.75,
        guided_fraction: float = 0.5,
        guided_ramp: float = 1.0,
        embed_dim: int | None = None,
        num_patches: int | None = None,
        hidden_dim: int = 128,
        pos_dim: int = 32,
        loss: str = "rank",
        loss_weight: float = 1.0,
    ) -> None:
        super().__init__(ratio, guided_fraction, guided_ramp)
        if loss not in LOSSES:
            raise ValueError(f"hpm loss must be one of {LOSSES}, got {loss!r}")
        if isinstance(loss_weight, bool) or not isinstance(loss_weight, (int, float)) or loss_weight < 0:
            raise ValueError(f"loss_weight must be a non-negative number, got {loss_weight!r}")
        self.scorer = TokenScorer(embed_dim, hidden_dim, pos_dim, num_patches, owner="hpm scorer")
        self.loss, self.loss_weight = loss, float(loss_weight)

    def bind(self, *, embed_dim: int, num_patches: int | None = None) -> None:
        """Build the scorer for tokens of width `embed_dim` (once; a different width is refused)."""
        self.scorer.bind(embed_dim=embed_dim, num_patches=num_patches)

    def score(self, tokens: Tensor, **context: Any) -> Tensor:
        """Predicted reconstruction difficulty [B, N] of patch tokens [B, N, D] (read detached)."""
        self.token_grid(tokens)
        return self.scorer(tokens, context.get("grid"))

    def aux_loss(self, plan: MaskPlan, per_patch: Tensor) -> Tensor | None:
        """loss_weight x (ranking or z-scored MSE loss) of the scores against the hidden patches' losses."""
        if plan.scores is None:
            raise ValueError("hpm aux_loss needs the plan this policy made (its scores are missing)")
        target = plan.target_mask  # [B, N] the hidden patches the loss covers (the decoder's subset, when named)
        scores = hidden_values(plan.scores, target)  # [B, H]
        losses = hidden_values(per_patch.detach().to(scores.dtype), target)  # [B, H]
        fn = ranking_loss if self.loss == "rank" else zscore_mse_loss
        return self.loss_weight * fn(scores, losses)

    def diagnostics(self, plan: MaskPlan, per_patch: Tensor) -> dict[str, float]:
        """hpm_rank_corr: Spearman correlation of predicted scores and actual losses on the hidden patches."""
        if plan.scores is None:
            return {}
        target = plan.target_mask
        scores = hidden_values(plan.scores.detach(), target)
        return {"hpm_rank_corr": rank_correlation(scores, hidden_values(per_patch.detach().to(scores.dtype), target))}

    def extra_repr(self) -> str:
        return f"ratio={self.ratio}, {self.guided_repr()}, loss={self.loss!r}, loss_weight={self.loss_weight}"
