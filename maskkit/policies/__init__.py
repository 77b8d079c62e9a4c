"""Built-in masking policies; importing this package registers them."""

from maskkit.policies.attention import AttentionPolicy
from maskkit.policies.base import MaskPolicy
from maskkit.policies.block import BlockPolicy
from maskkit.policies.hpm import HPMPolicy
from maskkit.policies.learned import LearnedMasker
from maskkit.policies.random import RandomPolicy
from maskkit.policies.scored import ScoredPolicy

__all__ = ["AttentionPolicy", "BlockPolicy", "HPMPolicy", "LearnedMasker", "MaskPolicy", "RandomPolicy", "ScoredPolicy"]
