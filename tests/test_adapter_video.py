"""The built-in video MAE (maskkit.adapters.video_mae, kind `video`): tubelets, positions, decoder masking, presets.

The MAE protocol itself (loss against VideoMAE's forward re-done by hand, round trips, features, learned masker,
state dict, the registered spec) is in tests/test_adapter_conformance.py (its `video` case).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from torch import Tensor

from maskkit import MaskPlan, create_policy, mae_forward, mae_step_loss
from maskkit.adapters import ADAPTERS, create_mae_from_spec, parse_model_spec
from maskkit.adapters.models import check_model_options
from maskkit.adapters.video_mae import TimmVideoMAE, create_video_mae, get_video_preset, sinusoid_table
from maskkit.mae import masked_loss, patch_loss

pytestmark = pytest.mark.usefixtures("one_thread")  # bit-exact comparisons need one thread count

B = 2
SMALL = dict(num_frames=8, img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=2, num_heads=2,
             decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=2)  # grid (4, 4, 4): N = 64  # fmt: skip


def small(seed: int = 0, **kw) -> TimmVideoMAE:
    return create_video_mae("micro", seed=seed, **{**SMALL, **kw}).eval()


def clips_for(m: TimmVideoMAE, seed: int = 7) -> Tensor:
    return torch.randn(B, m.in_chans, m.num_frames, *m.img_size, generator=torch.Generator().manual_seed(seed))


def plan_for(m: TimmVideoMAE, ratio: float = 0.75, seed: int = 11) -> MaskPlan:
    return MaskPlan.from_scores(torch.rand(B, m.num_patches, generator=torch.Generator().manual_seed(seed)), ratio)


def random_hidden_subset(plan: MaskPlan, m: int, seed: int = 5) -> Tensor:
    """m hidden patch indices per row, drawn uniformly, ascending: [B, M]."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for row in plan.mask:
        hidden = torch.nonzero(row).flatten()
        rows.append(hidden[torch.randperm(hidden.numel(), generator=gen)[:m]].sort().values)
    return torch.stack(rows)


# ---- tubelets and positions ------------------------------------------------------------------------


def test_sinusoid_table_is_videomaes():
    n, d = 10, 6
    table = sinusoid_table(n, d)
    expected = [[(math.sin if j % 2 == 0 else math.cos)(i / 10000 ** (2 * (j // 2) / d)) for j in range(d)]
                for i in range(n)]  # fmt: skip
    torch.testing.assert_close(table, torch.tensor(expected, dtype=torch.float32), rtol=0, atol=1e-7)
    m = small()
    assert torch.equal(m.pos_embed[0], sinusoid_table(64, 32))
    assert torch.equal(m.decoder_pos_embed[0], sinusoid_table(64, 32))
    assert "pos_embed" not in m.state_dict() and not any("pos_embed" in k for k in m.state_dict())  # fixed: not saved


def test_tokens_and_patches_are_tubelets_in_time_slowest_order():
    m = small()
    clips = clips_for(m)
    t, p, (gt, gh, gw) = m.tubelet_size, m.patch_size, m.grid
    assert (gt, gh, gw) == (4, 4, 4) and m.num_patches == 64
    patches, tokens = m.patchify(clips), m.patch_tokens(clips)  # [B, N, P], [B, N, D]
    weight = m.patch_embed.proj.weight.flatten(1)  # [D, C*t*p*p], flattened (C, t, p, p)
    for ti, hi, wi in ((0, 0, 0), (1, 2, 3), (3, 3, 0)):
        idx = (ti * gh + hi) * gw + wi
        cube = clips[:, :, ti * t:(ti + 1) * t, hi * p:(hi + 1) * p, wi * p:(wi + 1) * p]  # [B, C, t, p, p]
        assert torch.equal(patches[:, idx], cube.permute(0, 2, 3, 4, 1).reshape(B, -1))  # (t, p, p, C)
        own = cube.reshape(B, -1) @ weight.T + m.patch_embed.proj.bias + m.pos_embed[0, idx]
        torch.testing.assert_close(tokens[:, idx], own, rtol=1e-5, atol=1e-5)
    assert torch.equal(m.unpatchify(patches), clips)
    with pytest.raises(ValueError, match=r"patches must have shape \[B, 64, 96\]"):
        m.unpatchify(patches[:, :5])


def test_cls_attention_is_the_attention_each_token_receives():
    m = small()
    clips = clips_for(m)
    last = m.blocks[-1].attn
    last.fused_attn = False  # timm then materialises softmax(q k^T * scale) and passes it through attn_drop
    seen = []
    handle = last.attn_drop.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach()))
    try:
        m.features(clips)
    finally:
        handle.remove()
    weights = seen[0]  # [B, H, N, N]: queries x keys
    expected = weights.mean(dim=1).mean(dim=1)  # over heads, then queries: [B, N]
    torch.testing.assert_close(m.cls_attention(clips), expected, rtol=1e-5, atol=1e-7)


def test_clips_of_the_wrong_shape_are_one_line_errors():
    m = small()
    with pytest.raises(ValueError, match=r"^images must be clips \[B, 3, 8, H, W\].*image batch given to a video MAE"):
        mae_step_loss(m, create_policy("random"), torch.randn(B, 3, 16, 16))
    with pytest.raises(ValueError, match=r"^clips must have shape \[B, 3, 8, 16, 16\], got \(2, 3, 8, 16, 8\)$"):
        m.patch_tokens(torch.randn(B, 3, 8, 16, 8))


# ---- decoder masking: the decoder sees the visible tokens and the decoder_ids only ---------------------------


def _decoder_inputs(m: TimmVideoMAE, run) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shapes entering the first decoder block and the prediction head during `run()`."""
    shapes = []
    hooks = [mod.register_forward_pre_hook(lambda mod, args: shapes.append(tuple(args[0].shape)))
             for mod in (m.decoder_blocks[0], m.decoder_pred)]  # fmt: skip
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return shapes[0], shapes[1]


def test_the_decoder_sees_the_visible_and_the_decoder_ids_tokens_only():
    m = small()
    clips, plan = clips_for(m), plan_for(m)
    k, n, width = plan.num_visible, m.num_patches, 32
    assert _decoder_inputs(m, lambda: mae_forward(m, clips, plan)) == ((B, n, width), (B, n, width))
    sub = plan.with_decoder_ids(random_hidden_subset(plan, 12))
    assert _decoder_inputs(m, lambda: mae_forward(m, clips, sub)) == ((B, k + 12, width), (B, 12, width))


def test_a_subset_decode_is_the_decoder_on_those_tokens_and_the_loss_is_over_them():
    m = small()
    clips, plan = clips_for(m), plan_for(m)
    ids = random_hidden_subset(plan, 12)  # [B, M]
    sub = plan.with_decoder_ids(ids)
    out = mae_forward(m, clips, sub)
    # by hand: the visible latents, then mask tokens, each with the positional embedding of its patch
    latent = m.encode(m.patch_tokens(clips), plan)  # [B, K, D]
    x = torch.cat([m.decoder_embed(latent), m.mask_token.expand(B, 12, -1)], dim=1)  # [B, K + M, Dd]
    x = x + m.decoder_pos_embed[0][torch.cat([plan.ids_keep, ids], dim=1)]
    for blk in m.decoder_blocks:
        x = blk(x)
    own = m.decoder_pred(m.decoder_norm(x[:, plan.num_visible:]))  # [B, M, P]
    assert torch.equal(out.pred.gather(1, ids[..., None].expand(-1, -1, own.shape[-1])), own)
    others = torch.ones(B, m.num_patches, dtype=torch.bool).scatter(1, ids, False)
    assert bool((out.pred[others] == 0).all())  # zeros wherever the decoder did not reconstruct
    per_patch = patch_loss(own, m.patchify(clips).gather(1, ids[..., None].expand(-1, -1, own.shape[-1])))  # [B, M]
    assert torch.equal(out.loss, masked_loss(out.per_patch, sub.target_mask)) and float(sub.target_mask.sum()) == B * 12
    torch.testing.assert_close(out.loss, per_patch.mean(), rtol=1e-6, atol=0)


def test_gradients_reach_only_the_tubelets_the_loss_uses():
    m = small()
    clips, plan = clips_for(m), plan_for(m)
    ids = random_hidden_subset(plan, 12)
    for chosen, used in ((plan, plan.mask.bool() | ~plan.mask.bool()),
                         (plan.with_decoder_ids(ids), (~plan.mask.bool()).scatter(1, ids, True))):  # fmt: skip
        x = clips.clone().requires_grad_(True)
        mae_forward(m, x, chosen).loss.backward()
        per_token = m.patchify(x.grad).abs().sum(-1)  # [B, N]: visible (encoder input) or targets
        assert bool((per_token[used] > 0).all()) and bool((per_token[~used] == 0).all())
        m.zero_grad()
    # every decoder parameter and the mask token train under a subset decode
    mae_forward(m, clips, plan.with_decoder_ids(ids)).loss.backward()
    assert m.mask_token.grad.abs().sum() > 0 and all(p.grad is not None for p in m.decoder_blocks.parameters())


def test_decoding_every_hidden_token_as_a_subset_is_the_full_decode_up_to_summation_order():
    """With M = N - K the subset decode holds the same tokens as MAE's decode, visible ones first instead of in
    patch order: the same predictions at the hidden patches up to float summation order in attention (not bit
    for bit), and zeros at the visible ones (the full decode predicts them too, outside the loss)."""
    m = small()
    clips, plan = clips_for(m), plan_for(m)
    every = torch.stack([torch.nonzero(row).flatten() for row in plan.mask])  # [B, N - K]
    full, sub = mae_forward(m, clips, plan), mae_forward(m, clips, plan.with_decoder_ids(every))
    hidden = plan.mask[..., None]  # [B, N, 1]
    torch.testing.assert_close(sub.pred, full.pred * hidden, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sub.loss, full.loss, rtol=1e-6, atol=0)
    assert bool((full.pred * (1 - hidden)).abs().sum() > 0) and bool((sub.pred * (1 - hidden) == 0).all())


def test_a_decoder_callable_names_the_subset_through_mae_step_loss():
    m = small()
    clips = clips_for(m)
    gen = torch.Generator().manual_seed(3)

    def decoder(plan: MaskPlan, context: dict) -> MaskPlan:
        assert context["grid"] == (4, 4, 4)
        return plan.with_decoder_ids(random_hidden_subset(plan, 8))

    out = mae_step_loss(m, create_policy("random", ratio=0.75), clips, generator=gen, decoder=decoder)
    assert out.plan.num_decoded == 8 and float(out.plan.target_mask.sum()) == B * 8
    assert torch.equal(out.loss, masked_loss(out.per_patch, out.plan.target_mask))
    out.loss.backward()


# ---- presets, the kind, determinism -----------------------------------------------------------------


def test_vit_b_preset_is_videomaes_vit_b():
    preset = get_video_preset("vit-b")
    assert (preset.num_frames, preset.img_size, preset.tubelet_size, preset.patch_size) == (16, 224, 2, 16)
    assert (preset.embed_dim, preset.depth, preset.num_heads) == (768, 12, 12)
    assert (preset.decoder_embed_dim, preset.decoder_depth, preset.decoder_num_heads) == (384, 4, 6)
    with torch.device("meta"):  # the sizes without allocating 94M weights
        m = create_video_mae("vit-b")
    assert m.grid == (8, 14, 14) and m.num_patches == 1568 and m.decoder_pred.out_features == 2 * 16 * 16 * 3
    assert len(m.blocks) == 12 and len(m.decoder_blocks) == 4 and len(m.transformer_blocks()) == 16


def test_the_video_kind_builds_presets_from_the_runs_sizes():
    assert str(parse_model_spec("video:micro")) == "video:micro" and "video" in ADAPTERS.names()
    m = create_mae_from_spec("video:micro", img_size=16, in_chans=1, patch_size=4, num_frames=8, seed=4)
    want = create_video_mae("micro", num_frames=8, img_size=16, patch_size=4, in_chans=1, seed=4)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), want.state_dict().values(), strict=True))
    assert (m.num_frames, m.grid, m.in_chans) == (8, (4, 4, 4), 1)
    with pytest.raises(ValueError, match=r"^unknown video MAE preset 'huge'; available: micro, tiny"):
        parse_model_spec("video:huge")
    with pytest.raises(ValueError, match=r"^num_frames 7 is not divisible by tubelet_size 2$"):
        create_mae_from_spec("video:micro", img_size=16, in_chans=1, patch_size=4, num_frames=7)
    with pytest.raises(ValueError, match=r"^num_heads=5 does not divide embed_dim=64$"):
        create_mae_from_spec("video:micro", img_size=16, in_chans=1, patch_size=4, num_frames=8,
                             options={"num_heads": 5})  # fmt: skip
    with pytest.raises(ValueError, match=r"^--model-opt num_heads=5 does not divide the width embed_dim=64 of model"):
        check_model_options("video:micro", {"num_heads": 5})  # the preset's width, before anything is built
    with pytest.raises(ValueError, match=r"^video MAE option 'depthh' is not one of tubelet_size, "):
        create_mae_from_spec("video:micro", img_size=16, in_chans=1, patch_size=4, num_frames=8, options={"depthh": 2})
    with pytest.raises(ValueError, match=r"^model option 'num_frames' is set by the run"):
        create_mae_from_spec("video:micro", img_size=16, in_chans=1, patch_size=4, options={"num_frames": 8})


def test_weights_depend_only_on_the_seed():
    state = torch.random.get_rng_state()
    a, b, c = small(3), small(3), small(4)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG untouched
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not torch.equal(a.blocks[0].attn.qkv.weight, c.blocks[0].attn.qkv.weight)


@pytest.mark.slow
def test_the_video_kind_trains_through_maskkit_pretrain(tmp_path):
    """`--model video:micro` on the embedded clips: the data set the clip sizes, the record keeps them, and the
    weights rebuild from the record (the run's own build) to the trained model's shapes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "maskkit.cli", "pretrain", "--model", "video:micro", "--dataset", "movingdigits",
               "--steps", "3", "--batch-size", "4", "--no-progress", "--out", "run"]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "run" / "config.json").read_text())["model"]
    assert record["name"] == "video:micro" and record["embed_dim"] == 64
    frames, side, p = record["num_frames"], record["img_size"], record["patch_size"]
    assert record["num_patches"] == (frames // 2) * (side // p) ** 2
    rebuilt = create_mae_from_spec("video:micro", img_size=side, in_chans=record["in_chans"], patch_size=p,
                                   num_frames=frames, seed=record["init_seed"])  # fmt: skip
    state = torch.load(tmp_path / "run" / "model.pt", weights_only=True)["mae"]  # the trained weights
    result = rebuilt.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert not torch.equal(rebuilt.blocks[0].attn.qkv.weight, create_mae_from_spec(
        "video:micro", img_size=side, in_chans=record["in_chans"], patch_size=p, num_frames=frames,
        seed=record["init_seed"]).blocks[0].attn.qkv.weight)  # trained: moved from the initialisation  # fmt: skip
