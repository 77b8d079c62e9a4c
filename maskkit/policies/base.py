"""MaskPolicy: the one interface every masking strategy implements."""

from __future__ import annotations

import inspect
import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from maskkit.plan import (
    MaskPlan,
    NonFiniteWeightsError,
    check_grid,
    check_ratio,
    is_space_time,
    num_visible,
    plan_checks_enabled,
)
from maskkit.policies.card import CardInfo


def check_fraction(name: str, value: Any, *, include_one: bool = True) -> float:
    """`value` as a float in [0, 1] (or [0, 1) without `include_one`), else a one-line ValueError naming `name`."""
    interval = "[0, 1]" if include_one else "[0, 1)"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")
    if not (0.0 <= value <= 1.0 and (include_one or value < 1.0)):
        raise ValueError(f"{name} must lie in {interval}, got {value!r}")
    return float(value)


#: the registry that names policies in messages (`label`, `plugin_error`): maskkit.policies.registry sets it
#: when it creates POLICIES (importing this package imports it first), so this module imports nothing above it
NAMES: Any = None


def _registry() -> Any:
    """The policy registry, for plugin names in messages."""
    return NAMES


class MaskPolicy(nn.Module):
    """Decides which patches to hide: `policy(tokens [B, N, D], *, ratio=None, **context) -> MaskPlan`.

    An `nn.Module`, so learned policies carry parameters, `state_dict`, `.to()` and DDP.
    `ratio` is set per policy and may be overridden per call. Context keys a policy may read:
    `images` [B, C, H, W], `encoder` (an object with `cls_attention(images) -> [B, N]`),
    `attention` [B, N] (precomputed scores), `grid` (the token grid: (H', W'), or (T', H', W') for clips;
    read it with `grid_of`), `generator` (torch.Generator), `noise` [B, N]
    (fixes the random draw, as Hugging Face's ViTMAE `noise=`), `progress` (a float in [0, 1]:
    how far training has come, for schedules such as `guided_ramp`). Unknown keys are ignored.

    A policy with its own objective (e.g. a loss predictor) overrides `aux_loss`; every trainer
    (`maskkit pretrain`, `MLOEngine`, `use_policy` on the official MAE) adds it to the loss and
    steps the policy's parameters with it.
    """

    #: whether the policy has parameters trained by downstream feedback (the MLO engine).
    learnable: bool = False

    #: paper, idea, what it learns from and allowed option values for `maskkit.policy_card`; read
    #: from the class itself only (a subclass that declares none gets a card derived from it).
    card_info: ClassVar[CardInfo | None] = None

    def __init__(self, ratio: float = 0.75) -> None:
        super().__init__()
        self.ratio = check_ratio(ratio)

    def resolve_ratio(self, ratio: float | None, num_patches: int) -> float:
        """The per-call ratio if given, else the policy's own; validated against N."""
        return check_ratio(self.ratio if ratio is None else ratio, num_patches)

    def num_visible(self, num_patches: int, ratio: float | None = None, grid: tuple[int, ...] | None = None) -> int:
        """K, the patches a plan keeps visible at the ratio asked (per call, else the policy's own): int(N x (1 -
        ratio)), as the official MAE rounds; every plan is checked against it. A policy whose count is not free
        (e.g. `uniform`) or depends on the token `grid` (e.g. `tube`: a whole number per time slice) overrides it."""
        return num_visible(num_patches, self.resolve_ratio(ratio, num_patches))

    @staticmethod
    def token_grid(tokens: Tensor) -> tuple[int, int]:
        """(B, N) of patch tokens [B, N, D], or ValueError naming the shape."""
        if not isinstance(tokens, Tensor) or tokens.dim() != 3:
            raise ValueError(f"tokens must be [B, N, D], got shape {tuple(getattr(tokens, 'shape', ()))}")
        return tokens.shape[0], tokens.shape[1]

    @staticmethod
    def grid_of(num_patches: int, context: dict[str, Any]) -> tuple[int, ...]:
        """The token grid of N tokens: the context's `grid` ((H', W') or (T', H', W'), checked against N) when
        given, else the square sqrt(N) x sqrt(N); a one-line ValueError when neither is known."""
        grid = context.get("grid")
        if grid is not None:
            return check_grid(grid, num_patches)
        side = math.isqrt(num_patches)
        if side * side != num_patches:
            raise ValueError(f"N = {num_patches} tokens is not a square grid; pass the token grid as grid=(H', W') "
                             "or grid=(T', H', W')")  # fmt: skip
        return side, side

    def refuse_space_time(self, grid: tuple[int, ...] | None) -> None:
        """ValueError naming this policy when `grid` (the context's; None: not given) is a clip's (T', H', W'): for
        policies with no space-time meaning."""
        if grid is not None and is_space_time(tuple(grid)):
            raise ValueError(f"{_registry().label(self)} works on image patch grids only, not on the space-time "
                             f"token grid {'x'.join(map(str, grid))} (T' x H' x W') of a video MAE")  # fmt: skip

    def check_inputs(self, tokens: Tensor, context: dict[str, Any]) -> None:
        """ValueError naming the argument unless `tokens` is [B, N, D] with B >= 1 and the context's `images`
        (when given) holds the same B: checked on every call, before the policy's own code runs."""
        b, _ = self.token_grid(tokens)
        if b == 0:
            raise ValueError(f"tokens is an empty batch (B=0, shape {tuple(tokens.shape)}); give at least one image")
        images = context.get("images")
        if isinstance(images, Tensor) and (images.dim() == 0 or images.shape[0] != b):
            raise ValueError(f"images must hold the tokens' B={b} images, got shape {tuple(images.shape)}")

    def __call__(self, tokens: Tensor, *args: Any, **kwargs: Any) -> MaskPlan:
        """`forward`, then the plan's invariants checked (`MaskPlan.validate`, with the ratio asked for) for every
        policy, plugins included, unless `maskkit.plan.set_plan_checks(False)`; explicit `noise` / `attention`
        inputs must be finite (a NaN would give every image the same mask). Non-finite weights are the policy's
        fault only when its tokens were finite; from non-finite tokens they pass on to the non-finite guard.
        An exception raised inside a plugin policy becomes one line naming it (`Registry.plugin_error`)."""
        self.check_inputs(tokens, kwargs)
        check = plan_checks_enabled()
        if check:
            for key in ("noise", "attention"):
                value = kwargs.get(key)
                if isinstance(value, Tensor) and not bool(torch.isfinite(value).all()):
                    raise ValueError(f"policy {type(self).__name__}: {key} holds non-finite values (NaN or inf)")
        try:
            plan = super().__call__(tokens, *args, **kwargs)
        except Exception as err:
            raise _registry().plugin_error(self, "make_plan", err)  # noqa: B904 (chained by plugin_error)
        if check:
            who = _registry().label(self)
            if not isinstance(plan, MaskPlan):
                raise TypeError(f"{who} returned {type(plan).__name__}, not a MaskPlan")
            b, n = self.token_grid(tokens)
            try:
                plan.validate(n, b, visible=self._asked_visible(n, kwargs.get("ratio"), kwargs.get("grid")), who=who)
            except NonFiniteWeightsError:
                if bool(torch.isfinite(tokens).all()):
                    raise  # finite tokens, non-finite weights: the policy's own fault
                # non-finite tokens (e.g. NaN pixels): the trainer's non-finite guard names the loss it poisons
        return plan

    def _asked_visible(self, num_patches: int, ratio: Any, grid: Any = None) -> int | None:
        """How many patches the call's plan must keep visible (`num_visible`), or None when the policy cannot say
        (a plugin that sets no `ratio`)."""
        try:
            if grid is not None and "grid" in inspect.signature(self.num_visible).parameters:
                return int(self.num_visible(num_patches, ratio, grid=grid))
            return int(self.num_visible(num_patches, ratio))
        except Exception:  # no usable ratio to check the plan against
            return None

    def forward(
        self,
        tokens: Tensor,
        *,
        ratio: float | None = None,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
        **context: Any,
    ) -> MaskPlan:
        """The plan for `tokens` [B, N, D]: checks the shape and the ratio, then `make_plan`."""
        _, n = self.token_grid(tokens)
        return self.make_plan(tokens, self.resolve_ratio(ratio, n), noise=noise, generator=generator, **context)

    def make_plan(self, tokens: Tensor, ratio: float, **kwargs: Any) -> MaskPlan:
        """What a policy implements: the plan for checked tokens [B, N, D] at a checked ratio.

        `kwargs`: `noise` [B, N] uniform in [0, 1) or None, `generator` or None, and the context
        keys (`images`, `attention`, `progress`, ...). A policy may override `forward` instead.
        """
        raise NotImplementedError(f"{type(self).__name__} implements neither make_plan nor forward")

    # ---- a policy's own objective -------------------------------------------------------------

    def aux_loss(self, plan: MaskPlan, per_patch: Tensor) -> Tensor | None:
        """The policy's own loss for the plan it made and the MAE's per-patch losses [B, N] (detached).

        None (the default) means the policy has no objective of its own.
        """
        return None

    @property
    def has_aux_loss(self) -> bool:
        """Whether this policy defines `aux_loss` (its parameters then train on it)."""
        return type(self).aux_loss is not MaskPolicy.aux_loss

    def diagnostics(self, plan: MaskPlan, per_patch: Tensor) -> dict[str, float]:
        """Policy-specific numbers to log for a plan and its per-patch losses [B, N] (e.g. hpm_rank_corr)."""
        return {}

    def bind(self, *, embed_dim: int, num_patches: int) -> None:
        """Learn the MAE's token width and patch count (`use_policy` calls it); a no-op by default."""

    def extra_repr(self) -> str:
        return f"ratio={self.ratio}"
