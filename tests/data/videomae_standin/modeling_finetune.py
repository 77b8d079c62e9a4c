"""Stand-in for MCG-NJU/VideoMAE's `modeling_finetune.py`, written for maskkit's tests from its published interface.

The real file cannot be shipped (its licence). This one keeps what `modeling_pretrain.py` imports from it and what
maskkit's `videomae` adapter relies on: `Block` (pre-norm, `attn` with a bias-free `qkv` plus `q_bias` / `v_bias`,
`scale`, `num_heads`; `attn_drop` applied to the softmax), `PatchEmbed` (a Conv3d over tubelets, 16 frames unless
told), `get_sinusoid_encoding_table` (the fixed 1-D sin-cos table over the N tokens, a plain tensor, not a buffer).
Like the real file it registers a fine-tuning model in timm's registry under a name timm already uses
(`vit_small_patch16_224`), which the adapter's loader must undo.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.registry import register_model


def get_sinusoid_encoding_table(n_position: int, d_hid: int) -> torch.Tensor:
    """[1, n_position, d_hid] float32: channel j of position i is sin (j even) or cos (j odd) of
    i / 10000^(2 * (j // 2) / d_hid)."""
    position = torch.arange(n_position, dtype=torch.float64)[:, None]  # [N, 1]
    exponent = 2 * (torch.arange(d_hid, dtype=torch.float64) // 2) / d_hid  # [D]
    angles = position / torch.pow(torch.tensor(10000.0, dtype=torch.float64), exponent)  # [N, D]
    table = torch.where(torch.arange(d_hid) % 2 == 0, angles.sin(), angles.cos())
    return table.float().unsqueeze(0)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2, self.drop = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim), nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.act(self.fc1(x))))


class Attention(nn.Module):
    """Multi-head self-attention with VideoMAE's bias layout: qkv without bias, separate q and v biases (k none)."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = qk_scale or head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        b, n, d = x.shape
        bias = None if self.q_bias is None else torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        q, k, v = F.linear(x, self.qkv.weight, bias).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        weights = self.attn_drop(((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1))  # [B, H, N, N]
        return self.proj_drop(self.proj((weights @ v).transpose(1, 2).reshape(b, n, d)))


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, qk_scale=None, drop=0.0, attn_drop=0.0,
                 drop_path=0.0, init_values=None, act_layer=nn.GELU, norm_layer=nn.LayerNorm):  # fmt: skip
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, qk_scale, attn_drop, drop)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        scaled = init_values is not None and init_values > 0
        self.gamma_1 = nn.Parameter(init_values * torch.ones(dim)) if scaled else None
        self.gamma_2 = nn.Parameter(init_values * torch.ones(dim)) if scaled else None

    def forward(self, x):
        if self.gamma_1 is None:
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))
        x = x + self.gamma_1 * self.attn(self.norm1(x))
        return x + self.gamma_2 * self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """Clips [B, C, T, H, W] -> tokens [B, N, D] through a Conv3d over t x p x p tubelets (row-major, time slowest)."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, num_frames=16, tubelet_size=2):
        super().__init__()
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.patch_size = (patch_size, patch_size)
        self.tubelet_size = int(tubelet_size)
        self.num_patches = (num_frames // self.tubelet_size) * (self.img_size[0] // patch_size) * (
            self.img_size[1] // patch_size)  # fmt: skip
        kernel = (self.tubelet_size, patch_size, patch_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=kernel, stride=kernel)

    def forward(self, x, **kwargs):
        assert tuple(x.shape[-2:]) == self.img_size, f"clip size {tuple(x.shape[-2:])} is not {self.img_size}"
        return self.proj(x).flatten(2).transpose(1, 2)


class VideoClassifier(nn.Module):
    """A small fine-tuning model (mean pooling, fc_norm, head), registered in timm as the real file does."""

    def __init__(self, num_classes=400, embed_dim=64, depth=2, num_heads=4, **kwargs):
        super().__init__()
        self.patch_embed = PatchEmbed(embed_dim=embed_dim, **kwargs)
        self.pos_embed = get_sinusoid_encoding_table(self.patch_embed.num_patches, embed_dim)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, qkv_bias=True) for _ in range(depth)])
        self.fc_norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(x) + self.pos_embed.type_as(x).to(x.device)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.fc_norm(x.mean(1)))


@register_model
def vit_small_patch16_224(pretrained=False, **kwargs):
    return VideoClassifier(embed_dim=384, depth=12, num_heads=6, **kwargs)
