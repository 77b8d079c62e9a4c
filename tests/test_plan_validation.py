"""Every plan a policy returns is checked (`MaskPlan.validate`): a plugin policy returning an inverted plan, a
plan keeping or hiding every patch, wrong shapes, out-of-range or duplicated ids, a non-permutation
ids_restore, or non-finite weights is refused with one line, in the library and through `maskkit pretrain`."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap

import pytest
import torch

from maskkit.plan import MaskPlan, PlanError, plan_checks_enabled, set_plan_checks
from maskkit.policies import RandomPolicy
from maskkit.policies.base import MaskPolicy


def _plan(b=4, n=16, ratio=0.75, seed=0):
    return MaskPlan.from_scores(torch.rand(b, n, generator=torch.Generator().manual_seed(seed)), ratio)


def test_a_plan_from_scores_passes_and_is_returned_unchanged():
    plan = _plan()
    assert plan.validate(16, 4) is plan


BROKEN = {
    "inverted mask": (lambda p: dataclasses.replace(p, mask=1 - p.mask), "mask = (ids_restore >= K)"),
    "duplicate ids_keep": (lambda p: dataclasses.replace(p, ids_keep=p.ids_keep[:, :1].repeat(1, 4)), "no duplicates"),
    "ids out of range": (lambda p: dataclasses.replace(p, ids_keep=p.ids_keep + 16), "ids in range"),
    "negative ids": (lambda p: dataclasses.replace(p, ids_restore=p.ids_restore - 1), "ids in range"),
    "restore not a permutation": (lambda p: dataclasses.replace(p, ids_restore=torch.zeros_like(p.ids_restore)),
                                  "a permutation"),
    "restore not the inverse": (lambda p: dataclasses.replace(p, ids_restore=p.ids_restore.flip(1)), "ids_keep"),
    "NaN weights": (lambda p: dataclasses.replace(p, weights=torch.full_like(p.mask, float("nan"))), "finite weights"),
    "wrong weights shape": (lambda p: dataclasses.replace(p, weights=torch.ones(4, 15)), "weights must be [B, N]"),
    "batch mismatch": (lambda p: dataclasses.replace(p, ids_keep=p.ids_keep[:3]), "shapes disagree"),
    "float ids": (lambda p: dataclasses.replace(p, ids_keep=p.ids_keep.float()), "int64"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_each_broken_plan_is_refused_naming_the_check(case):
    broken, words = BROKEN[case]
    with pytest.raises(PlanError, match=None) as err:
        broken(_plan()).validate(16, 4)
    message = str(err.value)
    assert words in message and "\n" not in message


def test_wrong_patch_count_and_batch_size_are_named():
    with pytest.raises(PlanError, match="covers 16 patches but the tokens have 64"):
        _plan().validate(64)
    with pytest.raises(PlanError, match="for 4 images but the batch has 8"):
        _plan().validate(16, 8)


@pytest.mark.parametrize("keep, word", [(16, "keeps"), (0, "hides")])
def test_a_plan_that_keeps_or_hides_every_patch_is_refused(keep, word):
    b, n = 2, 16
    ids = torch.arange(n).expand(b, n).contiguous()
    mask = (ids >= keep).float()
    plan = MaskPlan(ids_keep=ids[:, :keep].contiguous(), ids_restore=ids, mask=mask)
    with pytest.raises(PlanError, match=f"{word} every patch"):
        plan.validate(n)


class Inverted(MaskPolicy):
    """A buggy plugin: hides the patches its plan says are visible."""

    def make_plan(self, tokens, ratio, **kwargs):
        plan = RandomPolicy(ratio).make_plan(tokens, ratio, **kwargs)
        return dataclasses.replace(plan, mask=1 - plan.mask)


def test_a_policy_returning_an_inverted_plan_is_refused_and_the_switch_turns_the_check_off():
    tokens = torch.randn(2, 16, 8)
    with pytest.raises(PlanError, match="policy Inverted: invalid plan"):
        Inverted(0.75)(tokens)
    previous = set_plan_checks(False)
    try:
        assert not plan_checks_enabled()
        plan = Inverted(0.75)(tokens)  # unchecked: the caller asked for it
        assert float(plan.mask.sum()) == 2 * 4  # the inverted mask hides only K patches per image
    finally:
        set_plan_checks(previous)


def test_non_finite_noise_or_attention_is_refused():
    tokens = torch.randn(2, 16, 8)
    noise = torch.rand(2, 16)
    noise[1, 3] = float("nan")
    with pytest.raises(ValueError, match="noise holds non-finite values"):
        RandomPolicy(0.75)(tokens, noise=noise)
    from maskkit.policies import AttentionPolicy

    attention = torch.rand(2, 16)
    attention[0, 0] = float("inf")
    with pytest.raises(ValueError, match="attention holds non-finite values"):
        AttentionPolicy(ratio=0.75)(tokens, attention=attention)


PLUGIN = '''
import dataclasses
import maskkit
from maskkit.policies import RandomPolicy


@maskkit.register_policy("keepall")
class KeepAll(maskkit.MaskPolicy):
    """Keeps every patch visible: a plan with nothing to reconstruct."""

    def make_plan(self, tokens, ratio, **kwargs):
        import torch
        b, n, _ = tokens.shape
        ids = torch.arange(n, device=tokens.device).expand(b, n).contiguous()
        return maskkit.MaskPlan(ids_keep=ids, ids_restore=ids, mask=torch.zeros(b, n))


@maskkit.register_policy("outofrange")
class OutOfRange(maskkit.MaskPolicy):
    """Returns ids past the last patch."""

    def make_plan(self, tokens, ratio, **kwargs):
        plan = RandomPolicy(ratio).make_plan(tokens, ratio, **kwargs)
        return dataclasses.replace(plan, ids_keep=plan.ids_keep + tokens.shape[1])
'''


@pytest.mark.parametrize("policy, words", [("keepall", "keeps every patch"), ("outofrange", "ids in range")])
@pytest.mark.slow
def test_a_plugin_policy_with_a_broken_plan_stops_pretrain_with_one_line(tmp_path, policy, words):
    (tmp_path / "broken_policies.py").write_text(textwrap.dedent(PLUGIN))
    env = {"MASKKIT_PLUGINS": "broken_policies", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-m", "maskkit.cli", "pretrain", "--policy", policy, "--steps", "2", "--no-progress",
         "--out", str(tmp_path / "run")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("Error: ") and words in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr
