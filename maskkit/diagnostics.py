"""Collapse diagnostics of masks: numbers that show a one-rule mask forming long before a probe does.

A learned masker that collapses hides the same patches in every image (high IoU between images,
per-position hiding frequencies near 0 or 1) and separates its logits far beyond its sampling
noise. Random masking gives the reference values (IoU about r / (2 - r) for ratio r, entropy
about 1). All functions take the plan's tensors and return floats; none draws random numbers.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from maskkit.plan import MaskPlan


def mask_iou(mask: Tensor) -> float:
    """Mean IoU of the hidden sets of every pair of distinct images in a batch: mask [B, N] (1 = hidden).

    1.0 when every image hides the same patches; for uniform random masking with ratio r,
    about r / (2 - r) (0.6 at r = 0.75). NaN for a batch of one image.
    """
    m = mask.detach().double()  # [B, N]
    batch = m.shape[0]
    if batch < 2:
        return float("nan")
    inter = m @ m.T  # [B, B] |h_a & h_b|
    sizes = m.sum(dim=1)  # [B]
    union = sizes[:, None] + sizes[None, :] - inter  # [B, B]
    iou = inter / union.clamp_min(1e-12)
    off = ~torch.eye(batch, dtype=torch.bool, device=m.device)
    return float(iou[off].mean())


def binary_entropy(p: Tensor) -> Tensor:
    """Entropy in nats of Bernoulli(p), elementwise (0 at p = 0 or 1)."""
    p = p.double()
    q = 1 - p
    return -(torch.xlogy(p, p) + torch.xlogy(q, q))


def position_entropy(mask: Tensor) -> float:
    """Normalised entropy of the per-position hiding frequency over a batch: mask [B, N].

    With f_n the fraction of images hiding patch n and r the mean of f, this is
    mean_n H(f_n) / H(r) (H the binary entropy): 1 when every position is hidden equally often
    (r), 0 when each position is always or never hidden (one rule for every image).
    """
    f = mask.detach().double().mean(dim=0)  # [N]
    r = f.mean()
    top = float(binary_entropy(r))
    if top <= 0:
        return float("nan")
    return float(binary_entropy(f).mean()) / top


def logit_spread(scores: Tensor) -> float:
    """Within-image standard deviation of a learned scorer's logits [B, N], averaged over the batch."""
    s = scores.detach().double()
    return float(s.std(dim=1).mean()) if s.shape[1] > 1 else 0.0


def plan_diagnostics(policy: Any, plan: MaskPlan, per_patch: Tensor | None = None) -> dict[str, float]:
    """The collapse diagnostics of one plan, plus the policy's own (`policy.diagnostics`).

    mask_iou and mask_pos_entropy for every plan; logit_spread when the policy's scores are a
    trained network's (`learned_scores`); e.g. hpm_rank_corr from the policy given per-patch losses.
    """
    out = {"mask_iou": mask_iou(plan.mask), "mask_pos_entropy": position_entropy(plan.mask)}
    if getattr(policy, "learned_scores", False) and plan.scores is not None:
        out["logit_spread"] = logit_spread(plan.scores)
    if per_patch is not None and callable(getattr(policy, "diagnostics", None)):
        out.update(policy.diagnostics(plan, per_patch))
    return {k: v for k, v in out.items() if not (isinstance(v, float) and math.isnan(v))}
