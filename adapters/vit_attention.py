"""CLS-to-patch attention of a timm ViT block (or, without CLS, the attention each token receives), recomputed
as a side computation.

timm's `Attention` never materialises the attention matrix when `fused_attn` is on (it calls
`F.scaled_dot_product_attention`), so the weights are recomputed here from the block's own
`norm1` and `attn.qkv` (plus `q_norm`/`k_norm` where present): softmax(q k^T * scale), the
softmax taken over every token (CLS included), then the CLS row restricted to the patch columns
and averaged over heads, as AttMask does. Nothing in the block is modified or called in a way
that changes its outputs; autograd follows the caller's mode (works under `torch.no_grad()`).

`cls_through_blocks` gives the encoder's CLS row for the features (linear probe, MLO's level 2):
the last block computes queries, attention output and MLP for the CLS row only.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch.nn.functional as F
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
    q, k, scale = _queries_keys(block, attn, x)  # [B, H, T, hd] each
    logits = (q[:, :, :1] * scale) @ k.transpose(-2, -1)  # [B, H, 1, T]: the CLS query only
    weights = logits.softmax(dim=-1)[:, :, 0, 1:]  # [B, H, N]
    return weights.mean(dim=1)  # [B, N]


def _queries_keys(block: nn.Module, attn: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, float]:
    """The block's queries and keys [B, H, T, hd] for its input x [B, T, D] (q_norm/k_norm applied), and its scale."""
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
    h = block.norm1(x)  # [B, T, D]
    qkv = attn.qkv(h).reshape(batch, length, 3, heads, head_dim).permute(2, 0, 3, 1, 4)  # [3, B, H, T, hd]
    return q_norm(qkv[0]), k_norm(qkv[1]), scale


def attention_received(block: nn.Module, x: Tensor) -> Tensor:
    """The attention each token receives in `block` for its input x [B, N, D] (no CLS) -> [B, N]: the columns of
    softmax(q k^T * scale) averaged over heads and queries (so each row sums to 1). A model without CLS (VideoMAE)
    gives this as its `cls_attention`."""
    attn = check_timm_block(block)
    if x.dim() != 3 or x.shape[1] < 1:
        raise ValueError(f"x must have shape [B, N, D] with N >= 1, got {tuple(x.shape)}")
    q, k, scale = _queries_keys(block, attn, x)  # [B, H, N, hd] each
    weights = ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # [B, H, N, N]: query rows, key columns
    return weights.mean(dim=(1, 2))  # [B, N]


def last_block_cls_attention(blocks: Iterable[nn.Module], x: Tensor) -> Tensor:
    """Run `blocks[:-1]` on x [B, 1 + N, D], then return the last block's CLS attention [B, N]."""
    blocks = list(blocks)
    if not blocks:
        raise ValueError("last_block_cls_attention needs at least one block")
    for blk in blocks[:-1]:
        x = blk(x)
    return cls_attention(blocks[-1], x)


def last_block_attention_received(blocks: Iterable[nn.Module], x: Tensor) -> Tensor:
    """Run `blocks[:-1]` on x [B, N, D] (no CLS), then return the attention each token receives in the last [B, N]."""
    blocks = list(blocks)
    if not blocks:
        raise ValueError("last_block_attention_received needs at least one block")
    for blk in blocks[:-1]:
        x = blk(x)
    return attention_received(blocks[-1], x)


# ---- the CLS row through the last block ----------------------------------------------------------


def _stochastic(module: nn.Module) -> bool:
    """Whether `module` draws random numbers in its current mode (a dropout or drop-path with p > 0)."""
    if not module.training:
        return False
    for sub in module.modules():
        p = getattr(sub, "p", None) if isinstance(sub, nn.Dropout) else getattr(sub, "drop_prob", None)
        if p:
            return True
    return False


def supports_cls_only(block: nn.Module) -> bool:
    """Whether `cls_only_block` reproduces `block` exactly: a timm `Block` with timm's `Attention`
    (forwards not overridden) that draws no random numbers in its current mode."""
    from timm.models.vision_transformer import Attention, Block

    attn = getattr(block, "attn", None)
    return (
        isinstance(block, Block)
        and type(block).forward is Block.forward
        and isinstance(attn, Attention)
        and type(attn).forward is Attention.forward
        and not _stochastic(block)
    )


def cls_only_block(block: nn.Module, x: Tensor) -> Tensor:
    """The CLS row of a timm `Block`'s output, computing only what that row needs: x [B, T, D] -> [B, 1, D].

    Keys and values come from every token; the query, the attention output, the projection and
    the MLP from the CLS row alone (about 1/T of those costs). Equal to `block(x)[:, :1]` up to
    floating-point summation order; the caller checks `supports_cls_only(block)` first.
    """
    attn = block.attn
    batch, length, _ = x.shape
    heads, head_dim, width = attn.num_heads, attn.head_dim, attn.attn_dim
    h = block.norm1(x)  # [B, T, D]
    weight, bias = attn.qkv.weight, attn.qkv.bias  # [3A, D], [3A]
    q = F.linear(h[:, :1], weight[:width], None if bias is None else bias[:width])  # [B, 1, A]
    kv = F.linear(h, weight[width:], None if bias is None else bias[width:])  # [B, T, 2A]
    q = q.reshape(batch, 1, heads, head_dim).transpose(1, 2)  # [B, H, 1, hd]
    k, v = kv.reshape(batch, length, 2, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, T, hd]
    q, k = attn.q_norm(q), attn.k_norm(k)
    if attn.fused_attn:
        o = F.scaled_dot_product_attention(q, k, v)  # [B, H, 1, hd]
    else:
        o = (q * attn.scale @ k.transpose(-2, -1)).softmax(dim=-1) @ v  # [B, H, 1, hd]
    o = attn.norm(o.transpose(1, 2).reshape(batch, 1, width))  # [B, 1, A]
    if getattr(attn, "gate", None) is not None:
        o = o * attn.gate(h[:, :1]).sigmoid()
    cls = x[:, :1] + block.drop_path1(block.ls1(attn.proj_drop(attn.proj(o))))  # [B, 1, D]
    return cls + block.drop_path2(block.ls2(block.mlp(block.norm2(cls))))


def cls_through_blocks(blocks: Iterable[nn.Module], x: Tensor) -> Tensor:
    """x [B, 1 + N, D] through every block, returning only the CLS row [B, 1, D]: the last block runs
    CLS-only (`cls_only_block`) when it is a plain timm Block, else whole."""
    blocks = list(blocks)
    for blk in blocks[:-1]:
        x = blk(x)
    if blocks and supports_cls_only(blocks[-1]):
        return cls_only_block(blocks[-1], x)
    return (blocks[-1](x) if blocks else x)[:, :1]
