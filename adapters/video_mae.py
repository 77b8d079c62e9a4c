"""The built-in video MAE: VideoMAE's design (Tong et al., NeurIPS 2022) on timm `Block`s, with size presets.

A clip [B, C, T, H, W] is cut by a tubelet embedding (Conv3d, kernel = stride = (t, p, p)) into N = T/t * H/p * W/p
tokens, ordered row-major over the grid (T/t, H/p, W/p), time slowest (the Conv3d output's `flatten(2)`). As in
VideoMAE there is no CLS token, and the positional embeddings of encoder and decoder are VideoMAE's fixed 1-D
sinusoid table over the N token indices (`sinusoid_table`, its `get_sinusoid_encoding_table(N, D)` semantics:
sin at even channels, cos at odd ones), held as non-persistent buffers: they follow from the sizes, so the state
dict holds learned weights only. Chosen over a 3-D sin-cos table to keep VideoMAE's own positional code.

The encoder runs on the visible tokens only; a narrow decoder (VideoMAE's: `decoder_embed` without bias, timm
`Block`s, `decoder_norm`, `decoder_pred` to t*p*p*C pixels ordered (t, p, p, C)) reconstructs:
- every token, as MAE decodes, when the plan names no decoder subset;
- only the visible tokens and the plan's `decoder_ids` (VideoMAE V2's dual masking, the cost lever), predicting
  the `decoder_ids` and scattering them back with zeros elsewhere (`MaskPlan.scatter_decoded`).
`features` is VideoMAE's fine-tuning pooling on the unmasked clip: the mean of the last block's tokens, then a
norm (the role of VideoMAE's `fc_norm`, played by the encoder's own trained final `norm`, so the pretraining
trains every parameter). `cls_attention` (no CLS) is the attention each token receives in the last encoder
block, averaged over heads and queries. Presets: `create_video_mae("micro" | "tiny" | "small" | "vit-s" | "vit-b"
| "vit-l")`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from maskkit.mae import MAEOutput, mae_step_loss
from maskkit.plan import MaskPlan
from maskkit.policies.random import RandomPolicy
from maskkit.positions import sinusoid_table
from maskkit.tubelets import patchify_clips, unpatchify_clips

from .build import positive_int, seeded
from .vit_attention import last_block_attention_received

__all__ = [
    "TimmVideoMAE",
    "VideoPreset",
    "create_video_mae",
    "get_video_preset",
    "list_video_presets",
    "register_video_preset",
    "sinusoid_table",
]


def _check_sizes(**sizes: Any) -> None:
    """ValueError naming the first option that is not a positive integer."""
    for name, value in sizes.items():
        if not positive_int(value):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


class TubeletEmbed(nn.Module):
    """Clips to tubelet tokens: Conv3d with kernel = stride = (t, p, p); [B, C, T, H, W] -> [B, N, D]."""

    def __init__(self, in_chans: int, embed_dim: int, tubelet_size: int, patch_size: int) -> None:
        super().__init__()
        size = (tubelet_size, patch_size, patch_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=size, stride=size)

    def forward(self, clips: Tensor) -> Tensor:
        return self.proj(clips).flatten(2).transpose(1, 2)  # [B, D, T', H', W'] -> [B, N, D], time slowest


class TimmVideoMAE(nn.Module):
    """VideoMAE-style masked autoencoder on timm `Block`s, implementing maskkit's MAE protocol for clips.

    Args: the clip's sizes (num_frames T, img_size H = W or (H, W), in_chans C), the tubelet (tubelet_size t,
    patch_size p), the encoder (embed_dim, depth, num_heads, mlp_ratio, drop_path_rate), the decoder
    (decoder_embed_dim, decoder_depth, decoder_num_heads, decoder_mlp_ratio) and `norm_pix_loss` (each target
    tubelet normalised by its own mean and variance, as `maskkit.mae.patch_loss` does). One-line ValueErrors
    name a bad size. Weights follow the global RNG (`create_video_mae(seed=...)` fixes them).
    """

    def __init__(
        self,
        *,
        num_frames: int = 16,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        tubelet_size: int = 2,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        decoder_embed_dim: int = 384,
        decoder_depth: int = 4,
        decoder_num_heads: int = 6,
        decoder_mlp_ratio: float = 4.0,
        norm_pix_loss: bool = False,
    ) -> None:
        super().__init__()
        sizes = tuple(img_size) if isinstance(img_size, (tuple, list)) else (img_size, img_size)
        if len(sizes) != 2 or not all(positive_int(s) for s in sizes):
            raise ValueError(f"img_size must be a positive integer or (H, W), got {img_size!r}")
        _check_sizes(num_frames=num_frames, patch_size=patch_size, tubelet_size=tubelet_size, in_chans=in_chans,
                     embed_dim=embed_dim, depth=depth, num_heads=num_heads, decoder_embed_dim=decoder_embed_dim,
                     decoder_depth=decoder_depth, decoder_num_heads=decoder_num_heads)  # fmt: skip
        if num_frames % tubelet_size:
            raise ValueError(f"num_frames {num_frames} is not divisible by tubelet_size {tubelet_size}")
        if sizes[0] % patch_size or sizes[1] % patch_size:
            raise ValueError(f"img_size {sizes[0]}x{sizes[1]} is not divisible by patch_size {patch_size}")
        widths = {"embed_dim": ("num_heads", embed_dim, num_heads),
                  "decoder_embed_dim": ("decoder_num_heads", decoder_embed_dim, decoder_num_heads)}  # fmt: skip
        for width_name, (heads_name, width, heads) in widths.items():
            if width % heads:
                raise ValueError(f"{heads_name}={heads} does not divide {width_name}={width}")
        for name, value in (("mlp_ratio", mlp_ratio), ("decoder_mlp_ratio", decoder_mlp_ratio)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        rate = drop_path_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
            raise ValueError(f"drop_path_rate must be a number in [0, 1), got {drop_path_rate!r}")

        self.num_frames: int = int(num_frames)  # T
        self.tubelet_size: int = int(tubelet_size)  # t
        self.patch_size: int = int(patch_size)  # p
        self.img_size: tuple[int, int] = (int(sizes[0]), int(sizes[1]))  # (H, W)
        self.in_chans: int = int(in_chans)  # C
        self.grid: tuple[int, int, int] = (num_frames // tubelet_size, sizes[0] // patch_size, sizes[1] // patch_size)
        self.num_patches: int = math.prod(self.grid)  # N
        self.embed_dim: int = int(embed_dim)  # D
        self.norm_pix_loss: bool = bool(norm_pix_loss)
        norm_layer = partial(nn.LayerNorm, eps=1e-6)

        self.patch_embed = TubeletEmbed(in_chans, embed_dim, tubelet_size, patch_size)
        pos_embed = sinusoid_table(self.num_patches, embed_dim)[None]  # [1, N, D], fixed
        self.register_buffer("pos_embed", pos_embed, persistent=False)
        rates = [float(drop_path_rate) * i / max(depth - 1, 1) for i in range(depth)]  # stochastic depth: 0 .. rate
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, drop_path=r, norm_layer=norm_layer) for r in rates
        )
        self.norm = norm_layer(embed_dim)

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=False)  # VideoMAE's encoder_to_decoder
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.register_buffer("decoder_pos_embed", sinusoid_table(self.num_patches, decoder_embed_dim)[None],
                             persistent=False)  # [1, N, Dd]  # fmt: skip
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_embed_dim, decoder_num_heads, decoder_mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
            for _ in range(decoder_depth)
        )
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, self.tubelet_size * self.patch_size**2 * self.in_chans)
        self._init_weights()

    def _init_weights(self) -> None:
        """VideoMAE's initialisation: xavier-uniform Linear weights, zero biases, unit LayerNorms; the tubelet
        projection xavier-uniform as a Linear over its flattened kernel (MAE's); mask_token ~ N(0, 0.02)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        proj = self.patch_embed.proj
        nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
        nn.init.zeros_(proj.bias)
        nn.init.normal_(self.mask_token, std=0.02)

    # ---- the MAE protocol -------------------------------------------------------------------

    def patch_tokens(self, clips: Tensor) -> Tensor:
        """Tubelet embedding plus positional embedding: [B, C, T, H, W] -> [B, N, D]."""
        self._check_clips(clips)
        return self.patch_embed(clips) + self.pos_embed.to(clips.dtype)  # [B, N, D]

    def encode(self, tokens: Tensor, plan: MaskPlan) -> Tensor:
        """Encode the visible tokens of `plan` (no CLS): [B, N, D] -> latent [B, K, D], in `ids_keep` order."""
        x = plan.gather(tokens)  # [B, K, D]
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)  # [B, K, D]

    def decode(self, latent: Tensor, plan: MaskPlan) -> Tensor:
        """Predict the hidden tubelets: latent [B, K, D] -> [B, N, P], P = t*p*p*C.

        Without `plan.decoder_ids`: MAE's decode, every token in patch order. With them: the decoder takes the K
        visible tokens and M mask tokens at the `decoder_ids` (VideoMAE V2), predicts those M, and returns them
        scattered in patch order with zeros at every other position.
        """
        x = self.decoder_embed(latent)  # [B, K, Dd]
        if plan.decoder_ids is None:
            x = plan.fill(x, self.mask_token) + self.decoder_pos_embed.to(x.dtype)  # [B, N, Dd] in patch order
            for blk in self.decoder_blocks:
                x = blk(x)
            return self.decoder_pred(self.decoder_norm(x))  # [B, N, P]
        b, k, width = x.shape
        m = plan.num_decoded
        positions = plan.decoder_positions  # [B, K + M]: ids_keep, then decoder_ids
        pos = self.decoder_pos_embed[0].to(x.dtype)[positions]  # [B, K + M, Dd]
        x = torch.cat([x, self.mask_token.to(x.dtype).expand(b, m, width)], dim=1) + pos  # [B, K + M, Dd]
        for blk in self.decoder_blocks:
            x = blk(x)
        pred = self.decoder_pred(self.decoder_norm(x[:, k:]))  # [B, M, P]: the decoder_ids only
        return plan.scatter_decoded(pred)  # [B, N, P]

    def patchify(self, clips: Tensor) -> Tensor:
        """[B, C, T, H, W] -> [B, N, t*p*p*C], each tubelet's pixels ordered (t, p, p, C) (VideoMAE's
        'b c (t p0) (h p1) (w p2) -> b (t h w) (p0 p1 p2 c)')."""
        self._check_clips(clips)
        return patchify_clips(clips, self.tubelet_size, self.patch_size)  # [B, N, t*p*p*C]

    def unpatchify(self, patches: Tensor) -> Tensor:
        """Inverse of `patchify`: [B, N, t*p*p*C] -> [B, C, T, H, W]."""
        c, t, p = self.in_chans, self.tubelet_size, self.patch_size
        expected = (self.num_patches, t * p * p * c)
        if not isinstance(patches, Tensor) or patches.dim() != 3 or tuple(patches.shape[1:]) != expected:
            got = tuple(patches.shape) if isinstance(patches, Tensor) else type(patches).__name__
            raise ValueError(f"patches must have shape [B, {self.num_patches}, {t * p * p * c}], got {got}")
        return unpatchify_clips(patches, self.grid, t, p, c)  # [B, C, T, H, W]

    def features(self, clips: Tensor) -> Tensor:
        """VideoMAE's pooled feature of the unmasked clip: the mean of the last block's tokens, then the norm:
        [B, C, T, H, W] -> [B, D]."""
        x = self.patch_tokens(clips)  # [B, N, D]
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x.mean(dim=1))  # [B, D]

    def cls_attention(self, clips: Tensor) -> Tensor:
        """(No CLS) the attention each token receives in the last encoder block on the unmasked clip, averaged
        over heads and queries: [B, C, T, H, W] -> [B, N] (rows sum to 1)."""
        return last_block_attention_received(self.blocks, self.patch_tokens(clips))

    def forward(
        self, clips: Tensor, policy: nn.Module | None = None, ratio: float | None = None, **context: Any
    ) -> MAEOutput:
        """One pretraining forward: policy (default `random` at its ratio 0.75, as every adapter's forward; pass
        VideoMAE's tube policy at 0.9 for its recipe) -> plan -> weighted masked loss. `context` reaches the
        policy (e.g. `noise=` [B, N] or `generator=`)."""
        policy = RandomPolicy() if policy is None else policy
        return mae_step_loss(self, policy, clips, ratio=ratio, **context)

    def transformer_blocks(self) -> list[nn.Module]:
        """Encoder then decoder blocks: what `--compile` compiles."""
        return [*self.blocks, *self.decoder_blocks]

    def no_weight_decay(self) -> set[str]:
        """Parameter names exempt from weight decay (timm's optimizer factory reads this)."""
        return {"mask_token"}

    def _check_clips(self, clips: Tensor) -> None:
        expected = (self.in_chans, self.num_frames, *self.img_size)
        if not isinstance(clips, Tensor) or clips.dim() != 5 or tuple(clips.shape[1:]) != expected:
            got = tuple(clips.shape) if isinstance(clips, Tensor) else type(clips).__name__
            raise ValueError(f"clips must have shape [B, {', '.join(map(str, expected))}], got {got}")

    def extra_repr(self) -> str:
        return (f"num_frames={self.num_frames}, img_size={self.img_size}, tubelet_size={self.tubelet_size}, "
                f"patch_size={self.patch_size}, in_chans={self.in_chans}, grid={self.grid}, "
                f"norm_pix_loss={self.norm_pix_loss}")  # fmt: skip


# ---- size presets ---------------------------------------------------------------------------


@dataclass(frozen=True)
class VideoPreset:
    """A named size: the clip it is made for (a run replaces frames, image size and channels by its data's),
    the tubelet, the encoder and the decoder."""

    num_frames: int
    img_size: int
    in_chans: int
    tubelet_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    decoder_embed_dim: int
    decoder_depth: int
    decoder_num_heads: int
    description: str = ""


_PRESETS: dict[str, VideoPreset] = {}


def register_video_preset(name: str, preset: VideoPreset, *, overwrite: bool = False) -> VideoPreset:
    """Add a size preset usable by `create_video_mae(name)` and `--model video:NAME`; a taken name raises unless
    `overwrite`."""
    if name in _PRESETS and not overwrite:
        raise ValueError(f"a video MAE preset named {name!r} is already registered")
    _PRESETS[name] = preset
    return preset


def list_video_presets() -> list[str]:
    """Names of the registered video size presets, in registration order (smallest first)."""
    return list(_PRESETS)


def get_video_preset(name: str) -> VideoPreset:
    try:
        return _PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown video MAE preset {name!r}; available: {', '.join(list_video_presets())}") from None


#: the built-in sizes: name, frames, image side, channels, tubelet, patch, width, depth, heads, decoder width /
#: depth / heads, description (VideoMAE's are its paper's ViT-S/B/L with its decoders)
_BUILTIN_PRESETS = (
    ("micro", 8, 16, 1, 2, 4, 64, 2, 4, 64, 1, 4,
     "CPU test size: 8 frames of 16x16, tubelet 2x4x4 (64 tokens), width 64, depth 2"),
    ("tiny", 16, 32, 3, 2, 4, 192, 4, 3, 128, 2, 4,
     "CPU demo size: 16 frames of 32x32, tubelet 2x4x4 (512 tokens), width 192, depth 4"),
    ("small", 16, 64, 3, 2, 8, 384, 6, 6, 192, 2, 3,
     "16 frames of 64x64, tubelet 2x8x8 (512 tokens), width 384, depth 6"),
    ("vit-s", 16, 224, 3, 2, 16, 384, 12, 6, 192, 4, 3,
     "VideoMAE ViT-S: 16x224x224, tubelet 2x16x16 (1568 tokens), decoder 192 wide, 4 deep"),
    ("vit-b", 16, 224, 3, 2, 16, 768, 12, 12, 384, 4, 6,
     "VideoMAE ViT-B: 16x224x224, tubelet 2x16x16 (1568 tokens), decoder 384 wide, 4 deep"),
    ("vit-l", 16, 224, 3, 2, 16, 1024, 24, 16, 512, 4, 8,
     "VideoMAE ViT-L: 16x224x224, tubelet 2x16x16 (1568 tokens), decoder 512 wide, 4 deep"),
)  # fmt: skip
for _name, *_sizes, _description in _BUILTIN_PRESETS:
    register_video_preset(_name, VideoPreset(*_sizes, description=_description))
del _name, _sizes, _description

#: the options `create_video_mae` takes beyond the preset's sizes
OPTIONS = ("tubelet_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "drop_path_rate", "decoder_embed_dim",
           "decoder_depth", "decoder_num_heads", "decoder_mlp_ratio")  # fmt: skip


def create_video_mae(
    preset: str,
    *,
    num_frames: int | None = None,
    img_size: int | tuple[int, int] | None = None,
    patch_size: int | None = None,
    in_chans: int | None = None,
    norm_pix_loss: bool = False,
    seed: int | None = None,
    **overrides: Any,
) -> TimmVideoMAE:
    """Build a `TimmVideoMAE` of a named size, e.g. `create_video_mae("micro", num_frames=16, img_size=32)`.

    Sizes not given are the preset's; `overrides` set any of `OPTIONS` (a different name is a one-line ValueError).
    `seed` fixes the initial weights (the global RNG is left untouched).
    """
    unknown = sorted(set(overrides) - set(OPTIONS))
    if unknown:
        raise ValueError(f"video MAE option {unknown[0]!r} is not one of {', '.join(OPTIONS)}")
    base = get_video_preset(preset)
    base = replace(
        base,
        num_frames=base.num_frames if num_frames is None else num_frames,
        img_size=base.img_size if img_size is None else img_size,
        patch_size=base.patch_size if patch_size is None else patch_size,
        in_chans=base.in_chans if in_chans is None else in_chans,
    )
    kwargs = {k: getattr(base, k) for k in VideoPreset.__dataclass_fields__ if k != "description"}
    kwargs.update(overrides)

    def build() -> TimmVideoMAE:
        return TimmVideoMAE(norm_pix_loss=norm_pix_loss, **kwargs)

    return build() if seed is None else seeded(seed, build)
