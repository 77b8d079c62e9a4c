"""Adapter for the official VideoMAE (MCG-NJU/VideoMAE `modeling_pretrain.PretrainVisionTransformer`): clips.

Its interface: `model(x, mask)` with clips x [B, C, T, H, W] and a boolean mask [B, N] (True = hidden, the same
count in every row, made by `masking_generator.TubeMaskingGenerator` in the data pipeline) returns the decoder's
predictions for the hidden tokens [B, N_hidden, t*p*p*3] in ascending token order; the loss is computed in the
training loop (`engine_for_pretraining.train_one_epoch`): `maskkit.adapters.videomae_loss`. The model is never
patched:
- `wrap(model, norm_pix_loss=True)`: the MAE protocol, driving `model.encoder`'s and `model.decoder`'s parts as
  `forward` does (`norm_pix_loss` is the loop's `--normlize_target`, True by default, not the model's);
- `videomae_step_loss(model, clips, policy)`: the drop-in for the loop's `outputs = model(videos, bool_masked_pos)`
  and its loss, with the mask made by a maskkit policy;
- `timm_registry_kept()`: the real `modeling_finetune.py` registers its models in timm's registry under names timm
  already uses (`vit_base_patch16_224`, ...), which would change what `timm.create_model` (and maskkit's timm
  presets) build in the same process; the loader imports it inside this guard, which restores the registry.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from maskkit.mae import MAEOutput, check_images, mae_step_loss, policy_aux_loss, policy_context
from maskkit.plan import MaskPlan, gather_tokens, scatter_tokens
from maskkit.policies.random import RandomPolicy
from maskkit.tubelets import patchify_clips, unpatchify_clips

from .hf_video import ascending, hidden_ids
from .videomae_loss import videomae_loss, videomae_pixels

__all__ = ["REQUIRED_ATTRIBUTES", "OfficialVideoMAE", "timm_registry_kept", "videomae_step_loss", "wrap"]

#: what `wrap` needs of a model (the official interface), as dotted attribute paths
REQUIRED_ATTRIBUTES = (
    "encoder.patch_embed", "encoder.pos_embed", "encoder.blocks", "encoder.norm", "encoder.head",
    "decoder", "encoder_to_decoder", "mask_token", "pos_embed",
)  # fmt: skip


def _has(model: Any, dotted: str) -> bool:
    for part in dotted.split("."):
        if not hasattr(model, part):
            return False
        model = getattr(model, part)
    return True


def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an official VideoMAE nn.Module, got {type(model).__name__}")
    missing = [name for name in REQUIRED_ATTRIBUTES if not _has(model, name)]
    if missing:
        raise TypeError(f"{type(model).__name__} lacks the official VideoMAE interface (PretrainVisionTransformer; "
                        f"missing: {', '.join(missing)})")  # fmt: skip


def _pair(size: Any) -> tuple[int, int]:
    return (int(size[0]), int(size[1])) if isinstance(size, (tuple, list)) else (int(size), int(size))


def _table(table: Tensor, like: Tensor) -> Tensor:
    """A fixed sin-cos table [1, N, D] as the official forward uses it: detached, in `like`'s dtype and device."""
    return table.type_as(like).to(like.device).clone().detach()


class OfficialVideoMAE(nn.Module):
    """The MAE protocol over an official `PretrainVisionTransformer` (held as the submodule `model`).

    The latent is the encoder's output (after its norm and head) for the visible tokens in ascending token order
    [B, K, D]. With `plan.decoder_ids`, the decoder runs on the visible tokens and the mask tokens of that subset
    only (VideoMAE V2's dual masking: the cost lever), zeros elsewhere. `num_frames` is derived from the tokens
    (the v1 class always builds 16 frames).
    """

    def __init__(self, model: nn.Module, norm_pix_loss: bool = True) -> None:
        super().__init__()
        _check_model(model)
        self.model = model
        embed = model.encoder.patch_embed
        self.patch_size = _pair(embed.patch_size)[0]
        self.tubelet_size = int(getattr(embed, "tubelet_size", 2))
        self.img_size = _pair(embed.img_size)
        self.in_chans = int(embed.proj.in_channels)
        self.embed_dim = int(model.encoder.pos_embed.shape[-1])
        self.num_patches = int(embed.num_patches)
        per_slice = (self.img_size[0] // self.patch_size) * (self.img_size[1] // self.patch_size)
        self.num_frames = self.num_patches // per_slice * self.tubelet_size
        self.grid = (self.num_frames // self.tubelet_size, *(s // self.patch_size for s in self.img_size))
        self._norm_pix_loss = bool(norm_pix_loss)

    @property
    def norm_pix_loss(self) -> bool:
        """The training loop's `normlize_target` (per-channel tubelet normalisation of the targets)."""
        return self._norm_pix_loss

    def patch_tokens(self, clips: Tensor) -> Tensor:
        """[B, C, T, H, W] -> [B, N, D]: the tubelet embedding plus the encoder's fixed table, nothing dropped."""
        x = self.model.encoder.patch_embed(clips)  # [B, N, D]
        return x + _table(self.model.encoder.pos_embed, x)

    def _encoder(self, x: Tensor) -> Tensor:
        """The encoder's blocks, norm and head: [B, L, D] -> [B, L, D]."""
        encoder = self.model.encoder
        for blk in encoder.blocks:
            x = blk(x)
        return encoder.head(encoder.norm(x))

    def encode(self, tokens: Tensor, plan: MaskPlan) -> Tensor:
        """[B, N, D] -> latent [B, K, D]: the visible tokens in ascending token order through the encoder."""
        return self._encoder(gather_tokens(tokens, ascending(plan.ids_keep)))

    def decode(self, latent: Tensor, plan: MaskPlan) -> Tensor:
        """[B, K, D] -> [B, N, P]: the decoder's predictions of the hidden tokens (or of `decoder_ids`), zeros
        elsewhere, as the model's own forward builds its input."""
        m = self.model
        x = m.encoder_to_decoder(latent)  # [B, K, Dd]
        b, _, dd = x.shape
        table = _table(m.pos_embed, x).expand(b, -1, -1)  # [B, N, Dd]
        decoded = hidden_ids(plan)  # [B, M] ascending
        full = torch.cat([x + gather_tokens(table, ascending(plan.ids_keep)),
                          m.mask_token + gather_tokens(table, decoded)], dim=1)  # [B, K + M, Dd]  # fmt: skip
        pred = m.decoder(full, decoded.shape[1])  # [B, M, P]
        return scatter_tokens(pred, decoded, self.num_patches)  # [B, N, P] zeros but at the decoded tokens

    def pixel_loss(self, pred: Tensor, clips: Tensor, plan: MaskPlan) -> tuple[Tensor, Tensor]:
        """engine_for_pretraining's loss (`videomae_loss`): (scalar, per-token [B, N]); `mae_forward` uses it."""
        return videomae_loss(pred, clips, plan, self.tubelet_size, self.patch_size, self.norm_pix_loss)

    def prediction_pixels(self, pred: Tensor, clips: Tensor) -> Tensor:
        """Predictions [B, N, P] in the clips' own normalised pixels, `patchify`'s layout (`videomae_pixels`): what
        a picture of the reconstruction shows (`unpatchify` of it)."""
        return videomae_pixels(pred, clips, self.tubelet_size, self.patch_size, self.norm_pix_loss)

    def transformer_blocks(self) -> list[nn.Module]:
        """Encoder then decoder blocks: what `--compile` compiles."""
        return [*self.model.encoder.blocks, *getattr(self.model.decoder, "blocks", [])]

    def patchify(self, clips: Tensor) -> Tensor:
        """[B, C, T, H, W] -> [B, N, t*p*p*C], each tubelet's pixels ordered (t, p, p, C): the loop's
        `b c (t p0) (h p1) (w p2) -> b (t h w) (p0 p1 p2 c)` (before its un-normalisation, see `pixel_loss`)."""
        return patchify_clips(clips, self.tubelet_size, self.patch_size)

    def unpatchify(self, patches: Tensor) -> Tensor:
        """Inverse of `patchify`: [B, N, t*p*p*C] -> [B, C, T, H, W]."""
        return unpatchify_clips(patches, self.grid, self.tubelet_size, self.patch_size, self.in_chans)

    def features(self, clips: Tensor) -> Tensor:
        """[B, C, T, H, W] -> [B, D]: the mean over all tokens of the unmasked encoder's output (after its norm),
        i.e. `encoder.forward_features(x, no mask).mean(1)`. The fine-tuning model's `fc_norm` is a head's
        parameter that the pretraining model does not have."""
        return self._encoder(self.patch_tokens(clips)).mean(dim=1)

    def cls_attention(self, clips: Tensor) -> Tensor:
        """[B, C, T, H, W] -> [B, N]: the attention each token receives in the last encoder block (softmax of the
        unmasked clip), averaged over heads and queries (VideoMAE has no CLS); each row sums to 1."""
        blocks = self.model.encoder.blocks
        x = self.patch_tokens(clips)  # [B, N, D]
        for blk in blocks[:-1]:
            x = blk(x)
        last = blocks[-1]
        attn = last.attn
        h = last.norm1(x)
        b, n, _ = h.shape
        q_bias = getattr(attn, "q_bias", None)
        bias = attn.qkv.bias if q_bias is None else torch.cat([q_bias, torch.zeros_like(attn.v_bias), attn.v_bias])
        qkv = F.linear(h, attn.qkv.weight, bias).reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = qkv[0], qkv[1]  # [B, H, N, d]
        scale = getattr(attn, "scale", q.shape[-1] ** -0.5)
        weights = ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # [B, H, N, N]
        return weights.mean(dim=(1, 2))  # [B, N]

    def forward(
        self, clips: Tensor, policy: nn.Module | None = None, ratio: float | None = None, **context: Any
    ) -> MAEOutput:
        """One pretraining forward through the protocol: policy (default random) -> plan -> VideoMAE's loss."""
        return mae_step_loss(self, RandomPolicy() if policy is None else policy, clips, ratio=ratio, **context)


def wrap(model: nn.Module, norm_pix_loss: bool = True) -> OfficialVideoMAE:
    """The MAE protocol over an official VideoMAE model (which stays usable and unchanged). `norm_pix_loss`: the
    training loop's `--normlize_target` (VideoMAE's default True)."""
    return OfficialVideoMAE(model, norm_pix_loss)


def videomae_step_loss(
    model: nn.Module, clips: Tensor, policy: Any, ratio: float | None = None, norm_pix_loss: bool = True, **context: Any
) -> MAEOutput:
    """The loop's `outputs = model(videos, bool_masked_pos)` and loss, with the mask made by `policy`.

    clips: [B, C, T, H, W], normalised with ImageNet's statistics as the official loader does. The model's own
    forward runs with `plan.mask`; without weights and `decoder_ids` the loss is engine_for_pretraining's bit for
    bit; with weights, maskkit's weighted loss of the same predictions; with `decoder_ids`, the loss over that subset
    (the model still predicts every hidden token). `pred` is [B, N, P] with the hidden tokens' predictions in place.
    """
    mae = model if isinstance(model, OfficialVideoMAE) else OfficialVideoMAE(model, norm_pix_loss)
    check_images(mae, clips, "clips")
    tokens = mae.patch_tokens(clips)  # [B, N, D]
    plan = policy(tokens, ratio=ratio, **policy_context(mae, clips, **context))
    if not isinstance(plan, MaskPlan):
        raise TypeError(f"policy {type(policy).__name__} returned {type(plan).__name__}, not a MaskPlan")
    outputs = mae.model(clips, plan.mask.bool())  # [B, M, P], hidden tokens ascending
    hidden = plan.mask.bool().nonzero()[:, 1].reshape(plan.batch_size, plan.num_hidden)  # [B, M]
    pred = outputs.new_zeros(plan.batch_size, plan.num_patches, outputs.shape[-1])  # [B, N, P]
    pred = pred.scatter(1, hidden.unsqueeze(-1).expand(-1, -1, outputs.shape[-1]), outputs)
    loss, per_patch = mae.pixel_loss(pred, clips, plan)
    return MAEOutput(loss=loss, pred=pred, plan=plan, per_patch=per_patch,
                     aux_loss=policy_aux_loss(policy, plan, per_patch))  # fmt: skip


@contextlib.contextmanager
def timm_registry_kept() -> Iterator[None]:
    """Whatever runs inside leaves timm's model registry as it found it (entries added or overwritten by
    `@register_model` are undone in place); a no-op where timm has no `_registry` module."""
    try:
        from timm.models import _registry as registry
    except ImportError:  # timm < 0.9 kept it elsewhere; nothing to guard
        yield
        return
    containers = {name: value for name, value in vars(registry).items()
                  if name.startswith("_") and not name.startswith("__") and isinstance(value, (dict, set, list))}  # fmt: skip
    saved = {name: _two_levels(value) for name, value in containers.items()}
    try:
        with warnings.catch_warnings():  # the overwrites it warns of are undone below
            warnings.filterwarnings("ignore", message=r"Overwriting \S+ in registry", category=UserWarning)
            yield
    finally:
        for name, value in containers.items():
            value.clear()
            if isinstance(value, list):
                value.extend(saved[name])
            else:
                value.update(saved[name])


def _two_levels(value: Any) -> Any:
    """A copy of a registry container and of the sets, lists and dicts in it (the objects inside stay shared)."""
    inner = (dict, set, list)
    if isinstance(value, dict):
        return {key: copy.copy(item) if isinstance(item, inner) else item for key, item in value.items()}
    return copy.copy(value)
