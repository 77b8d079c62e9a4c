"""The zoo policies (simmim, uniform, colornoise, adamae) through the three adapters and `maskkit pretrain`.

Every adapter must hide exactly N - K patches as the policy planned them, give a finite loss, and
(for adamae, the one with its own objective) carry the sampler's REINFORCE loss to its parameters.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from maskkit import create_policy, num_visible
from maskkit.adapters.models import load_official_module
from maskkit.adapters.official_mae import timm_compat, use_policy
from maskkit.adapters.timm import create_mae
from maskkit.checkpoint import load_checkpoint
from maskkit.cli.app import app

ZOO = ["simmim", "uniform", "colornoise", "adamae"]
B, N, D = 4, 16, 32  # 16x16 images, patch 4: a 4x4 grid (even, as uniform needs; simmim's 2x2 groups fit)
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

pytestmark = pytest.mark.usefixtures("one_thread")


models_mae = load_official_module(EXAMPLES / "models_mae.py")  # the official-MAE test double


@pytest.fixture()
def images() -> torch.Tensor:
    return torch.randn(B, 3, 16, 16, generator=torch.Generator().manual_seed(7))


def hidden_count(policy) -> int:
    """N - K at the policy's own ratio (simmim 0.6, the others 0.75)."""
    return N - num_visible(N, policy.ratio)


def check_plan(policy, mask: torch.Tensor) -> None:
    """Exactly N - K hidden per image; uniform: exactly one visible patch per 2x2 block."""
    assert mask.shape == (B, N)
    assert mask.sum(dim=1).tolist() == [float(hidden_count(policy))] * B
    if isinstance(policy, type(create_policy("uniform"))):
        blocks = mask.reshape(B, 2, 2, 2, 2).permute(0, 1, 3, 2, 4).reshape(B, 4, 4)
        assert (blocks.sum(-1) == 3).all()


def check_sampler_grads(policy) -> None:
    params = list(policy.parameters())
    assert params and all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


@pytest.mark.parametrize("name", ZOO)
def test_timm_adapter(name, images):
    mae = create_mae("pilot", img_size=16, patch_size=4, in_chans=3, embed_dim=D, depth=1, num_heads=2,
                     decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, seed=0)  # fmt: skip
    policy = create_policy(name)
    out = mae(images, policy=policy, generator=torch.Generator().manual_seed(0))
    check_plan(policy, out.plan.mask)
    assert out.pred.shape == (B, N, 4 * 4 * 3) and torch.isfinite(out.total_loss)
    expected = (out.per_patch * out.plan.mask).sum() / out.plan.mask.sum()  # unweighted: no policy here weights
    torch.testing.assert_close(out.loss, expected)
    out.total_loss.backward()
    assert mae.decoder_pred.weight.grad is not None
    if name == "adamae":
        assert out.aux_loss is not None and out.aux_loss.requires_grad
        torch.testing.assert_close(out.aux_loss, policy.aux_loss(out.plan, out.per_patch))
        check_sampler_grads(policy)
    else:
        assert out.aux_loss is None


@pytest.mark.parametrize("name", ZOO)
def test_official_mae_adapter(name, images):
    with timm_compat(models_mae):
        torch.manual_seed(0)
        model = models_mae.mae_vit_tiny_patch4().eval()
    policy = create_policy(name)  # adamae: built without embed_dim, use_policy binds it from the model
    handle = use_policy(model, policy)
    try:
        torch.manual_seed(1)
        loss, pred, mask = model(images)  # no mask_ratio: the policy's own
        check_plan(policy, mask)
        assert torch.equal(handle.plan.mask, mask) and torch.isfinite(loss)
        own = type(model).forward_loss(model, images, pred, mask)  # the model's own masked MSE
        if name == "adamae":
            per_patch = ((pred - model.patchify(images)) ** 2).mean(-1)
            torch.testing.assert_close(loss, own + policy.aux_loss(handle.plan, per_patch), rtol=1e-6, atol=0)
            assert any(k.startswith("maskkit_policy.sampler.") for k in model.state_dict())
            loss.backward()
            check_sampler_grads(policy)
        else:
            assert torch.equal(loss, own)
    finally:
        handle.remove()


@pytest.mark.parametrize("name", ZOO)
def test_hf_adapter(name, images):
    pytest.importorskip("transformers")
    from maskkit.adapters.hf import create_hf_mae, hf_loss, noise_for_plan

    torch.manual_seed(0)
    model = create_hf_mae(
        image_size=16, patch_size=4, num_channels=3, hidden_size=D, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
        decoder_intermediate_size=32,
    ).eval()  # fmt: skip
    policy = create_policy(name)
    out = hf_loss(model, images, policy, generator=torch.Generator().manual_seed(0))  # HF follows the plan (checked)
    check_plan(policy, out.plan.mask)
    assert torch.isfinite(out.total_loss)
    model.config.mask_ratio = policy.ratio  # HF's own forward with the plan's noise gives its own loss: the same
    with torch.no_grad():
        own = model(pixel_values=images, noise=noise_for_plan(out.plan))
    assert torch.equal(own.mask, out.plan.mask)
    torch.testing.assert_close(out.loss, own.loss)
    if name == "adamae":
        out.total_loss.backward()
        check_sampler_grads(policy)


@pytest.mark.parametrize("name", ZOO)
def test_pretrain_command(name, tmp_path):
    out = tmp_path / name
    result = CliRunner().invoke(app, ["pretrain", "--policy", name, "--steps", "2", "--batch-size", "16",
                                      "--no-progress", "--out", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["policy"]["name"] == name and config["train"]["steps"] == 2
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 2 and all(v == v for v in record.values())  # no NaN
    weights = load_checkpoint(out / "model.pt")
    if name == "adamae":  # the sampler trained alongside the MAE and is saved with it
        assert "policy_loss" in record and "adamae_entropy" in record
        assert weights["policy"]["sampler.net.0.weight"].shape[1] == 64 + 32  # micro width + position code
    else:
        assert "policy_loss" not in record
