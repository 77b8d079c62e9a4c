"""CLS-attention extraction from timm ViT blocks (maskkit.adapters.vit_attention)."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

from maskkit.adapters.vit_attention import cls_attention, last_block_cls_attention


def _block(dim: int = 32, heads: int = 4, qk_norm: bool = False, seed: int = 0) -> Block:
    torch.manual_seed(seed)
    block = Block(dim, heads, qkv_bias=True, qk_norm=qk_norm)
    for name, p in block.named_parameters():  # non-trivial norms and biases
        if "norm" in name:
            with torch.no_grad():
                p.add_(0.3 * torch.randn_like(p))
    block.attn.fused_attn = True  # the fast path: timm never builds the matrix here
    return block.eval()


def _explicit(block: Block, x: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T * scale) per head from the raw weights, in float64; CLS row, patch columns: [B, H, N]."""
    x = x.double()
    norm = block.norm1
    h = F.layer_norm(x, norm.normalized_shape, norm.weight.double(), norm.bias.double(), norm.eps)
    w, b = block.attn.qkv.weight.double(), block.attn.qkv.bias.double()
    dim = x.shape[-1]
    heads = block.attn.num_heads
    hd = dim // heads
    q_all = h @ w[:dim].T + b[:dim]  # [B, T, D]
    k_all = h @ w[dim : 2 * dim].T + b[dim : 2 * dim]
    rows = []
    for i in range(heads):
        q, k = q_all[..., i * hd : (i + 1) * hd], k_all[..., i * hd : (i + 1) * hd]  # [B, T, hd]
        if not isinstance(block.attn.q_norm, nn.Identity):
            qn, kn = block.attn.q_norm, block.attn.k_norm
            q = F.layer_norm(q, (hd,), qn.weight.double(), qn.bias.double(), qn.eps)
            k = F.layer_norm(k, (hd,), kn.weight.double(), kn.bias.double(), kn.eps)
        logits = (q[:, 0:1] @ k.transpose(1, 2)) / hd**0.5  # [B, 1, T]
        rows.append(torch.softmax(logits, dim=-1)[:, 0, 1:])  # [B, N]
    return torch.stack(rows, dim=1)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_matches_explicit_softmax_with_fused_attention(qk_norm):
    block = _block(qk_norm=qk_norm)
    x = torch.randn(3, 1 + 9, 32)
    got = cls_attention(block, x)
    assert got.shape == (3, 9)
    assert block.attn.fused_attn is True
    torch.testing.assert_close(got.double(), _explicit(block, x).mean(dim=1), rtol=1e-5, atol=1e-6)


def test_matches_timm_math_path_matrix():
    # timm's non-fused path materialises softmax(q k^T * scale) right before attn_drop: capture it.
    block = _block(seed=1)
    math_block = copy.deepcopy(block)
    math_block.attn.fused_attn = False
    seen = {}
    math_block.attn.attn_drop.register_forward_hook(lambda m, inp, out: seen.setdefault("attn", out))
    x = torch.randn(2, 1 + 16, 32)
    math_block(x)
    expected = seen["attn"][:, :, 0, 1:].mean(dim=1)  # [B, N]
    torch.testing.assert_close(cls_attention(block, x), expected, rtol=1e-5, atol=1e-7)


def test_encoder_outputs_unchanged_and_no_grad():
    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=0,
        img_size=16,
        patch_size=4,
        embed_dim=32,
        depth=2,
        num_heads=2,
    ).eval()
    images = torch.randn(2, 3, 16, 16)
    flags = [blk.attn.fused_attn for blk in vit.blocks]
    state = {k: v.clone() for k, v in vit.state_dict().items()}
    before = vit.forward_features(images)
    tokens = vit._pos_embed(vit.patch_embed(images))  # [B, 1 + N, D]
    with torch.no_grad():
        attn = last_block_cls_attention(vit.blocks, tokens)
    after = vit.forward_features(images)
    assert torch.equal(before, after)
    assert [blk.attn.fused_attn for blk in vit.blocks] == flags
    assert all(torch.equal(state[k], v) for k, v in vit.state_dict().items())
    assert attn.shape == (2, 16) and not attn.requires_grad
    # last block's attention on the output of the blocks before it
    manual = cls_attention(vit.blocks[-1], vit.blocks[0](tokens))
    assert torch.equal(attn, manual.detach())


def test_is_the_head_average():
    block = _block(seed=2)
    x = torch.randn(2, 1 + 12, 32)
    got = cls_attention(block, x)
    # permuting heads (their q and k rows in qkv) leaves the average unchanged ...
    permuted = copy.deepcopy(block)
    dim, heads = 32, block.attn.num_heads
    order = torch.tensor([2, 0, 3, 1])
    rows = torch.arange(dim).view(heads, -1)[order].reshape(-1)
    idx = torch.cat([rows, rows + dim, rows + 2 * dim])
    with torch.no_grad():
        permuted.attn.qkv.weight.copy_(block.attn.qkv.weight[idx])
        permuted.attn.qkv.bias.copy_(block.attn.qkv.bias[idx])
    torch.testing.assert_close(cls_attention(permuted, x), got, rtol=1e-6, atol=1e-7)
    # ... while a single head differs from it
    assert not torch.allclose(_explicit(block, x)[:, 0].float(), got, atol=1e-4)
    # with zero queries every head is uniform over the 1 + N tokens
    with torch.no_grad():
        block.attn.qkv.weight[:dim].zero_()
        block.attn.qkv.bias[:dim].zero_()
    torch.testing.assert_close(cls_attention(block, x), torch.full((2, 12), 1 / 13), rtol=1e-6, atol=0)


def test_gradients_flow_when_enabled():
    block = _block(seed=3)
    x = torch.randn(2, 5, 32)
    cls_attention(block, x)[:, 0].sum().backward()
    assert block.attn.qkv.weight.grad is not None and block.attn.qkv.weight.grad.abs().sum() > 0


def test_bad_inputs():
    with pytest.raises(TypeError, match="timm vision_transformer Block"):
        cls_attention(nn.Linear(4, 4), torch.randn(1, 3, 4))
    with pytest.raises(ValueError, match=r"\[B, 1 \+ N, D\]"):
        cls_attention(_block(), torch.randn(3, 32))
    with pytest.raises(ValueError, match="at least one block"):
        last_block_cls_attention([], torch.randn(1, 3, 32))
