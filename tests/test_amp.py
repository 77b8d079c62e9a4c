"""`--amp bf16`: the MAE forward of the real pretrain steps runs under bfloat16 autocast (CPU here; CUDA
the same way); weights, loss, optimizer states and the learned masker's hypergradient (finetune
features, darts finite differences) stay float32, and the loss is finite."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from maskkit import run as runs
from maskkit.checkpoint import load_checkpoint
from maskkit.cli.app import app
from maskkit.data import Batcher, channel_stats, load_dataset, make_splits
from maskkit.policies import create_policy
from maskkit.train import Pretrainer, TrainConfig

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")


def build(policy: str, amp: str, **train) -> tuple[Pretrainer, list[torch.dtype]]:
    """A micro MAE on digits; returns the trainer and a list that records every MAE Linear's output dtype."""
    torch.manual_seed(0)
    data = load_dataset("digits", None)
    splits = make_splits(data, 0)
    mean, std = channel_stats(data, splits["train"])
    mae = runs.build_mae({"preset": "micro", "img_size": 8, "patch_size": 2, "in_chans": 1,
                          "norm_pix_loss": False, "init_seed": 0})
    seen: list[torch.dtype] = []
    for m in mae.modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    kwargs = {"ratio": 0.75, **({"embed_dim": mae.embed_dim, "hidden_dim": 8} if policy == "learned" else {})}
    cfg = TrainConfig.from_dict({"steps": 4, "batch_size": 32, "amp": amp, **train})
    trainer = Pretrainer(mae, create_policy(policy, **kwargs), Batcher(data, mean, std, torch.device("cpu")),
                         splits, cfg, torch.device("cpu"))
    return trainer, seen


def test_bf16_forward_with_float32_weights_and_a_finite_loss():
    trainer, seen = build("random", "bf16")
    before = {n: p.detach().clone() for n, p in trainer.mae.named_parameters()}
    losses = [trainer.step()["loss"] for _ in range(3)]
    assert all(math.isfinite(v) for v in losses)
    assert seen and set(seen) == {torch.bfloat16}  # every MAE linear ran in bf16
    assert all(p.dtype == torch.float32 for p in trainer.mae.parameters())  # master weights stay float32
    assert any(not torch.equal(p, before[n]) for n, p in trainer.mae.named_parameters())
    state = trainer.optimizer.state_dict()["state"]
    assert all(v.dtype == torch.float32 for s in state.values() for k, v in s.items() if k != "step")
    fp32, _ = build("random", "none")
    reference = [fp32.step()["loss"] for _ in range(3)]
    assert losses != reference and max(abs(a - b) / b for a, b in zip(losses, reference, strict=False)) < 0.05


def test_learned_masker_pretrain_in_bf16_hypergradient_in_float32():
    amp, seen = build("learned", "bf16", hypergrad="darts", masker_every=2)
    fp32, _ = build("learned", "none", hypergrad="darts", masker_every=2)
    m0 = torch.cat([p.detach().flatten() for p in amp.policy.parameters()])
    first = amp.step()  # a pretrain step only
    assert set(seen) == {torch.bfloat16}
    seen.clear()
    second = amp.step()  # pretrain (bf16), then head features and darts finite differences (float32)
    assert seen[0] == torch.bfloat16 and torch.float32 in seen
    assert all(math.isfinite(v) for v in (*first.values(), *second.values()))
    fp32.step()
    reference = fp32.step()
    assert second["masker_grad_norm"] > 0
    assert abs(second["masker_grad_norm"] - reference["masker_grad_norm"]) < 0.1 * reference["masker_grad_norm"]
    update = torch.cat([p.detach().flatten() for p in amp.policy.parameters()]) - m0
    ref_update = torch.cat([p.detach().flatten() for p in fp32.policy.parameters()]) - m0
    assert float(torch.nn.functional.cosine_similarity(update, ref_update, dim=0)) > 0.9


def test_cli_amp_bf16_run(tmp_path):
    run = tmp_path / "amp"
    result = runner.invoke(app, ["pretrain", "--policy", "random", "--amp", "bf16", "--steps", "3", "--batch-size",
                                 "16", "--log-every", "1", "--no-progress", "--out", str(run)])
    assert result.exit_code == 0, result.output
    assert json.loads((run / "config.json").read_text())["train"]["amp"] == "bf16"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(math.isfinite(r["loss"]) for r in records)
    weights = load_checkpoint(run / "model.pt")["mae"]
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())
