"""Masking policies: one small module per strategy, registered in `POLICIES`; importing this package registers them.

The registry functions (`register_policy`, `create_policy`, `list_policies`, `policy_card`, ...) live in
`maskkit.policies.registry` and are exported here.
"""

from maskkit.policies.adamae import AdaMAEPolicy
from maskkit.policies.attention import AttentionPolicy
from maskkit.policies.base import MaskPolicy
from maskkit.policies.block import BlockPolicy
from maskkit.policies.colornoise import ColorNoisePolicy
from maskkit.policies.hpm import HPMPolicy
from maskkit.policies.learned import LearnedMasker
from maskkit.policies.random import RandomPolicy
from maskkit.policies.registry import (
    AUTO_POLICY_OPTIONS,
    COMMON_ALLOWED,
    LEARNS,
    POLICIES,
    CardInfo,
    PolicyCard,
    PolicyOption,
    coerce_policy_options,
    create_policy,
    create_sized_policy,
    get_policy_class,
    is_policy,
    list_policies,
    load_plugins,
    policy_card,
    policy_options,
    policy_summary,
    register_policy,
)
from maskkit.policies.scored import ScoredPolicy
from maskkit.policies.simmim import SimMIMPolicy
from maskkit.policies.uniform import UniformPolicy

__all__ = [
    "AUTO_POLICY_OPTIONS",
    "COMMON_ALLOWED",
    "LEARNS",
    "POLICIES",
    "AdaMAEPolicy",
    "AttentionPolicy",
    "BlockPolicy",
    "CardInfo",
    "ColorNoisePolicy",
    "HPMPolicy",
    "LearnedMasker",
    "MaskPolicy",
    "PolicyCard",
    "PolicyOption",
    "RandomPolicy",
    "ScoredPolicy",
    "SimMIMPolicy",
    "UniformPolicy",
    "coerce_policy_options",
    "create_policy",
    "create_sized_policy",
    "get_policy_class",
    "is_policy",
    "list_policies",
    "load_plugins",
    "policy_card",
    "policy_options",
    "policy_summary",
    "register_policy",
]
