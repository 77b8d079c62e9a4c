"""Built-in masking policies; importing this package registers them."""

from maskkit.policies.adamae import AdaMAEPolicy
from maskkit.policies.attention import AttentionPolicy
from maskkit.policies.base import MaskPolicy
from maskkit.policies.block import BlockPolicy
from maskkit.policies.colornoise import ColorNoisePolicy
from maskkit.policies.hpm import HPMPolicy
from maskkit.policies.learned import LearnedMasker
from maskkit.policies.random import RandomPolicy
from maskkit.policies.scored import ScoredPolicy
from maskkit.policies.simmim import SimMIMPolicy
from maskkit.policies.uniform import UniformPolicy

__all__ = [
    "AdaMAEPolicy",
    "AttentionPolicy",
    "BlockPolicy",
    "ColorNoisePolicy",
    "HPMPolicy",
    "LearnedMasker",
    "MaskPolicy",
    "RandomPolicy",
    "ScoredPolicy",
    "SimMIMPolicy",
    "UniformPolicy",
]
