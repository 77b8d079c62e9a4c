"""maskkit.adapters.official_mae over the official-MAE test double in examples/models_mae.py.

What every adapter must do (protocol, bit-identical loss, plan round trip, features, learned masker
gradients, undo, state_dict round trip) is in tests/test_adapter_conformance.py.
"""

from __future__ import annotations

import copy
import inspect
from pathlib import Path

import pytest
import timm.models.vision_transformer as vit
import torch

from maskkit import MaskPlan, create_policy, num_visible
from maskkit.adapters.models import load_official_module
from maskkit.adapters.official_mae import (
    policy_of,
    restore_masking,
    timm_compat,
    use_policy,
    wrap,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
B, N, D = 3, 16, 32  # tiny double: 16x16 images, patch 4, width 32


models_mae = load_official_module(EXAMPLES / "models_mae.py")  # the official-MAE test double
TIMM_1X = "qk_scale" not in inspect.signature(vit.Block.__init__).parameters


def make_model(seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    with timm_compat(models_mae):
        model = models_mae.mae_vit_tiny_patch4(**kwargs)
    return model.eval()


@pytest.fixture()
def model():
    return make_model()


# ---- timm_compat -----------------------------------------------------------------------------


@pytest.mark.skipif(not TIMM_1X, reason="timm still accepts qk_scale")
def test_double_needs_compat_under_timm_1x():
    with pytest.raises(TypeError, match="qk_scale"):
        models_mae.mae_vit_tiny_patch4()


@pytest.mark.skipif(not TIMM_1X, reason="timm still accepts qk_scale")
def test_timm_compat_patches_and_restores():
    original = vit.Block
    handle = timm_compat(models_mae)
    try:
        assert vit.Block is not original and models_mae.Block is vit.Block
        assert issubclass(vit.Block, original) and vit.Block.__name__ == "Block"
        block = vit.Block(8, 2, 4.0, True, None, 0.25)  # timm 0.3.2 positional order: ..., qk_scale, drop
        assert type(block).__mro__[1] is original
        assert block.attn.proj_drop.p == 0.25 and block.mlp.drop1.p == 0.25
        with pytest.raises(ValueError, match="qk_scale"):
            vit.Block(8, 2, qk_scale=0.5)
    finally:
        handle.remove()
    assert vit.Block is original and models_mae.Block is original
    with timm_compat(models_mae):
        assert models_mae.Block is not original
    assert models_mae.Block is original
    with pytest.raises(TypeError, match="modules"):
        timm_compat("models_mae")
    assert vit.Block is original


def test_compat_model_matches_plain_timm_blocks():
    """The compat Block is timm's Block: same parameters, same outputs."""
    with timm_compat(models_mae):
        torch.manual_seed(0)
        compat_block = models_mae.Block(32, 2, 2.0, qkv_bias=True, qk_scale=None)
    torch.manual_seed(0)
    plain = vit.Block(32, 2, 2.0, qkv_bias=True)
    assert compat_block.state_dict().keys() == plain.state_dict().keys()
    for (_, a), (_, b) in zip(compat_block.state_dict().items(), plain.state_dict().items(), strict=True):
        assert torch.equal(a, b)
    x = torch.randn(2, 5, 32)
    assert torch.equal(compat_block.eval()(x), plain.eval()(x))


# ---- the test double itself ------------------------------------------------------------------


def test_double_patchify_matches_official_einsum(model, images):
    p, h = 4, 4
    x = images.reshape(B, 3, h, p, h, p)
    expected = torch.einsum("nchpwq->nhwpqc", x).reshape(B, h * h, p * p * 3)
    assert torch.equal(model.patchify(images), expected)
    assert torch.equal(model.unpatchify(expected), images)


def test_double_pos_embed_matches_hf_sincos():
    """Our sin-cos table vs transformers' reference (which documents MAE's [col | row] layout)."""
    pytest.importorskip("transformers")
    from transformers.models.vit_mae.modeling_vit_mae import build_2d_sinusoidal_position_embedding

    ref = build_2d_sinusoidal_position_embedding(height=4, width=4, embed_dim=32, cls_token=True)
    half = ref.shape[-1] // 2
    ref = torch.cat([ref[..., half:], ref[..., :half]], dim=-1)  # HF's rotation to MAE's layout
    ours = models_mae.sincos_pos_embed_2d(32, 4, cls_token=True)
    torch.testing.assert_close(ours, ref.reshape(ours.shape), rtol=0, atol=1e-6)
    model = make_model()
    assert not model.pos_embed.requires_grad and torch.equal(model.pos_embed[0], ours)


def test_double_random_masking_semantics(model):
    x = torch.randn(B, N, D)
    torch.manual_seed(3)
    x_masked, mask, ids_restore = model.random_masking(x, 0.75)
    torch.manual_seed(3)
    noise = torch.rand(B, N)
    keep = num_visible(N, 0.75)
    ids_keep = torch.argsort(noise, dim=1)[:, :keep]
    assert torch.equal(x_masked, torch.stack([x[b, ids_keep[b]] for b in range(B)]))
    assert torch.equal(mask.sum(1), torch.full((B,), float(N - keep)))
    assert torch.equal(mask.gather(1, ids_keep), torch.zeros(B, keep))
    assert torch.equal(torch.argsort(torch.argsort(noise, dim=1), dim=1), ids_restore)


# ---- wrap (the MAE protocol itself: tests/test_adapter_conformance.py) -----------------------


def test_wrap_rejects_foreign_objects():
    with pytest.raises(TypeError, match="official MAE"):
        wrap(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="nn.Module"):
        wrap("model")


# ---- use_policy ------------------------------------------------------------------------------


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_use_policy_random_bit_identical(images, norm_pix_loss):
    reference, patched = make_model(norm_pix_loss=norm_pix_loss), make_model(norm_pix_loss=norm_pix_loss)
    torch.manual_seed(5)
    loss0, pred0, mask0 = reference(images, mask_ratio=0.75)
    loss0.backward()
    with use_policy(patched, create_policy("random")):
        torch.manual_seed(5)
        loss1, pred1, mask1 = patched(images, mask_ratio=0.75)  # the user's unchanged call
        loss1.backward()
    assert torch.equal(loss0, loss1) and torch.equal(pred0, pred1) and torch.equal(mask0, mask1)
    for (name, a), b in zip(reference.named_parameters(), patched.parameters(), strict=True):
        assert (a.grad is None) == (b.grad is None), name
        assert a.grad is None or torch.equal(a.grad, b.grad), name


def test_use_policy_passes_call_ratio_and_context(model, images):
    handle = use_policy(model, create_policy("random", ratio=0.9))
    _, _, mask = model(images, mask_ratio=0.5)
    assert torch.equal(mask.sum(1), torch.full((B,), float(N - num_visible(N, 0.5))))
    _, _, mask = model(images)  # no ratio: the policy's own
    assert torch.equal(mask.sum(1), torch.full((B,), float(N - num_visible(N, 0.9))))
    noise = torch.rand(B, N)
    _, _, mask = model(images, mask_ratio=0.75, noise=noise)  # per-call context reaches the policy
    assert torch.equal(mask, MaskPlan.from_scores(noise, 0.75).mask)
    assert handle.plan is not None and torch.equal(handle.plan.mask, mask)
    with pytest.raises(ValueError, match="mask ratio"):
        model(images, mask_ratio=1.5)
    handle.remove()


def test_use_policy_hpm_drop_in_trains_its_scorer_with_the_users_optimizer(images):
    model, reference = make_model(), make_model()
    hpm = create_policy("hpm")  # built without sizes: use_policy binds them from the model
    handle = use_policy(model, hpm)
    assert hpm.scorer.embed_dim == D and any(name.startswith("maskkit_policy.") for name in model.state_dict())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)  # built after use_policy: holds the scorer
    assert {id(p) for p in hpm.parameters()} <= {id(p) for g in optimizer.param_groups for p in g["params"]}
    noise = torch.rand(B, N, generator=torch.Generator().manual_seed(1))
    handle.set_progress(1.0)
    loss, pred, mask = model(images, mask_ratio=0.75, noise=noise)
    plan = handle.plan
    assert (plan.guided.sum(1) == 6).all()  # half of the 12 hidden at the end of the ramp
    own = reference.forward_loss(images, pred, mask)  # the model's own loss for the same prediction
    aux = hpm.aux_loss(plan, ((pred - reference.patchify(images)) ** 2).mean(-1))
    torch.testing.assert_close(loss, own + aux, rtol=1e-6, atol=0)
    before = [p.detach().clone() for p in hpm.parameters()]
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, hpm.parameters(), strict=True))
    handle.set_progress(0.0)  # start of the ramp: the random policy's plan for the same noise
    _, _, mask = model(images, mask_ratio=0.75, noise=noise)
    assert torch.equal(mask, MaskPlan.from_scores(noise, 0.75).mask) and not handle.plan.guided.any()
    with pytest.raises(ValueError, match="progress"):
        handle.set_progress(1.5)
    handle.remove()
    assert not any(name.startswith("maskkit_policy.") for name in model.state_dict())


def test_use_policy_attention_hides_most_attended(model, images):
    attention = torch.rand(B, N, generator=torch.Generator().manual_seed(2))
    hidden = N - num_visible(N, 0.75)
    with use_policy(model, create_policy("attention"), attention=attention):
        _, _, mask = model(images, mask_ratio=0.75)
    top = torch.zeros(B, N).scatter(1, attention.topk(hidden, dim=1).indices, 1.0)
    assert torch.equal(mask, top)
    # without precomputed scores the policy reads the model's own CLS attention
    own = wrap(model).cls_attention(images)
    with use_policy(model, create_policy("attention")):
        _, _, mask = model(images, mask_ratio=0.75)
    assert torch.equal(mask, torch.zeros(B, N).scatter(1, own.topk(hidden, dim=1).indices, 1.0))


def test_use_policy_refuses_a_trainable_learned_masker(model):
    with pytest.raises(ValueError, match="MLOEngine"):
        use_policy(model, create_policy("learned", embed_dim=D, num_patches=N))
    assert policy_of(model) is None and "forward" not in model.__dict__


def test_use_policy_applies_a_frozen_learned_masker_and_saves_it(model, images):
    masker = create_policy("learned", embed_dim=D, num_patches=N).requires_grad_(False)
    keys = set(model.state_dict())
    handle = use_policy(model, masker)
    assert set(model.state_dict()) == keys | {f"maskkit_policy.{k}" for k in masker.state_dict()}
    loss, pred, mask = model(images, mask_ratio=0.75)
    plan = handle.plan
    target = model.patchify(images)
    per_patch = ((pred - target) ** 2).mean(-1)  # independent recomputation of the weighted loss
    expected = (per_patch * mask * plan.weights).sum() / mask.sum()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    loss.backward()
    assert all(p.grad is None for p in masker.parameters())  # applied as it is
    assert model.decoder_pred.weight.grad is not None
    handle.remove()
    assert set(model.state_dict()) == keys  # detached again


def test_use_policy_touches_only_this_instance_and_restore_masking_undoes_it():
    """The bookkeeping of use_policy; that remove() leaves the model as it was: the conformance suite."""
    model, twin = make_model(), make_model()
    before = set(model.__dict__)
    keys = list(model.state_dict())
    handle = use_policy(model, create_policy("attention"))
    assert policy_of(model) is handle and list(model.state_dict()) == keys  # no parameters: none registered
    assert type(model).forward is models_mae.MaskedAutoencoderViT.forward  # class untouched
    assert "forward" not in twin.__dict__ and policy_of(twin) is None  # other instances untouched
    second = use_policy(model, create_policy("random"))  # replaces the first
    assert policy_of(model) is second and not handle.active
    assert restore_masking(model) is True and restore_masking(model) is False
    assert set(model.__dict__) == before and policy_of(model) is None


def test_deepcopy_of_patched_model_masks_itself(model, images):
    handle = use_policy(model, create_policy("hpm"))  # a policy with parameters of its own
    twin = copy.deepcopy(model)
    assert policy_of(twin) is not handle and policy_of(twin).policy is not handle.policy
    with torch.no_grad():
        twin.decoder_pred.bias.add_(1.0)  # the copy now predicts differently
    loss, _, _ = model(images, mask_ratio=0.75)
    twin_loss, _, _ = twin(images, mask_ratio=0.75)
    assert not torch.equal(loss, twin_loss)
    twin_loss.backward()
    assert twin.decoder_pred.bias.grad is not None and model.decoder_pred.bias.grad is None
    assert all(p.grad is None for p in handle.policy.parameters())  # the copy's scorer got them
    assert all(p.grad is not None for p in policy_of(twin).policy.parameters())
    assert restore_masking(twin) and policy_of(model) is handle
    handle.remove()


def test_use_policy_rejects_bad_input(model):
    with pytest.raises(TypeError, match="official MAE"):
        use_policy(torch.nn.Linear(2, 2), create_policy("random"))
    with pytest.raises(TypeError, match="policy"):
        use_policy(model, "random")
    with use_policy(model, lambda tokens, **_: "not a plan"):
        with pytest.raises(TypeError, match="MaskPlan"):
            model(torch.randn(1, 3, 16, 16), mask_ratio=0.75)
    assert "forward" not in model.__dict__
