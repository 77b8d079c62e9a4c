"""ScoredPolicy: rank patches by a score and hide the top ones, with part of the hidden set left random.

Every published learned or adaptive masking method that beats random masking keeps part of each
mask random and ramps its guidance up from zero (HPM, CL-MAE, SemMAE, AutoMAE). This base class
gives that device to every policy that ranks patches by a score: attention, learned, hpm and
third-party ones, which implement only `score`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from maskkit.plan import MaskPlan, guided_fraction_at, num_guided, num_visible
from maskkit.policies.base import MaskPolicy, check_fraction


def uniform_noise(noise: Tensor | None, batch: int, n: int, device: Any, generator: torch.Generator | None,
                  dtype: torch.dtype | None = None) -> Tensor:
    """The given noise [B, N] (shape checked) or a fresh uniform draw, exactly as the `random` policy draws it."""
    if noise is None:
        return torch.rand(batch, n, device=device, generator=generator, dtype=dtype)  # [B, N]
    if tuple(noise.shape) != (batch, n):
        raise ValueError(f"noise must have shape {(batch, n)}, got {tuple(noise.shape)}")
    return noise


class ScoredPolicy(MaskPolicy):
    """A policy that hides the patches its `score` ranks highest, mixed with uniform random masking.

    Guided fraction alpha (`guided_fraction`): of the N - K hidden patches, round(alpha (N - K))
    (half up) are chosen by the policy's rule (the top of `selection_key`: top-k of the scores, or
    a sampled rule such as Gumbel-top-k); the rest are drawn uniformly from the remaining patches
    with `noise` / `generator` exactly as `random` draws them, so alpha = 0 gives the `random`
    plan bit for bit. Ramp rho (`guided_ramp`): alpha rises linearly from 0 to its value over the
    first rho of training, read from the context key `progress` in [0, 1] (HPM: rho = 1); without
    `progress` alpha is at its full value. `plan.guided` marks the guided patches.

    Random draws: the random part draws first (from `noise` if given); a rule with its own draw
    (Gumbel, AttMask hints) then draws from `generator`. With alpha = 1 there is no random part
    and `noise` feeds the rule's own draw, as before guided fractions existed.

    Subclasses implement `score(tokens, **context) -> [B, N]` (higher = hidden first) and may
    override `selection_key` (the rule) and `finish` (e.g. loss weights from the scores).
    """

    #: whether the scores are a trained network's outputs (logged as `logit_spread`).
    learned_scores: bool = False

    def __init__(self, ratio: float = 0.75, guided_fraction: float = 1.0, guided_ramp: float = 0.0) -> None:
        super().__init__(ratio)
        self.guided_fraction = check_fraction("guided_fraction", guided_fraction)
        self.guided_ramp = check_fraction("guided_ramp", guided_ramp)

    def score(self, tokens: Tensor, **context: Any) -> Tensor:
        """Per-patch scores [B, N] of tokens [B, N, D]; the highest are hidden first."""
        raise NotImplementedError

    def selection_key(self, scores: Tensor, *, ratio: float, noise: Tensor | None,
                      generator: torch.Generator | None) -> Tensor:
        """The key [B, N] whose top entries are the guided patches (default: the scores, detached)."""
        return scores.detach()

    def finish(self, plan: MaskPlan, scores: Tensor) -> MaskPlan:
        """The final plan; by default it carries the policy's own scores for inspection."""
        return replace(plan, scores=scores)

    def num_guided(self, num_hidden: int, progress: float | None = None) -> int:
        """How many of the hidden patches the rule chooses at `progress` (None: full alpha)."""
        return num_guided(num_hidden, guided_fraction_at(self.guided_fraction, self.guided_ramp, progress))

    def make_plan(self, tokens: Tensor, ratio: float, *, noise: Tensor | None = None,
                  generator: torch.Generator | None = None, progress: float | None = None,
                  **context: Any) -> MaskPlan:
        batch, n = tokens.shape[:2]  # tokens: [B, N, D]
        hidden = n - num_visible(n, ratio)
        guided = self.num_guided(hidden, progress)
        uniform = None
        if guided < hidden:  # the random part draws first, exactly as `random` does
            uniform = uniform_noise(noise, batch, n, tokens.device, generator)  # [B, N]
            noise = None  # the rule's own draw, if any, comes from the generator
        scores = self.score(tokens, generator=generator, **context)  # [B, N]
        key = self.selection_key(scores, ratio=ratio, noise=noise, generator=generator)  # [B, N]
        return self.finish(MaskPlan.from_guided_scores(key, ratio, guided, uniform), scores)

    def guided_repr(self) -> str:
        return f"guided_fraction={self.guided_fraction}, guided_ramp={self.guided_ramp}"
