"""maskkit.adapters.hf_video over a tiny randomly initialised transformers VideoMAEForPreTraining (no download).

The reference is transformers itself: `model(pixel_values, bool_masked_pos)` with pixel_values [B, T, C, H, W] (its
loss, logits), `model.videomae(...)` (hidden states, attentions). Every test skips without transformers.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
import torch
from einops import rearrange

from maskkit import MaskPlan, create_policy, is_mae, mae_forward, mae_step_loss, num_visible
from maskkit.adapters import create_mae_from_spec, parse_model_spec

transformers = pytest.importorskip("transformers")

from maskkit.adapters.hf_video import HFVideoMAE, create_hf_video_mae, hf_video_loss, wrap  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # bit-exact comparisons need one thread count

B, C, T, S = 3, 3, 4, 8  # clips [3, 3, 4, 8, 8]: tubelets 2x4x4 on a (2, 2, 2) grid, N = 8
N, D = 8, 32
TINY = dict(
    image_size=S, patch_size=4, num_channels=C, num_frames=T, tubelet_size=2, hidden_size=D, num_hidden_layers=2,
    num_attention_heads=2, intermediate_size=64, decoder_hidden_size=16, decoder_num_hidden_layers=1,
    decoder_num_attention_heads=2, decoder_intermediate_size=32,
)  # fmt: skip
SPEC_OPTIONS = {k: v for k, v in TINY.items() if k not in ("image_size", "patch_size", "num_channels", "num_frames")}


def make_model(seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_hf_video_mae(**{**TINY, **overrides}).eval()


def make_clips(channels: int = C) -> torch.Tensor:
    return torch.randn(B, channels, T, S, S, generator=torch.Generator().manual_seed(7))


def make_noise(seed: int = 11) -> torch.Tensor:
    return torch.rand(B, N, generator=torch.Generator().manual_seed(seed))


def hf_pixel_values(clips: torch.Tensor) -> torch.Tensor:
    """What a transformers user feeds: frames before channels, contiguous."""
    return clips.permute(0, 2, 1, 3, 4).contiguous()


def hidden_rows(pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, N, P] -> [B, M, P]: the rows of the hidden tokens, in token order (transformers' logits order)."""
    return pred[mask.bool()].reshape(pred.shape[0], -1, pred.shape[-1])


def engine_targets(clips: torch.Tensor, normalise: bool) -> torch.Tensor:
    """VideoMAE's targets written as engine_for_pretraining.py does (einops), for 3-channel clips."""
    mean = torch.as_tensor((0.485, 0.456, 0.406))[None, :, None, None, None]
    std = torch.as_tensor((0.229, 0.224, 0.225))[None, :, None, None, None]
    frames = clips * std + mean
    if not normalise:
        return rearrange(frames, "b c (t p0) (h p1) (w p2) -> b (t h w) (p0 p1 p2 c)", p0=2, p1=4, p2=4)
    tubes = rearrange(frames, "b c (t p0) (h p1) (w p2) -> b (t h w) (p0 p1 p2) c", p0=2, p1=4, p2=4)
    tubes = (tubes - tubes.mean(dim=-2, keepdim=True)) / (tubes.var(dim=-2, unbiased=True, keepdim=True).sqrt() + 1e-6)
    return rearrange(tubes, "b n p c -> b n (p c)")


# ---- the loss: transformers' own, bit for bit ---------------------------------------------------------------


@pytest.mark.parametrize("norm_pix_loss", [False, True])
@pytest.mark.parametrize("mean_pooling", [True, False])
def test_random_policy_loss_bit_identical_to_transformers(norm_pix_loss, mean_pooling):
    model = make_model(norm_pix_loss=norm_pix_loss, use_mean_pooling=mean_pooling)
    mae, clips, noise = wrap(model), make_clips(), make_noise()
    assert mae.norm_pix_loss == norm_pix_loss and is_mae(mae)
    for ratio in (0.75, 0.5):
        out = mae_step_loss(mae, create_policy("random", ratio=ratio), clips, noise=noise)
        assert out.plan.num_visible == num_visible(N, ratio)
        own = model(pixel_values=hf_pixel_values(clips), bool_masked_pos=out.plan.mask.bool())
        assert torch.equal(out.loss, own.loss)
        assert torch.equal(hidden_rows(out.pred, out.plan.mask), own.logits)
        visible = ~out.plan.mask.bool()
        assert torch.equal(out.pred[visible], torch.zeros_like(out.pred[visible]))  # no prediction for them
        drop_in = hf_video_loss(model, clips, create_policy("random", ratio=ratio), noise=noise)
        assert torch.equal(drop_in.loss, own.loss) and torch.equal(drop_in.pred, out.pred)
        assert torch.equal(drop_in.per_patch, out.per_patch)
    assert torch.equal(mae(clips, noise=noise).loss, mae_step_loss(mae, create_policy("random"), clips, noise=noise).loss)


def test_one_channel_clips_with_norm_pix_loss_match_transformers():
    """transformers does not un-normalise other channel counts (and then needs norm_pix_loss): nor does maskkit."""
    model = make_model(num_channels=1, norm_pix_loss=True)
    clips = make_clips(channels=1)
    out = mae_step_loss(wrap(model), create_policy("random"), clips, noise=make_noise())
    own = model(pixel_values=hf_pixel_values(clips), bool_masked_pos=out.plan.mask.bool())
    assert torch.equal(out.loss, own.loss)


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_per_token_loss_and_weighted_plan(norm_pix_loss):
    """per_patch is the mean squared error against VideoMAE's targets (the engine's einops construction); a weighted
    plan weights it as maskkit does (sum(l * m * w) / sum(m))."""
    mae, clips, noise = wrap(make_model(norm_pix_loss=norm_pix_loss)), make_clips(), make_noise()
    weights = torch.rand(B, N, generator=torch.Generator().manual_seed(3)) + 0.5
    out = mae_forward(mae, clips, MaskPlan.from_scores(noise, 0.75, weights=weights))
    target = engine_targets(clips, norm_pix_loss)  # [B, N, P]
    per_patch = ((out.pred - target) ** 2).mean(dim=-1)
    torch.testing.assert_close(out.per_patch, per_patch, rtol=1e-6, atol=1e-6)
    mask = out.plan.mask
    torch.testing.assert_close(out.loss, (out.per_patch * mask * weights).sum() / mask.sum(), rtol=1e-6, atol=0)


def test_learned_masker_gets_gradients_through_the_drop_in():
    model = make_model(num_frames=8)  # a (4, 2, 2) grid: N = 16 (the learned masker takes a square N today)
    masker = create_policy("learned", ratio=0.75, embed_dim=D, num_patches=16)
    out = hf_video_loss(model, torch.randn(B, C, 8, S, S, generator=torch.Generator().manual_seed(5)), masker)
    assert out.plan.weights is not None and out.plan.weights.requires_grad
    out.loss.backward()
    grads = [p.grad for p in masker.parameters() if p.requires_grad]
    assert grads and all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    assert any(g.abs().sum() > 0 for g in grads) and model.decoder.head.weight.grad is not None


# ---- the protocol's parts against transformers' ------------------------------------------------------------


def test_tokens_grid_and_patchify_follow_transformers():
    model = make_model()
    mae, clips = wrap(model), make_clips()
    assert (mae.num_frames, mae.tubelet_size, mae.grid, mae.num_patches, mae.patch_size) == (T, 2, (2, 2, 2), N, 4)
    own = model.videomae.embeddings(hf_pixel_values(clips), None)  # [B, N, D], nothing dropped
    assert torch.equal(mae.patch_tokens(clips), own)
    patches = mae.patchify(clips)  # (t, p, p, C) per tubelet, time slowest
    expected = rearrange(clips, "b c (t p0) (h p1) (w p2) -> b (t h w) (p0 p1 p2 c)", p0=2, p1=4, p2=4)
    assert torch.equal(patches, expected) and torch.equal(mae.unpatchify(patches), clips)
    # the token order is the Conv3d's: token (t, h, w) holds frames 2t..2t+1, rows 4h.., columns 4w..
    assert torch.equal(patches[:, 1 * 4 + 0 * 2 + 1, :C], clips[:, :, 2, 0, 4])


def test_features_are_the_mean_of_the_unmasked_encoder():
    for mean_pooling in (True, False):  # without mean pooling, transformers' encoder ends with its layernorm
        model = make_model(use_mean_pooling=mean_pooling)
        clips = make_clips()
        own = model.videomae(hf_pixel_values(clips)).last_hidden_state.mean(dim=1)  # bool_masked_pos None
        torch.testing.assert_close(wrap(model).features(clips), own, rtol=1e-5, atol=1e-6)


def test_cls_attention_is_the_attention_each_token_receives():
    model = make_model()
    model.set_attn_implementation("eager")
    clips = make_clips()
    attentions = model.videomae(hf_pixel_values(clips), output_attentions=True).attentions
    expected = attentions[-1].mean(dim=(1, 2))  # [B, H, N, N] -> over heads and queries
    got = wrap(model).cls_attention(clips)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.sum(dim=-1), torch.ones(B), rtol=0, atol=1e-5)


# ---- decoder subset (VideoMAE V2's dual masking) ------------------------------------------------------------


def test_decoder_subset_decodes_only_the_subset():
    model = make_model()
    mae, clips, noise = wrap(model), make_clips(), make_noise()
    tokens = mae.patch_tokens(clips)
    plan = create_policy("random", ratio=0.5)(tokens, noise=noise)  # K = 4, 4 hidden
    hidden = plan.mask.bool().nonzero()[:, 1].reshape(B, -1)  # [B, 4] ascending
    everything = mae_forward(mae, clips, plan.with_decoder_ids(hidden))  # the subset = every hidden token
    plain = mae_forward(mae, clips, plan)
    assert torch.equal(everything.loss, plain.loss) and torch.equal(everything.pred, plain.pred)
    subset = hidden[:, ::2]  # [B, 2]
    out = mae_forward(mae, clips, plan.with_decoder_ids(subset))
    chosen = torch.zeros(B, N).scatter(1, subset, 1.0).bool()
    assert torch.equal(out.pred[~chosen], torch.zeros_like(out.pred[~chosen]))  # zeros off the subset
    # the decoder saw the visible tokens and the subset's mask tokens only (VideoMAE V2): its own input, by hand
    latent = mae.encode(tokens, plan)
    x = model.encoder_to_decoder(latent)
    table = model.position_embeddings.expand(B, -1, -1)
    keep = plan.ids_keep.sort(dim=1).values
    full = torch.cat([x + table.gather(1, keep[..., None].expand(-1, -1, 16)),
                      model.mask_token + table.gather(1, subset[..., None].expand(-1, -1, 16))], dim=1)  # fmt: skip
    torch.testing.assert_close(hidden_rows(out.pred, chosen), model.decoder(full, 2).logits, rtol=1e-6, atol=1e-6)
    target = engine_targets(clips, True)[chosen].reshape(B, 2, -1)
    expected = ((hidden_rows(out.pred, chosen) - target) ** 2).mean()
    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=0)
    # the drop-in: transformers predicts every hidden token; the loss is taken over the subset
    policy = create_policy("random", ratio=0.5)
    drop_in = hf_video_loss(model, clips, lambda t, **kw: policy(t, **kw).with_decoder_ids(subset), noise=noise)
    target_rows = engine_targets(clips, True)[chosen].reshape(B, 2, -1)
    torch.testing.assert_close(drop_in.loss, ((hidden_rows(drop_in.pred, chosen) - target_rows) ** 2).mean(),
                               rtol=1e-6, atol=0)  # fmt: skip


# ---- leaves the user's model alone; state round trip ----------------------------------------------------------


def test_wrapping_and_training_leave_the_model_unchanged():
    raw, twin = make_model(), make_model()
    clips, mask = make_clips(), make_noise().argsort(dim=1) < 6  # 6 hidden per row
    state = {k: v.clone() for k, v in raw.state_dict().items()}
    attrs = set(raw.__dict__)
    mae = wrap(raw)
    assert mae.model is raw and list(mae.parameters()) == list(raw.parameters())
    mae(clips).loss.backward()
    hf_video_loss(raw, clips, create_policy("random"), ratio=0.5).loss.backward()
    assert set(raw.__dict__) == attrs and "forward" not in raw.__dict__
    assert all(torch.equal(v, state[k]) for k, v in raw.state_dict().items())
    mine, theirs = (m(pixel_values=hf_pixel_values(clips), bool_masked_pos=mask) for m in (raw, twin))
    assert torch.equal(mine.loss, theirs.loss) and torch.equal(mine.logits, theirs.logits)


def test_state_dict_round_trip():
    mae, clips, noise = wrap(make_model(0)), make_clips(), make_noise()
    expected = mae_step_loss(mae, create_policy("random"), clips, noise=noise)
    buffer = io.BytesIO()
    torch.save(mae.state_dict(), buffer)
    buffer.seek(0)
    fresh = wrap(make_model(1))
    assert not torch.equal(mae_step_loss(fresh, create_policy("random"), clips, noise=noise).loss, expected.loss)
    fresh.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    assert torch.equal(mae_step_loss(fresh, create_policy("random"), clips, noise=noise).loss, expected.loss)


def test_refuses_foreign_models_and_image_batches():
    with pytest.raises(TypeError, match="VideoMAEForPreTraining"):
        HFVideoMAE(torch.nn.Linear(2, 2))
    mae = wrap(make_model())
    with pytest.raises(ValueError, match=r"image batch given to a video MAE"):
        mae(torch.randn(B, C, S, S))
    with pytest.raises(ValueError, match=r"clips must be clips \[B, 3, 4, H, W\]"):
        hf_video_loss(mae, torch.randn(B, C, 6, S, S), create_policy("random"))


# ---- the registered kind -------------------------------------------------------------------------------


def test_the_registered_kind_builds_the_same_model():
    for seed, norm_pix_loss in ((0, False), (3, True)):
        built = create_mae_from_spec("hf-video:tiny", img_size=S, in_chans=C, patch_size=4, num_frames=T, seed=seed,
                                     norm_pix_loss=norm_pix_loss, options=SPEC_OPTIONS)  # fmt: skip
        want = wrap(make_model(seed, norm_pix_loss=norm_pix_loss))
        assert type(built) is HFVideoMAE and built.norm_pix_loss == norm_pix_loss and built.grid == (2, 2, 2)
        got, expected = built.state_dict(), want.state_dict()
        assert list(got) == list(expected) and all(torch.equal(got[k], expected[k]) for k in got)


def test_config_file_and_folder(tmp_path):
    config = transformers.VideoMAEConfig(**{**TINY, "image_size": 32, "num_frames": 16})
    config.to_json_file(str(tmp_path / "config.json"))
    for arg in (tmp_path / "config.json", tmp_path):
        spec = parse_model_spec(f"hf-video:{arg}")
        assert str(spec) == f"hf-video:{arg.resolve()}"
        built = create_mae_from_spec(spec, img_size=S, in_chans=C, num_frames=T, seed=0)  # the run's sizes win
        assert built.grid == (2, 2, 2) and built.embed_dim == D and built.model.config.hidden_size == D


@pytest.mark.parametrize(
    ("spec", "kwargs", "message"),
    [
        ("hf-video:model.bin", {}, "hf-video: expects 'tiny', a VideoMAEConfig .json file or a folder"),
        ("hf-video:tiny", {"in_chans": 1}, "1-channel clips need --norm-pix-loss"),
        ("hf-video:tiny", {"num_frames": 5}, "tubelet_size 2 does not divide num_frames 5"),
        ("hf-video:tiny", {"patch_size": 3}, "img_size 8 is not divisible by patch_size 3"),
        ("hf-video:tiny", {"options": {"hiden_size": 8}}, "unknown VideoMAEConfig option 'hiden_size' .*'hidden_size'"),
        ("hf-video:tiny", {"options": {"num_frames": 8}}, "'num_frames' is set by the run"),
        ("hf-video:/nowhere/config.json", {}, "hf-video model config not found: /nowhere/config.json"),
    ],
)
def test_bad_specs_are_one_line(spec, kwargs, message):
    with pytest.raises(ValueError, match=message) as err:
        create_mae_from_spec(spec, **{"img_size": S, "in_chans": C, "num_frames": T, **kwargs})
    assert "\n" not in str(err.value)


def test_unreadable_config_file_is_one_line(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="cannot read VideoMAEConfig from .*config.json") as err:
        create_mae_from_spec(f"hf-video:{bad}", img_size=S, in_chans=C, num_frames=T)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_prediction_pixels_invert_the_targets(norm_pix_loss):
    """A prediction equal to VideoMAE's target is the clip itself once back in its pixels (pictures use this)."""
    mae, clips = wrap(make_model(norm_pix_loss=norm_pix_loss)), make_clips()
    pixels = mae.prediction_pixels(engine_targets(clips, norm_pix_loss), clips)
    torch.testing.assert_close(mae.unpatchify(pixels), clips, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_hf_video_trains_through_maskkit_pretrain(tmp_path):
    """`--model hf-video:tiny` on the embedded grey clips: VideoMAE's loss needs --norm-pix-loss for one channel
    (one line without it); the record's clip sizes rebuild the model, into which the trained weights load."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "maskkit.cli", "pretrain", "--model", "hf-video:tiny", "--dataset",
            "movingdigits,side=16,count=64", "--num-frames", "4", "--steps", "3", "--batch-size", "4", "--no-progress"]  # fmt: skip
    refused = subprocess.run([*base, "--out", "bad"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "1-channel clips need --norm-pix-loss" in refused.stderr
    result = subprocess.run([*base, "--norm-pix-loss", "--out", "run"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "run" / "config.json").read_text())["model"]
    assert (record["name"], record["num_frames"], record["num_patches"]) == ("hf-video:tiny", 4, 2 * 4 * 4)
    rebuilt = create_mae_from_spec("hf-video:tiny", img_size=record["img_size"], in_chans=1, patch_size=record["patch_size"],
                                   num_frames=4, norm_pix_loss=True, seed=record["init_seed"])  # fmt: skip
    state = torch.load(tmp_path / "run" / "model.pt", weights_only=True)["mae"]
    loaded = rebuilt.load_state_dict(state, strict=True)
    assert not loaded.missing_keys and not loaded.unexpected_keys
    assert not torch.equal(state["model.decoder.head.weight"], create_mae_from_spec(
        "hf-video:tiny", img_size=16, in_chans=1, num_frames=4, norm_pix_loss=True, seed=record["init_seed"],
    ).state_dict()["model.decoder.head.weight"])  # trained: moved from the initialisation  # fmt: skip
