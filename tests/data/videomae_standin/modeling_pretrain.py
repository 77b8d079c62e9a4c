"""Stand-in for MCG-NJU/VideoMAE's `modeling_pretrain.py`, written for maskkit's tests from its published interface.

`PretrainVisionTransformer.forward(x, mask)`: clips x [B, C, T, H, W] and a boolean mask [B, N] (True = hidden, the
same count in every row) -> the decoder's predictions for the hidden tokens [B, N_hidden, t*p*p*3], in ascending
token order. The encoder keeps the visible tokens (ascending) after adding the fixed sin-cos table, runs its blocks
and its final norm; the decoder takes [visible + table | mask token + table] and predicts its last N_hidden rows.
The loss lives in the training loop (`engine_for_pretraining.py`), not here. Sizes the real class takes as
arguments are arguments here too (img_size, patch_size, encoder_in_chans, decoder_num_classes, tubelet_size, ...);
like the real one it always builds 16-frame models (its PatchEmbed's default), and imports its blocks from the
sibling `modeling_finetune`.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
from modeling_finetune import Block, PatchEmbed, get_sinusoid_encoding_table
from timm.models.registry import register_model


def _init(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class PretrainVisionTransformerEncoder(nn.Module):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=0, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, qkv_bias=False, qk_scale=None, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0,
                 norm_layer=nn.LayerNorm, init_values=None, tubelet_size=2, use_checkpoint=False,
                 use_learnable_pos_emb=False):  # fmt: skip
        super().__init__()
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, tubelet_size=tubelet_size)
        self.pos_embed = get_sinusoid_encoding_table(self.patch_embed.num_patches, embed_dim)  # not a parameter
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, qk_scale, drop_rate, attn_drop_rate, 0.0, init_values,
                  norm_layer=norm_layer)
            for _ in range(depth)
        ])  # fmt: skip
        self.norm = norm_layer(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(_init)

    def forward_features(self, x, mask):
        x = self.patch_embed(x)  # [B, N, D]
        x = x + self.pos_embed.type_as(x).to(x.device).clone().detach()
        b, _, d = x.shape
        visible = x[~mask].reshape(b, -1, d)  # [B, K, D] in token order
        for blk in self.blocks:
            visible = blk(visible)
        return self.norm(visible)

    def forward(self, x, mask):
        return self.head(self.forward_features(x, mask))


class PretrainVisionTransformerDecoder(nn.Module):
    def __init__(self, patch_size=16, num_classes=768, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
                 qkv_bias=False, qk_scale=None, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0,
                 norm_layer=nn.LayerNorm, init_values=None, num_patches=196, tubelet_size=2, use_checkpoint=False):  # fmt: skip
        super().__init__()
        assert num_classes == 3 * tubelet_size * patch_size**2, "the decoder predicts 3-channel tubelets"
        self.num_classes = num_classes
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, qk_scale, drop_rate, attn_drop_rate, 0.0, init_values,
                  norm_layer=norm_layer)
            for _ in range(depth)
        ])  # fmt: skip
        self.norm = norm_layer(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(_init)

    def forward(self, x, return_token_num):
        for blk in self.blocks:
            x = blk(x)
        if return_token_num > 0:
            x = x[:, -return_token_num:]  # the mask tokens only
        return self.head(self.norm(x))


class PretrainVisionTransformer(nn.Module):
    def __init__(self, img_size=224, patch_size=16, encoder_in_chans=3, encoder_num_classes=0, encoder_embed_dim=768,
                 encoder_depth=12, encoder_num_heads=12, decoder_num_classes=1536, decoder_embed_dim=512,
                 decoder_depth=8, decoder_num_heads=8, mlp_ratio=4.0, qkv_bias=False, qk_scale=None, drop_rate=0.0,
                 attn_drop_rate=0.0, drop_path_rate=0.0, norm_layer=nn.LayerNorm, init_values=0.0,
                 use_learnable_pos_emb=False, use_checkpoint=False, tubelet_size=2, num_classes=0, in_chans=0):  # fmt: skip
        super().__init__()
        shared = dict(mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale, drop_rate=drop_rate,
                      attn_drop_rate=attn_drop_rate, norm_layer=norm_layer, init_values=init_values,
                      tubelet_size=tubelet_size)  # fmt: skip
        self.encoder = PretrainVisionTransformerEncoder(
            img_size=img_size, patch_size=patch_size, in_chans=encoder_in_chans, num_classes=encoder_num_classes,
            embed_dim=encoder_embed_dim, depth=encoder_depth, num_heads=encoder_num_heads, **shared)  # fmt: skip
        num_patches = self.encoder.patch_embed.num_patches
        self.decoder = PretrainVisionTransformerDecoder(
            patch_size=patch_size, num_classes=decoder_num_classes, embed_dim=decoder_embed_dim, depth=decoder_depth,
            num_heads=decoder_num_heads, num_patches=num_patches, **shared)  # fmt: skip
        self.encoder_to_decoder = nn.Linear(encoder_embed_dim, decoder_embed_dim, bias=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.pos_embed = get_sinusoid_encoding_table(num_patches, decoder_embed_dim)  # not a parameter
        nn.init.trunc_normal_(self.mask_token, std=0.02, a=-0.02, b=0.02)

    def forward(self, x, mask):
        visible = self.encoder_to_decoder(self.encoder(x, mask))  # [B, K, Dd]
        b, _, d = visible.shape
        table = self.pos_embed.expand(b, -1, -1).type_as(x).to(x.device).clone().detach()  # [B, N, Dd]
        shown, hidden = table[~mask].reshape(b, -1, d), table[mask].reshape(b, -1, d)
        full = torch.cat([visible + shown, self.mask_token + hidden], dim=1)  # [B, N, Dd]
        return self.decoder(full, hidden.shape[1])  # [B, N_hidden, 3 * t * p * p]


@register_model
def pretrain_videomae_tiny_patch4(pretrained=False, **kwargs):
    """A CPU-sized model for tests: 16 frames of 8x8, tubelets 2x4x4 (32 tokens), width 32."""
    return PretrainVisionTransformer(
        img_size=8, patch_size=4, encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2, decoder_num_classes=96,
        decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, mlp_ratio=2, qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)  # fmt: skip
