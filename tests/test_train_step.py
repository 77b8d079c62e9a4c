"""Training steps behind one protocol (issue 21): PlainStep and MLOStep both satisfy `TrainStep`, the step is
chosen from the policy card's `learns` (not from attributes), the trainer with either step reproduces the
golden runs in-process, and mlo_bench's plain contender is the trainer's PlainStep."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_resume import build as build_as_resume
from torch import Tensor, nn

from maskkit.mae import mae_step_loss
from maskkit.optim import param_groups
from maskkit.plan import MaskPlan
from maskkit.policies import POLICIES, CardInfo, create_policy, create_sized_policy, register_policy
from maskkit.policies.base import MaskPolicy
from maskkit.policies.scored import uniform_noise
from maskkit.train import (
    MLOSettings,
    Pretrainer,
    Resolved,
    TrainConfig,
    TrainSettings,
    TrainStep,
    policy_learns,
    step_kind,
)
from maskkit.train.mlo_step import MLOStep, engine_config
from maskkit.train.plain import PlainStep

GOLDEN = Path(__file__).resolve().parent / "golden"


class _Scored(MaskPolicy):
    """A policy with one parameter and its own loss (the parameter's square): trained only if the card says so."""

    def __init__(self, ratio: float = 0.75) -> None:
        super().__init__(ratio)
        self.scale = nn.Parameter(torch.tensor(2.0))

    def make_plan(self, tokens: Tensor, ratio: float, *, generator: torch.Generator | None = None,
                  **context: object) -> MaskPlan:
        batch, n = tokens.shape[:2]  # [B, N, D]
        return MaskPlan.from_scores(uniform_noise(None, batch, n, tokens.device, generator), ratio)

    def aux_loss(self, plan: MaskPlan, per_patch: Tensor) -> Tensor:
        return self.scale**2


class ReconstructionPolicy(_Scored):
    """Says it learns from reconstruction: its aux loss trains beside the MAE."""

    card_info = CardInfo(paper="-", idea="a test policy", learns="reconstruction")


class NothingPolicy(_Scored):
    """Says it learns nothing: its aux loss, though defined, is not trained."""

    card_info = CardInfo(paper="-", idea="a test policy", learns="nothing")


@pytest.fixture(autouse=True)
def test_policies():
    """The two test policies, registered for this module's tests only (other tests list every policy)."""
    register_policy("test-step-reconstruction", overwrite=True)(ReconstructionPolicy)
    register_policy("test-step-nothing", overwrite=True)(NothingPolicy)
    yield
    for name in ("test-step-reconstruction", "test-step-nothing"):
        POLICIES.unregister(name)


def build(policy: str, *, mlo: MLOSettings | None = None, **flat: object) -> Pretrainer:
    """A micro MAE on digits with `policy` (as the CLI builds it), batch 16."""
    return build_as_resume(policy, TrainConfig(mlo=mlo or MLOSettings(), steps=4, batch_size=16, log_every=1, **flat))


def weights(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("policy,kind", [("random", PlainStep), ("hpm", PlainStep), ("learned", MLOStep)])
def test_both_steps_satisfy_the_protocol_and_undo_leaves_no_trace(policy, kind):
    trainer = build(policy, skip_nonfinite=True)
    step = trainer.train_step
    assert isinstance(step, kind) and isinstance(step, TrainStep)
    state = step.state_dict()
    assert tuple(state) == step.state_keys and step.can_checkpoint()
    assert step.optimizers()[0] is step.optimizer and set(step.modules()) >= {"MAE", "masker"}
    before = {name: weights(m) for name, m in step.modules().items() if m is not None}
    images = trainer.batcher.images(trainer.streams["train"].next()[:16])
    context = {"generator": trainer.generators["mask"], "progress": 0.0}
    metrics, bad = step.run(images, context, agree=lambda b: b is not None, undoable=True)
    assert bad is None and metrics["loss"] > 0
    step.undo()  # as the trainer does for a non-finite batch: every level back where it was
    for name, module in step.modules().items():
        if module is not None:
            after = weights(module)
            assert all(torch.equal(before[name][k], after[k]) for k in after), name
    step.load_state_dict(state)  # the checkpoint part round-trips
    step.run(images, context, agree=lambda b: b is not None, undoable=False)
    step.commit()
    assert any(not torch.equal(before["MAE"][k], v) for k, v in weights(step.mae).items())


def test_the_step_follows_the_card_not_the_attributes():
    assert policy_learns(create_policy("test-step-reconstruction")) == "reconstruction"
    assert policy_learns(create_policy("test-step-nothing")) == "nothing"
    assert step_kind("labels", MLOSettings()) == "mlo"
    assert step_kind("labels", MLOSettings(freeze_masker=True)) == "plain"
    assert step_kind("reconstruction", MLOSettings()) == step_kind("nothing", MLOSettings()) == "plain"
    with pytest.raises(ValueError, match="learns from one of"):
        step_kind("pixels", MLOSettings())
    for name, trained in (("test-step-reconstruction", True), ("test-step-nothing", False)):
        trainer = build(name)
        metrics = trainer.step()
        scale = float(trainer.policy.scale.detach())
        assert ("policy_loss" in metrics) is trained, name
        if trained:  # AdamW moved the parameter down its own loss's gradient (2 * scale > 0)
            assert metrics["policy_loss"] == 4.0 and scale < 2.0
        else:
            assert scale == 2.0
    frozen = build("learned", mlo=MLOSettings(freeze_masker=True))
    assert isinstance(frozen.train_step, PlainStep) and frozen.engine is None and frozen.head is None
    assert not any(p.requires_grad for p in frozen.policy.parameters())
    assert isinstance(build("learned").train_step, MLOStep)


def test_the_engine_config_is_the_mlo_section_as_it_is():
    mlo = MLOSettings(hypergrad="unroll", unroll_steps=2, masker_every=3, masker_start=4, masker_reg=0.5)
    cfg = engine_config(TrainConfig(TrainSettings(amp="bf16"), mlo, Resolved(mask_ratio=0.6)))
    assert (cfg.hypergrad, cfg.unroll_steps, cfg.masker_every, cfg.masker_start, cfg.masker_reg) == \
        ("unroll", 2, 3, 4, 0.5)
    assert (cfg.ratio, cfg.amp, cfg.level2, cfg.darts_paths, cfg.darts_fd) == (0.6, "bf16", "head", "both", "central")


def test_the_record_layout_of_train_config_is_unchanged_but_for_the_recipe_keys_appended():
    flat = {"steps": 7, "batch_size": 16, "lr": 0.001, "weight_decay": 0.05, "optimizer": "adamw", "warmup_steps": 1,
            "mask_ratio": 0.6, "seed": 3, "log_every": 5, "ckpt_every": 10, "keep_checkpoints": 2,
            "mlo": {**MLOSettings().__dict__, "masker_lr": 0.01}, "skip_nonfinite": False, "amp": "none",
            "mask_noise": "rank", "compile": "none", "world_size": 1}  # fmt: skip
    cfg = TrainConfig.from_dict(flat)  # a record written before --accum-iter and --min-lr: what it ran with
    added = {"accum_iter": 1, "min_lr": 0.0, "decoder_ratio": None, "decoder_rule": "auto"}  # (issue 31: the last two)
    assert cfg.to_dict() == {**flat, **added}
    assert list(cfg.to_dict()) == [*flat, *added]
    assert TrainConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()
    assert (cfg.steps, cfg.resolved.mask_ratio, cfg.train.lr, cfg.mlo.masker_lr) == (7, 0.6, 0.001, 0.01)
    with pytest.raises(ValueError, match="unknown training setting"):
        TrainConfig.from_dict({**flat, "epochs_x": 1})


SCRIPT = """
import json, sys
from pathlib import Path
sys.path.insert(0, {golden!r})
import record
from maskkit.checkpoint import save_checkpoint
from maskkit.run import PolicyConfig, RunConfig, TrainSettings, create_run
from maskkit.train import train
out = Path(sys.argv[1])
results = {{}}
for case, policy, steps, batch in {cases!r}:
    config = RunConfig(policy=PolicyConfig(policy), train=TrainSettings(steps=steps, batch_size=batch, log_every=5,
                                                                        ckpt_every=10, seed=3))
    trainer = create_run(config, out / case).trainer
    train(trainer, out / case)  # the loop itself, not the run layer's train_run
    save_checkpoint(out / case / "model.pt", trainer.weights())
    results[case] = {{"step_class": type(trainer.train_step).__name__, **record.digest(out / case)}}
print(json.dumps(results))
"""


@pytest.mark.slow
def test_the_trainer_with_either_step_reproduces_the_golden_runs(tmp_path):
    """In-process Trainer + train() (no CLI) with a PlainStep (random, hpm) and an MLOStep (learned darts) gives
    the golden fixtures' metrics and weights bit for bit."""
    sys.path.insert(0, str(GOLDEN))
    import record

    cases = [("random", "random", 30, 128), ("hpm", "hpm", 30, 128), ("learned-darts", "learned", 20, 64)]
    code = SCRIPT.format(golden=str(GOLDEN), cases=cases)
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=record.ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for case, want_class in (("random", "PlainStep"), ("hpm", "PlainStep"), ("learned-darts", "MLOStep")):
        expected = json.loads(record.fixture(case).read_text())
        got = results[case]
        assert got["step_class"] == want_class
        assert got["metrics"] == expected["metrics"], case
        assert got["tensors"] == expected["tensors"], case


@pytest.mark.parametrize("name,policy", [("mae_step", "random"), ("hpm_step", "hpm")])
def test_the_bench_plain_contender_is_the_trainers_step_with_the_same_losses(name, policy):
    """mlo_bench's plain contender runs PlainStep; the MAE step written out by hand (the bench's code before
    issue 21) on the same seed gives the identical loss and weights."""
    from maskkit.adapters.timm import create_mae
    from maskkit.mlo_bench import CYCLE, make_contender

    torch.manual_seed(0)  # hpm's scorer initialises from the global RNG
    cycle = make_contender(name, preset="micro", batch=8)
    assert isinstance(cycle.step, PlainStep) and cycle.engine is None
    cycle()

    torch.manual_seed(0)
    mae = create_mae("micro", seed=0)
    gen = torch.Generator().manual_seed(0)
    shape = (mae.in_chans, *tuple(getattr(mae, "img_size", (32, 32))))
    images = [torch.randn(8, *shape, generator=gen) for _ in range(CYCLE)]
    ref_policy = create_sized_policy(policy, embed_dim=mae.embed_dim, num_patches=mae.num_patches, ratio=0.75)
    opt = torch.optim.AdamW(param_groups(nn.ModuleDict({"mae": mae, "policy": ref_policy}), 1e-3), lr=1e-4,
                            betas=(0.9, 0.95))
    mask_gen = torch.Generator().manual_seed(0)
    for x in images:
        out = mae_step_loss(mae, ref_policy, x, generator=mask_gen)
        opt.zero_grad(set_to_none=True)
        out.total_loss.backward()
        opt.step()
    assert torch.equal(cycle.step.last_loss, out.total_loss.detach())
    got = weights(cycle.step.mae)
    assert all(torch.equal(v, got[k]) for k, v in weights(mae).items())
