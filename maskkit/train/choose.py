"""The one place a run's step is chosen and built: from the policy card's `learns` (nothing | reconstruction |
labels) and `--freeze-masker`, never by probing the policy's attributes.

    kind = step_kind(policy_learns(policy), config.mlo)     # "plain" or "mlo"
    check_step(kind, config)                                 # settings the step cannot run: one line
    step = make_step(kind, parts)                            # PlainStep.build or MLOStep.build
"""

from __future__ import annotations

from torch import nn

from maskkit.train.config import MLOSettings, TrainConfig
from maskkit.train.mlo_step import MLOStep
from maskkit.train.plain import PlainStep
from maskkit.train.step import LEARNS, StepParts, TrainStep

#: the step class of each kind
STEPS: dict[str, type] = {"plain": PlainStep, "mlo": MLOStep}


def step_kind(learns: str, mlo: MLOSettings) -> str:
    """'mlo' for a policy that learns from labels (unless --freeze-masker), else 'plain'."""
    if learns not in LEARNS:
        raise ValueError(f"a policy learns from one of {', '.join(LEARNS)}, got {learns!r}")
    return "mlo" if learns == "labels" and not mlo.freeze_masker else "plain"


def policy_learns(policy: nn.Module) -> str:
    """What a built policy learns from, read from its registered class's card."""
    from maskkit.policies import get_policy_class, list_policies, policy_card

    for name in list_policies():
        if get_policy_class(name) is type(policy):
            return policy_card(name).learns
    raise ValueError(f"policy class {type(policy).__name__} is not registered; register it or pass learns=")


def check_step(kind: str, config: TrainConfig) -> None:
    """One-line ValueError for settings the chosen step cannot run (before anything is built)."""
    check = getattr(STEPS[kind], "check", None)
    if check is not None:
        check(config)


def make_step(kind: str, parts: StepParts) -> TrainStep:
    """Build the step of `kind` ('plain' | 'mlo', from `step_kind`)."""
    return STEPS[kind].build(parts)
