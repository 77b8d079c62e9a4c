"""Adapters: the only code in maskkit that knows a foreign MAE codebase.

- `maskkit.adapters.timm`: an MAE around any timm VisionTransformer, with size presets.
- `maskkit.adapters.official_mae`: facebookresearch/mae `MaskedAutoencoderViT` (wrap, use_policy,
  restore_masking, timm_compat).
- `maskkit.adapters.hf`: transformers `ViTMAEForPreTraining` (needs the `hf` extra;
  imported lazily): HFMAE, hf_loss, noise_for_plan, create_hf_mae.
- `maskkit.adapters.video_mae`: the built-in video MAE (VideoMAE's design on timm blocks), with size presets.
- `maskkit.adapters.hf_video`: transformers `VideoMAEForPreTraining` (clips; the `hf` extra): HFVideoMAE,
  hf_video_loss, create_hf_video_mae.
- `maskkit.adapters.videomae`: MCG-NJU/VideoMAE `PretrainVisionTransformer` (the user's modeling_pretrain.py):
  wrap, videomae_step_loss, timm_registry_kept.

Each model kind of `--model KIND:ARG` is a `ModelAdapter` registered in `ADAPTERS` in one file
(`kind_timm`, `kind_official`, `kind_hf`, `kind_video`, `kind_hf_video`, `kind_videomae`; a third party's through
`register_adapter`, MASKKIT_PLUGINS or the `maskkit.adapters` entry-point group); `maskkit.adapters.models` parses and builds through them.
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
from maskkit.adapters.video_mae import (
    TimmVideoMAE,
    VideoPreset,
    create_video_mae,
    get_video_preset,
    list_video_presets,
    register_video_preset,
)
from maskkit.adapters.vit_attention import attention_received, cls_attention, last_block_cls_attention

# the built-in kinds register in this order, the order of the spec grammar in messages
# isort: off
from maskkit.adapters.adapter import ADAPTERS, BuildRequest, ModelAdapter, ModelSpec, register_adapter
from maskkit.adapters import kind_timm  # noqa: F401
from maskkit.adapters import kind_official  # noqa: F401
from maskkit.adapters import kind_hf  # noqa: F401
from maskkit.adapters import kind_video  # noqa: F401
from maskkit.adapters import kind_hf_video  # noqa: F401
from maskkit.adapters import kind_videomae  # noqa: F401
from maskkit.adapters.models import create_mae_from_spec, model_adapter, parse_model_spec, preferred_patch_size
# isort: on

__all__ = [
    "ADAPTERS",
    "BuildRequest",
    "MAEPreset",
    "ModelAdapter",
    "ModelSpec",
    "TimmMAE",
    "TimmVideoMAE",
    "VideoPreset",
    "attention_received",
    "cls_attention",
    "create_mae",
    "create_mae_from_spec",
    "create_video_mae",
    "get_preset",
    "get_video_preset",
    "last_block_cls_attention",
    "list_presets",
    "list_video_presets",
    "model_adapter",
    "parse_model_spec",
    "preferred_patch_size",
    "register_adapter",
    "register_preset",
    "register_video_preset",
    "sincos_pos_embed_2d",
]
