"""A test double of facebookresearch/mae `models_mae.py`, written for maskkit from its published interface.

The official file cannot be shipped (its license), so this one reproduces its interface and
semantics: the same attribute names, method signatures, tensor shapes, masking by `torch.rand`
noise and loss. Like the original it builds its blocks with `Block(..., qk_scale=None, ...)`, a
keyword timm 1.x removed, so under timm 1.x it needs `maskkit.adapters.official_mae.timm_compat()`
exactly as the real file does. One generalisation: `patchify`/`unpatchify` use `in_chans`
where the original hard-codes 3 channels (as many forks do), so 1-channel toy data works.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block, PatchEmbed


def sincos_pos_embed_2d(dim: int, grid: int, cls_token: bool = False) -> torch.Tensor:
    """Fixed 2-D sin-cos positional embedding [grid*grid (+1), dim], in MAE's layout.

    The first half of the channels encodes the column of a patch, the second half its row; each
    half is [sin | cos] of position * 1/10000^(i/(dim/4)). A zero row is prepended for CLS.
    """
    if dim % 4 != 0:
        raise ValueError(f"sin-cos embedding width must be a multiple of 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # [D/4]
    rows, cols = torch.meshgrid(
        torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij"
    )

    def one_axis(pos: torch.Tensor) -> torch.Tensor:  # [G*G] -> [G*G, D/2]
        angles = pos.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    emb = torch.cat([one_axis(cols), one_axis(rows)], dim=1)  # [G*G, D]
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()


class MaskedAutoencoderViT(nn.Module):
    """Masked Autoencoder with a VisionTransformer backbone (the official interface)."""

    def __init__(
        self,
        img_size=224,
        patch_size=16,
        in_chans=3,
        embed_dim=1024,
        depth=24,
        num_heads=16,
        decoder_embed_dim=512,
        decoder_depth=8,
        decoder_num_heads=16,
        mlp_ratio=4.0,
        norm_layer=nn.LayerNorm,
        norm_pix_loss=False,
    ):
        super().__init__()
        self.in_chans = in_chans

        # encoder
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList(
            [
                Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, qk_scale=None, norm_layer=norm_layer)
                for _ in range(depth)
            ]
        )
        self.norm = norm_layer(embed_dim)

        # decoder
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(
            torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False
        )
        self.decoder_blocks = nn.ModuleList(
            [
                Block(
                    decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, qk_scale=None,
                    norm_layer=norm_layer,
                )
                for _ in range(decoder_depth)
            ]
        )
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans, bias=True)

        self.norm_pix_loss = norm_pix_loss
        self.initialize_weights()

    def initialize_weights(self):
        grid = int(self.patch_embed.num_patches**0.5)
        self.pos_embed.data.copy_(sincos_pos_embed_2d(self.pos_embed.shape[-1], grid, cls_token=True)[None])
        self.decoder_pos_embed.data.copy_(
            sincos_pos_embed_2d(self.decoder_pos_embed.shape[-1], grid, cls_token=True)[None]
        )
        # the patch projection is initialised like a Linear layer over flattened patches
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_weights)

    def _init_weights(self, m):
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.zeros_(m.bias)
            nn.init.ones_(m.weight)

    def patchify(self, imgs):
        """imgs [N, C, H, W] -> x [N, L, p*p*C], each patch flattened as (row, col, channel)."""
        p = self.patch_embed.patch_size[0]
        assert imgs.shape[2] == imgs.shape[3] and imgs.shape[2] % p == 0
        c, h = self.in_chans, imgs.shape[2] // p
        x = imgs.reshape(imgs.shape[0], c, h, p, h, p)
        x = x.permute(0, 2, 4, 3, 5, 1)  # [N, h, w, p, q, C]
        return x.reshape(imgs.shape[0], h * h, p * p * c)

    def unpatchify(self, x):
        """x [N, L, p*p*C] -> imgs [N, C, H, W]."""
        p = self.patch_embed.patch_size[0]
        h = int(x.shape[1] ** 0.5)
        assert h * h == x.shape[1]
        x = x.reshape(x.shape[0], h, h, p, p, self.in_chans)
        x = x.permute(0, 5, 1, 3, 2, 4)  # [N, C, h, p, w, q]
        return x.reshape(x.shape[0], self.in_chans, h * p, h * p)

    def random_masking(self, x, mask_ratio):
        """Per-sample random masking by argsort of uniform noise.

        x: [N, L, D] -> x_masked [N, len_keep, D], mask [N, L] (0 keep, 1 remove), ids_restore [N, L].
        """
        n, length, d = x.shape
        len_keep = int(length * (1 - mask_ratio))
        noise = torch.rand(n, length, device=x.device)  # [N, L]; small = keep
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_masked = torch.gather(x, 1, ids_keep.unsqueeze(-1).repeat(1, 1, d))
        mask = torch.ones(n, length, device=x.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)  # back to patch order
        return x_masked, mask, ids_restore

    def forward_encoder(self, x, mask_ratio):
        x = self.patch_embed(x)  # [N, L, D]
        x = x + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, mask_ratio)  # [N, K, D]
        cls_token = self.cls_token + self.pos_embed[:, :1, :]
        x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)  # [N, 1 + K, D]
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return x, mask, ids_restore

    def forward_decoder(self, x, ids_restore):
        x = self.decoder_embed(x)  # [N, 1 + K, Dd]
        mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # [N, L, Dd] visible first, no CLS
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))  # unshuffle
        x = torch.cat([x[:, :1, :], x_], dim=1)  # [N, 1 + L, Dd]
        x = x + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        x = self.decoder_pred(x)  # [N, 1 + L, p*p*C]
        return x[:, 1:, :]

    def forward_loss(self, imgs, pred, mask):
        """Mean squared error on removed patches; imgs [N, C, H, W], pred [N, L, P], mask [N, L]."""
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = (pred - target) ** 2
        loss = loss.mean(dim=-1)  # [N, L] per patch
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs, mask_ratio=0.75):
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio)
        pred = self.forward_decoder(latent, ids_restore)  # [N, L, p*p*C]
        loss = self.forward_loss(imgs, pred, mask)
        return loss, pred, mask


def _paper_size(patch_size, embed_dim, depth, num_heads, **kwargs):
    """The official factories' shared settings: decoder 512 wide, 8 deep, 16 heads; MLP ratio 4; LayerNorm eps 1e-6."""
    return MaskedAutoencoderViT(
        patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
        decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
        mlp_ratio=4, norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs,
    )


def mae_vit_base_patch16_dec512d8b(**kwargs):
    return _paper_size(16, 768, 12, 12, **kwargs)


def mae_vit_large_patch16_dec512d8b(**kwargs):
    return _paper_size(16, 1024, 24, 16, **kwargs)


def mae_vit_huge_patch14_dec512d8b(**kwargs):
    return _paper_size(14, 1280, 32, 16, **kwargs)


def mae_vit_tiny_patch4(**kwargs):
    """A CPU-sized model for tests and examples (not in the official file): 16x16 inputs, 16 patches."""
    config = dict(
        img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=2, num_heads=2,
        decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2,
        mlp_ratio=2, norm_layer=partial(nn.LayerNorm, eps=1e-6),
    )
    config.update(kwargs)
    return MaskedAutoencoderViT(**config)


# recommended architectures, as in the official file
mae_vit_base_patch16 = mae_vit_base_patch16_dec512d8b
mae_vit_large_patch16 = mae_vit_large_patch16_dec512d8b
mae_vit_huge_patch14 = mae_vit_huge_patch14_dec512d8b
