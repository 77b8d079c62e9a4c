"""MaskPlan: which patches an MAE sees and which it must reconstruct.

Conventions follow the official MAE `random_masking`: a per-patch score is sorted
ascending, the first K = int(N * (1 - ratio)) patches are kept (visible), and
`mask` is 1 for hidden and 0 for visible patches, in the original patch order.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

import torch
from torch import Tensor


def num_visible(num_patches: int, ratio: float) -> int:
    """K = int(N * (1 - ratio)), exactly as the official MAE computes `len_keep`."""
    return int(num_patches * (1 - ratio))


def check_ratio(ratio: float, num_patches: int | None = None) -> float:
    """Return `ratio` as a float, or raise ValueError naming it when it is unusable.

    A ratio must lie in (0, 1) and, given N, leave at least one visible and one hidden patch.
    """
    try:
        value = float(ratio)
    except (TypeError, ValueError):
        raise ValueError(f"mask ratio must be a number in (0, 1), got {ratio!r}") from None
    if not (0.0 < value < 1.0):
        raise ValueError(f"mask ratio must lie in (0, 1), got {ratio!r}")
    if num_patches is not None:
        keep = num_visible(num_patches, value)
        if keep < 1 or keep > num_patches - 1:
            raise ValueError(
                f"mask ratio {ratio!r} leaves {keep} of {num_patches} patches visible; "
                "need at least one visible and one hidden patch"
            )
    return value


def guided_fraction_at(fraction: float, ramp: float, progress: float | None) -> float:
    """The guided fraction in force at `progress` in [0, 1]: it rises linearly from 0 to `fraction`
    over the first `ramp` of the run (HPM's schedule with ramp = 1); full when progress is None or ramp is 0."""
    if progress is None or ramp <= 0:
        return fraction
    return fraction * min(1.0, max(0.0, float(progress)) / ramp)


def num_guided(num_hidden: int, fraction: float) -> int:
    """round(fraction * (N - K)) hidden patches chosen by the policy's rule, rounded half up."""
    return min(num_hidden, int(math.floor(fraction * num_hidden + 0.5)))


def check_grid(grid: object, num_patches: int | None = None) -> tuple[int, ...]:
    """`grid` as a tuple of positive ints: (H', W') for images, (T', H', W') for clips, whose product is N
    when `num_patches` is given; else a one-line ValueError naming `grid`. Tokens are ordered row-major
    over it, time slowest (as a Conv3d tubelet embedding's `flatten(2)` orders them)."""
    if not isinstance(grid, (tuple, list)) or len(grid) not in (2, 3) or not all(
        isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in grid
    ):
        raise ValueError(f"grid must be (H', W') or (T', H', W') of positive integers, got {grid!r}")
    shape = tuple(int(g) for g in grid)
    if num_patches is not None and math.prod(shape) != num_patches:
        raise ValueError(f"grid {'x'.join(map(str, shape))} holds {math.prod(shape)} tokens, but there are {num_patches}")
    return shape


def is_space_time(grid: tuple[int, ...]) -> bool:
    """Whether a token grid is a clip's (T', H', W') rather than an image's (H', W')."""
    return len(grid) == 3


class PlanError(ValueError):
    """A MaskPlan whose fields disagree (shapes, ids, mask, weights): a policy's bug, in one line."""


class NonFiniteWeightsError(PlanError):
    """A plan whose only fault is non-finite weights (a policy's bug, or non-finite inputs reaching it)."""


#: whether every plan a policy returns is checked (`MaskPlan.validate`); on by default, as in `maskkit
#: pretrain`. `set_plan_checks(False)` (or MASKKIT_CHECK_PLANS=0) turns the checks off for a tuned loop.
_CHECK_PLANS = os.environ.get("MASKKIT_CHECK_PLANS", "1") not in ("0", "false", "no", "off")


def set_plan_checks(enabled: bool) -> bool:
    """Turn the check of every policy's plan on or off; returns the previous setting."""
    global _CHECK_PLANS
    previous, _CHECK_PLANS = _CHECK_PLANS, bool(enabled)
    return previous


def plan_checks_enabled() -> bool:
    """Whether policies' plans are checked (`set_plan_checks`)."""
    return _CHECK_PLANS


def gather_tokens(x: Tensor, ids: Tensor) -> Tensor:
    """Pick tokens `x[b, ids[b, k]]` along dim 1: x [B, N, D], ids [B, K] -> [B, K, D]."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def scatter_tokens(values: Tensor, ids: Tensor, num_tokens: int) -> Tensor:
    """The inverse of `gather_tokens`: values [B, M, P] placed at `ids` [B, M] of a zero [B, num_tokens, P]."""
    out = values.new_zeros(values.shape[0], num_tokens, values.shape[-1])  # [B, N, P]
    return out.scatter(1, ids.unsqueeze(-1).expand(-1, -1, values.shape[-1]), values)


@dataclass
class MaskPlan:
    """One masking decision for a batch.

    Attributes:
        ids_keep: [B, K] indices of the visible patches, in the order the encoder sees them.
        ids_restore: [B, N] inverse permutation: position of patch n in the shuffled order.
        mask: [B, N] 1.0 = hidden (to reconstruct), 0.0 = visible; original patch order.
        weights: [B, N] per-patch weights of the reconstruction loss, or None for 1.
            A learned policy stores its masking probabilities here, differentiably.
        scores: [B, N] the score that was sorted (ascending = kept first), for inspection.
        probs: [B, N] a learned policy's masking probabilities, for inspection, or None; they
            are the weights unless the policy weights its loss otherwise.
        guided: [B, N] bool, True for the hidden patches the policy chose by its own rule (the
            rest of the hidden set is uniformly random), or None when the whole plan is one rule.
        decoder_ids: [B, M] indices of the hidden patches the decoder reconstructs (VideoMAE V2's dual
            masking, CrossMAE's partial reconstruction), ascending per row, the same M for every image;
            the loss is taken over them only. None (the default): every hidden patch, as MAE.
    """

    ids_keep: Tensor
    ids_restore: Tensor
    mask: Tensor
    weights: Tensor | None = None
    scores: Tensor | None = None
    probs: Tensor | None = None
    guided: Tensor | None = None
    decoder_ids: Tensor | None = None

    @classmethod
    def from_scores(cls, scores: Tensor, ratio: float, weights: Tensor | None = None) -> MaskPlan:
        """Keep the K lowest-scoring patches, as `random_masking` does with its noise.

        scores: [B, N]; ties are broken by torch.argsort exactly as in the official code.
        """
        if scores.dim() != 2:
            raise ValueError(f"scores must be [B, N], got shape {tuple(scores.shape)}")
        if scores.shape[0] == 0:
            raise ValueError(f"scores is an empty batch (B=0, shape {tuple(scores.shape)}); give at least one image")
        if weights is not None and weights.shape != scores.shape:
            raise ValueError(f"weights must have the scores' shape {tuple(scores.shape)}, got {tuple(weights.shape)}")
        batch, n = scores.shape
        ratio = check_ratio(ratio, n)
        keep = num_visible(n, ratio)
        ids_shuffle = torch.argsort(scores, dim=1)  # [B, N] ascending: kept first
        ids_restore = torch.argsort(ids_shuffle, dim=1)  # [B, N]
        ids_keep = ids_shuffle[:, :keep]  # [B, K]
        mask = torch.ones(batch, n, device=scores.device, dtype=_float_dtype(scores))
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, ids_restore)  # [B, N] back to patch order
        return cls(ids_keep=ids_keep, ids_restore=ids_restore, mask=mask, weights=weights, scores=scores)

    @property
    def batch_size(self) -> int:
        return self.mask.shape[0]

    @property
    def num_patches(self) -> int:
        return self.mask.shape[1]

    @property
    def num_visible(self) -> int:
        return self.ids_keep.shape[1]

    @property
    def num_hidden(self) -> int:
        return self.num_patches - self.num_visible

    def validate(
        self, num_patches: int | None = None, batch_size: int | None = None, *, visible: int | None = None,
        who: str = "plan",
    ) -> MaskPlan:
        """Check the plan's invariants; returns it, or raises a one-line PlanError naming what is wrong.

        Shapes agree (mask and ids_restore [B, N], ids_keep [B, K], weights [B, N]; B and N as given);
        K is `visible` when given (what the ratio asked for makes visible: `num_visible(N, ratio)`); ids
        are integers in range; `ids_restore` is a permutation and `ids_keep[b, j]` is the patch at
        shuffled position j (so ids_keep holds no duplicates and `restore` undoes the shuffle); `mask`
        is exactly 1 where `ids_restore >= K`; weights are finite, non-negative, with a positive sum over
        each image's hidden patches (else the loss is negative, or nothing is reconstructed); at least one
        patch is visible and one hidden. All value checks are reduced into one boolean (one device sync);
        only a failing plan is examined further, to say which check failed.
        """
        mask, ids_keep, ids_restore, weights = self.mask, self.ids_keep, self.ids_restore, self.weights
        for name, t in (("mask", mask), ("ids_keep", ids_keep), ("ids_restore", ids_restore)):
            if not isinstance(t, Tensor) or t.dim() != 2:
                raise PlanError(f"{who}: {name} must be a 2-d tensor, got {tuple(getattr(t, 'shape', ())) or type(t).__name__}")
        b, n = mask.shape
        k = ids_keep.shape[1]
        if tuple(ids_restore.shape) != (b, n) or ids_keep.shape[0] != b:
            raise PlanError(f"{who}: shapes disagree: mask {tuple(mask.shape)}, ids_restore {tuple(ids_restore.shape)}, "
                            f"ids_keep {tuple(ids_keep.shape)}")
        if num_patches is not None and n != num_patches:
            raise PlanError(f"{who}: the plan covers {n} patches but the tokens have {num_patches}")
        if batch_size is not None and b != batch_size:
            raise PlanError(f"{who}: the plan is for {b} images but the batch has {batch_size}")
        if k == 0 or k == n:
            raise PlanError(f"{who}: the plan {'hides' if k == 0 else 'keeps'} every patch ({k} of {n} visible)")
        if visible is not None and k != visible:
            raise PlanError(f"{who}: the plan hides {n - k} of {n} patches but the mask ratio asked for hides "
                            f"{n - visible} ({visible} visible)")
        if ids_keep.dtype != torch.long or ids_restore.dtype != torch.long:
            raise PlanError(f"{who}: ids must be int64, got ids_keep {ids_keep.dtype}, ids_restore {ids_restore.dtype}")
        if weights is not None and (not isinstance(weights, Tensor) or tuple(weights.shape) != (b, n)):
            raise PlanError(f"{who}: weights must be [B, N] = {(b, n)}, got {tuple(getattr(weights, 'shape', ()))}")
        if self.decoder_ids is not None:
            self._check_decoder_ids(who)
        ok = self._checks(k)
        if bool(torch.stack(ok).all()):
            return self
        names = ("ids in range", "ids_restore a permutation", "ids_keep in shuffled order (no duplicates)",
                 "mask = (ids_restore >= K)", "finite weights", "non-negative weights",
                 "a positive sum of weights over each image's hidden patches")
        failed = [name for name, good in zip(names, ok, strict=True) if not bool(good)]
        kind = NonFiniteWeightsError if failed == ["finite weights"] else PlanError
        raise kind(f"{who}: invalid plan: not {failed[0]} (B={b}, N={n}, K={k})")

    def _check_decoder_ids(self, who: str) -> None:
        """PlanError unless `decoder_ids` is [B, M] int64, 1 <= M <= N - K, ascending per row, all hidden."""
        ids, (b, n), hidden = self.decoder_ids, self.mask.shape, self.num_hidden
        if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.shape[0] != b or ids.dtype != torch.long:
            got = f"{tuple(ids.shape)} {ids.dtype}" if isinstance(ids, Tensor) else type(ids).__name__
            raise PlanError(f"{who}: decoder_ids must be [B, M] int64 with B={b}, got {got}")
        m = ids.shape[1]
        if not 1 <= m <= hidden:
            raise PlanError(f"{who}: decoder_ids names {m} patches per image; it must name 1 to {hidden} (the hidden ones)")
        in_range = bool((ids.min() >= 0) & (ids.max() < n))
        if not in_range or not bool((ids[:, 1:] > ids[:, :-1]).all()):
            raise PlanError(f"{who}: decoder_ids must be distinct patch indices in [0, {n}), ascending per row")
        if not bool(self.mask.detach().gather(1, ids).eq(1).all()):
            raise PlanError(f"{who}: decoder_ids names a visible patch; the decoder reconstructs hidden patches only")

    def _checks(self, k: int) -> list[Tensor]:
        """The value checks as 0-d booleans: range, permutation, keep order, mask, finite weights, non-negative
        weights, positive hidden weight per image (a NaN weight fails only the finite check)."""
        mask, ids_keep, ids_restore = self.mask, self.ids_keep, self.ids_restore
        b, n = mask.shape
        in_range = (ids_keep.min() >= 0) & (ids_keep.max() < n) & (ids_restore.min() >= 0) & (ids_restore.max() < n)
        if not bool(in_range):  # gather/scatter below need valid ids
            false = torch.zeros((), dtype=torch.bool, device=mask.device)
            return [in_range, false, false, false, false, false, false]
        seen = torch.zeros(b, n, dtype=torch.bool, device=mask.device).scatter_(1, ids_restore, True)
        order = torch.arange(k, device=mask.device).expand(b, k)
        keep_order = (ids_restore.gather(1, ids_keep) == order).all()
        mask_ok = (mask.detach() == (ids_restore >= k).to(mask.dtype)).all()
        weights = self.weights
        if weights is None:
            true = torch.ones_like(mask_ok)
            return [in_range, seen.all(), keep_order, mask_ok, true, true, true]
        w = weights.detach()
        finite = torch.isfinite(w.sum(dtype=torch.float32))  # NaN and inf propagate: one cheap reduction
        non_negative = ~(w < 0).any()  # NaN < 0 is False: NaN fails only `finite`
        positive = ~((w * mask.detach()).sum(dim=1) <= 0).any()
        return [in_range, seen.all(), keep_order, mask_ok, finite, non_negative, positive]

    def gather(self, tokens: Tensor) -> Tensor:
        """Visible tokens in encoder order: [B, N, D] -> [B, K, D]."""
        self.check_tokens("tokens", tokens, self.num_patches)
        return gather_tokens(tokens, self.ids_keep)

    def restore(self, shuffled: Tensor) -> Tensor:
        """Undo the shuffle: [B, N, D] in (visible, then hidden) order -> [B, N, D] in patch order."""
        self.check_tokens("shuffled", shuffled, self.num_patches)
        return gather_tokens(shuffled, self.ids_restore)

    def check_tokens(self, name: str, tokens: Tensor, n: int) -> None:
        """ValueError naming `name` unless `tokens` is [B, n, D] with this plan's B (the shape given and expected)."""
        shape = tuple(tokens.shape) if isinstance(tokens, Tensor) else None
        if shape is None or len(shape) != 3 or shape[:2] != (self.batch_size, n):
            got = type(tokens).__name__ if shape is None else f"shape {shape}"
            raise ValueError(f"{name} must be [B, N, D] = [{self.batch_size}, {n}, D] for this plan "
                             f"(B={self.batch_size} images, {n} tokens), got {got}")  # fmt: skip

    def fill(self, visible: Tensor, mask_token: Tensor) -> Tensor:
        """Append mask tokens after the visible ones and restore patch order.

        visible: [B, K, D]; mask_token: [1, 1, D] (or broadcastable) -> [B, N, D].
        """
        self.check_tokens("visible", visible, self.num_visible)
        if not isinstance(mask_token, Tensor) or mask_token.shape[-1:] != visible.shape[-1:]:
            got = tuple(mask_token.shape) if isinstance(mask_token, Tensor) else type(mask_token).__name__
            raise ValueError(f"mask_token must be [1, 1, D] with the visible tokens' D={visible.shape[-1]}, got {got}")
        b, k, d = visible.shape
        filler = mask_token.expand(b, self.num_patches - k, d).to(visible.dtype)
        return self.restore(torch.cat([visible, filler], dim=1))

    @property
    def target_mask(self) -> Tensor:
        """[B, N] 1.0 where the loss is taken: the `decoder_ids` when named, else every hidden patch (`mask`)."""
        if self.decoder_ids is None:
            return self.mask
        return torch.zeros_like(self.mask).scatter_(1, self.decoder_ids, 1.0)

    @property
    def num_decoded(self) -> int:
        """M, the hidden patches per image the decoder reconstructs (N - K without `decoder_ids`)."""
        return self.num_hidden if self.decoder_ids is None else self.decoder_ids.shape[1]

    def with_decoder_ids(self, ids: Tensor) -> MaskPlan:
        """This plan with the decoder reconstructing only the hidden patches `ids` [B, M] (sorted here); checked."""
        if not isinstance(ids, Tensor):
            raise PlanError(f"decoder_ids must be a [B, M] tensor, got {type(ids).__name__}")
        plan = replace(self, decoder_ids=torch.sort(ids, dim=1).values)
        plan._check_decoder_ids("plan")
        return plan

    @property
    def decoder_positions(self) -> Tensor:
        """[B, K + M] the patch index of every decoder input token: the visible ones (`ids_keep`), then the hidden
        ones it reconstructs (`decoder_ids`, or every hidden patch in shuffled order without them)."""
        if self.decoder_ids is None:
            ids_shuffle = torch.argsort(self.ids_restore, dim=1)  # [B, N] visible first, then hidden
            return ids_shuffle
        return torch.cat([self.ids_keep, self.decoder_ids], dim=1)  # [B, K + M]

    def scatter_decoded(self, pred: Tensor) -> Tensor:
        """Predictions of the reconstructed patches back in patch order with zeros elsewhere: `pred` [B, M, P] (the
        `decoder_ids`) or [B, K + M, P] (every `decoder_positions` token) -> [B, N, P]."""
        b, n, m, k = self.batch_size, self.num_patches, self.num_decoded, self.num_visible
        if not isinstance(pred, Tensor) or pred.dim() != 3 or pred.shape[0] != b or pred.shape[1] not in (m, k + m):
            got = tuple(pred.shape) if isinstance(pred, Tensor) else type(pred).__name__
            raise ValueError(f"pred must be [B, M, P] or [B, K + M, P] = [{b}, {m} or {k + m}, P], got {got}")
        return scatter_tokens(pred, self.decoder_positions[:, -pred.shape[1]:], n)  # [B, N, P]

    def loss_weights(self) -> Tensor:
        """target_mask * w, the per-patch factor of the weighted masked loss: [B, N]."""
        if self.weights is None:
            return self.target_mask
        return self.target_mask * self.weights

    def detach(self) -> MaskPlan:
        """The same plan with weights and scores cut from the autograd graph."""
        return replace(
            self,
            weights=None if self.weights is None else self.weights.detach(),
            scores=None if self.scores is None else self.scores.detach(),
            probs=None if self.probs is None else self.probs.detach(),
        )

    @classmethod
    def from_guided_scores(
        cls,
        scores: Tensor,
        ratio: float,
        num_guided: int,
        noise: Tensor | None = None,
    ) -> MaskPlan:
        """Hide the `num_guided` highest-scoring patches, and the rest of the N - K hidden ones uniformly.

        scores: [B, N], higher = hidden first (as `from_scores`). noise: [B, N] uniforms of the
        random part, used exactly as the `random` policy uses its noise: the patches not guided
        are ranked by noise and the lowest K stay visible. So `num_guided=0` gives the `random`
        plan for the same noise bit for bit, and `num_guided=N-K` gives `from_scores(scores)`
        (no noise needed). `plan.guided` marks the guided patches; `plan.scores` is the sorted key
        (a policy may replace it by its own scores for inspection).
        """
        if scores.dim() != 2:
            raise ValueError(f"scores must be [B, N], got shape {tuple(scores.shape)}")
        batch, n = scores.shape
        hidden = n - num_visible(n, check_ratio(ratio, n))
        if isinstance(num_guided, bool) or not isinstance(num_guided, int) or not 0 <= num_guided <= hidden:
            raise ValueError(f"num_guided must be an integer in [0, {hidden}] (the hidden count), got {num_guided!r}")
        if num_guided == hidden:
            plan = cls.from_scores(scores, ratio)
            return replace(plan, guided=plan.mask.bool())
        if noise is None or tuple(noise.shape) != (batch, n):
            shape = None if noise is None else tuple(noise.shape)
            raise ValueError(f"a partly random plan needs noise of shape {(batch, n)}, got {shape}")
        guided = torch.zeros(batch, n, dtype=torch.bool, device=scores.device)
        if num_guided > 0:
            top = torch.topk(scores.detach(), num_guided, dim=1).indices  # [B, G] the policy's own choice
            guided = guided.scatter(1, top, True)
            noise = noise.masked_fill(guided, float("inf"))  # guided patches sort last: hidden
        return replace(cls.from_scores(noise, ratio), guided=guided)

    def to(self, device: torch.device | str) -> MaskPlan:
        return MaskPlan(
            ids_keep=self.ids_keep.to(device),
            ids_restore=self.ids_restore.to(device),
            mask=self.mask.to(device),
            weights=None if self.weights is None else self.weights.to(device),
            scores=None if self.scores is None else self.scores.to(device),
            probs=None if self.probs is None else self.probs.to(device),
            guided=None if self.guided is None else self.guided.to(device),
            decoder_ids=None if self.decoder_ids is None else self.decoder_ids.to(device),
        )


def _float_dtype(t: Tensor) -> torch.dtype:
    return t.dtype if t.is_floating_point() else torch.get_default_dtype()
