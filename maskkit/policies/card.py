"""What a masking policy says about itself: `CardInfo` (declared by its class) and `PolicyCard` (read back).

A policy's card is the registry's card (`maskkit.registry.Card`: paper, idea, allowed option values) plus
what its parameters learn from (`learns`), which decides the training path of a run. Options that mean
the same in every policy share their allowed values (`COMMON_ALLOWED`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from maskkit.registry import Card, CardOption

#: what a policy's parameters learn from: no parameters, the MAE's own reconstruction loss
#: (`aux_loss`), or downstream labels (a `learnable` policy, trained by the MLO engine).
LEARNS = ("nothing", "reconstruction", "labels")

#: allowed values of the options that mean the same in every built-in policy, written once here; a
#: card's own `allowed` entry overrides one (e.g. `uniform` takes only ratio 0.75).
COMMON_ALLOWED: Mapping[str, str] = {
    "ratio": "(0, 1)",
    "guided_fraction": "[0, 1]",
    "guided_ramp": "[0, 1]",
    "embed_dim": "int >= 1 | None",
    "num_patches": "int >= 1 | None",
    "hidden_dim": "int >= 1",
    "pos_dim": "int >= 0, multiple of 4",
    "loss_weight": ">= 0",
}


@dataclass(frozen=True)
class CardInfo:
    """What a policy class declares for its `PolicyCard` (class attribute `card_info`); `allowed` maps
    each option to its allowed values as text: "high | low | hint", "[0, 1]", "(0, 1)", "int >= 1 | None"
    (options listed in COMMON_ALLOWED need no entry)."""

    paper: str
    idea: str
    learns: str
    allowed: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.learns not in LEARNS:
            raise ValueError(f"learns must be one of {LEARNS}, got {self.learns!r}")

    def allowed_values(self, option: str) -> str | None:
        """The option's allowed values: the card's own entry, else the shared COMMON_ALLOWED one."""
        return self.allowed.get(option) or COMMON_ALLOWED.get(option)

    def registry_card(self) -> Card:
        """The same card for the generic registry (`Registry.card`), the shared allowed values filled in."""
        allowed = {key: self.allowed_values(key) or "" for key in {**COMMON_ALLOWED, **self.allowed}}
        return Card(idea=self.idea, paper=self.paper, allowed=allowed)


@dataclass(frozen=True)
class PolicyCard:
    """A policy at a glance: short citation ("-" for none), one-line idea, what it learns from, options."""

    name: str
    paper: str
    idea: str
    learns: str  # one of LEARNS
    options: tuple[CardOption, ...]
