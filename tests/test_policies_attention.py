"""Attention-guided masking (AttMask high / low / hint) vs direct computations."""

from __future__ import annotations

import pytest
import torch

from maskkit.plan import num_visible
from maskkit.policies import AttentionPolicy
from maskkit.policies.attention import num_hints


def hidden_set(plan, b):
    return set(torch.nonzero(plan.mask[b]).flatten().tolist())


def distinct_attention(batch, n, seed):
    """Attention rows (softmax of uniforms): distinct values almost surely, so ranks are unique."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, n, generator=gen).softmax(dim=1)


@pytest.mark.parametrize("n,ratio", [(16, 0.75), (64, 0.5), (196, 0.75)])
def test_high_and_low_hide_top_and_bottom_attended(n, ratio):
    batch = 4
    attn = distinct_attention(batch, n, seed=n)
    tokens = torch.zeros(batch, n, 3)
    hidden = n - num_visible(n, ratio)
    high = AttentionPolicy(ratio, mode="high")(tokens, attention=attn)
    low = AttentionPolicy(ratio, mode="low")(tokens, attention=attn)
    for b in range(batch):
        assert hidden_set(high, b) == set(torch.topk(attn[b], hidden).indices.tolist())
        assert hidden_set(low, b) == set(torch.topk(attn[b], hidden, largest=False).indices.tolist())


@pytest.mark.parametrize("n,ratio,hint_ratio", [(196, 0.75, 0.1), (64, 0.5, 0.25), (16, 0.75, 0.3)])
def test_hint_reveals_stated_number_and_keeps_count(n, ratio, hint_ratio):
    batch = 4
    attn = distinct_attention(batch, n, seed=1)
    noise = torch.rand(batch, n, generator=torch.Generator().manual_seed(2))
    keep = num_visible(n, ratio)
    hidden = n - keep
    h = num_hints(n, keep, hint_ratio)
    assert h == min(round(hint_ratio * hidden), keep) and h > 0
    plan = AttentionPolicy(ratio, mode="hint", hint_ratio=hint_ratio)(
        torch.zeros(batch, n, 2), attention=attn, noise=noise
    )
    assert plan.mask.sum(dim=1).tolist() == [hidden] * batch
    for b in range(batch):
        order = torch.argsort(attn[b], descending=True).tolist()
        top, next_ = set(order[:hidden]), set(order[hidden : hidden + h])
        got = hidden_set(plan, b)
        revealed = top - got
        # direct rule: the h top-attended candidates with the lowest noise are revealed ...
        cand = sorted(top, key=lambda i: noise[b, i].item())
        assert revealed == set(cand[:h])
        # ... and the h next-most-attended patches are hidden in their place
        assert got == (top - revealed) | next_


def test_hint_randomness_follows_generator():
    attn = distinct_attention(2, 64, seed=3)
    policy = AttentionPolicy(0.75, mode="hint")
    tokens = torch.zeros(2, 64, 2)
    a = policy(tokens, attention=attn, generator=torch.Generator().manual_seed(0))
    b = policy(tokens, attention=attn, generator=torch.Generator().manual_seed(0))
    c = policy(tokens, attention=attn, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.mask, b.mask) and not torch.equal(a.mask, c.mask)


def test_hint_ratio_zero_equals_high():
    attn = distinct_attention(3, 64, seed=4)
    tokens = torch.zeros(3, 64, 2)
    hint = AttentionPolicy(0.75, mode="hint", hint_ratio=0.0)(tokens, attention=attn)
    high = AttentionPolicy(0.75, mode="high")(tokens, attention=attn)
    assert torch.equal(hint.mask, high.mask)


class FakeEncoder:
    """Stands in for an MAE: cls_attention is the mean of the image patches; records grad mode."""

    def __init__(self):
        self.grad_enabled = None

    def cls_attention(self, images):
        self.grad_enabled = torch.is_grad_enabled()
        return images.flatten(1) * 1.0  # [B, N]: here an "image" is just one value per patch


def test_reads_encoder_attention_without_grad():
    images = torch.rand(2, 4, 4, requires_grad=True)  # [B, 4, 4] -> 16 "patches"
    encoder = FakeEncoder()
    plan = AttentionPolicy(0.75)(torch.zeros(2, 16, 3), encoder=encoder, images=images)
    assert encoder.grad_enabled is False
    direct = AttentionPolicy(0.75)(torch.zeros(2, 16, 3), attention=images.detach().flatten(1))
    assert torch.equal(plan.mask, direct.mask)
    assert not plan.scores.requires_grad


def test_missing_or_bad_attention_is_a_clear_error():
    tokens = torch.zeros(2, 16, 3)
    with pytest.raises(ValueError, match="needs `attention`"):
        AttentionPolicy()(tokens)
    with pytest.raises(ValueError, match=r"attention must be a tensor of shape \(2, 16\)"):
        AttentionPolicy()(tokens, attention=torch.rand(2, 17))
    with pytest.raises(TypeError, match="cls_attention"):
        AttentionPolicy()(tokens, encoder=object(), images=torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError, match="noise must have shape"):
        AttentionPolicy(mode="hint")(tokens, attention=torch.rand(2, 16), noise=torch.rand(2, 3))
