"""A hypergradient method added without editing maskkit: a module written here, loaded through MASKKIT_PLUGINS.

The plugin is darts along the masker -> pretrain -> validation path only, built from maskkit.mlo's
public parts. It passes the conformance suite in-process (through MLOEngine), and trains through a
real `maskkit pretrain --hypergrad plugin_direct` process, where it must take exactly the steps of
the built-in `--hypergrad darts --darts-paths direct`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from test_hypergrad_conformance import (
    Case,
    check_card_and_options,
    check_matches_finite_differences,
    check_state_dict_round_trip,
)

from maskkit import registry
from maskkit.mlo import HYPERGRADS, MLOConfig

PLUGIN = '''"""darts along the direct path only, as a third-party hypergradient method."""
from maskkit.mlo import Hypergradient, darts_masker_grad, finetune_step, optimizer_params, register_hypergrad
from maskkit.registry import Card

CALLS = []


@register_hypergrad("plugin_direct", card=Card(idea="darts on the masker -> pretrain -> validation path only",
                                                paper="Liu et al., ICLR 2019", allowed={"r": "> 0"}))
class DirectPath(Hypergradient):
    """Finite-difference hypergradient that ignores the head step's dependence on the MAE."""

    def __init__(self, r: float = 0.01) -> None:
        if not (isinstance(r, (int, float)) and r > 0):
            raise ValueError(f"{self.label('r')} must be a positive number, got {r!r}")
        self.r = r

    def pretrain(self, engine, images, *, learning, progress):
        return engine.pretrain(images, keep_params=learning, progress=progress)  # keep W for the difference

    def masker_grads(self, engine, step, train_batch, val_batch):
        CALLS.append(engine.step_count)
        ft = finetune_step(engine.mae, engine.head, engine.head_optimizer, train_batch, val_batch,
                           mae_params=optimizer_params(engine.mae_optimizer), paths="direct",
                           grad_clip=engine.config.head_grad_clip)
        return darts_masker_grad(engine.mae, engine.masker, step, ft.vector, engine.mae_optimizer, r=self.r), ft
'''
CASE = Case("plugin_direct", {"r": 0.01}, seed=14, frozen_head=True, tol=5e-4)  # exact up to r with C' = C


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """The plugin module in tmp_path, loaded the way the CLI loads it (MASKKIT_PLUGINS, current directory)."""
    (tmp_path / "my_hypergrad.py").write_text(PLUGIN)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(registry.PLUGINS_ENV, "my_hypergrad")
    monkeypatch.setattr(registry, "_imported_plugins", set())
    monkeypatch.setattr(HYPERGRADS, "_loaded", False)
    try:
        assert "plugin_direct" in HYPERGRADS.names()
        yield sys.modules["my_hypergrad"]
    finally:
        HYPERGRADS.unregister("plugin_direct")
        sys.modules.pop("my_hypergrad", None)


def test_the_plugin_passes_the_conformance_checks_through_the_engine(plugin):
    check_card_and_options(CASE)
    check_matches_finite_differences(CASE)
    check_state_dict_round_trip(CASE)
    assert plugin.CALLS  # its masker_grads ran
    with pytest.raises(ValueError, match="plugin_direct_r must be a positive number"):
        MLOConfig(hypergrad="plugin_direct", hypergrad_options={"r": 0})
    with pytest.raises(ValueError, match="level2='ridge' is implemented for hypergrad='darts' only"):
        MLOConfig(hypergrad="plugin_direct", level2="ridge")


def _pretrain(tmp_path, name: str, *args: str) -> tuple[list[dict], dict]:
    env = {**os.environ, "MASKKIT_PLUGINS": "my_hypergrad", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = tmp_path / name
    command = [sys.executable, "-m", "maskkit.cli", "pretrain", "--policy", "learned", "--learned-hidden-dim", "8",
               "--steps", "4", "--batch-size", "16", "--log-every", "1", "--seed", "2", "--no-progress",
               "--out", str(out), *args]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return metrics, torch.load(out / "model.pt", map_location="cpu", weights_only=True)


def test_the_plugin_trains_through_maskkit_pretrain(tmp_path):
    (tmp_path / "my_hypergrad.py").write_text(PLUGIN)
    metrics, model = _pretrain(tmp_path, "plugin", "--hypergrad", "plugin_direct")
    config = json.loads((tmp_path / "plugin" / "config.json").read_text())
    assert config["train"]["mlo"]["hypergrad"] == "plugin_direct"
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert metrics[1]["masker_grad_norm"] > 0  # (at step 4 the cosine schedule has brought the MAE's lr to 0)
    assert sum("masker_grad_norm" in m for m in metrics) == 2  # masker_every 2: steps 2 and 4
    # the same computation as the built-in darts on its direct path: the same numbers, bit for bit
    reference, ref_model = _pretrain(tmp_path, "darts", "--hypergrad", "darts", "--darts-paths", "direct")
    assert metrics == reference
    for part in ("mae", "policy", "head"):
        if part in ref_model:
            assert all(torch.equal(model[part][k], v) for k, v in ref_model[part].items()), part
