"""MLOEngine: the downstream signal reaches the masker, schedule, result keys, resume, adapters."""

import io
import math
import pathlib
import sys

import pytest
import torch
from torch import nn

from maskkit.adapters.timm import create_mae
from maskkit.mlo import DIAGNOSTIC_KEYS, MASKER_STEP_KEYS, STEP_KEYS, MLOConfig, MLOEngine, default_optimizers
from maskkit.policies import create_policy

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
LEFT = torch.zeros(4, 4, dtype=torch.bool)
LEFT[:, :2] = True
LEFT = LEFT.flatten()  # [16] patches of the left half of a 4 x 4 grid


def regions_batch(n: int, g: torch.Generator):
    """16x16 grey images: the left half holds horizontal (label 0) or vertical (label 1) stripes
    plus a little noise; the right half is pure noise, independent of the label."""
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 1, 16, 16, generator=g)
    phase = torch.randint(0, 2, (n, 1, 1), generator=g)
    idx = torch.arange(16)
    rows = ((idx[:, None] + phase) % 2).float().expand(n, 16, 16) * 2 - 1
    cols = ((idx[None, :] + phase) % 2).float().expand(n, 16, 16) * 2 - 1
    stripes = torch.where(y[:, None, None] == 0, rows, cols)
    x[:, 0, :, :8] = stripes[:, :, :8] + 0.3 * torch.randn(n, 16, 8, generator=g)
    return x, y


def small_mae(seed=0, **kw):
    return create_mae("tiny", img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2,
                      decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=1, seed=seed, **kw)


def make_engine(seed=0, config=None, mae=None, train_n=16, val_n=16, lrs=(1e-3, 1e-2, 3e-3)):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    mae = small_mae(seed) if mae is None else mae
    head = nn.Linear(mae.embed_dim, 2)
    masker = create_policy("learned", embed_dim=mae.embed_dim, num_patches=16, hidden_dim=32)
    engine = MLOEngine(
        mae, masker, head,
        mae_optimizer=torch.optim.AdamW(mae.parameters(), lr=lrs[0], betas=(0.9, 0.95), weight_decay=1e-3),
        head_optimizer=torch.optim.AdamW(head.parameters(), lr=lrs[1]),
        masker_optimizer=torch.optim.AdamW(masker.parameters(), lr=lrs[2]),
        config=config or MLOConfig(),
        train_batches=lambda: regions_batch(train_n, g), val_batches=lambda: regions_batch(val_n, g),
    )
    return engine, g


def left_right_logit_gap(engine, images):
    """Mean masking log-odds of the informative (left) patches minus the noise (right) ones."""
    with torch.no_grad():
        logits = engine.masker.logits(engine.mae.patch_tokens(images))  # [B, 16]
    return (logits[:, LEFT].mean() - logits[:, ~LEFT].mean()).item()


@pytest.mark.slow
def test_downstream_signal_raises_masking_of_informative_patches():
    """Theory: d val / d p_n = -<grad l_n, D v> m_n / sum(m): weighting the reconstruction of a patch
    that carries the label helps the validation loss, weighting pure noise does not, so the masker's
    odds of hiding (and weighting) the left patches must rise against the right ones."""
    engine, g = make_engine(seed=0, train_n=32, val_n=128)
    probe, _ = regions_batch(256, torch.Generator().manual_seed(123))
    before = left_right_logit_gap(engine, probe)
    for _ in range(300):
        engine.step(regions_batch(64, g)[0])
    after = left_right_logit_gap(engine, probe)
    assert abs(before) < 0.02  # the masker starts (nearly) indifferent
    assert after - before > 0.2, (before, after)


def test_step_keys_floats_and_schedule():
    cfg = MLOConfig(masker_every=3)
    engine, g = make_engine(config=cfg)
    for s in range(7):
        masker_before = [p.detach().clone() for p in engine.masker.parameters()]
        head_before = [p.detach().clone() for p in engine.head.parameters()]
        mae_before = [p.detach().clone() for p in engine.mae.parameters()]
        due = engine.masker_due()
        stats = engine.step(regions_batch(8, g)[0])
        assert due == ((s + 1) % 3 == 0)
        expected = set(STEP_KEYS) | set(DIAGNOSTIC_KEYS) | (set(MASKER_STEP_KEYS) if due else set())
        assert set(stats) == expected
        assert all(type(v) is float and math.isfinite(v) for v in stats.values())
        assert stats["step"] == s and stats["masker_updated"] == float(due)
        changed = lambda before, m: any(not torch.equal(a, b) for a, b in zip(before, m.parameters(), strict=False))  # noqa: E731
        assert changed(masker_before, engine.masker) == due
        assert changed(head_before, engine.head) == due
        assert changed(mae_before, engine.mae)  # a pretrain step every iteration
        assert 0 < stats["mask_prob_mean"] < 1 and 0 < stats["mask_entropy"] <= math.log(2)
        assert stats["lr_masker"] == 3e-3


def _params(engine):
    return [p.detach().clone() for m in (engine.mae, engine.head, engine.masker) for p in m.parameters()]


@pytest.mark.parametrize("config", [MLOConfig(), MLOConfig(hypergrad="unroll", unroll_steps=2)],
                         ids=["darts", "unroll_k2"])
def test_state_dict_round_trip_continues_identically(config):
    engine, g = make_engine(seed=1, config=config)
    sched = torch.optim.lr_scheduler.StepLR(engine.mae_optimizer, step_size=3, gamma=0.5)
    engine.schedulers["mae"] = sched
    batches = [regions_batch(8, g) for _ in range(10)]
    for x, _ in batches[:4]:
        engine.step(x, train_batch=batches[-1], val_batch=batches[-2])
    buf = io.BytesIO()
    torch.save(engine.state_dict(), buf)
    ref = [engine.step(x, train_batch=batches[-1], val_batch=batches[-2]) for x, _ in batches[4:8]]
    ref_params = _params(engine)

    other, _ = make_engine(seed=7, config=config)  # different initial weights
    other.schedulers["mae"] = torch.optim.lr_scheduler.StepLR(other.mae_optimizer, step_size=3, gamma=0.5)
    buf.seek(0)
    other.load_state_dict(torch.load(buf, weights_only=False))
    got = [other.step(x, train_batch=batches[-1], val_batch=batches[-2]) for x, _ in batches[4:8]]
    assert got == ref  # bit-identical stats, lr schedule included
    assert all(torch.equal(a, b) for a, b in zip(_params(other), ref_params, strict=False))


def test_unroll_window_refuses_mid_cycle_checkpoint():
    engine, g = make_engine(config=MLOConfig(hypergrad="unroll", unroll_steps=2))
    engine.step(regions_batch(8, g)[0])
    with pytest.raises(RuntimeError, match="unroll window"):
        engine.state_dict()


@pytest.mark.parametrize("clip", [None, 0.05], ids=["no_clip", "clip"])
def test_darts_and_unroll_take_the_same_real_steps(clip):
    """The hypergradient method changes only the masker's update: the MAE and head steps are the same,
    gradient clipping included (float64, so that only the methods and not rounding are compared)."""
    engines = []
    for method, k in (("darts", 1), ("unroll", 2)):
        config = MLOConfig(hypergrad=method, unroll_steps=k, grad_clip=clip, head_grad_clip=clip)
        engine, _ = make_engine(seed=3, config=config, mae=small_mae(3).double())
        engine.head.double(), engine.masker.double()
        engines.append(engine)
    g = torch.Generator().manual_seed(0)
    batches = [[t.double() if t.is_floating_point() else t for t in regions_batch(8, g)] for _ in range(4)]
    for x, _ in batches[:2]:
        sa, sb = (e.step(x, train_batch=batches[2], val_batch=batches[3]) for e in engines)
        assert sa["pretrain_loss"] == pytest.approx(sb["pretrain_loss"], rel=1e-10)
    assert sa["val_loss"] == pytest.approx(sb["val_loss"], rel=1e-10)
    assert sa["head_loss"] == pytest.approx(sb["head_loss"], rel=1e-10)
    a, b = engines
    for m in ("mae", "head"):
        for p, q in zip(getattr(a, m).parameters(), getattr(b, m).parameters(), strict=False):
            torch.testing.assert_close(p, q, rtol=1e-8, atol=1e-10)


def _official_mae():
    sys.path.insert(0, str(EXAMPLES))
    try:
        import models_mae

        from maskkit.adapters.official_mae import timm_compat, wrap

        with timm_compat():
            return wrap(models_mae.mae_vit_tiny_patch4(img_size=16, in_chans=1))
    finally:
        sys.path.remove(str(EXAMPLES))


def _hf_mae():
    pytest.importorskip("transformers")
    from maskkit.adapters.hf import create_hf_mae, wrap

    return wrap(create_hf_mae(image_size=16, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=2,
                              num_attention_heads=2, intermediate_size=64, decoder_hidden_size=16,
                              decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                              decoder_intermediate_size=32))


@pytest.mark.parametrize("build", [_official_mae, _hf_mae], ids=["official_wrap", "hf"])
@pytest.mark.parametrize("hypergrad", ["darts", "unroll"])
def test_other_adapters(build, hypergrad):
    torch.manual_seed(0)
    engine, g = make_engine(config=MLOConfig(hypergrad=hypergrad), mae=build())
    masker_before = [p.detach().clone() for p in engine.masker.parameters()]
    for _ in range(2):
        stats = engine.step(regions_batch(8, g)[0])
    assert math.isfinite(stats["val_loss"]) and stats["masker_grad_norm"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(masker_before, engine.masker.parameters(), strict=False))


def test_default_optimizers_groups():
    mae = small_mae()
    head, masker = nn.Linear(32, 2), create_policy("learned", embed_dim=32, num_patches=16)
    opts = default_optimizers(mae, head, masker, preset="imagenet")
    groups = opts["mae_optimizer"].param_groups
    names = {id(p): n for n, p in mae.named_parameters()}
    decayed = [names[id(p)] for gr in groups if gr["weight_decay"] > 0 for p in gr["params"]]
    skipped = [names[id(p)] for gr in groups if gr["weight_decay"] == 0 for p in gr["params"]]
    assert all(mae.get_parameter(n).ndim > 1 for n in decayed)
    assert not any(k in n for n in decayed for k in ("pos_embed", "cls_token", "mask_token"))
    assert "encoder.cls_token" in skipped and "mask_token" in skipped and any(n.endswith(".bias") for n in skipped)
    assert groups[0]["lr"] == 1.5e-4 and groups[0]["betas"] == (0.9, 0.95) and groups[0]["weight_decay"] == 0.05
    assert opts["head_optimizer"].param_groups[0]["lr"] == 5e-4
    assert opts["masker_optimizer"].param_groups[0]["lr"] == 5e-5
    with pytest.raises(ValueError, match="preset"):
        default_optimizers(mae, head, masker, preset="mnist")


def test_bad_input():
    engine, g = make_engine()
    engine.train_batches = None
    engine.step(regions_batch(8, g)[0])  # not a masker step: no labeled batch needed
    with pytest.raises(ValueError, match="train_batch"):
        engine.step(regions_batch(8, g)[0])
    with pytest.raises(ValueError, match="images"):
        engine.step(torch.zeros(16, 16))
    with pytest.raises(ValueError, match="unroll_steps"):
        MLOConfig(hypergrad="unroll", unroll_steps=3, masker_every=2)
    with pytest.raises(ValueError, match="hypergrad"):
        MLOConfig(hypergrad="reinforce")
    with pytest.raises(ValueError, match="masker_every"):
        MLOConfig(masker_every=0)
    with pytest.raises(TypeError, match="learnable MaskPolicy"):
        MLOEngine(small_mae(), create_policy("random"), nn.Linear(32, 2), mae_optimizer=engine.mae_optimizer,
                  head_optimizer=engine.head_optimizer, masker_optimizer=engine.masker_optimizer)


@pytest.mark.slow
def test_official_loop_example_runs():
    import os
    import re
    import subprocess

    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "official_mae_mlo.py"), "--epochs", "1", "--num_samples", "256",
         "--batch_size", "32"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    final = re.search(r"final loss: (\S+), validation accuracy of the head: (\S+)", proc.stdout)
    assert final and math.isfinite(float(final.group(1))) and 0.0 <= float(final.group(2)) <= 1.0
    assert "val_loss" in proc.stdout  # the masker/head steps ran inside the loop


@pytest.mark.parametrize("hypergrad", ["darts", "unroll"])
def test_optimizers_without_a_known_derivative_are_refused_at_construction(hypergrad):
    import torch_optimizer

    mae = create_mae("micro", seed=0)
    masker = create_policy("learned", embed_dim=mae.embed_dim, num_patches=mae.num_patches, hidden_dim=8)
    head = torch.nn.Linear(mae.embed_dim, 10)
    opts = default_optimizers(mae, head, masker)
    opts["mae_optimizer"] = torch_optimizer.Lamb(mae.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="Lamb"):
        MLOEngine(mae, masker, head, **opts, config=MLOConfig(hypergrad=hypergrad))


def test_default_optimizers_refuse_a_masker_without_parameters():
    mae = create_mae("micro", seed=0)
    with pytest.raises(TypeError, match="masker must be a learnable MaskPolicy"):
        default_optimizers(mae, nn.Linear(mae.embed_dim, 10), create_policy("random"))


def test_the_masker_ratio_is_used_unless_the_config_sets_one():
    mae = create_mae("micro", seed=0)
    masker = create_policy("learned", ratio=0.5, embed_dim=mae.embed_dim, num_patches=mae.num_patches, hidden_dim=8)
    head = nn.Linear(mae.embed_dim, 10)
    images = torch.rand(4, 1, 8, 8)
    seen = []
    masker.register_forward_hook(lambda module, args, plan: seen.append(int(plan.mask.sum(1)[0])))
    for ratio, hidden in ((None, 8), (0.75, 12)):  # N = 16 patches
        engine = MLOEngine(mae, masker, head, **default_optimizers(mae, head, masker), config=MLOConfig(ratio=ratio))
        engine.step(images)
        assert seen[-1] == hidden


@pytest.mark.parametrize("hypergrad", ["darts", "unroll"])
@pytest.mark.slow
def test_masker_warmup_trains_the_head_but_not_the_masker(hypergrad):
    """masker_start=5, masker_every=2: cycles end at steps 1, 3, 5, 7; the masker first moves at 5."""
    cfg = MLOConfig(masker_every=2, masker_start=5, hypergrad=hypergrad)
    engine, g = make_engine(config=cfg)
    assert [engine.masker_learning(s) for s in range(8)] == [False] * 4 + [True] * 4
    for s in range(8):
        masker_before = [p.detach().clone() for p in engine.masker.parameters()]
        head_before = [p.detach().clone() for p in engine.head.parameters()]
        stats = engine.step(regions_batch(8, g)[0])
        due, learning = (s + 1) % 2 == 0, s >= 5
        changed = lambda before, m: any(not torch.equal(a, b) for a, b in zip(before, m.parameters(), strict=False))  # noqa: E731
        assert changed(head_before, engine.head) == due  # the head trains during the warm-up too
        assert changed(masker_before, engine.masker) == (due and learning)
        assert stats["masker_updated"] == float(due and learning)
        assert ("masker_grad_norm" in stats) == (due and learning)
        assert ("val_loss" in stats) == due


def test_masker_warmup_changes_nothing_but_the_masker_updates():
    """Before masker_start the run is an MLO run whose masker optimizer never steps: the MAE takes
    exactly the steps it takes in an engine with a frozen masker (masker lr 0)."""
    a, ga = make_engine(seed=3, config=MLOConfig(masker_start=6))
    b, gb = make_engine(seed=3, lrs=(1e-3, 1e-2, 0.0))
    for _ in range(6):
        a.step(regions_batch(8, ga)[0])
        b.step(regions_batch(8, gb)[0])
    for p, q in zip(a.mae.parameters(), b.mae.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    for p, q in zip(a.head.parameters(), b.head.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_masker_start_is_checked():
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="masker_start"):
            MLOConfig(masker_start=bad)


@pytest.mark.parametrize("weighting", ["normalized", "straight"])
def test_mask_statistics_are_of_the_probabilities_whatever_the_weighting(weighting):
    engine, g = make_engine(seed=2)
    engine.masker.weighting = weighting
    images = regions_batch(8, torch.Generator().manual_seed(5))[0]
    stats = engine.step(images)
    with torch.no_grad():
        probs = engine.masker.probabilities(engine.mae.patch_tokens(images))
    # the first step's masker is the one that chose the masks; the MAE step moved the tokens only a little
    assert abs(stats["mask_prob_mean"] - float(probs.mean())) < 1e-3
    assert stats["mask_prob_mean"] != pytest.approx(1.0)


def test_ridge_level2_moves_the_masker_and_leaves_the_head():
    engine, g = make_engine(seed=4, config=MLOConfig(level2="ridge", ridge=0.5))
    masker_before = [p.detach().clone() for p in engine.masker.parameters()]
    head_before = [p.detach().clone() for p in engine.head.parameters()]
    for _ in range(4):
        stats = engine.step(regions_batch(8, g)[0])
    assert stats["masker_updated"] == 1.0 and stats["masker_grad_norm"] > 0
    assert 0 <= stats["val_acc"] <= 1 and math.isfinite(stats["val_loss"])
    assert any(not torch.equal(a, b) for a, b in zip(masker_before, engine.masker.parameters(), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(head_before, engine.head.parameters(), strict=True))
    with pytest.raises(ValueError, match="level2"):
        MLOConfig(level2="knn")
    with pytest.raises(ValueError, match="hypergrad='darts' only"):
        MLOConfig(level2="ridge", hypergrad="unroll")
    with pytest.raises(ValueError, match="ridge must be a positive"):
        MLOConfig(ridge=0)


# ---- anti-collapse penalty, level-3 extra terms, progress ----------------------------------------


def test_prior_kl_and_its_gradient_against_finite_differences():
    from maskkit.mlo import prior_kl

    p = torch.tensor([[0.75, 0.2, 0.9]], dtype=torch.float64)
    expected = sum(q * math.log(q / 0.75) + (1 - q) * math.log((1 - q) / 0.25) for q in p[0].tolist()) / 3
    assert float(prior_kl(p, 0.75)) == pytest.approx(expected, rel=1e-12)
    assert float(prior_kl(torch.full((2, 5), 0.75, dtype=torch.float64), 0.75)) == 0.0
    torch.manual_seed(0)
    masker = create_policy("learned", embed_dim=6, hidden_dim=8, pos_dim=4).double()
    torch.nn.init.normal_(masker.net[-1].weight, std=0.5)
    tokens = torch.randn(3, 16, 6, dtype=torch.float64)

    def penalty() -> torch.Tensor:
        return prior_kl(masker.probabilities(tokens), 0.75)

    grads = torch.autograd.grad(penalty(), list(masker.parameters()))
    direction = [torch.randn_like(p) for p in masker.parameters()]
    eps = 1e-6
    with torch.no_grad():
        for p, d in zip(masker.parameters(), direction, strict=True):
            p.add_(d, alpha=eps)
        up = float(penalty())
        for p, d in zip(masker.parameters(), direction, strict=True):
            p.add_(d, alpha=-2 * eps)
        down = float(penalty())
    fd = (up - down) / (2 * eps)
    analytic = sum(float((g * d).sum()) for g, d in zip(grads, direction, strict=True))
    assert analytic == pytest.approx(fd, rel=1e-6)


def _masker_grads(engine, steps, g):
    """The gradients the engine hands to the masker optimizer at each masker step."""
    seen = []
    original = engine._masker_update

    def spy(grads):
        seen.append([x.detach().clone() for x in grads])
        return original(grads)

    engine._masker_update = spy
    for _ in range(steps):
        engine.step(regions_batch(8, g)[0])
    return seen


@pytest.mark.parametrize("hypergrad", ["darts", "unroll"])
def test_masker_reg_adds_exactly_its_gradient_at_the_masker_step(hypergrad):
    from maskkit.mlo import prior_kl

    weight = 0.3
    plain, g1 = make_engine(seed=4, config=MLOConfig(hypergrad=hypergrad))
    reg, g2 = make_engine(seed=4, config=MLOConfig(hypergrad=hypergrad, masker_reg=weight))
    # iteration 2 is the first masker step (masker_every 2); its pretrain batch is the second draw
    replay = torch.Generator().manual_seed(4)
    regions_batch(8, replay)
    batch = regions_batch(8, replay)[0]
    masker_copy = create_policy("learned", embed_dim=32, num_patches=16, hidden_dim=32)
    masker_copy.load_state_dict(reg.masker.state_dict())  # the masker does not move before that step
    a = _masker_grads(plain, 2, g1)
    first = reg.step(regions_batch(8, g2)[0])
    tokens = reg.mae.patch_tokens(batch).detach()  # the MAE after its first step makes the tokens
    expected_extra = torch.autograd.grad(weight * prior_kl(masker_copy.probabilities(tokens), 0.75),
                                         list(masker_copy.parameters()))
    b = _masker_grads(reg, 1, g2)
    assert "masker_prior_kl" not in first
    assert len(a) == len(b) == 1
    for x, y, e in zip(a[0], b[0], expected_extra, strict=True):
        torch.testing.assert_close(y - x, e, rtol=1e-4, atol=1e-7)


def test_masker_reg_zero_is_bit_identical_and_checked():
    a, g1 = make_engine(seed=5)
    b, g2 = make_engine(seed=5, config=MLOConfig(masker_reg=0.0))
    for _ in range(4):
        sa, sb = a.step(regions_batch(8, g1)[0]), b.step(regions_batch(8, g2)[0])
        assert sa == sb or all(math.isnan(sa[k]) and math.isnan(sb[k]) or sa[k] == sb[k] for k in sa)
    for p, q in zip(a.masker.parameters(), b.masker.parameters(), strict=True):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="masker_reg"):
        MLOConfig(masker_reg=-1.0)
    with pytest.raises(ValueError, match="total_steps"):
        MLOConfig(total_steps=0)


@pytest.mark.slow
def test_masker_reg_keeps_probabilities_near_the_ratio():
    stats = {}
    for weight in (0.0, 5.0):
        engine, g = make_engine(seed=6, lrs=(1e-3, 1e-2, 3e-2), config=MLOConfig(masker_reg=weight))
        for _ in range(40):
            out = engine.step(regions_batch(16, g)[0])
        stats[weight] = out["mask_prob_std"], abs(out["mask_prob_mean"] - 0.75)
    assert stats[5.0][1] < stats[0.0][1]  # pulled toward the ratio


def test_engine_passes_progress_to_the_masker():
    seen = []

    class Recording(type(create_policy("learned"))):
        def forward(self, tokens, **context):
            seen.append(context.get("progress"))
            return super().forward(tokens, **context)

    engine, g = make_engine(seed=7, config=MLOConfig(total_steps=8))
    recording = Recording(embed_dim=32, num_patches=16, hidden_dim=32)
    recording.load_state_dict(engine.masker.state_dict())
    engine.masker = recording
    engine.masker_optimizer = torch.optim.AdamW(recording.parameters(), lr=1e-3)
    for _ in range(3):
        engine.step(regions_batch(8, g)[0])
    engine.step(regions_batch(8, g)[0], progress=0.9)
    assert seen == [0.0, 1 / 8, 2 / 8, 0.9]


def test_a_maskers_own_aux_loss_joins_its_gradient_at_the_masker_step():
    learned = type(create_policy("learned"))

    class Penalised(learned):
        def aux_loss(self, plan, per_patch):
            return 0.2 * (plan.scores ** 2).mean()

    plain, g1 = make_engine(seed=8)
    own, g2 = make_engine(seed=8)
    penalised = Penalised(embed_dim=32, num_patches=16, hidden_dim=32)
    penalised.load_state_dict(own.masker.state_dict())
    own.masker = penalised
    own.masker_optimizer = torch.optim.AdamW(penalised.parameters(), lr=3e-3)
    replay = torch.Generator().manual_seed(8)
    regions_batch(8, replay)
    batch = regions_batch(8, replay)[0]  # the pretrain batch of the first masker step
    copy_ = create_policy("learned", embed_dim=32, num_patches=16, hidden_dim=32)
    copy_.load_state_dict(penalised.state_dict())
    a = _masker_grads(plain, 2, g1)
    own.step(regions_batch(8, g2)[0])
    tokens = own.mae.patch_tokens(batch).detach()
    expected = torch.autograd.grad(0.2 * (copy_.logits(tokens) ** 2).mean(), list(copy_.parameters()))
    b = _masker_grads(own, 1, g2)
    for x, y, e in zip(a[0], b[0], expected, strict=True):
        torch.testing.assert_close(y - x, e, rtol=1e-4, atol=1e-7)
