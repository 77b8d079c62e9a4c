"""The policy registry: third-party plug-in, listing, options, errors."""

from __future__ import annotations

import pytest
import torch

from maskkit import registry
from maskkit.plan import MaskPlan
from maskkit.policies import MaskPolicy
from maskkit.registry import (
    create_policy,
    get_policy_class,
    is_policy,
    list_policies,
    policy_options,
    policy_summary,
    register_policy,
)


@pytest.fixture
def clean_registry():
    """Remove whatever a test registers, so other tests see the built-ins only."""
    before = dict(registry._REGISTRY)
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(before)


def test_builtins_are_registered():
    assert {"random", "attention", "learned", "block"} <= set(list_policies())
    assert list_policies() == sorted(list_policies())
    assert get_policy_class("learned").learnable and not get_policy_class("random").learnable


def test_third_party_policy_round_trips(clean_registry):
    @register_policy("center_test")
    class CenterPolicy(MaskPolicy):
        """Hide the patches farthest from the middle (a toy third-party policy)."""

        def __init__(self, ratio: float = 0.6, sharpness: float = 2.0) -> None:
            super().__init__(ratio)
            self.sharpness = sharpness

        def forward(self, tokens, *, ratio=None, **context):
            batch, n = tokens.shape[:2]
            distance = (torch.arange(n, dtype=torch.float32) - (n - 1) / 2).abs() ** self.sharpness
            return MaskPlan.from_scores(distance.expand(batch, n), self.resolve_ratio(ratio, n))

    assert "center_test" in list_policies() and is_policy("center_test")
    assert get_policy_class("center_test") is CenterPolicy
    assert policy_summary("center_test").startswith("Hide the patches farthest")
    options = {o.name: o for o in policy_options("center_test")}
    assert list(options) == ["ratio", "sharpness"]
    assert options["ratio"].default == 0.6 and options["sharpness"].default == 2.0
    assert options["sharpness"].annotation == "float"

    policy = create_policy("center_test", ratio=0.5, sharpness=1.0)
    assert isinstance(policy, CenterPolicy) and policy.ratio == 0.5 and policy.sharpness == 1.0
    plan = policy(torch.zeros(2, 8, 4))
    assert plan.mask.tolist() == [[1, 1, 0, 0, 0, 0, 1, 1]] * 2  # the middle four stay visible


def test_bare_decorator_uses_lowercase_class_name(clean_registry):
    @register_policy
    class MyOddPolicy(MaskPolicy):
        pass

    assert get_policy_class("myoddpolicy") is MyOddPolicy


def test_duplicate_name_rejected_unless_overwrite(clean_registry):
    with pytest.raises(ValueError, match="'random' is already registered"):

        @register_policy("random")
        class Impostor(MaskPolicy):
            pass

    @register_policy("random", overwrite=True)
    class Replacement(MaskPolicy):
        pass

    assert get_policy_class("random") is Replacement


def test_unknown_name_and_bad_options():
    with pytest.raises(ValueError, match="unknown policy 'no_such_policy'"):
        create_policy("no_such_policy")
    with pytest.raises(ValueError, match="unknown policy 'nope'"):
        policy_options("nope")
    with pytest.raises(ValueError, match="bad options for policy 'random'"):
        create_policy("random", colour="red")


@pytest.mark.parametrize(
    "name,kwargs,match",
    [
        ("attention", {"mode": "middle"}, "mode"),
        ("attention", {"hint_ratio": 1.0}, "hint_ratio"),
        ("learned", {"arch": "cnn"}, "arch"),
        ("learned", {"selection": "argmax"}, "selection"),
        ("learned", {"temperature": 0.0}, "temperature"),
        ("learned", {"arch": "paper"}, "num_patches"),
        ("block", {"min_block_patches": 0}, "min_block_patches"),
        ("block", {"min_aspect": -1.0}, "min_aspect"),
    ],
)
def test_bad_constructor_options_are_value_errors(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_policy(name, **kwargs)


def test_options_of_builtins_have_documented_defaults():
    learned = {o.name: o.default for o in policy_options("learned")}
    assert learned["arch"] == "token" and learned["selection"] == "topk" and learned["embed_dim"] == 192
    attention = {o.name: o.default for o in policy_options("attention")}
    assert attention == {"ratio": 0.75, "mode": "high", "hint_ratio": 0.1, "guided_fraction": 1.0, "guided_ramp": 0.0}


PLUGIN = '''
import torch
import maskkit


@maskkit.register_policy("plugin_center")
class PluginCenter(maskkit.MaskPolicy):
    """Hide the patches nearest the centre (a third-party plugin)."""

    def forward(self, tokens, *, ratio=None, **context):
        b, n, _ = tokens.shape
        side = int(n ** 0.5)
        yy, xx = torch.meshgrid(*(torch.arange(side),) * 2, indexing="ij")
        dist = ((yy - (side - 1) / 2) ** 2 + (xx - (side - 1) / 2) ** 2).flatten().float()
        return maskkit.MaskPlan.from_scores(-dist.expand(b, n), self.resolve_ratio(ratio, n))
'''


def test_plugins_named_in_the_environment_reach_the_cli(clean_registry, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from maskkit.cli.app import app

    (tmp_path / "maskkit_test_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(registry.PLUGINS_ENV, "maskkit_test_plugin")
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    result = CliRunner().invoke(app, ["policies"])
    assert result.exit_code == 0 and "plugin_center" in result.output
    plan = create_policy("plugin_center", ratio=0.75)(torch.zeros(1, 16, 4))
    assert plan.mask.view(4, 4)[1:3, 1:3].eq(1).all()  # the 2x2 centre is hidden
    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["pretrain", "--policy", "plugin_center", "--steps", "2", "--batch-size", "8",
                                      "--no-progress", "--out", str(run)])
    assert result.exit_code == 0, result.output
    assert '"name": "plugin_center"' in (run / "config.json").read_text()


def test_a_missing_plugin_is_a_one_line_error(monkeypatch):
    from typer.testing import CliRunner

    from maskkit.cli.app import app

    monkeypatch.setenv(registry.PLUGINS_ENV, "no_such_maskkit_plugin")
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    result = CliRunner().invoke(app, ["policies"])
    assert result.exit_code == 1
    assert "cannot import policy plugin 'no_such_maskkit_plugin'" in result.output
    assert "Traceback" not in result.output
