"""The timm adapter (maskkit.adapters.timm): attention, layout, presets, export, bad input.

What every adapter must do (protocol, official-MAE-equivalent loss, plan round trip, features, learned
masker gradients, undo, state_dict round trip) is in tests/test_adapter_conformance.py.
"""

from __future__ import annotations

import math

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

import maskkit
from maskkit.adapters.timm import TimmMAE, create_mae, get_preset, list_presets, sincos_pos_embed_2d
from maskkit.mae import policy_context

SMALL = dict(embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=2)


def small_mae(img: int = 32, chans: int = 3, **kw) -> TimmMAE:
    return create_mae("tiny", img_size=img, in_chans=chans, seed=0, **{**SMALL, **kw})


def test_cls_attention_is_last_block_attention_on_unmasked_images():
    m = small_mae().eval()
    images = torch.randn(2, 3, 32, 32)
    last = m.encoder.blocks[-1].attn
    last.fused_attn = False  # timm's math path materialises the matrix before attn_drop
    seen = []
    last.attn_drop.register_forward_hook(lambda mod, inp, out: seen.append(out))
    m.encoder.forward_features(images)  # timm's own full, unmasked forward
    expected = seen[0][:, :, 0, 1:].mean(dim=1)  # [B, N]
    torch.testing.assert_close(m.cls_attention(images), expected, rtol=1e-5, atol=1e-7)


def test_patchify_layout_and_round_trip():
    m = small_mae(28, 2)
    images = torch.randn(3, 2, 28, 28)
    patches = m.patchify(images)
    assert torch.equal(m.unpatchify(patches), images)
    i, j = 2, 5  # patch in row 2, column 5 of the 7x7 grid, flattened as (row, col, channel)
    expected = images[:, :, 4 * i : 4 * i + 4, 4 * j : 4 * j + 4].permute(0, 2, 3, 1).reshape(3, -1)
    assert torch.equal(patches[:, 7 * i + j], expected)
    with pytest.raises(ValueError, match="patches must have shape"):
        m.unpatchify(patches[:, :5])


def test_attention_policy_hides_most_attended():
    m = small_mae()
    images = torch.randn(3, 3, 32, 32)
    out = m(images, policy=maskkit.create_policy("attention", ratio=0.75))
    hidden = torch.topk(m.cls_attention(images), 48, dim=1).indices
    expected = torch.zeros(3, 64).scatter(1, hidden, 1.0)
    assert torch.equal(out.plan.mask, expected)
    out.loss.backward()
    assert m.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    # the same scores passed precomputed through the context
    ctx = policy_context(m, images)
    assert set(ctx) == {"images", "encoder", "grid"} and ctx["grid"] == (8, 8)
    again = m(images, policy=maskkit.create_policy("attention"), attention=m.cls_attention(images).detach())
    assert torch.equal(again.plan.mask, expected)


def test_encoder_state_dict_loads_into_timm_strict():
    m = small_mae(28, 1).eval()
    fresh = timm.create_model(**m.encoder_config).eval()
    fresh.load_state_dict(m.encoder_state_dict(), strict=True)
    images = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))  # not the other tests' RNG draws
    features = m.features(images)  # CLS-only last block: equal up to summation order (tests/test_vit_cls_only.py)
    torch.testing.assert_close(fresh.forward_features(images)[:, 0], features, rtol=0, atol=1e-6)
    torch.testing.assert_close(fresh(images), features, rtol=0, atol=1e-6)  # num_classes=0, token pooling
    # ... and with a classifier head, everything but the head loads
    head = timm.create_model(**{**m.encoder_config, "num_classes": 10})
    missing, unexpected = head.load_state_dict(m.encoder_state_dict(), strict=False)
    assert sorted(missing) == ["head.bias", "head.weight"] and not unexpected


def test_fixed_sincos_pos_embeds():
    m = small_mae()
    pos = m.encoder.pos_embed
    assert not pos.requires_grad and not m.decoder_pos_embed.requires_grad
    assert torch.equal(pos[0], sincos_pos_embed_2d(32, (8, 8)))
    m(torch.randn(2, 3, 32, 32)).loss.backward()
    assert pos.grad is None and m.mask_token.grad is not None
    # 2-D sin-cos values against the formula: first half encodes the column, second the row
    emb = sincos_pos_embed_2d(8, (3, 4))  # D = 8: per axis 2 sines then 2 cosines
    assert emb.shape == (1 + 12, 8) and torch.equal(emb[0], torch.zeros(8))
    row, col = 2, 3
    expected = [
        f(pos * 10000 ** (-j / 2)) for pos in (col, row) for f in (math.sin, math.cos) for j in range(2)
    ]
    torch.testing.assert_close(emb[1 + 4 * row + col], torch.tensor(expected), rtol=1e-6, atol=1e-7)


def test_wraps_instance():
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=7)
    original = vit.pos_embed.detach().clone()
    m = TimmMAE(vit, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, fixed_pos_embed=False)
    assert m.encoder is vit and vit.num_classes == 0 and m.encoder_config is None
    assert torch.equal(vit.pos_embed, original) and vit.pos_embed.requires_grad
    target = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=0)
    target.load_state_dict(m.encoder_state_dict(), strict=True)
    out = m(torch.randn(2, 3, 16, 16))
    assert out.pred.shape == (2, 16, 48) and torch.isfinite(out.loss)


def test_presets_and_seed():
    assert {"tiny", "pilot", "vit-b", "vit-l"} <= set(list_presets())
    assert (get_preset("vit-b").embed_dim, get_preset("vit-l").depth) == (768, 24)
    state = torch.get_rng_state()
    a, b = small_mae(), small_mae()
    assert torch.equal(torch.get_rng_state(), state)
    assert all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    digits = create_mae("pilot", img_size=8, patch_size=2, depth=1, decoder_depth=1)
    assert (digits.num_patches, digits.in_chans, digits.embed_dim) == (16, 1, 128)


def test_bad_input_errors():
    with pytest.raises(ValueError, match="unknown MAE preset 'huge'"):
        create_mae("huge")
    with pytest.raises(ValueError, match="divisible by patch_size 4"):
        create_mae("tiny", img_size=30)
    with pytest.raises(ValueError, match="cannot build timm encoder"):
        TimmMAE("no_such_model")
    with pytest.raises(ValueError, match="pretrained=False"):
        TimmMAE("vit_tiny_patch16_224", pretrained=True)
    with pytest.raises(ValueError, match="exactly one prefix token"):
        small_mae(reg_tokens=1)
    with pytest.raises(ValueError, match="divisible by decoder_num_heads 3"):
        small_mae(decoder_num_heads=3)
    with pytest.raises(ValueError, match="cannot build timm encoder"):
        small_mae(num_heads=3)  # width 32
    with pytest.raises(TypeError, match="timm VisionTransformer"):
        TimmMAE(torch.nn.Linear(3, 3))
    m = small_mae()
    with pytest.raises(ValueError, match=r"images must have shape \[B, 3, 32, 32\]"):
        m.patch_tokens(torch.randn(2, 1, 32, 32))


def test_hpm_objective_through_the_timm_adapter():
    m = small_mae(img=16)
    hpm = maskkit.create_policy("hpm", embed_dim=m.embed_dim, num_patches=m.num_patches)
    imgs = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    out = m(imgs, policy=hpm, generator=torch.Generator().manual_seed(0), progress=1.0)
    assert (out.plan.guided.sum(1) == 6).all()  # half of the 12 hidden
    torch.testing.assert_close(out.total_loss, out.loss + hpm.aux_loss(out.plan, out.per_patch))
    out.total_loss.backward()
    assert all(p.grad is not None for p in hpm.parameters())
    assert m.encoder.patch_embed.proj.weight.grad is not None


# ---- decoder masking: CLS, the visible tokens and the decoder_ids only -----------------------------------


@pytest.mark.usefixtures("one_thread")  # bit-exact comparisons need one thread count
def test_a_subset_decode_is_the_decoder_on_cls_the_visible_and_the_decoder_ids():
    m = small_mae().eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    plan = maskkit.MaskPlan.from_scores(torch.rand(2, 64, generator=torch.Generator().manual_seed(1)), 0.75)
    k = plan.num_visible
    every = torch.stack([torch.nonzero(row).flatten() for row in plan.mask])  # [B, N - K] ascending
    ids = every[:, ::3]  # [B, M] a subset of the hidden patches
    seen = []
    hook = m.decoder_blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(tuple(args[0].shape)))
    out = maskkit.mae_forward(m, images, plan.with_decoder_ids(ids))
    hook.remove()
    assert seen == [(2, 1 + k + ids.shape[1], 32)]
    # by hand: CLS, the visible latents, mask tokens, each with the positional embedding of its patch
    x = m.decoder_embed(m.encode(m.patch_tokens(images), plan))  # [B, 1 + K, Dd]
    pos = m.decoder_pos_embed[0, 1:][torch.cat([plan.ids_keep, ids], dim=1)]
    x = torch.cat([x[:, :1] + m.decoder_pos_embed[:, :1],
                   torch.cat([x[:, 1:], m.mask_token.expand(2, ids.shape[1], -1)], dim=1) + pos], dim=1)  # fmt: skip
    for blk in m.decoder_blocks:
        x = blk(x)
    own = m.decoder_pred(m.decoder_norm(x[:, 1 + k:]))  # [B, M, P]
    assert torch.equal(out.pred.gather(1, ids[..., None].expand(-1, -1, own.shape[-1])), own)
    others = torch.ones(2, 64, dtype=torch.bool).scatter(1, ids, False)
    assert bool((out.pred[others] == 0).all())  # zeros at every other patch
    target = m.patchify(images).gather(1, ids[..., None].expand(-1, -1, own.shape[-1]))
    torch.testing.assert_close(out.loss, ((own - target) ** 2).mean(), rtol=1e-6, atol=0)
    # every hidden patch as the subset: the full decode's predictions there, up to summation order
    full, sub = maskkit.mae_forward(m, images, plan), maskkit.mae_forward(m, images, plan.with_decoder_ids(every))
    torch.testing.assert_close(sub.pred, full.pred * plan.mask[..., None], rtol=1e-5, atol=1e-5)
