"""maskkit: pluggable masking strategies for Masked Autoencoders.

Public API (see the README for a tour):
- masks: `MaskPlan`, `check_ratio`, `num_visible`, `gather_tokens`
- policies: `MaskPolicy`, `ScoredPolicy` (guided fraction), `RandomPolicy`, `AttentionPolicy`, `LearnedMasker`,
  `HPMPolicy`, `BlockPolicy`, `register_policy`, `create_policy`, `list_policies`, `policy_options`,
  `policy_card` (a `PolicyCard`: paper, idea, what it learns from, options with allowed values)
- collapse diagnostics: `maskkit.diagnostics` (`plan_diagnostics`, `mask_iou`, `position_entropy`, `logit_spread`)
- learning the masker: `MLOEngine`, `MLOConfig`, `default_optimizers`, `stratified_split`,
  `unroll`, `math_attention`, `UnrollError`
- the MAE protocol: `MAEProtocol`, `patch_loss`, `masked_loss`, `mae_forward`, `mae_step_loss`, `MAEOutput`
"""

from maskkit.mae import MAEOutput, MAEProtocol, is_mae, mae_forward, mae_step_loss, masked_loss, patch_loss
from maskkit.mlo import MLOConfig, MLOEngine, default_optimizers
from maskkit.plan import MaskPlan, check_ratio, gather_tokens, num_visible
from maskkit.policies import (
    AttentionPolicy,
    BlockPolicy,
    HPMPolicy,
    LearnedMasker,
    MaskPolicy,
    PolicyCard,
    RandomPolicy,
    ScoredPolicy,
    create_policy,
    list_policies,
    policy_card,
    policy_options,
    register_policy,
)
from maskkit.splits import stratified_split
from maskkit.unroll import UnrollError, math_attention, unroll

__version__ = "0.1.0"

__all__ = [
    "AttentionPolicy",
    "BlockPolicy",
    "HPMPolicy",
    "LearnedMasker",
    "MAEOutput",
    "MLOConfig",
    "MLOEngine",
    "UnrollError",
    "default_optimizers",
    "math_attention",
    "stratified_split",
    "unroll",
    "MAEProtocol",
    "MaskPlan",
    "MaskPolicy",
    "PolicyCard",
    "RandomPolicy",
    "ScoredPolicy",
    "check_ratio",
    "create_policy",
    "gather_tokens",
    "is_mae",
    "list_policies",
    "mae_forward",
    "mae_step_loss",
    "masked_loss",
    "num_visible",
    "patch_loss",
    "policy_card",
    "policy_options",
    "register_policy",
]
