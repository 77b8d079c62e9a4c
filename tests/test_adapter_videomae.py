"""maskkit.adapters.videomae (kind `videomae`) over the stand-in tests/data/videomae_standin/modeling_pretrain.py.

The stand-in has the official interface (MCG-NJU/VideoMAE's files cannot be shipped); the reference loss is
engine_for_pretraining.py's, re-written here with einops. What every adapter must do is in
tests/test_adapter_conformance.py (the `videomae` case). A checkout of the real repository is tried by
`test_real_modeling_pretrain` when MASKKIT_VIDEOMAE_REPO names it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from einops import rearrange
from timm.models import _registry

from maskkit import MaskPlan, create_policy, mae_forward, mae_step_loss
from maskkit.adapters import create_mae_from_spec, parse_model_spec
from maskkit.adapters.kind_videomae import load_videomae_module
from maskkit.adapters.videomae import OfficialVideoMAE, timm_registry_kept, videomae_step_loss, wrap

pytestmark = pytest.mark.usefixtures("one_thread")  # bit-exact comparisons need one thread count

STANDIN = Path(__file__).resolve().parent / "data" / "videomae_standin" / "modeling_pretrain.py"
B, N = 2, 32  # 16 frames of 8x8 in tubelets 2x4x4: an (8, 2, 2) grid


def standin():
    return load_videomae_module(STANDIN)


def make_model(seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return standin().pretrain_videomae_tiny_patch4(**kwargs).eval()


def make_clips() -> torch.Tensor:
    return torch.randn(B, 3, 16, 8, 8, generator=torch.Generator().manual_seed(7))


def make_noise() -> torch.Tensor:
    return torch.rand(B, N, generator=torch.Generator().manual_seed(11))


def engine_loss(outputs: torch.Tensor, videos: torch.Tensor, mask: torch.Tensor, normlize_target: bool) -> torch.Tensor:
    """engine_for_pretraining.train_one_epoch's loss (its published semantics, with einops as it does)."""
    mean = torch.as_tensor((0.485, 0.456, 0.406))[None, :, None, None, None]
    std = torch.as_tensor((0.229, 0.224, 0.225))[None, :, None, None, None]
    unnorm = videos * std + mean
    if normlize_target:
        squeeze = rearrange(unnorm, "b c (t p0) (h p1) (w p2) -> b (t h w) (p0 p1 p2) c", p0=2, p1=4, p2=4)
        normed = (squeeze - squeeze.mean(dim=-2, keepdim=True)) / (
            squeeze.var(dim=-2, unbiased=True, keepdim=True).sqrt() + 1e-6)  # fmt: skip
        patches = rearrange(normed, "b n p c -> b n (p c)")
    else:
        patches = rearrange(unnorm, "b c (t p0) (h p1) (w p2) -> b (t h w) (p0 p1 p2 c)", p0=2, p1=4, p2=4)
    b, _, c = patches.shape
    labels = patches[mask].reshape(b, -1, c)
    return torch.nn.MSELoss()(input=outputs, target=labels)


def rows(pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, N, P] -> [B, M, P]: the hidden tokens' rows in token order (the model's output order)."""
    return pred[mask].reshape(pred.shape[0], -1, pred.shape[-1])


# ---- the loss of the training loop, bit for bit --------------------------------------------------------------


@pytest.mark.parametrize("normlize_target", [True, False])
def test_loss_bit_identical_to_the_training_loop(normlize_target):
    model = make_model()
    mae, clips, noise = wrap(model, normlize_target), make_clips(), make_noise()
    assert mae.norm_pix_loss is normlize_target and (mae.num_frames, mae.grid) == (16, (8, 2, 2))
    for ratio in (0.9, 0.75):
        out = mae_step_loss(mae, create_policy("random", ratio=ratio), clips, noise=noise)
        mask = out.plan.mask.bool()
        outputs = model(clips, mask)  # the model's own forward, the loop's call
        assert torch.equal(out.loss, engine_loss(outputs, clips, mask, normlize_target))
        assert torch.equal(rows(out.pred, mask), outputs)
        drop_in = videomae_step_loss(model, clips, create_policy("random", ratio=ratio), noise=noise,
                                     norm_pix_loss=normlize_target)  # fmt: skip
        assert torch.equal(drop_in.loss, out.loss) and torch.equal(drop_in.pred, out.pred)


def test_wrap_defaults_to_the_loops_normalised_targets():
    assert wrap(make_model()).norm_pix_loss is True  # run_mae_pretraining's --normlize_target default


def test_weighted_plan_in_the_drop_in():
    """A learned masker's weights weight the per-token errors (maskkit's loss); gradients reach it."""
    torch.manual_seed(0)
    model = standin().PretrainVisionTransformer(
        img_size=8, patch_size=4, tubelet_size=4, decoder_num_classes=192, encoder_embed_dim=32, encoder_depth=1,
        encoder_num_heads=2, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2,
    )  # a (4, 2, 2) grid: N = 16, square  # fmt: skip
    masker = create_policy("learned", ratio=0.75, embed_dim=32, num_patches=16)
    out = videomae_step_loss(model, make_clips(), masker)
    plan = out.plan
    assert plan.weights is not None
    torch.testing.assert_close(out.loss, (out.per_patch * plan.mask * plan.weights).sum() / plan.mask.sum(),
                               rtol=1e-6, atol=0)  # fmt: skip
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in masker.parameters())


# ---- the protocol's parts against the model's own -----------------------------------------------------------


def test_cls_attention_is_the_softmax_the_last_block_computes():
    model = make_model()
    captured = []
    hook = model.encoder.blocks[-1].attn.attn_drop.register_forward_hook(lambda m, args, out: captured.append(args[0]))
    try:
        clips = make_clips()
        model.encoder(clips, torch.zeros(B, N, dtype=torch.bool))  # nothing hidden: every token attends
    finally:
        hook.remove()
    expected = captured[0].mean(dim=(1, 2))  # [B, H, N, N] -> received, over heads and queries
    got = wrap(model).cls_attention(clips)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.sum(-1), torch.ones(B), rtol=0, atol=1e-5)


def test_decoder_subset_runs_the_decoder_on_the_subset_only():
    model = make_model()
    mae, clips = wrap(model, False), make_clips()
    tokens = mae.patch_tokens(clips)
    plan = create_policy("random", ratio=0.75)(tokens, noise=make_noise())  # K = 8, 24 hidden
    hidden = plan.mask.bool().nonzero()[:, 1].reshape(B, -1)
    full = mae_forward(mae, clips, plan.with_decoder_ids(hidden))
    plain = mae_forward(mae, clips, plan)
    assert torch.equal(full.loss, plain.loss) and torch.equal(full.pred, plain.pred)
    subset = hidden[:, 1::3]  # [B, 8]
    out = mae_forward(mae, clips, plan.with_decoder_ids(subset))
    chosen = torch.zeros(B, N).scatter(1, subset, 1.0).bool()
    assert torch.equal(out.pred[~chosen], torch.zeros_like(out.pred[~chosen]))
    x = model.encoder_to_decoder(mae.encode(tokens, plan))  # [B, K, 16]
    table = model.pos_embed.expand(B, -1, -1)
    keep = plan.ids_keep.sort(dim=1).values
    inputs = torch.cat([x + table.gather(1, keep[..., None].expand(-1, -1, 16)),
                        model.mask_token + table.gather(1, subset[..., None].expand(-1, -1, 16))], dim=1)  # fmt: skip
    torch.testing.assert_close(rows(out.pred, chosen), model.decoder(inputs, 8), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.loss, engine_loss(rows(out.pred, chosen), clips, chosen, False), rtol=1e-6, atol=0)


def test_wrap_refuses_foreign_modules():
    with pytest.raises(TypeError, match=r"lacks the official VideoMAE interface .*missing: encoder.patch_embed"):
        OfficialVideoMAE(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="nn.Module"):
        wrap("model")


def test_stand_in_table_is_transformers_sinusoid_table():
    """The stand-in's fixed table against transformers' port of VideoMAE's (the same published formula)."""
    pytest.importorskip("transformers")
    from transformers.models.videomae.modeling_videomae import get_sinusoid_encoding_table

    ours = standin().get_sinusoid_encoding_table(32, 16)
    torch.testing.assert_close(ours, get_sinusoid_encoding_table(32, 16), rtol=0, atol=1e-6)


# ---- timm's registry ---------------------------------------------------------------------------------------


def test_loading_the_file_leaves_timms_registry_alone():
    """The real modeling_finetune.py registers `vit_small_patch16_224` (and others) over timm's; so does the
    stand-in. Loaded through the adapter, timm's own entry stays."""
    before = _registry._model_entrypoints["vit_small_patch16_224"]
    code = (
        "import sys, timm; sys.path.insert(0, sys.argv[1]); import modeling_pretrain; "
        "print(timm.models._registry._model_entrypoints['vit_small_patch16_224'].__module__)"
    )
    bare = subprocess.run([sys.executable, "-W", "ignore", "-c", code, str(STANDIN.parent)], capture_output=True,
                          text=True, check=True)  # fmt: skip
    assert bare.stdout.strip() == "modeling_finetune"  # imported as it is, the file takes timm's name
    built = create_mae_from_spec(f"videomae:{STANDIN}:pretrain_videomae_tiny_patch4", img_size=8, in_chans=3)
    assert isinstance(built, OfficialVideoMAE)
    assert _registry._model_entrypoints["vit_small_patch16_224"] is before
    assert "pretrain_videomae_tiny_patch4" not in timm.list_models()

    def vit_small_patch16_224(**kwargs):  # registered over timm's own inside the guard
        raise AssertionError("not to be built")

    with timm_registry_kept():  # the guard itself: the overwrite inside is undone on the way out
        timm.models.register_model(vit_small_patch16_224)
        assert _registry._model_entrypoints["vit_small_patch16_224"] is vit_small_patch16_224
    assert _registry._model_entrypoints["vit_small_patch16_224"] is before


# ---- the registered kind ----------------------------------------------------------------------------------


def test_spec_forms_and_sizes(tmp_path, monkeypatch):
    monkeypatch.chdir(STANDIN.parent)
    spec = parse_model_spec("videomae:modeling_pretrain.py")
    assert str(spec) == f"videomae:{STANDIN}:PretrainVisionTransformer"
    assert str(parse_model_spec(f"videomae:{STANDIN}:pretrain_videomae_tiny_patch4")).endswith(":pretrain_videomae_tiny_patch4")
    options = {"encoder_embed_dim": 32, "encoder_depth": 1, "encoder_num_heads": 2, "decoder_embed_dim": 16,
               "decoder_depth": 1, "decoder_num_heads": 2}  # fmt: skip
    # the class: the run's sizes by name, decoder_num_classes = 3 * t * p * p computed for it
    built = create_mae_from_spec(spec, img_size=16, in_chans=3, patch_size=8, num_frames=16, norm_pix_loss=True,
                                 options=options)  # fmt: skip
    assert (built.patch_size, built.grid, built.norm_pix_loss) == (8, (8, 2, 2), True)
    assert built.model.decoder.head.out_features == 3 * 2 * 8 * 8
    # a factory taking **kwargs keeps its own sizes (8x8, patch 4)
    factory = create_mae_from_spec(f"videomae:{STANDIN}:pretrain_videomae_tiny_patch4", img_size=8, in_chans=3,
                                   num_frames=16, seed=3)  # fmt: skip
    assert factory.grid == (8, 2, 2)
    want = wrap(make_model(3)).state_dict()
    assert all(torch.equal(v, want[k]) for k, v in factory.state_dict().items())


@pytest.mark.parametrize(
    ("arg", "kwargs", "message"),
    [
        ("model.pth", {}, r"videomae: expects a Python file \(modeling_pretrain.py\), got 'model.pth'"),
        ("{standin}:Nope", {}, r"has no callable 'Nope' \(it defines: .*PretrainVisionTransformer"),
        ("{standin}", {"num_frames": 8}, "builds a model for clips of 16 frames, not 8; pass --num-frames 16"),
        ("{standin}", {"options": {"encoder_dept": 1}}, "has no option 'encoder_dept'"),
        ("{standin}", {"in_chans": 1}, r"rejected its arguments: .*\(VideoMAE's decoder predicts 3-channel tubelets; "
                                       r"the data have 1 channels\)"),
        ("{standin}:pretrain_videomae_tiny_patch4", {"img_size": 16}, "does not fit clips of 16 frames of 16x16"),
        ("/nowhere/modeling_pretrain.py", {}, "official model file not found: /nowhere/modeling_pretrain.py"),
    ],
)
def test_bad_specs_are_one_line(arg, kwargs, message):
    small = {"encoder_embed_dim": 32, "encoder_depth": 1, "encoder_num_heads": 2, "decoder_embed_dim": 16,
             "decoder_depth": 1, "decoder_num_heads": 2}  # fmt: skip
    options = {} if "pretrain_videomae_tiny_patch4" in arg else small
    given = {"img_size": 8, "in_chans": 3, "patch_size": None, "num_frames": 16, "options": options, **kwargs}
    if ":pretrain" not in arg and given["patch_size"] is None:
        given["patch_size"] = 4
    with pytest.raises(ValueError, match=message) as err:
        create_mae_from_spec(f"videomae:{arg.format(standin=STANDIN)}", **given)
    assert "\n" not in str(err.value)


def test_a_file_that_does_not_import_is_one_line(tmp_path):
    broken = tmp_path / "modeling_pretrain.py"
    broken.write_text("from modeling_gone import Block\n")  # its sibling is missing
    with pytest.raises(ValueError, match="cannot import official model file .*ModuleNotFoundError") as err:
        create_mae_from_spec(f"videomae:{broken}", img_size=8, in_chans=3, patch_size=4, num_frames=16)
    assert "\n" not in str(err.value)


# ---- the real repository, where a checkout is at hand --------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("MASKKIT_VIDEOMAE_REPO"), reason="MASKKIT_VIDEOMAE_REPO names no checkout")
def test_real_modeling_pretrain():
    """MCG-NJU/VideoMAE's own modeling_pretrain.py (a checkout the user has): built through the kind at a small size,
    its loss through maskkit equals the training loop's on the model's own forward, bit for bit."""
    path = Path(os.environ["MASKKIT_VIDEOMAE_REPO"]) / "modeling_pretrain.py"
    options = {"encoder_embed_dim": 32, "encoder_depth": 1, "encoder_num_heads": 2, "decoder_embed_dim": 16,
               "decoder_depth": 1, "decoder_num_heads": 2, "qkv_bias": True}  # fmt: skip
    before = _registry._model_entrypoints["vit_base_patch16_224"]
    mae = create_mae_from_spec(f"videomae:{path}", img_size=8, in_chans=3, patch_size=4, num_frames=16,
                               norm_pix_loss=True, options=options).eval()  # fmt: skip
    assert _registry._model_entrypoints["vit_base_patch16_224"] is before
    clips = make_clips()
    out = mae_step_loss(mae, create_policy("random", ratio=0.9), clips, noise=make_noise())
    mask = out.plan.mask.bool()
    assert torch.equal(out.loss, engine_loss(mae.model(clips, mask), clips, mask, True))
    weights = torch.rand(B, N, generator=torch.Generator().manual_seed(2)) + 0.5
    assert torch.isfinite(mae_forward(mae, clips, MaskPlan.from_scores(make_noise(), 0.9, weights=weights)).loss)


def test_sibling_imports_resolve_in_the_files_own_folder(tmp_path):
    """Two checkouts in one process: the second file's `from modeling_finetune import ...` gets its own sibling,
    not the module of that name another checkout left in sys.modules."""
    standin()  # the stand-in's modeling_finetune is now imported
    for name in ("modeling_pretrain.py", "modeling_finetune.py"):
        (tmp_path / name).write_text((STANDIN.parent / name).read_text())
    with (tmp_path / "modeling_finetune.py").open("a") as f:
        f.write("\nCHECKOUT = 'second'\n")
    stale = sys.modules.get("modeling_finetune")
    module = load_videomae_module(tmp_path / "modeling_pretrain.py")
    assert module.Block.__init__.__globals__.get("CHECKOUT") == "second"  # the block class of its own sibling
    assert sys.modules.get("modeling_finetune") is stale  # the first checkout's module is back where it was
