"""CLS-to-patch attention of a timm ViT block, recomputed as a side computation.

timm's `Attention` never materialises the attention matrix when `fused_attn` is on (it calls
`F.scaled_dot_product_attention`), so the weights are recomputed here from the block's own
`norm1` and `attn.qkv` (plus `q_norm`/`k_norm` where present): softmax(q k^T * scale), the
softmax taken over every token (CLS included), then the CLS row restricted to the patch columns
and averaged over heads, as AttMask does. Nothing in the block is modified or called in a way
that changes its outputs; autograd follows the caller's mode (works under `torch.no_grad()`).
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor, nn


def check_timm_block(block: nn.Module) -> nn.Module:
    """The block's `attn` if `block` looks like a timm `Block` with timm's `Attention`; else TypeError."""
    attn = getattr(block, "attn", None)
    norm1 = getattr(block, "norm1", None)
    qkv = getattr(attn, "qkv", None)
    if (
        not callable(norm1)
        or attn is None
        or not isinstance(qkv, nn.Linear)
        or not isinstance(getattr(attn, "num_heads", None), int)
    ):
        raise TypeError(
            f"expected a timm vision_transformer Block (norm1, attn.qkv: nn.Linear, attn.num_heads), "
            f"got {type(block).__name__}"
        )
    if qkv.out_features % (3 * attn.num_heads) != 0:
        raise TypeError(
            f"attn.qkv of {type(block).__name__} has {qkv.out_features} outputs, "
            f"not 3 x num_heads ({attn.num_heads}) x head_dim"
        )
    return attn


def cls_attention(block: nn.Module, x: Tensor) -> Tensor:
    """CLS-to-patch attention weights of `block` for its input x [B, 1 + N, D] (CLS first) -> [B, N].

    Head-averaged row 0 of softmax(q k^T * scale), CLS column dropped (so rows sum to less than 1).
    """
    attn = check_timm_block(block)
    if x.dim() != 3 or x.shape[1] < 2:
        raise ValueError(f"x must have shape [B, 1 + N, D] with N >= 1, got {tuple(x.shape)}")
    heads = attn.num_heads
    head_dim = getattr(attn, "head_dim", None) or attn.qkv.out_features // (3 * heads)
    scale = getattr(attn, "scale", None)
    if scale is None:
        scale = head_dim**-0.5
    q_norm = getattr(attn, "q_norm", None)  # absent before timm 0.9
    k_norm = getattr(attn, "k_norm", None)
    q_norm = nn.Identity() if q_norm is None else q_norm
    k_norm = nn.Identity() if k_norm is None else k_norm

    batch, length, _ = x.shape
    h = block.norm1(x)  # [B, T, D], T = 1 + N
    qkv = attn.qkv(h).reshape(batch, length, 3, heads, head_dim).permute(2, 0, 3, 1, 4)  # [3, B, H, T, hd]
    q, k = q_norm(qkv[0]), k_norm(qkv[1])  # [B, H, T, hd]
    logits = (q[:, :, :1] * scale) @ k.transpose(-2, -1)  # [B, H, 1, T]: the CLS query only
    weights = logits.softmax(dim=-1)[:, :, 0, 1:]  # [B, H, N]
    return weights.mean(dim=1)  # [B, N]


def last_block_cls_attention(blocks: Iterable[nn.Module], x: Tensor) -> Tensor:
    """Run `blocks[:-1]` on x [B, 1 + N, D], then return the last block's CLS attention [B, N]."""
    blocks = list(blocks)
    if not blocks:
        raise ValueError("last_block_cls_attention needs at least one block")
    for blk in blocks[:-1]:
        x = blk(x)
    return cls_attention(blocks[-1], x)
