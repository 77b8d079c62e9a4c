"""Paired masking studies (`maskkit ablate`): statistics of paired seeds, with verdicts in plain words."""

from maskkit.ablate.stats import Comparison, compare, describe, paired_interval

__all__ = ["Comparison", "compare", "describe", "paired_interval"]
