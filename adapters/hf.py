"""Adapter for Hugging Face `transformers` `ViTMAEForPreTraining` (the `hf` extra).

Masking is driven through the model's own `forward(pixel_values, noise=...)`: ViTMAE keeps the
patches with the lowest noise, so the noise `plan.ids_restore` (the rank of every patch in the
plan's shuffled order) makes it keep exactly `plan.ids_keep`, in the same order, without patching
the model. `hf_loss` then weights the per-patch loss by `plan.weights`; `HFMAE` is the MAE protocol.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from maskkit.mae import MAEOutput, mae_step_loss, masked_loss, patch_loss, policy_aux_loss, policy_context
from maskkit.plan import MaskPlan, num_visible
from maskkit.policies.random import RandomPolicy


def _transformers() -> Any:
    """Import transformers on first use, with a one-line hint when the extra is missing."""
    try:
        import transformers
    except ImportError as err:
        raise ImportError(
            "maskkit.adapters.hf needs Hugging Face transformers: pip install 'maskkit[hf]'"
        ) from err
    return transformers


def create_hf_mae(**config: Any) -> nn.Module:
    """A randomly initialised `ViTMAEForPreTraining` from `ViTMAEConfig(**config)` (no download).

    Example (CPU-sized): `create_hf_mae(image_size=16, patch_size=4, num_channels=3, hidden_size=32,
    num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, decoder_hidden_size=16,
    decoder_num_hidden_layers=1, decoder_num_attention_heads=2, decoder_intermediate_size=32)`.
    """
    tf = _transformers()
    return tf.ViTMAEForPreTraining(tf.ViTMAEConfig(**config))


def _unwrap(model: Any) -> nn.Module:
    """The `ViTMAEForPreTraining` inside an HFMAE, or the model itself after a duck-type check."""
    if isinstance(model, HFMAE):
        return model.model
    if not isinstance(model, nn.Module) or not all(
        hasattr(model, name) for name in ("vit", "decoder", "patchify", "config")
    ):
        raise TypeError(f"expected a transformers ViTMAEForPreTraining, got {type(model).__name__}")
    return model


def _layer_out(out: Any) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out  # transformers 4.x layers return tuples


def noise_for_plan(plan: MaskPlan) -> Tensor:
    """ViTMAE `noise` [B, N] under which its `random_masking` reproduces `plan` exactly.

    argsort(noise) must equal the plan's shuffle order (ids_keep first); `ids_restore` holds each
    patch's position in that order, distinct integers, so argsort gives it back with no ties.
    """
    return plan.ids_restore.to(torch.get_default_dtype())


@contextlib.contextmanager
def _mask_ratio_for(model: nn.Module, keep: int) -> Iterator[None]:
    """Temporarily set the config's `mask_ratio` so that ViTMAE keeps `keep` patches, if it would not."""
    configs = {id(c): c for c in (model.config, model.vit.config, model.vit.embeddings.config)}.values()
    n = model.vit.embeddings.patch_embeddings.num_patches
    saved = [(c, c.mask_ratio) for c in configs]
    try:
        for c, ratio in saved:
            if num_visible(n, ratio) != keep:
                c.mask_ratio = 1.0 - (keep + 0.5) / n  # int(n * (1 - r)) == keep
        yield
    finally:
        for c, ratio in saved:
            c.mask_ratio = ratio


class HFMAE(nn.Module):
    """The MAE protocol over a `ViTMAEForPreTraining` (held as the submodule `model`).

    `patch_tokens` skips the embeddings' internal random masking; `encode`/`decode` run the encoder
    layers and `model.decoder` on a MaskPlan, matching HF's forward for the same kept patches.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = _unwrap(model)
        cfg = self.model.config
        embeddings = self.model.vit.embeddings
        size = embeddings.patch_embeddings.patch_size
        self.patch_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.num_patches = int(embeddings.patch_embeddings.num_patches)
        self.embed_dim = int(cfg.hidden_size)
        self.in_chans = int(cfg.num_channels)

    @property
    def norm_pix_loss(self) -> bool:
        return bool(self.model.config.norm_pix_loss)

    @property
    def config(self) -> Any:
        return self.model.config

    def patch_tokens(self, images: Tensor) -> Tensor:
        """[B, C, H, W] -> [B, N, D]: patch embeddings plus position embeddings, no CLS, no masking."""
        embeddings = self.model.vit.embeddings
        return embeddings.patch_embeddings(images) + embeddings.position_embeddings[:, 1:, :]

    def _with_cls(self, x: Tensor) -> Tensor:
        """[B, K, D] -> [B, 1 + K, D]."""
        embeddings = self.model.vit.embeddings
        cls = embeddings.cls_token + embeddings.position_embeddings[:, :1, :]
        return torch.cat((cls.expand(x.shape[0], -1, -1), x), dim=1)

    def _layers(self) -> nn.ModuleList:
        vit = self.model.vit
        return vit.layers if hasattr(vit, "layers") else vit.encoder.layer  # transformers 5.x / 4.x

    def _encoder(self, x: Tensor) -> Tensor:
        for layer in self._layers():
            x = _layer_out(layer(x))
        return self.model.vit.layernorm(x)

    def encode(self, tokens: Tensor, plan: MaskPlan) -> Tensor:
        """[B, N, D] -> latent [B, 1 + K, D] of the plan's visible tokens."""
        return self._encoder(self._with_cls(plan.gather(tokens)))

    def decode(self, latent: Tensor, plan: MaskPlan) -> Tensor:
        """HF's decoder with the plan's `ids_restore`: [B, 1 + K, D] -> [B, N, P]."""
        return self.model.decoder(latent, plan.ids_restore).logits

    def transformer_blocks(self) -> list[nn.Module]:
        """Encoder then decoder layers: what `--compile` compiles."""
        return [*self._layers(), *self.model.decoder.decoder_layers]

    def patchify(self, images: Tensor) -> Tensor:
        return self.model.patchify(images)

    def unpatchify(self, patches: Tensor) -> Tensor:
        return self.model.unpatchify(patches)

    def features(self, images: Tensor) -> Tensor:
        """CLS after the final layernorm with nothing masked: [B, C, H, W] -> [B, D].

        ViTMAEModel always masks `config.mask_ratio` of the patches, so this runs its layers on all
        tokens in patch order instead of calling it.
        """
        return self._encoder(self._with_cls(self.patch_tokens(images)))[:, 0]

    def cls_attention(self, images: Tensor) -> Tensor:
        """CLS-to-patch softmax attention of the last encoder layer, mean over heads: [B, N]."""
        layers = self._layers()
        x = self._with_cls(self.patch_tokens(images))  # [B, 1 + N, D]
        for layer in layers[:-1]:
            x = _layer_out(layer(x))
        last = layers[-1]
        h = last.layernorm_before(x)
        q_proj, k_proj = _query_key(last.attention)
        heads = self.model.config.num_attention_heads
        b, t, d = h.shape
        q = q_proj(h[:, :1]).reshape(b, 1, heads, -1).transpose(1, 2)  # [B, H, 1, d]
        k = k_proj(h).reshape(b, t, heads, -1).transpose(1, 2)  # [B, H, 1 + N, d]
        attn = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)  # [B, H, 1, 1 + N]
        return attn[:, :, 0, 1:].mean(dim=1)  # [B, N]

    def forward(
        self, images: Tensor, policy: nn.Module | None = None, ratio: float | None = None, **context: Any
    ) -> MAEOutput:
        """One pretraining forward through the protocol (as TimmMAE): policy (default random) -> plan -> loss."""
        return mae_step_loss(self, RandomPolicy() if policy is None else policy, images, ratio=ratio, **context)


def _query_key(attention: nn.Module) -> tuple[nn.Module, nn.Module]:
    inner = getattr(attention, "attention", attention)  # 4.x nests a self-attention module
    for q_name, k_name in (("q_proj", "k_proj"), ("query", "key")):
        if hasattr(inner, q_name) and hasattr(inner, k_name):
            return getattr(inner, q_name), getattr(inner, k_name)
    raise TypeError(f"cannot find query/key projections in {type(attention).__name__}")


def wrap(model: nn.Module) -> HFMAE:
    """The MAE protocol over a `ViTMAEForPreTraining`."""
    return HFMAE(model)


def hf_loss(
    model: nn.Module,
    pixel_values: Tensor,
    policy: Any,
    ratio: float | None = None,
    **context: Any,
) -> MAEOutput:
    """One pretraining forward of a `ViTMAEForPreTraining` masked by `policy`, loss weighted by the plan.

    The policy sees the patch tokens [B, N, D] and the context (`images`, `encoder` = HFMAE, and
    `context`); its plan reaches HF as `noise=noise_for_plan(plan)`. `ratio` None means the
    policy's own; when it keeps a different number of patches than `config.mask_ratio`, the config
    is overridden for this call only. Returns the weighted loss, HF's logits [B, N, P], the plan and
    the unweighted per-patch loss; with `plan.weights` None the loss equals HF's `outputs.loss`.
    A policy with its own objective (e.g. `hpm`) puts it in `aux_loss`: backpropagate `total_loss`.
    """
    hf = _unwrap(model)
    mae = model if isinstance(model, HFMAE) else HFMAE(hf)
    tokens = mae.patch_tokens(pixel_values)  # [B, N, D]
    plan = policy(tokens, ratio=ratio, **policy_context(mae, pixel_values, **context))
    if not isinstance(plan, MaskPlan):
        raise TypeError(f"policy {type(policy).__name__} returned {type(plan).__name__}, not a MaskPlan")
    with _mask_ratio_for(hf, plan.num_visible):
        outputs = hf(pixel_values=pixel_values, noise=noise_for_plan(plan))
    if not torch.equal(outputs.mask, plan.mask.to(outputs.mask.dtype)):
        raise RuntimeError("ViTMAE did not follow the plan's noise; its random_masking has changed")
    target = hf.patchify(pixel_values)  # [B, N, P]
    per_patch = patch_loss(outputs.logits, target, bool(hf.config.norm_pix_loss))  # [B, N]
    loss = masked_loss(per_patch, outputs.mask, plan.weights)
    return MAEOutput(loss=loss, pred=outputs.logits, plan=plan, per_patch=per_patch,
                     aux_loss=policy_aux_loss(policy, plan, per_patch))


__all__ = ["HFMAE", "create_hf_mae", "hf_loss", "noise_for_plan", "wrap"]
