"""Masking policies: one small module per strategy, registered in `POLICIES`; importing this package registers them.

The registry functions (`register_policy`, `create_policy`, `list_policies`, `policy_card`, ...) live in
`maskkit.policies.registry` and are exported here.
"""

from maskkit.policies import registry as _registry
from maskkit.policies.adamae import AdaMAEPolicy
from maskkit.policies.attention import AttentionPolicy
from maskkit.policies.base import MaskPolicy
from maskkit.policies.block import BlockPolicy
from maskkit.policies.colornoise import ColorNoisePolicy
from maskkit.policies.frame import FramePolicy
from maskkit.policies.hpm import HPMPolicy
from maskkit.policies.learned import LearnedMasker
from maskkit.policies.motion import MotionPolicy
from maskkit.policies.random import RandomPolicy
from maskkit.policies.registry import *  # noqa: F403 - every registry function, listed in its __all__
from maskkit.policies.scored import ScoredPolicy
from maskkit.policies.simmim import SimMIMPolicy
from maskkit.policies.tube import TubePolicy
from maskkit.policies.uniform import UniformPolicy

#: the policy classes, then every registry function (maskkit.policies.registry's own list)
__all__ = [
    "AdaMAEPolicy", "AttentionPolicy", "BlockPolicy", "ColorNoisePolicy", "FramePolicy", "HPMPolicy", "LearnedMasker",
    "MaskPolicy", "MotionPolicy", "RandomPolicy", "ScoredPolicy", "SimMIMPolicy", "TubePolicy", "UniformPolicy",
    *_registry.__all__,
]  # fmt: skip
