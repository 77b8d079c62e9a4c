"""The policy registry: third-party plug-in, listing, options, errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from maskkit.plan import MaskPlan
from maskkit.policies import (
    MaskPolicy,
    create_policy,
    get_policy_class,
    is_policy,
    list_policies,
    policy_options,
    policy_summary,
    register_policy,
    registry,
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_the_readme_plugin_example_works_from_the_current_directory(tmp_path):
    """README: put my_policies.py in the current directory, then MASKKIT_PLUGINS=my_policies maskkit pretrain."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if 'register_policy("center")' in b]
    assert len(blocks) == 1
    work, scripts = tmp_path / "work", tmp_path / "bin"
    work.mkdir()
    scripts.mkdir()
    (work / "my_policies.py").write_text(blocks[0])  # the example as written
    # like the `maskkit` console script: sys.path starts with the script's folder, not the current directory
    (scripts / "maskkit").write_text("import sys\nfrom maskkit.cli.app import main\nsys.exit(main())\n")
    env = {**os.environ, "MASKKIT_PLUGINS": "my_policies", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(scripts / "maskkit"), "pretrain", "--policy", "center", "--steps", "2",
               "--batch-size", "16", "--no-progress", "--out", "runs/center"]
    result = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert json.loads((work / "runs/center/config.json").read_text())["policy"]["name"] == "center"


# ---- policy cards -------------------------------------------------------------------------------

BUILTINS = ("adamae", "attention", "block", "colornoise", "hpm", "learned", "random", "simmim", "uniform")
CITATIONS = {
    "random": "He et al., CVPR 2022", "attention": "Kakogeorgiou et al., ECCV 2022", "block": "Bao et al., ICLR 2022",
    "learned": "Guo et al., TMLR 2025", "hpm": "Wang et al., CVPR 2023", "simmim": "Xie et al., CVPR 2022",
    "uniform": "Li et al., arXiv 2022", "colornoise": "Hinojosa et al., ECCV 2024",
    "adamae": "Bandara et al., CVPR 2023",
}  # fmt: skip
#: constructor arguments some choices need (SimMIM's "pixels" unit needs the model's patch size)
CHOICE_EXTRAS = {"simmim": {"patch_size": 1}, "learned": {"num_patches": 16, "embed_dim": 8}}


def _satisfies(allowed: str, value) -> bool | None:
    """Whether `value` is one of the allowed values written as text; None where the text is not machine-readable."""
    verdicts = []
    for alt in (a.strip() for a in allowed.split(" | ")):
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if alt == "None":
            verdicts.append(value is None)
        elif alt == "bool":
            verdicts.append(isinstance(value, bool))
        elif alt == "path":
            verdicts.append(isinstance(value, str))
        elif alt == "int >= 0, multiple of 4":
            verdicts.append(isinstance(value, int) and number and value >= 0 and value % 4 == 0)
        elif alt.startswith("int >= ") and alt[7:].isdigit():
            verdicts.append(isinstance(value, int) and number and value >= int(alt[7:]))
        elif alt[:2] in ("> ", ">=") and alt.lstrip(">= ").replace(".", "").isdigit():
            bound = float(alt.lstrip(">= "))
            verdicts.append(number and (value >= bound if alt.startswith(">=") else value > bound))
        elif alt[0] in "[(" and alt[-1] in "])" and all(_is_number(v) for v in alt[1:-1].split(",")):
            lo, hi = (float(v) for v in alt[1:-1].split(","))
            verdicts.append(number and (lo <= value if alt[0] == "[" else lo < value)
                            and (value <= hi if alt[-1] == "]" else value < hi))  # fmt: skip
        elif alt.replace(".", "").isdigit():
            verdicts.append(number and value == float(alt))
        elif alt.isidentifier():
            verdicts.append(value == alt)
        else:
            return None  # e.g. "int >= min_block_patches", "(rows, cols)"
    return any(verdicts)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_cards_match_the_constructor(name):
    card = registry.policy_card(name)
    assert isinstance(card, registry.PolicyCard) and card.name == name
    assert card.paper == CITATIONS[name] and card.idea and "\n" not in card.idea
    declared = vars(get_policy_class(name))["card_info"]
    signature = {o.name: o.default for o in policy_options(name)}
    assert set(declared.allowed) <= set(signature)  # none stale
    assert set(signature) <= set(declared.allowed) | set(registry.COMMON_ALLOWED)  # every option declared
    assert [(o.name, o.default) for o in card.options] == list(signature.items())
    for option in card.options:
        name_, default, allowed = option  # a (name, default, allowed) entry
        assert allowed == declared.allowed.get(name_, registry.COMMON_ALLOWED.get(name_))
        assert _satisfies(allowed, default) in (True, None), (name_, default, allowed)
        words = [a.strip() for a in allowed.split("|")]
        if isinstance(default, str) and all(w.isidentifier() for w in words):  # fixed choices: each one works
            for choice in words:
                create_policy(name, **{**CHOICE_EXTRAS.get(name, {}), name_: choice})
            with pytest.raises(ValueError):
                create_policy(name, **{**CHOICE_EXTRAS.get(name, {}), name_: "no_such_choice"})


def test_learns_says_what_a_policy_learns_from():
    learns = {name: registry.policy_card(name).learns for name in BUILTINS}
    assert learns["learned"] == "labels"
    assert learns["hpm"] == learns["adamae"] == "reconstruction"
    assert {n for n, v in learns.items() if v == "nothing"} == {
        "random", "attention", "block", "simmim", "uniform", "colornoise"}
    # consistent with the classes: labels <=> learnable, reconstruction <=> an aux_loss of its own
    for name, value in learns.items():
        cls = get_policy_class(name)
        assert (value == "labels") == bool(cls.learnable)
        assert (value == "reconstruction") == (cls.aux_loss is not MaskPolicy.aux_loss)


def test_third_party_policy_gets_a_derived_card(clean_registry):
    @register_policy("derived_test")
    class Derived(MaskPolicy):
        """Hide the rightmost patches.

        More text that is not part of the idea.
        """

        def __init__(self, ratio: float = 0.6, width: int | None = None, shape: str = "bar", scale=2) -> None:
            super().__init__(ratio)

    @register_policy("derived_aux")
    class WithAux(MaskPolicy):
        def aux_loss(self, plan, per_patch):
            return per_patch.mean()

    @register_policy("derived_learnable")
    class Learnable(Derived):  # inherits no card: cards are read from the class itself
        learnable = True

    card = registry.policy_card("derived_test")
    assert (card.paper, card.idea, card.learns) == ("-", "Hide the rightmost patches.", "nothing")
    assert card.options == (("ratio", 0.6, "float"), ("width", None, "int | None"), ("shape", "bar", "str"),
                            ("scale", 2, "any"))  # fmt: skip
    assert registry.policy_card("derived_aux").learns == "reconstruction"
    assert registry.policy_card("derived_aux").idea == ""
    assert registry.policy_card("derived_learnable").learns == "labels"

    @register_policy("derived_random")
    class MyRandom(get_policy_class("random")):
        """My own random masking."""

    assert registry.policy_card("derived_random").paper == "-"  # not the parent's card
    assert registry.policy_card("derived_random").options[0].allowed == "float"


def test_card_info_rejects_an_unknown_learns():
    with pytest.raises(ValueError, match="learns must be one of"):
        registry.CardInfo(paper="-", idea="x", learns="gradients")
    assert maskkit_policy_card_is_exported()


def maskkit_policy_card_is_exported() -> bool:
    import maskkit

    return maskkit.policy_card is registry.policy_card and "policy_card" in maskkit.__all__
