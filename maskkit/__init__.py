"""maskkit: pluggable masking strategies for Masked Autoencoders.

Public API (see the README for a tour):
- masks: `MaskPlan`, `check_ratio`, `num_visible`, `gather_tokens`
- policies: `MaskPolicy`, `ScoredPolicy` (guided fraction), `RandomPolicy`, `AttentionPolicy`, `LearnedMasker`,
  `HPMPolicy`, `BlockPolicy`, `register_policy`, `create_policy`, `list_policies`, `policy_options`,
  `policy_card` (a `PolicyCard`: paper, idea, what it learns from, options with allowed values)
- collapse diagnostics: `maskkit.diagnostics` (`plan_diagnostics`, `mask_iou`, `position_entropy`, `logit_spread`)
- learning the masker: `MLOEngine`, `MLOConfig`, `default_optimizers`, `stratified_split`,
  `unroll`, `math_attention`, `UnrollError` (imported on first use: they need `higher`),
  `HYPERGRADS`, `register_hypergrad`, `Hypergradient` (hypergradient methods)
- the MAE protocol: `MAEProtocol`, `patch_loss`, `masked_loss`, `mae_forward`, `mae_step_loss`, `MAEOutput`
"""

from typing import Any

from maskkit.data.splits import stratified_split
from maskkit.mae import (
    MAEOutput,
    MAEProtocol,
    is_mae,
    is_video_mae,
    mae_forward,
    mae_step_loss,
    masked_loss,
    patch_loss,
    token_grid,
)
from maskkit.mlo import (
    HYPERGRADS,
    Hypergradient,
    MLOConfig,
    MLOEngine,
    default_optimizers,
    register_hypergrad,
)
from maskkit.plan import MaskPlan, check_grid, check_ratio, gather_tokens, num_visible
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

__version__ = "0.1.0"

#: names served lazily from maskkit.mlo.unroll, so that `import maskkit` does not import `higher`
_LAZY = {"unroll": "maskkit.mlo.unroll", "math_attention": "maskkit.mlo.unroll", "UnrollError": "maskkit.mlo.unroll"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'maskkit' has no attribute {name!r}")


__all__ = [
    "AttentionPolicy",
    "BlockPolicy",
    "HPMPolicy",
    "LearnedMasker",
    "MAEOutput",
    "HYPERGRADS",
    "Hypergradient",
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
    "check_grid",
    "check_ratio",
    "create_policy",
    "gather_tokens",
    "is_mae",
    "is_video_mae",
    "list_policies",
    "mae_forward",
    "mae_step_loss",
    "masked_loss",
    "num_visible",
    "patch_loss",
    "policy_card",
    "policy_options",
    "register_hypergrad",
    "register_policy",
    "token_grid",
]
