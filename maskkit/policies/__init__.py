"""Built-in masking policies; importing this package registers them."""

from maskkit.policies.attention import AttentionPolicy
from maskkit.policies.base import MaskPolicy
from maskkit.policies.block import BlockPolicy
from maskkit.policies.learned import LearnedMasker
from maskkit.policies.random import RandomPolicy

__all__ = ["AttentionPolicy", "BlockPolicy", "LearnedMasker", "MaskPolicy", "RandomPolicy"]
