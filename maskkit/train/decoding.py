"""`DecoderMasking`: the run's --decoder-ratio / --decoder-rule, applied to every plan a training step makes.

VideoMAE V2's dual masking (and CrossMAE's partial reconstruction for images): after the policy has chosen
the hidden patches, a rule names the subset the decoder reconstructs (`MaskPlan.decoder_ids`); the loss is
taken over it, and a built-in MAE decodes only the visible and named tokens, which is what makes the step
cheaper. The rules live with the policies (`maskkit.policies.decoder.apply_decoder_rule`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from maskkit.plan import MaskPlan, is_space_time
from maskkit.train.config import TrainSettings


@dataclass(frozen=True)
class DecoderMasking:
    """Apply `rule` at `ratio` (the fraction of hidden patches NOT reconstructed) to a plan, drawing from the
    context's generator; `rule` "auto" is runningcell on a clip's token grid and random on an image's."""

    rule: str
    ratio: float

    def rule_for(self, grid: tuple[int, ...] | None) -> str:
        """The concrete rule on `grid`: `rule`, or for "auto" runningcell on clips, random on images."""
        if self.rule != "auto":
            return self.rule
        return "runningcell" if grid is not None and is_space_time(grid) else "random"

    def __call__(self, plan: MaskPlan, context: dict[str, Any]) -> MaskPlan:
        from maskkit.policies.decoder import apply_decoder_rule

        grid = context.get("grid")
        return apply_decoder_rule(plan, self.rule_for(grid), self.ratio, grid=grid, generator=context.get("generator"))

    @classmethod
    def from_settings(cls, train: TrainSettings) -> DecoderMasking | None:
        """The run's decoder masking, or None without --decoder-ratio (every hidden patch is reconstructed)."""
        if train.decoder_ratio is None:
            return None
        return cls(train.decoder_rule, float(train.decoder_ratio))
