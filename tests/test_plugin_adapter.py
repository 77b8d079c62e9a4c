"""A model adapter written outside maskkit (a module file here, loaded through MASKKIT_PLUGINS): `--model toy:WIDTH`.

It registers with `register_adapter("toy")`, passes the adapter conformance suite in-process, and trains
through a real `maskkit pretrain --model toy:16` process, whose model.pt loads into a freshly built one.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
import test_adapter_conformance as conformance
import torch
from torch import nn

import maskkit.registry
from maskkit.adapters import ADAPTERS, create_mae_from_spec, parse_model_spec
from maskkit.adapters.models import spec_grammar
from maskkit.checkpoint import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

PLUGIN = '''
"""A third-party model kind: `toy:WIDTH`, a two-block timm ViT of that width inside maskkit's TimmMAE."""

import timm
import torch

from maskkit.adapters import BuildRequest, ModelAdapter, ModelSpec, TimmMAE, register_adapter
from maskkit.registry import Card

DECODER = dict(decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)


def build_vit(width, img_size, patch_size, in_chans):
    """The codebase's own model: a timm ViT, two blocks of `width`."""
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=img_size, patch_size=patch_size,
        in_chans=in_chans, embed_dim=width, depth=2, num_heads=2,
    )


@register_adapter("toy", card=Card(idea="a two-block timm ViT of a given width", allowed={"width": "even int >= 2"}))
class ToyAdapter(ModelAdapter):
    """A toy model kind written outside maskkit."""

    forms = ("toy:WIDTH",)

    def __init__(self, width: int = 32) -> None:
        if isinstance(width, bool) or not isinstance(width, int) or width < 2 or width % 2:
            raise ValueError(f"toy: width must be an even integer >= 2, got {width!r}")
        self.width = width

    @classmethod
    def parse(cls, arg: str) -> "ToyAdapter":
        if not arg.isdigit():
            raise ValueError(f"toy: expects a width, got {arg!r}")
        return cls(int(arg))

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec("toy", str(self.width))

    def build(self, request: BuildRequest) -> TimmMAE:
        patch = request.patch_size or 2  # its own choice when the run leaves it open
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(request.seed)
            vit = build_vit(self.width, request.sizes, patch, request.in_chans)
            return TimmMAE(vit, norm_pix_loss=request.norm_pix_loss, **DECODER, **request.options)
'''


@pytest.fixture
def toy(tmp_path, monkeypatch) -> Iterator[object]:
    """The plugin module, loaded as `maskkit pretrain` loads it (MASKKIT_PLUGINS, the current directory);
    unregistered and forgotten afterwards."""
    (tmp_path / "toy_adapter.py").write_text(PLUGIN)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(maskkit.registry.PLUGINS_ENV, "toy_adapter")
    monkeypatch.setattr(maskkit.registry, "_imported_plugins", set(maskkit.registry._imported_plugins))
    assert "toy" not in ADAPTERS
    assert ADAPTERS.load(again=True) == ["toy_adapter"]
    try:
        yield sys.modules["toy_adapter"]
    finally:
        ADAPTERS.unregister("toy")
        sys.modules.pop("toy_adapter", None)


def toy_case(plugin) -> conformance.AdapterCase:
    """The toy adapter's one conformance fixture: its own loss is MAE's forward redone by hand (the suite's timm one)."""

    def build(seed: int, norm_pix_loss: bool) -> nn.Module:
        return create_mae_from_spec("toy:32", img_size=16, in_chans=3, patch_size=4, seed=seed,
                                    norm_pix_loss=norm_pix_loss).eval()  # fmt: skip

    def build_raw(seed: int) -> nn.Module:
        return conformance.seeded(seed, lambda: plugin.build_vit(32, 16, 4, 3).eval())

    return conformance.AdapterCase(
        name="toy", img_size=16, in_chans=3, patch_size=4, embed_dim=32, build=build,
        own_loss=conformance.timm_own_loss, own_features=conformance.timm_own_features,
        features_tol=dict(rtol=0, atol=1e-6), raw_of=lambda mae: mae.encoder, build_raw=build_raw,
        attach=functools.partial(conformance.timm_attach, decoder=plugin.DECODER),
        raw_output=conformance.timm_raw_output, adds_parameters=True, spec="toy:32",
    )  # fmt: skip


def test_a_plugin_adapter_registers_and_passes_the_conformance_suite(toy):
    assert "toy" in ADAPTERS.names() and ADAPTERS.get("toy") is toy.ToyAdapter
    card = ADAPTERS.card("toy")
    assert (card.kind, card.idea, card.paper) == ("adapter", "a two-block timm ViT of a given width", "-")
    assert card.options == (("width", 32, "even int >= 2"),)
    assert parse_model_spec(" toy:48 ") == toy.ModelSpec("toy", "48") and str(parse_model_spec("toy:48")) == "toy:48"
    assert "hf:tiny, hf:PATH.json, video:NAME" in spec_grammar() and spec_grammar().endswith(" or toy:WIDTH")
    with pytest.raises(ValueError, match="toy: width must be an even integer >= 2, got 7"):
        parse_model_spec("toy:7")
    with pytest.raises(ValueError, match="names no toy model"):
        parse_model_spec("toy:")
    ran = conformance.check_conformance(toy_case(toy))
    assert ran == [test.__name__ for test in conformance.SUITE]


@pytest.mark.slow
def test_a_plugin_adapter_trains_through_maskkit_pretrain(toy, tmp_path):
    env = {**os.environ, maskkit.registry.PLUGINS_ENV: "toy_adapter", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "maskkit.cli", "pretrain", "--model", "toy:16", "--steps", "3",
               "--batch-size", "8", "--no-progress", "--out", "run"]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "run" / "config.json").read_text())["model"]
    assert record["name"] == "toy:16" and (record["patch_size"], record["embed_dim"]) == (2, 16)
    assert record["num_patches"] == (record["img_size"] // 2) ** 2
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines if '"step"' in line][-1] == 3

    fresh = create_mae_from_spec(record["name"], img_size=record["img_size"], in_chans=record["in_chans"],
                                 patch_size=record["patch_size"], seed=record["init_seed"])  # fmt: skip
    trained = load_checkpoint(tmp_path / "run" / "model.pt")["mae"]
    untrained = {k: v.clone() for k, v in fresh.state_dict().items()}
    result = fresh.load_state_dict(trained, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert all(torch.equal(fresh.state_dict()[k], trained[k]) for k in trained)
    assert any(not torch.equal(untrained[k], trained[k]) for k in trained)  # three steps moved the weights
