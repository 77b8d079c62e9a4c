"""`MLOConfig`: the MLO engine's schedule and its hypergradient method, checked once.

The method is a name in `HYPERGRADS` (maskkit.mlo.base) plus its options. The built-ins'
options keep their flat keywords (`darts_paths=`, `darts_fd=`, `darts_scale=`, `darts_r=`,
`unroll_steps=`, `first_order=`; see each method's `config_fields`); any other method's
options go in `hypergrad_options`. `create_hypergrad()` builds a fresh method for an engine.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from maskkit.mlo.base import HYPERGRADS, Hypergradient
from maskkit.plan import check_ratio

#: level 2 of the MLO (what the validation loss is measured through)
LEVEL2S = ("head", "ridge")
#: mixed precision of the real pretrain steps
AMP_MODES = ("none", "bf16")


@dataclass
class MLOConfig:
    """The schedule and the hypergradient of the MLO engine (defaults: the MLO-MAE reference).

    Args:
        ratio: mask ratio of the pretrain step, or None for the masker's own ratio. Default None.
        masker_every: one finetune step and one masker step after every this many pretrain steps. Default 2.
        unroll_steps: K, pretrain steps unrolled by hypergrad="unroll" (<= masker_every). Default 1.
        hypergrad: a registered hypergradient method (`HYPERGRADS.names()`): "darts" (finite
            differences, no double backward through the MAE) or "unroll" (exact reverse mode through
            K steps), or a plugin's. Default "darts".
        darts_paths: "both" (masker -> pretrain -> validation and masker -> pretrain -> finetune
            -> validation, as the reference) or "direct" (the first only). Default "both".
        darts_scale: "optimizer" (exact per-element derivative of the pretrain/head optimizer's
            update) or "lr" (the bare learning rate, as betty). Default "optimizer".
        darts_r: finite-difference radius r; eps = r / ||direction||. Default 0.01 (DARTS, betty).
        darts_fd: "central" (two MAE forwards, as DARTS/betty) or "forward" (one forward, reusing the
            pretrain step's per-patch losses; error O(eps)). Default "central".
        first_order: unroll without second-order terms (hypergrad="unroll" only). Default False.
        masker_start: masker warm-up, in pretrain steps: the masker is first updated at the end of
            the first cycle that ends at or after this step. Before that the head still steps
            (plainly, without a hypergradient), so its validation loss means something when the
            masker starts. Default 0 (from the first cycle, as the reference).
        level2: "head" (the paper: a linear head trained by one step per cycle; its validation
            loss drives the masker) or "ridge" (a ridge-regression probe refit in closed form on each
            labeled batch, `maskkit.mlo.steps.ridge_step`; the engine's head is then not used).
            "ridge" needs hypergrad="darts". Default "head".
        ridge: the ridge probe's regularisation, relative to the features' mean squared norm. Default 0.1.
        grad_clip, head_grad_clip, masker_grad_clip: max gradient norm per level, or None. Default None.
        amp: "bf16" runs the MAE forward of the real pretrain steps under bfloat16 autocast; the
            finetune step, the validation loss, the darts finite differences and the steps inside an
            unroll window stay float32. Default "none".
        masker_reg: weight of the anti-collapse penalty added to the level-3 objective: the mean
            over patches of KL(Bernoulli(p) || Bernoulli(r)) between the masker's probability p of
            hiding each patch and the mask ratio r (`prior_kl`), on the pretrain batch of each masker
            step. It pulls every probability back toward the ratio, the value of uniform masking,
            so a masker can only stray from uniform where the validation loss pays for it.
            Default 0.0 (off: runs stay bit-identical to runs without it).
        total_steps: the length of the run, for the context key `progress` = step / total_steps that
            the masker's schedules read (e.g. guided_ramp), when `step` is not given `progress`.
            Default None (no progress: schedules at their full value).
        hypergrad_options: options of the method `hypergrad` that no field above holds (a plugin's);
            an option a field holds is moved into that field. Default {}.
    """

    ratio: float | None = None
    masker_every: int = 2
    unroll_steps: int = 1
    hypergrad: str = "darts"
    darts_paths: str = "both"
    darts_scale: str = "optimizer"
    darts_r: float = 0.01
    darts_fd: str = "central"
    first_order: bool = False
    masker_start: int = 0
    level2: str = "head"
    ridge: float = 0.1
    grad_clip: float | None = None
    head_grad_clip: float | None = None
    masker_grad_clip: float | None = None
    amp: str = "none"
    masker_reg: float = 0.0
    total_steps: int | None = None
    hypergrad_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.ratio is not None:
            self.ratio = check_ratio(self.ratio)
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be 'none' or 'bf16', got {self.amp!r}")
        if isinstance(self.masker_every, bool) or not isinstance(self.masker_every, int) or self.masker_every < 1:
            raise ValueError(f"masker_every must be a positive integer, got {self.masker_every!r}")
        if not isinstance(self.hypergrad, str) or self.hypergrad not in HYPERGRADS:
            raise ValueError(f"hypergrad must be one of {tuple(HYPERGRADS.names())}, got {self.hypergrad!r}")
        if not isinstance(self.hypergrad_options, dict):
            raise ValueError(f"hypergrad_options must be a dict, got {type(self.hypergrad_options).__name__}")
        self._absorb_options()
        for name in HYPERGRADS.names():  # every field-held option is checked, whichever method runs
            if HYPERGRADS.get(name).held_fields() and name != self.hypergrad:
                self._create(name)
        method = self.create_hypergrad()
        if isinstance(self.masker_start, bool) or not isinstance(self.masker_start, int) or self.masker_start < 0:
            raise ValueError(f"masker_start must be a non-negative integer, got {self.masker_start!r}")
        if self.level2 not in LEVEL2S:
            raise ValueError(f"level2 must be one of {LEVEL2S}, got {self.level2!r}")
        if self.level2 not in method.level2s:
            able = " or ".join(repr(n) for n in HYPERGRADS.names() if self.level2 in HYPERGRADS.get(n).level2s)
            raise ValueError(f"level2={self.level2!r} is implemented for hypergrad={able or 'none'} only")
        if not (isinstance(self.ridge, (int, float)) and self.ridge > 0):
            raise ValueError(f"ridge must be a positive number, got {self.ridge!r}")
        method.check_config(self)
        if isinstance(self.masker_reg, bool) or not isinstance(self.masker_reg, (int, float)) or not (
            math.isfinite(self.masker_reg) and self.masker_reg >= 0
        ):
            raise ValueError(f"masker_reg must be a non-negative number, got {self.masker_reg!r}")
        if self.total_steps is not None and (
            isinstance(self.total_steps, bool) or not isinstance(self.total_steps, int) or self.total_steps < 1
        ):
            raise ValueError(f"total_steps must be a positive integer or None, got {self.total_steps!r}")
        for name in ("grad_clip", "head_grad_clip", "masker_grad_clip"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"{name} must be a positive number or None, got {value!r}")

    def _absorb_options(self) -> None:
        """Options in hypergrad_options that a field holds move into it (a conflicting pair is refused)."""
        held = HYPERGRADS.get(self.hypergrad).held_fields()
        defaults = {f.name: f.default for f in fields(self)}
        rest = {}
        for option, value in self.hypergrad_options.items():
            name = held.get(option)
            if name is None:
                rest[option] = value
            elif getattr(self, name) not in (defaults[name], value):
                raise ValueError(f"hypergrad_options[{option!r}] = {value!r} contradicts {name}={getattr(self, name)!r}")
            else:
                setattr(self, name, value)
        self.hypergrad_options = rest

    def method_options(self, name: str | None = None) -> dict[str, Any]:
        """The options of method `name` (default: `hypergrad`) as its constructor takes them."""
        name = self.hypergrad if name is None else name
        held = {option: getattr(self, f) for option, f in HYPERGRADS.get(name).held_fields().items()}
        return {**held, **self.hypergrad_options} if name == self.hypergrad else held

    def create_hypergrad(self) -> Hypergradient:
        """A fresh instance of the method (an engine's own: a method may hold an open window)."""
        return self._create(self.hypergrad)

    def _create(self, name: str) -> Hypergradient:
        method = HYPERGRADS.create(name, **self.method_options(name))
        if not isinstance(method, Hypergradient):
            raise ValueError(f"hypergrad {name!r} did not build a maskkit.mlo.Hypergradient "
                             f"(got {type(method).__name__})")
        return method

    def window_steps(self) -> int:
        """Pretrain steps one hypergradient spans (1: every engine step can be undone alone)."""
        return self.create_hypergrad().window_steps()

    def state(self) -> dict[str, Any]:
        """The config as `MLOEngine.state_dict` records it: `asdict`, without `hypergrad_options` when empty
        (so the built-ins write exactly the format of before the registry)."""
        out = asdict(self)
        if not out["hypergrad_options"]:
            del out["hypergrad_options"]
        return out
