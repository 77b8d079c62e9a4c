"""`--compile`: transformer blocks compiled in place, run eagerly inside the differentiable unroll."""

import json

import pytest
import torch
from test_mlo import _masker_grads, make_engine, small_mae

from maskkit.compile import check_backend, compile_blocks, is_compiled, transformer_blocks, uncompiled
from maskkit.mae import mae_step_loss
from maskkit.mlo import MLOConfig
from maskkit.mlo.unroll import math_attention
from maskkit.policies import create_policy


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: dynamo stops compiling a function after enough recompiles in one
    process (other test files compile timm blocks too) and would then run it eagerly."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_blocks_compile_in_place_keeping_names_and_losses():
    mae, ref = small_mae(0), small_mae(0)
    blocks = transformer_blocks(mae)
    assert len(blocks) == 2 + 1  # encoder depth 2, decoder depth 1
    keys = list(mae.state_dict())
    assert compile_blocks(mae, "eager") == 3 and is_compiled(mae) and not is_compiled(ref)
    assert all(b._compiled_call_impl is not None for b in blocks)
    assert list(mae.state_dict()) == keys  # checkpoints are unchanged
    images = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    noise = torch.rand(4, 16, generator=torch.Generator().manual_seed(1))
    policy = create_policy("random")
    got, want = (mae_step_loss(m, policy, images, noise=noise).loss for m in (mae, ref))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    got.backward(), want.backward()
    for p, q in zip(mae.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7)
    assert compile_blocks(small_mae(0), "none") == 0


def test_uncompiled_runs_eagerly_inside_and_restores_on_exit():
    mae = small_mae(0)
    compile_blocks(mae, "eager")
    compiled = [b._compiled_call_impl for b in transformer_blocks(mae)]
    with uncompiled(mae):
        assert not is_compiled(mae)
    assert [b._compiled_call_impl for b in transformer_blocks(mae)] == compiled


def test_a_compiled_block_has_no_double_backward():
    """Why the unroll runs eagerly: a compiled graph refuses the second derivative the hypergradient needs."""
    mae = small_mae(0)
    compile_blocks(mae, "aot_eager")
    block = transformer_blocks(mae)[0]
    x = torch.randn(2, 5, 32, requires_grad=True)
    with math_attention(), pytest.raises(RuntimeError, match="create_graph|double backward"):
        (g,) = torch.autograd.grad(block(x).pow(2).sum(), x, create_graph=True)
        torch.autograd.grad(g.sum(), x)
    with uncompiled(mae), math_attention():  # eager, math SDPA: the second derivative exists
        (g,) = torch.autograd.grad(block(x).pow(2).sum(), x, create_graph=True)
        assert torch.autograd.grad(g.sum(), x)[0].shape == x.shape


@pytest.mark.slow
def test_unroll_hypergradient_of_a_compiled_mae_equals_the_eager_one():
    """The exact unroll with compiled blocks: blocks run eagerly on the functional weights inside the
    window, compiled outside it; the masker gets the same hypergradients as without compiling."""
    config = MLOConfig(hypergrad="unroll", unroll_steps=1, masker_every=2)
    grads = []
    for backend in ("none", "aot_eager"):
        engine, g = make_engine(seed=2, config=config)
        compile_blocks(engine.mae, backend)
        grads.append(_masker_grads(engine, 4, g))
        assert is_compiled(engine.mae) == (backend != "none")  # restored after each window
    assert len(grads[0]) == 2
    for a, b in zip(*grads, strict=True):
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_darts_with_compiled_blocks_trains():
    engine, g = make_engine(seed=2, config=MLOConfig())
    compile_blocks(engine.mae, "aot_eager")
    grads = _masker_grads(engine, 4, g)
    assert len(grads) == 2 and all(torch.isfinite(x).all() and x.abs().sum() > 0 for x in grads[0])


def test_backend_names_are_checked_in_one_line():
    assert check_backend("none") == "none" and check_backend("inductor") == "inductor"
    with pytest.raises(ValueError, match="--compile must be none or a torch.compile backend") as err:
        check_backend("turbo")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="transformer_blocks"):
        compile_blocks(torch.nn.Linear(2, 2), "eager")


def test_cli_pretrain_with_compile_records_it(tmp_path):
    from typer.testing import CliRunner

    from maskkit.cli.app import app

    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["pretrain", "--dataset", "digits", "--model", "micro", "--steps", "3",
                                      "--batch-size", "16", "--device", "cpu", "--compile", "eager",
                                      "--no-progress", "--out", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    record = json.loads((out / "config.json").read_text())
    assert record["train"]["compile"] == "eager" and record["config"]["train"]["compile"] == "eager"
    state = torch.load(out / "model.pt", weights_only=True)["mae"]
    assert not any("_orig_mod" in k for k in state)  # the names of an uncompiled model
