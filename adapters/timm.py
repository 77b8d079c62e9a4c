"""An MAE around any timm `VisionTransformer`, with a light decoder of maskkit's own.

The encoder is a plain timm `VisionTransformer` held as `self.encoder` (no classifier head,
`global_pool="token"`), so `encoder_state_dict()` loads into `timm.create_model(...)` with
`strict=True` for fine-tuning. As in MAE (He et al. 2022, models_mae.py), the encoder's
`pos_embed` is overwritten with fixed 2-D sin-cos values and frozen (`requires_grad=False`;
it stays a Parameter, so the state dict keeps timm's layout); pass `fixed_pos_embed=False`
to keep an instance's own, trainable one. The decoder (`decoder_embed`, `mask_token`,
`decoder_pos_embed`, `decoder_blocks` of timm `Block`s, `decoder_norm`, `decoder_pred`)
follows MAE's layout and initialisation; given a plan's `decoder_ids` it decodes only CLS, the visible
tokens and those (decoder masking, a cost lever). Size presets: `create_mae("tiny" | "pilot" | "vit-b" | "vit-l")`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import timm
import torch
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from maskkit.mae import MAEOutput, mae_step_loss
from maskkit.plan import MaskPlan
from maskkit.policies.random import RandomPolicy

from .vit_attention import check_timm_block, cls_through_blocks, last_block_cls_attention

__all__ = [
    "MAEPreset",
    "TimmMAE",
    "create_mae",
    "get_preset",
    "list_presets",
    "register_preset",
    "sincos_pos_embed_2d",
]


def _sincos_1d(dim: int, positions: Tensor) -> Tensor:
    """[M] positions -> [M, dim]: sin of the first dim/2 frequencies, then cos (float64)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))  # [dim/2]
    angles = positions[:, None] * omega[None, :]  # [M, dim/2]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_pos_embed_2d(embed_dim: int, grid_size: tuple[int, int], cls_token: bool = True) -> Tensor:
    """MAE's fixed 2-D sin-cos positional embedding: [(1 +) H*W, D], patches in row-major order.

    The first D/2 channels encode each patch's column, the last D/2 its row (MAE's
    `get_2d_sincos_pos_embed` layout); the CLS slot, if any, is all zeros. D must be divisible by 4.
    """
    if embed_dim % 4 != 0:
        raise ValueError(f"sin-cos positional embedding needs a width divisible by 4, got {embed_dim}")
    rows, cols = grid_size
    row = torch.arange(rows, dtype=torch.float64).repeat_interleave(cols)  # [H*W]
    col = torch.arange(cols, dtype=torch.float64).repeat(rows)  # [H*W]
    emb = torch.cat([_sincos_1d(embed_dim // 2, col), _sincos_1d(embed_dim // 2, row)], dim=1)  # [H*W, D]
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=torch.float64), emb], dim=0)
    return emb.float()


def _check_encoder(model: nn.Module) -> None:
    """Raise a one-line error unless `model` is a timm ViT that maskkit can mask token-wise."""
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"encoder must be a timm VisionTransformer, got {type(model).__name__}")
    problems = []
    if model.cls_token is None or model.num_prefix_tokens != 1:
        problems.append("exactly one prefix token, the CLS token (no register/distillation tokens)")
    if model.pos_embed is None or model.no_embed_class:
        problems.append("a learned pos_embed with a CLS slot (pos_embed='learn', no_embed_class=False)")
    elif model.pos_embed.shape[1] != model.patch_embed.num_patches + 1:
        problems.append("pos_embed of length 1 + num_patches")
    if getattr(model, "dynamic_img_size", False):
        problems.append("a fixed image size (dynamic_img_size=False)")
    if getattr(model, "attn_pool", None) is not None or not isinstance(
        getattr(model, "fc_norm", None), nn.Identity
    ):
        problems.append(
            "the final norm on tokens (global_pool='token' or '', no fc_norm or attention pooling)"
        )
    patch = tuple(model.patch_embed.patch_size)
    if patch[0] != patch[1]:
        problems.append(f"square patches (got {patch})")
    if problems:
        raise ValueError("the timm encoder must have " + "; ".join(problems))
    for blk in model.blocks:
        check_timm_block(blk)  # TypeError if a block is not timm's Block/Attention


def _check_decoder(width: Any, depth: Any, heads: Any, mlp_ratio: Any) -> None:
    """ValueError naming the bad decoder option, before anything is built."""
    for name, value in (("decoder_embed_dim", width), ("decoder_depth", depth), ("decoder_num_heads", heads)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if width % heads or width % 4:
        raise ValueError(
            f"decoder_embed_dim {width} must be divisible by decoder_num_heads {heads} and by 4 (sin-cos)"
        )
    if not isinstance(mlp_ratio, (int, float)) or mlp_ratio <= 0:
        raise ValueError(f"decoder_mlp_ratio must be a positive number, got {mlp_ratio!r}")


class TimmMAE(nn.Module):
    """Masked autoencoder with a timm `VisionTransformer` encoder, implementing maskkit's MAE protocol.

    Args:
        encoder: a timm model name (built with `timm.create_model(name, pretrained=False,
            num_classes=0, **encoder_kwargs)`; nothing is downloaded) or a `VisionTransformer`
            instance (used in place; a classifier head is removed with `reset_classifier(0)`).
        decoder_embed_dim, decoder_depth, decoder_num_heads, decoder_mlp_ratio: the decoder's
            size. Defaults 512, 8, 16, 4.0 (MAE's).
        norm_pix_loss: normalise each target patch by its mean and variance (MAE). Default False.
        fixed_pos_embed: overwrite the encoder's pos_embed with 2-D sin-cos and freeze it, as MAE
            does. Default True; False keeps an instance's own pos_embed as it is.
        **encoder_kwargs: passed to `timm.create_model` (img_size, patch_size, in_chans,
            embed_dim, depth, num_heads, drop_path_rate, ...); only with a name.
    """

    def __init__(
        self,
        encoder: str | VisionTransformer = "vit_base_patch16_224",
        *,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        decoder_mlp_ratio: float = 4.0,
        norm_pix_loss: bool = False,
        fixed_pos_embed: bool = True,
        **encoder_kwargs: Any,
    ) -> None:
        super().__init__()
        _check_decoder(decoder_embed_dim, decoder_depth, decoder_num_heads, decoder_mlp_ratio)
        self.encoder_config: dict[str, Any] | None = None  # timm.create_model(**encoder_config) rebuilds it
        if isinstance(encoder, str):
            if "pretrained" in encoder_kwargs:
                raise ValueError(
                    "TimmMAE builds encoders with pretrained=False; pass a loaded instance instead"
                )
            if encoder_kwargs.get("num_classes", 0) != 0:
                raise ValueError(
                    "the MAE encoder has no classifier head (num_classes=0); add one when fine-tuning"
                )
            kwargs = {**encoder_kwargs, "num_classes": 0}
            try:
                model = timm.create_model(encoder, pretrained=False, **kwargs)
            except (RuntimeError, TypeError, AssertionError) as err:
                raise ValueError(f"cannot build timm encoder {encoder!r} with {kwargs}: {err}") from None
            self.encoder_config = {"model_name": encoder, **kwargs}
        elif isinstance(encoder, nn.Module):
            if encoder_kwargs:
                raise TypeError(f"encoder options {sorted(encoder_kwargs)} apply only when encoder is a name")
            model = encoder
        else:
            raise TypeError(
                f"encoder must be a timm model name or a VisionTransformer, got {type(encoder).__name__}"
            )
        _check_encoder(model)
        if model.num_classes != 0:
            model.reset_classifier(0)
        self.encoder = model

        embed = model.patch_embed
        self.patch_size: int = int(embed.patch_size[0])  # p
        self.grid_size: tuple[int, int] = tuple(int(g) for g in embed.grid_size)  # (H/p, W/p)
        self.img_size: tuple[int, int] = tuple(int(s) for s in embed.img_size)
        self.num_patches: int = int(embed.num_patches)  # N
        self.embed_dim: int = int(model.embed_dim)  # D
        self.in_chans: int = int(model.in_chans)  # C
        self.norm_pix_loss: bool = bool(norm_pix_loss)
        if fixed_pos_embed:
            with torch.no_grad():
                model.pos_embed.copy_(
                    sincos_pos_embed_2d(self.embed_dim, self.grid_size).to(model.pos_embed)[None]
                )
            model.pos_embed.requires_grad_(False)

        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.decoder_embed = nn.Linear(self.embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(
            sincos_pos_embed_2d(decoder_embed_dim, self.grid_size).unsqueeze(0), requires_grad=False
        )  # [1, 1 + N, Dd], fixed
        self.decoder_blocks = nn.ModuleList(
            Block(
                decoder_embed_dim, decoder_num_heads, decoder_mlp_ratio, qkv_bias=True, norm_layer=norm_layer
            )
            for _ in range(decoder_depth)
        )
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, self.patch_size**2 * self.in_chans, bias=True)
        self._init_decoder()
        self.to(model.pos_embed.device)  # the decoder joins an instance already on a device

    def _init_decoder(self) -> None:
        """MAE's decoder initialisation: xavier-uniform Linear weights, zero biases, mask_token ~ N(0, .02)."""
        nn.init.normal_(self.mask_token, std=0.02)
        decoder = [self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred]
        for module in nn.ModuleList(decoder).modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    # ---- the MAE protocol -------------------------------------------------------------------

    def patch_tokens(self, images: Tensor) -> Tensor:
        """Patch embedding plus positional embedding, no CLS: [B, C, H, W] -> [B, N, D]."""
        self._check_images(images)
        x = self.encoder.patch_embed(images)  # [B, N, D]
        return x + self.encoder.pos_embed[:, 1:]

    def encode(self, tokens: Tensor, plan: MaskPlan) -> Tensor:
        """Encode the visible tokens of `plan` with CLS prepended: [B, N, D] -> [B, 1 + K, D]."""
        return self._trunk(self._with_cls(plan.gather(tokens)))

    def decode(self, latent: Tensor, plan: MaskPlan) -> Tensor:
        """Predict every patch: latent [B, 1 + K, D] -> [B, N, p*p*C]; with `plan.decoder_ids`, only those
        (`_decode_subset`)."""
        x = self.decoder_embed(latent)  # [B, 1 + K, Dd]
        if plan.decoder_ids is not None:
            return self._decode_subset(x, plan)
        patches = plan.fill(x[:, 1:], self.mask_token)  # [B, N, Dd] in patch order
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed  # [B, 1 + N, Dd]
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_pred(self.decoder_norm(x))  # [B, 1 + N, P]
        return x[:, 1:]  # [B, N, P]

    def _decode_subset(self, x: Tensor, plan: MaskPlan) -> Tensor:
        """Decoder masking (VideoMAE V2's dual masking; CrossMAE's partial reconstruction): the decoder takes CLS,
        the K visible tokens and M mask tokens at `plan.decoder_ids`, and predicts those M: x [B, 1 + K, Dd] ->
        [B, N, P] with zeros at every other patch."""
        b, k, width = x.shape[0], plan.num_visible, x.shape[-1]
        pos = self.decoder_pos_embed[0, 1:][plan.decoder_positions]  # [B, K + M, Dd]
        tokens = torch.cat([x[:, 1:], self.mask_token.to(x.dtype).expand(b, plan.num_decoded, width)], dim=1) + pos
        x = torch.cat([x[:, :1] + self.decoder_pos_embed[:, :1], tokens], dim=1)  # [B, 1 + K + M, Dd]
        for blk in self.decoder_blocks:
            x = blk(x)
        pred = self.decoder_pred(self.decoder_norm(x[:, 1 + k:]))  # [B, M, P]
        return plan.scatter_decoded(pred)  # [B, N, P]

    def transformer_blocks(self) -> list[nn.Module]:
        """Encoder then decoder blocks: what `--compile` compiles."""
        return [*self.encoder.blocks, *self.decoder_blocks]

    def patchify(self, images: Tensor) -> Tensor:
        """[B, C, H, W] -> [B, N, p*p*C], each patch flattened as (p, q, c) (MAE's 'nchpwq->nhwpqc')."""
        self._check_images(images)
        p, (gh, gw) = self.patch_size, self.grid_size
        x = images.reshape(images.shape[0], self.in_chans, gh, p, gw, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(images.shape[0], gh * gw, p * p * self.in_chans)

    def unpatchify(self, patches: Tensor) -> Tensor:
        """Inverse of `patchify`: [B, N, p*p*C] -> [B, C, H, W]."""
        p, (gh, gw), c = self.patch_size, self.grid_size, self.in_chans
        if patches.dim() != 3 or tuple(patches.shape[1:]) != (gh * gw, p * p * c):
            raise ValueError(
                f"patches must have shape [B, {gh * gw}, {p * p * c}], got {tuple(patches.shape)}"
            )
        x = patches.reshape(patches.shape[0], gh, gw, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(patches.shape[0], c, gh * p, gw * p)

    def features(self, images: Tensor) -> Tensor:
        """CLS embedding after the final norm, nothing masked: [B, C, H, W] -> [B, D].

        The last block computes only the CLS row (`cls_through_blocks`): equal to the full forward's
        CLS feature up to summation order, at about 1/(1 + N) of that block's query, projection and MLP.
        """
        enc = self.encoder
        x = enc.norm_pre(enc.pos_drop(self._with_cls(self.patch_tokens(images))))  # [B, 1 + N, D]
        return enc.norm(cls_through_blocks(enc.blocks, x))[:, 0]  # [B, D]

    def cls_attention(self, images: Tensor) -> Tensor:
        """CLS-to-patch attention of the last encoder block on the unmasked images, head-averaged: [B, N]."""
        enc = self.encoder
        x = enc.norm_pre(enc.pos_drop(self._with_cls(self.patch_tokens(images))))  # [B, 1 + N, D]
        return last_block_cls_attention(enc.blocks, x)

    def forward(
        self, images: Tensor, policy: nn.Module | None = None, ratio: float | None = None, **context: Any
    ) -> MAEOutput:
        """One pretraining forward: policy (default `random`, ratio 0.75) -> plan -> weighted masked loss.

        `context` reaches the policy (e.g. `noise=` [B, N] or `generator=` for `random`).
        """
        policy = RandomPolicy() if policy is None else policy
        return mae_step_loss(self, policy, images, ratio=ratio, **context)

    # ---- helpers ------------------------------------------------------------------------------

    def encoder_state_dict(self) -> dict[str, Tensor]:
        """The encoder's weights; `timm.create_model(**self.encoder_config).load_state_dict(sd)` is strict."""
        return self.encoder.state_dict()

    def no_weight_decay(self) -> set[str]:
        """Parameter names exempt from weight decay (timm's optimizer factory reads this)."""
        return {"encoder.cls_token", "encoder.pos_embed", "mask_token", "decoder_pos_embed"}

    def _with_cls(self, x: Tensor) -> Tensor:
        """Prepend CLS (cls_token + its pos_embed slot): [B, M, D] -> [B, 1 + M, D]."""
        cls = self.encoder.cls_token + self.encoder.pos_embed[:, :1]  # [1, 1, D]
        return torch.cat([cls.expand(x.shape[0], -1, -1), x], dim=1)

    def _trunk(self, x: Tensor) -> Tensor:
        """The encoder after its embeddings, as timm's forward_features: [B, T, D] -> [B, T, D]."""
        enc = self.encoder
        x = enc.norm_pre(enc.pos_drop(x))
        for blk in enc.blocks:
            x = blk(x)
        return enc.norm(x)

    def _check_images(self, images: Tensor) -> None:
        expected = (self.in_chans, *self.img_size)
        if not isinstance(images, Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != expected:
            got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"images must have shape [B, {', '.join(map(str, expected))}], got {got}")

    def extra_repr(self) -> str:
        return (
            f"img_size={self.img_size}, patch_size={self.patch_size}, in_chans={self.in_chans}, "
            f"num_patches={self.num_patches}, norm_pix_loss={self.norm_pix_loss}"
        )


# ---- size presets ---------------------------------------------------------------------------


@dataclass(frozen=True)
class MAEPreset:
    """A named size: the timm model the encoder starts from, its overrides, and the decoder."""

    encoder: str
    img_size: int | tuple[int, int]
    patch_size: int
    in_chans: int
    embed_dim: int
    depth: int
    num_heads: int
    decoder_embed_dim: int
    decoder_depth: int
    decoder_num_heads: int
    description: str = ""


_PRESETS: dict[str, MAEPreset] = {}


def register_preset(name: str, preset: MAEPreset, *, overwrite: bool = False) -> MAEPreset:
    """Add a size preset usable by `create_mae(name)`; a taken name raises unless `overwrite`."""
    if name in _PRESETS and not overwrite:
        raise ValueError(f"an MAE preset named {name!r} is already registered")
    _PRESETS[name] = preset
    return preset


def list_presets() -> list[str]:
    """Names of the registered size presets, sorted."""
    return sorted(_PRESETS)


def get_preset(name: str) -> MAEPreset:
    try:
        return _PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown MAE preset {name!r}; available: {', '.join(list_presets())}") from None


#: the built-in sizes: name, timm encoder, image side, patch, channels, width, depth, heads,
#: decoder width / depth / heads, description
_BUILTIN_PRESETS = (
    ("micro", "vit_tiny_patch16_224", 8, 2, 1, 64, 4, 4, 64, 1, 4,
     "CPU demo size (default of `maskkit pretrain`): 8x8 digits, patch 2, width 64, depth 4"),
    ("tiny", "vit_tiny_patch16_224", 32, 4, 3, 192, 4, 3, 128, 2, 4,
     "CPU benchmark size: 32x32 (or img_size=28) inputs, patch 4, width 192, depth 4"),
    ("pilot", "vit_tiny_patch16_224", 28, 4, 1, 128, 4, 4, 64, 2, 4,
     "MNIST study size: 28x28 grey digits, patch 4, width 128, depth 4"),
    ("small", "vit_small_patch16_224", 64, 8, 3, 384, 12, 6, 256, 4, 8,
     "ViT-S/8 at 64x64 (64 patches), decoder 256 wide, 4 deep: the middle of `maskkit bench`'s scaling rows"),
    ("vit-b", "vit_base_patch16_224", 224, 16, 3, 768, 12, 12, 512, 8, 16,
     "MAE paper ViT-B/16 at 224x224, decoder 512 wide, 8 deep"),
    ("vit-l", "vit_large_patch16_224", 224, 16, 3, 1024, 24, 16, 512, 8, 16,
     "MAE paper ViT-L/16 at 224x224, decoder 512 wide, 8 deep"),
)  # fmt: skip
for _name, *_sizes, _description in _BUILTIN_PRESETS:
    register_preset(_name, MAEPreset(*_sizes, description=_description))
del _name, _sizes, _description

_DECODER_OPTIONS = (
    "decoder_embed_dim",
    "decoder_depth",
    "decoder_num_heads",
    "decoder_mlp_ratio",
    "fixed_pos_embed",
)


def create_mae(
    preset: str,
    *,
    img_size: int | tuple[int, int] | None = None,
    patch_size: int | None = None,
    in_chans: int | None = None,
    norm_pix_loss: bool = False,
    seed: int | None = None,
    **overrides: Any,
) -> TimmMAE:
    """Build a `TimmMAE` of a named size, e.g. `create_mae("tiny", img_size=28, in_chans=1)`.

    `overrides` set decoder options (decoder_embed_dim, decoder_depth, decoder_num_heads,
    decoder_mlp_ratio, fixed_pos_embed) or timm encoder options (embed_dim, depth, num_heads,
    drop_path_rate, ...). `seed` fixes the initial weights (the global RNG is left untouched).
    """
    base = get_preset(preset)
    base = replace(
        base,
        img_size=base.img_size if img_size is None else img_size,
        patch_size=base.patch_size if patch_size is None else patch_size,
        in_chans=base.in_chans if in_chans is None else in_chans,
    )
    sizes = base.img_size if isinstance(base.img_size, (tuple, list)) else (base.img_size, base.img_size)
    if not isinstance(base.patch_size, int) or base.patch_size < 1:
        raise ValueError(f"patch_size must be a positive integer, got {base.patch_size!r}")
    if len(sizes) != 2 or any(not isinstance(s, int) or s < 1 or s % base.patch_size for s in sizes):
        raise ValueError(
            f"img_size {base.img_size!r} must be positive and divisible by patch_size {base.patch_size}"
        )
    if not isinstance(base.in_chans, int) or base.in_chans < 1:
        raise ValueError(f"in_chans must be a positive integer, got {base.in_chans!r}")

    decoder = {
        "decoder_embed_dim": base.decoder_embed_dim,
        "decoder_depth": base.decoder_depth,
        "decoder_num_heads": base.decoder_num_heads,
    }
    decoder.update({k: overrides.pop(k) for k in _DECODER_OPTIONS if k in overrides})
    encoder = {
        "img_size": base.img_size,
        "patch_size": base.patch_size,
        "in_chans": base.in_chans,
        "embed_dim": base.embed_dim,
        "depth": base.depth,
        "num_heads": base.num_heads,
        **overrides,
    }
    if seed is None:
        return TimmMAE(base.encoder, norm_pix_loss=norm_pix_loss, **decoder, **encoder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TimmMAE(base.encoder, norm_pix_loss=norm_pix_loss, **decoder, **encoder)
