"""Adapters: the only code in maskkit that knows a foreign MAE codebase.

- `maskkit.adapters.timm`: an MAE around any timm VisionTransformer, with size presets.
- `maskkit.adapters.official_mae`: facebookresearch/mae `MaskedAutoencoderViT` (wrap, use_policy,
  restore_masking, timm_compat).
- `maskkit.adapters.hf`: transformers `ViTMAEForPreTraining` (needs the `hf` extra;
  imported lazily): HFMAE, hf_loss, noise_for_plan, create_hf_mae.
"""

from maskkit.adapters.timm import (
    MAEPreset,
    TimmMAE,
    create_mae,
    get_preset,
    list_presets,
    register_preset,
    sincos_pos_embed_2d,
)
from maskkit.adapters.vit_attention import cls_attention, last_block_cls_attention

__all__ = [
    "MAEPreset",
    "TimmMAE",
    "cls_attention",
    "create_mae",
    "get_preset",
    "last_block_cls_attention",
    "list_presets",
    "register_preset",
    "sincos_pos_embed_2d",
]
