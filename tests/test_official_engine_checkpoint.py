"""engine_checkpoint_entries / restore_engine: an MLOEngine inside the official MAE checkpoint dict.

The checkpoint is built as facebookresearch/mae `util/misc.py` `save_model` builds it ('model',
'optimizer', 'epoch', 'scaler', 'args'), over the official-MAE test double in examples/models_mae.py.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import pytest
import torch
from torch import nn

from maskkit import create_policy
from maskkit.adapters.models import load_official_module
from maskkit.adapters.official_mae import (
    ENGINE_CHECKPOINT_KEY,
    engine_checkpoint_entries,
    restore_engine,
    timm_compat,
    wrap,
)
from maskkit.mlo import MLOConfig, MLOEngine, default_optimizers

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


models_mae = load_official_module(EXAMPLES / "models_mae.py")  # the official-MAE test double


def make_engine(seed: int) -> tuple[nn.Module, MLOEngine]:
    """The official double (16x16 grey images, 16 patches), wrapped, with a learned masker and a 2-class head;
    the MAE optimizer is the one the official loop would build (and save as 'optimizer')."""
    torch.manual_seed(seed)
    with timm_compat(models_mae):
        model = models_mae.mae_vit_tiny_patch4(img_size=16, in_chans=1)
    mae = wrap(model)
    masker = create_policy("learned", embed_dim=mae.embed_dim, num_patches=mae.num_patches, hidden_dim=16)
    head = nn.Linear(mae.embed_dim, 2)
    opts = default_optimizers(mae, head, masker, preset="imagenet")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))  # the official loop's
    engine = MLOEngine(mae, masker, head, mae_optimizer=optimizer, head_optimizer=opts["head_optimizer"],
                       masker_optimizer=opts["masker_optimizer"], config=MLOConfig(ratio=0.75),
                       generator=torch.Generator().manual_seed(seed))
    return model, engine


def batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(123)
    return [(torch.randn(4, 1, 16, 16, generator=g), torch.randint(0, 2, (4,), generator=g)) for _ in range(n)]


def run(engine: MLOEngine, data: list) -> list[dict[str, float]]:
    labeled = data[-1]
    return [engine.step(x, train_batch=labeled, val_batch=labeled) for x, _ in data]


def params(engine: MLOEngine) -> list[torch.Tensor]:
    return [p.detach().clone() for m in (engine.mae, engine.masker, engine.head) for p in m.parameters()]


def official_checkpoint(model: nn.Module, engine: MLOEngine, epoch: int, args: argparse.Namespace) -> dict:
    """`misc.save_model`'s dict, plus the engine entry."""
    return {"model": model.state_dict(), "optimizer": engine.mae_optimizer.state_dict(), "epoch": epoch,
            "scaler": {}, "args": args, **engine_checkpoint_entries(engine)}


def saved(obj: dict) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def test_round_trip_through_the_official_checkpoint_is_bit_identical(one_thread):
    data = batches(8)
    model, engine = make_engine(seed=0)
    run(engine, data[:4])
    buf = saved(official_checkpoint(model, engine, epoch=0, args=argparse.Namespace(epochs=2, lr=1e-3)))
    torch.manual_seed(99)
    ref_stats = run(engine, data[4:])
    ref_params = params(engine)

    model2, fresh = make_engine(seed=5)  # different initial weights and generator
    with torch.serialization.safe_globals([argparse.Namespace]):  # the official 'args' entry
        checkpoint = torch.load(buf, map_location="cpu", weights_only=True)
    model2.load_state_dict(checkpoint["model"])  # what misc.load_model does, then the engine
    fresh.mae_optimizer.load_state_dict(checkpoint["optimizer"])
    assert restore_engine(fresh, checkpoint) is True
    assert fresh.step_count == 4
    torch.manual_seed(99)
    got_stats = run(fresh, data[4:])
    assert got_stats == ref_stats
    assert all(torch.equal(a, b) for a, b in zip(params(fresh), ref_params, strict=True))


def test_entry_shares_storages_with_the_official_entries():
    """The engine's MAE and MAE-optimizer state are the official 'model'/'optimizer' tensors: saved once."""
    model, engine = make_engine(seed=0)
    run(engine, batches(2))
    args = argparse.Namespace(epochs=1)
    plain = {"model": model.state_dict(), "optimizer": engine.mae_optimizer.state_dict(), "epoch": 0,
             "scaler": {}, "args": args}
    own = {"masker": engine.masker.state_dict(), "head": engine.head.state_dict(),
           "opts": [engine.head_optimizer.state_dict(), engine.masker_optimizer.state_dict()]}
    extra = len(saved(official_checkpoint(model, engine, 0, args)).getvalue()) - len(saved(plain).getvalue())
    assert extra < len(saved(own).getvalue()) + 64 * 1024  # masker + head + their optimizers + small metadata


def test_absent_entry_returns_false_and_changes_nothing():
    model, engine = make_engine(seed=0)
    before = params(engine)
    assert restore_engine(engine, {"model": model.state_dict(), "epoch": 3}) is False
    assert engine.step_count == 0
    assert all(torch.equal(a, b) for a, b in zip(params(engine), before, strict=True))


def test_custom_key():
    _, engine = make_engine(seed=0)
    run(engine, batches(2))
    entry = engine_checkpoint_entries(engine, key="mlo")
    assert list(entry) == ["mlo"]
    _, fresh = make_engine(seed=1)
    assert restore_engine(fresh, entry) is False
    assert restore_engine(fresh, entry, key="mlo") is True and fresh.step_count == 2


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        (3, "not an MLOEngine state dict: got int"),
        ({"step": 1}, "missing mae, masker, head, optimizers"),
        ({"step": 1, "mae": {}, "masker": {}, "head": {}, "optimizers": {"mae": {}}}, "missing optimizers.head"),
        ({"step": 1, "mae": {}, "masker": {}, "head": {}, "optimizers": []}, "optimizers \\(not a dict\\)"),
    ],
    ids=["not_a_dict", "missing_keys", "missing_optimizer", "optimizers_not_a_dict"],
)
def test_malformed_entry_is_a_one_line_value_error(entry, match):
    _, engine = make_engine(seed=0)
    before = params(engine)
    with pytest.raises(ValueError, match=match) as info:
        restore_engine(engine, {ENGINE_CHECKPOINT_KEY: entry})
    assert "\n" not in str(info.value) and ENGINE_CHECKPOINT_KEY in str(info.value)
    assert all(torch.equal(a, b) for a, b in zip(params(engine), before, strict=True))


def test_bad_arguments():
    _, engine = make_engine(seed=0)
    with pytest.raises(TypeError, match="MLOEngine"):
        engine_checkpoint_entries(object())
    with pytest.raises(TypeError, match="MLOEngine"):
        restore_engine(object(), {})
    with pytest.raises(TypeError, match="checkpoint must be a dict"):
        restore_engine(engine, [("maskkit_engine", {})])
