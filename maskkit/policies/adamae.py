"""AdaMAE adaptive masking: a sampling network picks the visible tokens (Bandara et al., CVPR 2023)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from maskkit.plan import MaskPlan
from maskkit.policies.base import MaskPolicy
from maskkit.policies.card import CardInfo
from maskkit.policies.learned import gumbel_from_uniform
from maskkit.policies.registry import register_policy
from maskkit.policies.scored import uniform_noise
from maskkit.policies.token_scorer import TokenScorer


@register_policy("adamae")
class AdaMAEPolicy(MaskPolicy):
    """AdaMAE: visible tokens sampled from a learned categorical distribution, trained by REINFORCE.

    Bandara et al., "AdaMAE: Adaptive Masking for Efficient Spatiotemporal Learning with Masked
    Autoencoders", CVPR 2023.

    Sampling network: a `TokenScorer`, one MLP shared by all tokens (the token MLP of
    `LearnedMasker`): LayerNorm(token, no affine) concatenated with a fixed 2-D sin-cos position
    code of width `pos_dim` -> Linear(D + pos_dim, hidden_dim) -> GELU -> Linear(hidden_dim, 1), one
    logit per token; p = softmax over the N tokens of an image. (AdaMAE's network is a small MHA block with a
    linear head; this one sees each token alone.) Tokens are detached first: the MAE gets no
    gradient through the sampler.

    Sampling: K = int(N * (1 - ratio)) VISIBLE tokens are drawn from p without replacement (as
    AdaMAE's torch.multinomial), by Gumbel-top-k: the K largest log p_i + G_i are visible, with G
    standard Gumbel noise from `noise` [B, N] (uniforms) or `generator`, so the same noise gives
    the same plan. `plan.scores` holds log p [B, N], attached to the sampler's graph (not the
    sorted key, which is -(log p + G)); `plan.weights` and `plan.probs` are None (the MAE's loss is
    unweighted and p is a visibility, not a masking, probability).

    Objective (`aux_loss`): AdaMAE's sampling loss
        L_s = -loss_weight * mean over hidden tokens of log p_i * stopgrad(l_i),
    l the MAE's per-patch reconstruction loss; minimising it raises p where the error is high, so
    high-error tokens become more likely VISIBLE. The mean runs over all hidden tokens of the batch
    (every image hides the same number, so this equals AdaMAE's per-image mean then batch mean).
    Call it with the plan as returned (`plan.detach()` cuts log p from the graph).

    The network needs the token width D: give `embed_dim`, or let `bind(embed_dim=..., num_patches=...)`
    (called by `use_policy`) build it, or, failing both, it is built at the first forward from the
    tokens' width, on their device. Build it before making the optimizer or loading a state_dict
    (a policy without a network has no parameters). `learnable` is False: it is not trained by
    downstream feedback (MLO), only by `aux_loss`.

    Args:
        ratio: fraction of tokens hidden, in (0, 1). Default 0.75 (image MAE; AdaMAE uses 0.95 on video).
        embed_dim: token width D, or None to build the network in `bind` / at the first forward.
        hidden_dim: MLP width. Default 128.
        pos_dim: width of the sin-cos position code (a multiple of 4; 0 for none; > 0 needs a
            square grid). Default 32.
        loss_weight: weight of the sampling loss. Default 1e-4 (AdaMAE).
    """

    card_info = CardInfo(
        paper="Bandara et al., CVPR 2023",
        idea="AdaMAE: a sampling network picks the visible patches, trained by REINFORCE toward high-error ones",
        learns="reconstruction",
    )

    learnable = False

    def __init__(
        self,
        ratio: float = 0.75,
        embed_dim: int | None = None,
        hidden_dim: int = 128,
        pos_dim: int = 32,
        loss_weight: float = 1e-4,
    ) -> None:
        super().__init__(ratio)
        if isinstance(loss_weight, bool) or not isinstance(loss_weight, (int, float)) or not loss_weight >= 0:
            raise ValueError(f"loss_weight must be a non-negative number, got {loss_weight!r}")
        self.sampler = TokenScorer(embed_dim, hidden_dim, pos_dim, owner="AdaMAE sampler")
        self.loss_weight = float(loss_weight)

    def bind(self, *, embed_dim: int, num_patches: int | None = None) -> None:
        """Build the network for tokens of width `embed_dim` (or check that it matches)."""
        self.sampler.bind(embed_dim=embed_dim, num_patches=num_patches)

    def logits(self, tokens: Tensor, grid: tuple[int, ...] | None = None) -> Tensor:
        """Sampling logits [B, N] of patch tokens [B, N, D] (detached) on the token `grid`; builds the network if
        needed."""
        self.token_grid(tokens)
        return self.sampler(tokens, grid)

    def log_probs(self, tokens: Tensor, grid: tuple[int, ...] | None = None) -> Tensor:
        """log p [B, N]: the log-softmax over each image's tokens of the sampling logits."""
        return torch.log_softmax(self.logits(tokens, grid), dim=-1)

    def make_plan(self, tokens: Tensor, ratio: float, *, noise: Tensor | None = None,
                  generator: torch.Generator | None = None, **context: Any) -> MaskPlan:
        batch, n = tokens.shape[:2]  # tokens: [B, N, D]
        log_p = self.log_probs(tokens, context.get("grid"))  # [B, N] attached to the sampler
        noise = uniform_noise(noise, batch, n, log_p.device, generator, dtype=log_p.dtype)  # [B, N]
        perturbed = log_p.detach() + gumbel_from_uniform(noise.to(log_p))  # [B, N]; the K largest are visible
        plan = MaskPlan.from_scores(-perturbed, ratio)  # from_scores keeps the K lowest visible
        return replace(plan, scores=log_p, mask=plan.mask.to(torch.get_default_dtype()))

    def aux_loss(self, plan: MaskPlan, per_patch: Tensor) -> Tensor:
        """AdaMAE's sampling loss -w * sum(log p * l * mask) / sum(mask) (l detached): a scalar."""
        if plan.scores is None:
            raise ValueError("AdaMAE aux_loss needs the plan's log-probabilities in plan.scores (got None)")
        log_p = plan.scores  # [B, N]
        if per_patch.shape != log_p.shape:
            raise ValueError(
                f"per_patch loss must have the plan's shape {tuple(log_p.shape)}, "
                f"got {tuple(per_patch.shape)}"
            )
        mask = plan.target_mask.to(log_p.dtype)  # [B, N] 1 = hidden and reconstructed (the decoder's subset)
        loss = per_patch.detach().to(log_p.dtype)  # [B, N]
        return -self.loss_weight * (log_p * loss * mask).sum() / mask.sum()

    def diagnostics(self, plan: MaskPlan, per_patch: Tensor) -> dict[str, float]:
        """adamae_entropy: mean entropy of p over the batch, divided by log N (1 = uniform)."""
        if plan.scores is None:
            return {}
        log_p = plan.scores.detach().float()  # [B, N]
        entropy = -(log_p.exp() * log_p).sum(dim=-1).mean()
        return {"adamae_entropy": float(entropy / torch.log(torch.tensor(float(log_p.shape[-1]))))}

    def extra_repr(self) -> str:
        return f"ratio={self.ratio}, loss_weight={self.loss_weight}"
