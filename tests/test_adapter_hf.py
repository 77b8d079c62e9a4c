"""maskkit.adapters.hf over a tiny randomly initialised transformers ViTMAEForPreTraining (no download).

Every test that needs transformers skips cleanly (pytest.importorskip) when the `hf` extra is absent.
What every adapter must do (protocol, bit-identical loss, plan round trip, features, learned masker
gradients, undo, state_dict round trip) is in tests/test_adapter_conformance.py.
"""

from __future__ import annotations

import sys

import pytest
import torch

from maskkit import MaskPlan, create_policy, num_visible
from maskkit.adapters.hf import HFMAE, create_hf_mae, hf_loss, noise_for_plan, wrap

B, N, D = 3, 16, 32
TINY = dict(
    image_size=16, patch_size=4, num_channels=3, hidden_size=D, num_hidden_layers=2, num_attention_heads=2,
    intermediate_size=64, decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
    decoder_intermediate_size=32,
)


def make_model(seed: int = 0, **overrides):
    pytest.importorskip("transformers")
    torch.manual_seed(seed)
    return create_hf_mae(**{**TINY, **overrides}).eval()


@pytest.fixture()
def model():
    return make_model()


def test_missing_extra_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(ImportError, match=r"maskkit\[hf\]"):
        create_hf_mae(**TINY)


def test_noise_for_plan_reproduces_any_plan(model):
    """HF's own random_masking under the derived noise keeps exactly plan.ids_keep, in order."""
    scores = torch.randn(B, N, generator=torch.Generator().manual_seed(1))
    plan = MaskPlan.from_scores(scores, 0.75)
    sequence = torch.randn(B, N, D)
    kept, mask, ids_restore = model.vit.embeddings.random_masking(sequence, noise_for_plan(plan))
    assert torch.equal(kept, plan.gather(sequence))
    assert torch.equal(mask, plan.mask) and torch.equal(ids_restore, plan.ids_restore)


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_hf_loss_random_bit_identical_to_hf(images, norm_pix_loss):
    """hf_loss (HF's own forward, fed the plan's noise) under the RNG state HF would draw its noise from."""
    model = make_model(norm_pix_loss=norm_pix_loss)
    torch.manual_seed(4)
    reference = model(pixel_values=images)  # HF draws torch.rand(B, N) itself
    torch.manual_seed(4)
    out = hf_loss(model, images, create_policy("random"))
    assert torch.equal(out.loss, reference.loss) and torch.equal(out.pred, reference.logits)
    assert torch.equal(out.plan.mask, reference.mask)


def test_ratio_override_is_temporary(model, images):
    out = hf_loss(model, images, create_policy("random"), ratio=0.5)
    assert out.plan.num_visible == num_visible(N, 0.5)
    assert torch.equal(out.plan.mask.sum(1), torch.full((B,), float(N - num_visible(N, 0.5))))
    assert model.config.mask_ratio == 0.75 and model.vit.embeddings.config.mask_ratio == 0.75


def test_hf_loss_weights_by_a_learned_masker(model, images):
    masker = create_policy("learned", embed_dim=D, num_patches=N)
    out = hf_loss(model, images, masker, ratio=0.75)
    target = model.patchify(images)
    per_patch = ((out.pred - target) ** 2).mean(-1)
    expected = (per_patch * out.plan.mask * out.plan.weights).sum() / out.plan.mask.sum()
    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=0)
    out.loss.backward()
    grads = [p.grad for p in masker.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    assert model.decoder.decoder_pred.weight.grad is not None


def test_attention_policy_through_hf(model, images):
    hidden = N - num_visible(N, 0.75)
    own = wrap(model).cls_attention(images)
    out = hf_loss(model, images, create_policy("attention"))  # reads HFMAE.cls_attention
    assert torch.equal(out.plan.mask, torch.zeros(B, N).scatter(1, own.topk(hidden, dim=1).indices, 1.0))
    given = torch.rand(B, N, generator=torch.Generator().manual_seed(3))
    out = hf_loss(model, images, create_policy("attention"), attention=given)
    assert torch.equal(out.plan.mask, torch.zeros(B, N).scatter(1, given.topk(hidden, dim=1).indices, 1.0))


def test_cls_attention_matches_hf_unmasked(model, images):
    """Against HF itself with nothing masked and patches in order (mask_ratio 0, increasing noise)."""
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    else:  # older transformers
        model.config._attn_implementation = "eager"
    model.config.mask_ratio = 0.0
    order = torch.arange(N, dtype=torch.float32).expand(B, N)
    outputs = model.vit(pixel_values=images, noise=order, output_attentions=True)
    expected = outputs.attentions[-1][:, :, 0, 1:].mean(dim=1)  # [B, N]
    torch.testing.assert_close(wrap(model).cls_attention(images), expected, rtol=1e-5, atol=1e-6)


def test_rejects_foreign_models(images):
    with pytest.raises(TypeError, match="ViTMAEForPreTraining"):
        HFMAE(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="ViTMAEForPreTraining"):
        hf_loss(torch.nn.Linear(2, 2), images, create_policy("random"))


def test_hpm_objective_through_hf_loss_and_wrap(model, images):
    hpm = create_policy("hpm", embed_dim=D)
    out = hf_loss(model, images, hpm, generator=torch.Generator().manual_seed(0))
    assert out.aux_loss is not None and torch.equal(out.aux_loss, hpm.aux_loss(out.plan, out.per_patch))
    out.total_loss.backward()
    assert all(p.grad is not None for p in hpm.parameters())
    from maskkit.mae import mae_step_loss

    wrapped = mae_step_loss(wrap(model), hpm, images, generator=torch.Generator().manual_seed(0))
    assert wrapped.aux_loss is not None and torch.isfinite(wrapped.total_loss)
