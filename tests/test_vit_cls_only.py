"""The CLS-only last block behind `features` (timm and official-MAE adapters): equal to the full
forward's CLS feature within 1e-6 in float32, with equal gradients, fused attention or not; blocks it
cannot reproduce exactly (dropout or drop-path in training mode) run whole."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from maskkit.adapters.official_mae import timm_compat, wrap
from maskkit.adapters.timm import create_mae
from maskkit.adapters.vit_attention import cls_only_block, cls_through_blocks, supports_cls_only

SMALL = dict(img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=16,
             decoder_depth=1, decoder_num_heads=1, seed=0)


def full_cls(mae) -> callable:
    """The reference: the whole encoder on every token, then the CLS row after the final norm."""
    return lambda x: mae._trunk(mae._with_cls(mae.patch_tokens(x)))[:, 0]


def grads(out: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    weights = torch.linspace(-1, 1, out.numel()).reshape(out.shape)  # a generic direction
    return list(torch.autograd.grad((out * weights).sum(), params))


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("options", [{}, {"qk_norm": True}, {"qkv_bias": False}])
def test_timm_features_equal_the_full_forward_with_equal_gradients(fused, options):
    torch.manual_seed(0)  # the weights, whatever ran before in this process
    mae = create_mae("tiny", **SMALL, **options).train()
    for blk in mae.encoder.blocks:
        blk.attn.fused_attn = fused
    assert supports_cls_only(mae.encoder.blocks[-1])
    x = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
    params = [p for p in mae.encoder.parameters() if p.requires_grad] + [x]
    want, got = full_cls(mae)(x), mae.features(x)
    torch.testing.assert_close(got, want, rtol=0, atol=5e-6)  # float32 rounding of two summation orders
    for a, b in zip(grads(got, params), grads(want, params), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_a_block_with_drop_path_in_training_runs_whole_and_exactly():
    mae = create_mae("tiny", **SMALL, drop_path_rate=0.5).train()
    assert not supports_cls_only(mae.encoder.blocks[-1])  # it draws random numbers: not reproducible
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(7)
    want = full_cls(mae)(x)
    torch.manual_seed(7)
    assert torch.equal(mae.features(x), want)
    mae.eval()  # in eval mode drop-path is the identity: the CLS-only path applies again
    assert supports_cls_only(mae.encoder.blocks[-1])
    torch.testing.assert_close(mae.features(x), full_cls(mae)(x), rtol=0, atol=1e-6)


def test_cls_only_block_is_the_cls_row_of_the_block():
    mae = create_mae("tiny", **SMALL).eval()
    block = mae.encoder.blocks[0]
    x = torch.randn(2, 17, 32, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(cls_only_block(block, x), block(x)[:, :1], rtol=0, atol=1e-6)
    other = torch.nn.Sequential(torch.nn.Identity())  # not a timm Block: runs whole
    assert not supports_cls_only(other) and torch.equal(cls_through_blocks([other], x), x[:, :1])


def test_official_adapter_features_equal_its_full_encoder():
    path = Path(__file__).resolve().parents[1] / "examples" / "models_mae.py"
    spec = importlib.util.spec_from_file_location("maskkit_cls_models_mae", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    with timm_compat(module):
        model = module.mae_vit_tiny_patch4()
    mae = wrap(model)
    assert supports_cls_only(model.blocks[-1])
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    want = mae._encoder(mae._with_cls(mae.patch_tokens(x)))[:, 0]
    got = mae.features(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    params = [p for p in model.parameters() if p.requires_grad]
    for a, b in zip(torch.autograd.grad(got.sum(), params, allow_unused=True),
                    torch.autograd.grad(want.sum(), params, allow_unused=True), strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
