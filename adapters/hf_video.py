"""Adapter for Hugging Face `transformers` `VideoMAEForPreTraining` (the `hf` extra): clips [B, C, T, H, W].

The model is never patched. transformers takes `pixel_values` [B, T, C, H, W] (frames before channels) and a
`bool_masked_pos` [B, N] with the same number of hidden tokens in every row, which a maskkit plan has:
- `HFVideoMAE`, the MAE protocol, drives the model's own submodules as its `forward` does: the visible tokens in
  ascending patch order through the encoder, then the decoder over [visible | mask tokens] with the fixed sin-cos
  table, whose predictions for the hidden tokens (ascending) are put back in place with the plan;
- `hf_video_loss(model, clips, policy)`: the model's own `forward(pixel_values, bool_masked_pos=plan.mask)`, for a
  user's loop, with its logits re-scored when the plan has weights.
The loss is VideoMAE's own (`maskkit.adapters.videomae_loss`): transformers' `outputs.loss` bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from maskkit.mae import MAEOutput, check_images, mae_step_loss, policy_aux_loss, policy_context
from maskkit.plan import MaskPlan, gather_tokens, scatter_tokens
from maskkit.policies.random import RandomPolicy
from maskkit.tubelets import patchify_clips, unpatchify_clips

from .hf import _transformers
from .videomae_loss import videomae_loss, videomae_pixels

__all__ = ["HFVideoMAE", "create_hf_video_mae", "hf_video_loss", "to_pixel_values", "wrap"]


def create_hf_video_mae(**config: Any) -> nn.Module:
    """A randomly initialised `VideoMAEForPreTraining` from `VideoMAEConfig(**config)` (no download)."""
    tf = _transformers()
    return tf.VideoMAEForPreTraining(tf.VideoMAEConfig(**config))


def _unwrap(model: Any) -> nn.Module:
    """The `VideoMAEForPreTraining` inside an HFVideoMAE, or the model itself after a duck-type check."""
    if isinstance(model, HFVideoMAE):
        return model.model
    if not isinstance(model, nn.Module) or not all(
        hasattr(model, name) for name in ("videomae", "decoder", "encoder_to_decoder", "mask_token", "config")
    ):
        raise TypeError(f"expected a transformers VideoMAEForPreTraining, got {type(model).__name__}")
    return model


def to_pixel_values(clips: Tensor) -> Tensor:
    """maskkit's clips [B, C, T, H, W] as transformers' `pixel_values` [B, T, C, H, W] (a view)."""
    return clips.transpose(1, 2)


def ascending(ids: Tensor) -> Tensor:
    """Token indices [B, K] sorted per row: the order in which VideoMAE's boolean indexing keeps tokens."""
    return ids.sort(dim=1).values


class HFVideoMAE(nn.Module):
    """The MAE protocol over a `VideoMAEForPreTraining` (held as the submodule `model`); see the module docstring.

    The latent is the encoder's output for the visible tokens in ascending patch order [B, K, D] (no CLS).
    With `plan.decoder_ids`, the decoder runs on the visible tokens and the mask tokens of that subset only
    (VideoMAE V2's dual masking: the cost lever), zeros elsewhere.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = _unwrap(model)
        cfg = self.model.config
        embed = self.model.videomae.embeddings.patch_embeddings
        self.patch_size = int(cfg.patch_size)
        self.tubelet_size = int(cfg.tubelet_size)
        self.num_frames = int(cfg.num_frames)
        self.in_chans = int(cfg.num_channels)
        self.embed_dim = int(cfg.hidden_size)
        self.num_patches = int(embed.num_patches)
        h, w = embed.image_size
        self.img_size = (int(h), int(w))
        self.grid = (self.num_frames // self.tubelet_size, int(h) // self.patch_size, int(w) // self.patch_size)

    @property
    def norm_pix_loss(self) -> bool:
        return bool(self.model.config.norm_pix_loss)

    @property
    def config(self) -> Any:
        return self.model.config

    def _layers(self) -> nn.ModuleList:
        return self.model.videomae.encoder.layer

    def _encoder(self, x: Tensor) -> Tensor:
        """The encoder layers, then its layernorm where it has one (not with mean pooling): [B, L, D] -> [B, L, D]."""
        x = self.model.videomae.encoder(x).last_hidden_state
        norm = self.model.videomae.layernorm
        return x if norm is None else norm(x)

    def patch_tokens(self, clips: Tensor) -> Tensor:
        """[B, C, T, H, W] -> [B, N, D]: the tubelet embedding plus the fixed sin-cos table, nothing dropped."""
        embeddings = self.model.videomae.embeddings
        x = embeddings.patch_embeddings(to_pixel_values(clips))  # [B, N, D]
        return x + embeddings.position_embeddings.detach().type_as(x).to(device=x.device, copy=True)

    def encode(self, tokens: Tensor, plan: MaskPlan) -> Tensor:
        """[B, N, D] -> latent [B, K, D]: the visible tokens in ascending patch order through the encoder."""
        return self._encoder(gather_tokens(tokens, ascending(plan.ids_keep)))

    def decode(self, latent: Tensor, plan: MaskPlan) -> Tensor:
        """[B, K, D] -> [B, N, P]: predictions of the hidden tokens (or of `decoder_ids`), zeros elsewhere."""
        m = self.model
        x = m.encoder_to_decoder(latent)  # [B, K, Dd]
        b, _, dd = x.shape
        table = m.position_embeddings.expand(b, -1, -1).type_as(x).detach().to(device=x.device, copy=True)  # [B, N, Dd]
        decoded = hidden_ids(plan)  # [B, M] ascending
        pos_visible = gather_tokens(table, ascending(plan.ids_keep))  # [B, K, Dd]
        pos_decoded = gather_tokens(table, decoded)  # [B, M, Dd]
        full = torch.cat([x + pos_visible, m.mask_token + pos_decoded], dim=1)  # [B, K + M, Dd]
        logits = m.decoder(full, decoded.shape[1]).logits  # [B, M, P]
        return scatter_tokens(logits, decoded, self.num_patches)  # [B, N, P] zeros but at the decoded tokens

    def pixel_loss(self, pred: Tensor, clips: Tensor, plan: MaskPlan) -> tuple[Tensor, Tensor]:
        """VideoMAE's loss (`videomae_loss`): (scalar, per-token [B, N]); `mae_forward` uses it."""
        return videomae_loss(pred, clips, plan, self.tubelet_size, self.patch_size, self.norm_pix_loss)

    def prediction_pixels(self, pred: Tensor, clips: Tensor) -> Tensor:
        """Predictions [B, N, P] in the clips' own normalised pixels, `patchify`'s layout (`videomae_pixels`): what
        a picture of the reconstruction shows (`unpatchify` of it)."""
        return videomae_pixels(pred, clips, self.tubelet_size, self.patch_size, self.norm_pix_loss)

    def transformer_blocks(self) -> list[nn.Module]:
        """Encoder then decoder layers: what `--compile` compiles."""
        return [*self._layers(), *self.model.decoder.decoder_layers]

    def patchify(self, clips: Tensor) -> Tensor:
        """[B, C, T, H, W] -> [B, N, t*p*p*C]: each tubelet's pixels ordered (t, p, p, C), as transformers' labels
        (before their un-normalisation and per-channel normalisation, which `pixel_loss` applies)."""
        return patchify_clips(clips, self.tubelet_size, self.patch_size)

    def unpatchify(self, patches: Tensor) -> Tensor:
        """Inverse of `patchify`: [B, N, t*p*p*C] -> [B, C, T, H, W]."""
        return unpatchify_clips(patches, self.grid, self.tubelet_size, self.patch_size, self.in_chans)

    def features(self, clips: Tensor) -> Tensor:
        """[B, C, T, H, W] -> [B, D]: the mean over all tokens of the unmasked encoder's output (after its layernorm
        where it has one). VideoMAEForVideoClassification adds its own `fc_norm` on top: a fine-tuning head's
        parameter that the pretraining model does not have."""
        return self._encoder(self.patch_tokens(clips)).mean(dim=1)

    def cls_attention(self, clips: Tensor) -> Tensor:
        """[B, C, T, H, W] -> [B, N]: the attention each token receives in the last encoder layer (softmax of the
        unmasked clip), averaged over heads and queries (VideoMAE has no CLS); each row sums to 1."""
        layers = self._layers()
        x = self.patch_tokens(clips)  # [B, N, D]
        for layer in layers[:-1]:
            x = layer(x)
        inner = layers[-1].attention.attention
        h = layers[-1].layernorm_before(x)
        b, n, _ = h.shape
        heads = inner.num_attention_heads
        q = inner.query(h).reshape(b, n, heads, -1).transpose(1, 2)  # [B, H, N, d]
        k = inner.key(h).reshape(b, n, heads, -1).transpose(1, 2)  # [B, H, N, d]
        attn = (q @ k.transpose(-2, -1) * inner.scaling).softmax(dim=-1)  # [B, H, N, N]
        return attn.mean(dim=(1, 2))  # [B, N]

    def forward(
        self, clips: Tensor, policy: nn.Module | None = None, ratio: float | None = None, **context: Any
    ) -> MAEOutput:
        """One pretraining forward through the protocol: policy (default random) -> plan -> VideoMAE's loss."""
        return mae_step_loss(self, RandomPolicy() if policy is None else policy, clips, ratio=ratio, **context)


def hidden_ids(plan: MaskPlan) -> Tensor:
    """[B, M] the tokens the decoder predicts, ascending: `decoder_ids` when the plan names them, else every hidden
    token (VideoMAE's `bool_masked_pos` order)."""
    if plan.decoder_ids is not None:
        return ascending(plan.decoder_ids)
    b, m = plan.batch_size, plan.num_hidden
    return plan.mask.bool().nonzero()[:, 1].reshape(b, m)  # row-major: ascending in each row


def wrap(model: nn.Module) -> HFVideoMAE:
    """The MAE protocol over a `VideoMAEForPreTraining` (which stays usable and unchanged)."""
    return HFVideoMAE(model)


def hf_video_loss(
    model: nn.Module, clips: Tensor, policy: Any, ratio: float | None = None, **context: Any
) -> MAEOutput:
    """One pretraining forward of a `VideoMAEForPreTraining`, masked by `policy` through its own `bool_masked_pos`.

    clips: [B, C, T, H, W] (maskkit's layout; transposed for transformers). The policy sees the tokens [B, N, D]
    and the context (`images`, `encoder` = HFVideoMAE, `grid`, and `context`). Without weights and without
    `decoder_ids` the loss is transformers' `outputs.loss`; with weights it is maskkit's weighted loss of the same
    logits; with `decoder_ids` (a plan carrying them) transformers still predicts every hidden token and the loss
    is taken over the subset (no saving: use the protocol, `wrap(model)`, for that). `pred` is [B, N, P] with the
    hidden tokens' logits in place and zeros elsewhere.
    """
    hf = _unwrap(model)
    mae = model if isinstance(model, HFVideoMAE) else HFVideoMAE(hf)
    check_images(mae, clips, "clips")
    tokens = mae.patch_tokens(clips)  # [B, N, D]
    plan = policy(tokens, ratio=ratio, **policy_context(mae, clips, **context))
    if not isinstance(plan, MaskPlan):
        raise TypeError(f"policy {type(policy).__name__} returned {type(plan).__name__}, not a MaskPlan")
    outputs = hf(pixel_values=to_pixel_values(clips), bool_masked_pos=plan.mask.bool())
    hidden = plan.mask.bool().nonzero()[:, 1].reshape(plan.batch_size, plan.num_hidden)  # [B, M] ascending
    pred = outputs.logits.new_zeros(plan.batch_size, plan.num_patches, outputs.logits.shape[-1])  # [B, N, P]
    pred = pred.scatter(1, hidden.unsqueeze(-1).expand(-1, -1, pred.shape[-1]), outputs.logits)
    loss, per_patch = mae.pixel_loss(pred, clips, plan)
    if plan.weights is None and plan.decoder_ids is None:
        loss = outputs.loss  # transformers' own (equal to `loss`; kept as its tensor)
    return MAEOutput(loss=loss, pred=pred, plan=plan, per_patch=per_patch,
                     aux_loss=policy_aux_loss(policy, plan, per_patch))  # fmt: skip

