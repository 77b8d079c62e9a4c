"""The official MAE recipe's flags (issue 22, item 7): --accum-iter (K micro-batches give the gradient and
the update of one batch of K x b, with the same masks), --blr (lr = blr x effective batch / 256, recorded),
--min-lr (the official cosine floor), --warmup-epochs and --epochs in steps of the effective batch, the
one-line errors, the official spellings as aliases, a real accumulated run stopped by SIGTERM that resumes
bit-identically, and --skip-nonfinite dropping a whole accumulated step."""

from __future__ import annotations

import json
import math
import signal

import pytest
import torch
from test_cli import fails, ok
from test_resume import assert_same_run, build, finish, lines, pretrain, signal_after, stopped_step

from maskkit.checkpoint import list_checkpoints, load_checkpoint
from maskkit.optim import warmup_cosine
from maskkit.run import RunConfig, RunRecord
from maskkit.run.builder import train_section
from maskkit.train import INJECT_NAN_ENV, TrainConfig, TrainSettings, parse_inject_nan
from maskkit.train.config import ACCUM_MLO, DEFAULT_LR
from maskkit.train.plain import mae_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")

#: a short CLI run on digits (the micro model)
SHORT = ["--policy", "random", "--log-every", "1", "--ckpt-every", "100", "--no-progress"]


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def said(result) -> str:
    """The command's output with rich's line wrapping undone."""
    return " ".join(result.output.split())


def config(run) -> dict:
    return json.loads((run / "config.json").read_text())


# ---- --accum-iter: the same step as one big batch ----------------------------------------------------


@pytest.mark.parametrize("noise", ["sample", "rank"])
@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_k_micro_batches_give_the_gradient_and_update_of_one_batch_of_k_times_b(k, noise, optimizer):
    b, lr = 8, {"sgd": 0.05, "adamw": 1.5e-3}[optimizer]
    flat = {"steps": 5, "warmup_steps": 0, "mask_noise": noise, "optimizer": optimizer, "lr": lr}
    big = build("random", batch_size=k * b, **flat)
    acc = build("random", batch_size=b, accum_iter=k, **flat)
    assert all(torch.equal(p, q) for p, q in zip(big.mae.parameters(), acc.mae.parameters(), strict=True))
    if noise == "sample":  # micro-batch m's rows are the big batch's rows m*b .. m*b + b - 1
        whole = big._sample_noise(k * b)
        for m in range(k):
            assert torch.equal(acc._sample_noise(b, m), whole[m * b : (m + 1) * b])
    for _ in range(2):  # the second step also compares the optimizer's state after one update
        one, many = big.step(), acc.step()
        assert many["loss"] == pytest.approx(one["loss"], rel=1e-5)  # equal hidden counts: the same mean
        for (name, p), q in zip(big.mae.named_parameters(), acc.mae.parameters(), strict=True):
            if p.grad is None:  # a parameter the loss does not reach (none in both runs)
                assert q.grad is None, name
                continue
            scale = float(p.grad.abs().max())
            error = float((q.grad - p.grad).abs().max())  # float rounding only
            assert error <= 1e-5 * scale, f"gradient of {name}"
            if optimizer == "sgd":  # the update is linear in the gradient
                assert float((q - p).detach().abs().max()) <= 1e-6, f"updated {name}"
            else:  # AdamW divides by sqrt(v): an entry whose gradient is 0 up to rounding (the attention keys'
                # bias, to which softmax is blind) moves by +-lr on rounding noise; compare the others to lr/100
                real = p.grad.abs() > 1e-4 * scale
                assert float((q - p).detach()[real].abs().max()) <= lr / 100, f"updated {name}"
    assert acc.loaders["train"].stream.position == 2 * k and big.loaders["train"].stream.position == 2
    assert acc.step_count == big.step_count == 2


def _accumulating_rank(rank: int, world: int, port: int, out: str) -> None:
    """One of `world` processes: 4 steps of 2 micro-batches of 4 (sample noise, SGD); saves its final weights."""
    import os

    from test_distributed import build as build_ranked

    from maskkit.distributed import cleanup, init_from_env

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    dist = init_from_env("cpu")
    try:
        trainer = build_ranked("random", 4, dist, accum_iter=2, mask_noise="sample", optimizer="sgd", lr=0.05)
        losses = [trainer.step()["loss"] for _ in range(4)]
        torch.save({"losses": losses, "mae": trainer.mae.state_dict()}, f"{out}/rank{rank}.pt")
    finally:
        cleanup(dist)


@pytest.mark.slow
def test_two_processes_accumulating_two_micro_batches_of_b_match_one_process_of_4b(tmp_path):
    import torch.multiprocessing as mp
    from test_distributed import build as build_ranked
    from test_distributed import free_port

    from maskkit.distributed import SINGLE

    mp.spawn(_accumulating_rank, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    single = build_ranked("random", 16, SINGLE, mask_noise="sample", optimizer="sgd", lr=0.05)
    losses = [single.step()["loss"] for _ in range(4)]
    assert ranks[0]["losses"] == ranks[1]["losses"]
    assert ranks[0]["losses"] == pytest.approx(losses, rel=1e-5)  # the same images and masks in every step
    for name, t in single.mae.state_dict().items():
        assert torch.equal(ranks[0]["mae"][name], ranks[1]["mae"][name]), name
        torch.testing.assert_close(ranks[0]["mae"][name], t, rtol=1e-5, atol=1e-6, msg=name)


def test_the_rank_generator_draws_k_micro_batches_as_one_draw_of_k_times_b_rows_on_cpu():
    for b, n, k in ((8, 16, 2), (16, 16, 4), (5, 49, 3), (128, 196, 2)):
        one = torch.rand(k * b, n, generator=torch.Generator().manual_seed(11))
        gen = torch.Generator().manual_seed(11)
        assert torch.equal(torch.cat([torch.rand(b, n, generator=gen) for _ in range(k)]), one)


def test_the_logged_loss_is_the_mean_of_the_micro_batches():
    acc = build("random", batch_size=8, accum_iter=2, steps=3, warmup_steps=0, mask_noise="sample")
    parts = []
    original = acc.train_step.run

    def run(images, context, **kw):
        out = original(images, context, **kw)
        parts.append(out[0]["loss"])
        return out

    acc.train_step.run = run
    logged = acc.step()["loss"]
    assert len(parts) == 2 and logged == (parts[0] + parts[1]) / 2


def test_a_learned_masker_refuses_accumulation_in_one_line(tmp_path):
    learned = ["pretrain", "--policy", "learned", "--accum-iter", "2", "--steps", "2"]
    fails(ACCUM_MLO, *learned, "--out", tmp_path / "r")
    with pytest.raises(ValueError, match="--accum-iter above 1 needs a policy"):
        build("learned", accum_iter=2, steps=2)
    ok("pretrain", "--policy", "learned", "--freeze-masker", "--accum-iter", "2", "--steps", "2", "--batch-size", "8",
       "--out", tmp_path / "frozen", *SHORT[2:])  # fmt: skip  # a frozen masker: plain MAE steps, accumulated


# ---- --blr, --min-lr, --warmup-epochs, --epochs ------------------------------------------------------


@pytest.mark.parametrize(
    "batch, accum, world, blr, expected",
    [(64, 8, 8, 1.5e-4, 2.4e-3), (128, 1, 1, 1.5e-4, 7.5e-5), (16, 2, 1, 1e-3, 1.25e-4), (32, 4, 2, 2e-4, 2e-4),
     (256, 1, 1, 1e-3, 1e-3)],
)  # fmt: skip
def test_blr_is_scaled_by_the_effective_batch_over_256(batch, accum, world, blr, expected):
    t = TrainSettings(batch_size=batch, accum_iter=accum, blr=blr)
    assert t.effective_batch(world) == batch * accum * world
    assert t.peak_lr(world) == blr * batch * accum * world / 256
    assert t.peak_lr(world) == pytest.approx(expected, rel=1e-12)
    assert TrainSettings(batch_size=batch, accum_iter=accum, lr=3e-4).peak_lr(world) == 3e-4  # --lr as it is
    assert TrainSettings(batch_size=batch, accum_iter=accum).peak_lr(world) == DEFAULT_LR
    record = train_section(RunConfig(train=t), 10_000, world)
    assert (record["lr"], record["accum_iter"], record["world_size"]) == (t.peak_lr(world), accum, world)


def test_a_blr_run_records_the_resolved_lr_and_shows_it(tmp_path):
    run = tmp_path / "blr"
    out = ok("pretrain", "--blr", "1e-3", "--batch-size", "16", "--accum-iter", "2", "--steps", "4",
             "--warmup-steps", "2", "--out", run, *SHORT)  # fmt: skip
    out = said(out)
    record = config(run)
    assert record["train"]["lr"] == 1e-3 * 32 / 256 and record["train"]["accum_iter"] == 2
    assert record["config"]["train"]["blr"] == 1e-3 and record["config"]["train"]["lr"] is None
    newest = list_checkpoints(run / "checkpoints")[-1]
    assert load_checkpoint(newest)["config"]["lr"] == 1e-3 * 32 / 256
    assert max(m["lr"] for m in metrics(run)) == pytest.approx(1.25e-4, rel=1e-12)
    assert "of 32 (16 x 2 accumulated)" in out and "lr 0.000125 (blr 0.001 x 32 / 256)" in out
    assert RunRecord.read(run).train_config.resolved.lr == 1e-3 * 32 / 256  # what a resume builds from


def lrs(steps: int, warmup: int, lr: float, min_lr: float) -> list[float]:
    """The MAE optimizer's learning rate at every step of a run (as the trainer steps its scheduler)."""
    cfg = TrainConfig(steps=steps, warmup_steps=warmup, lr=lr, min_lr=min_lr)
    optimizer, scheduler = mae_optimizer(torch.nn.Linear(2, 2), cfg)
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_min_lr_is_the_official_cosine_floor_and_zero_is_the_plain_cosine_bit_for_bit():
    steps, warmup, lr, floor = 40, 6, 2e-3, 1e-4
    for s, got in enumerate(lrs(steps, warmup, lr, floor)):
        if s < warmup:
            want = lr * (s + 1) / warmup
        else:  # the official MAE's lr_sched.adjust_learning_rate, per step
            want = floor + (lr - floor) * 0.5 * (1.0 + math.cos(math.pi * (s - warmup) / (steps - warmup)))
        assert got == pytest.approx(want, rel=1e-12, abs=1e-18), s
    plain = warmup_cosine(steps, warmup)  # the schedule before --min-lr, called as it was
    assert lrs(steps, warmup, lr, 0.0) == [lr * plain(s) for s in range(steps)]


def test_warmup_epochs_and_epochs_count_steps_of_the_effective_batch(tmp_path):
    t = TrainSettings(batch_size=16, accum_iter=2, warmup_epochs=1.5, epochs=2)
    assert t.steps_per_epoch(1000) == 1000 // 32 == 31
    assert t.steps_per_epoch(1000, 4) == 1000 // 128 and t.steps_per_epoch(20, 4) == 1  # at least one
    assert t.total_steps(1000) == 62 and t.total_steps(1000, 2) == 2 * (1000 // 64)
    assert t.warmup(62, 1000) == round(1.5 * 31) and TrainSettings().warmup(600, 1000) == 30  # 5% by default
    assert TrainSettings(batch_size=16, epochs=1).total_steps(1000) == 1000 // 16  # as before for one process
    run = tmp_path / "epochs"
    out = ok("pretrain", "--epochs", "1", "--warmup-epochs", "0.5", "--batch-size", "16", "--accum-iter", "2",
             "--log-every", "5", "--out", run, *SHORT[:2], "--no-progress")  # fmt: skip
    out = said(out)
    record = config(run)
    split = record["dataset"]["splits"]["train"]
    per_epoch = split // 32
    assert record["train"]["steps"] == per_epoch and record["train"]["warmup_steps"] == round(0.5 * per_epoch)
    logged = metrics(run)
    assert (logged[-1]["step"], logged[-1]["epoch"]) == (per_epoch, 1.0)  # Trainer.epoch agrees with --epochs
    banner = f"{per_epoch} steps (1 epoch) of 32 (16 x 2 accumulated), warm-up {round(0.5 * per_epoch)} steps"
    assert banner in out


# ---- errors and aliases ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [(["--lr", "1e-3", "--blr", "1e-4"], "give --lr or --blr, not both"),
     (["--warmup-steps", "3", "--warmup-epochs", "1"], "give --warmup-steps or --warmup-epochs, not both"),
     (["--accum-iter", "0"], "--accum-iter must be a positive integer, got 0"),
     (["--accum_iter", "-2"], "--accum-iter must be a positive integer, got -2"),
     (["--blr", "-1"], "--blr must be a finite non-negative number, got -1.0"),
     (["--min-lr", "nan"], "--min-lr must be a finite non-negative number, got nan"),
     (["--warmup-epochs", "-1"], "--warmup-epochs must be a finite non-negative number, got -1.0"),
     (["--lr", "1e-3", "--min-lr", "2e-3"], "--min-lr 0.002 is above the peak learning rate 0.001")],
)  # fmt: skip
def test_recipe_mistakes_are_one_line_errors_and_write_nothing(tmp_path, args, message):
    fails(message, "pretrain", "--steps", "2", "--out", tmp_path / "run", *args)
    assert not (tmp_path / "run" / "config.json").exists()


def test_the_official_spellings_are_aliases(tmp_path):
    run = tmp_path / "official"
    ok("pretrain", "--batch_size", "8", "--accum_iter", "2", "--min_lr", "1e-5", "--warmup_epochs", "0.01",
       "--weight_decay", "0.01", "--mask_ratio", "0.5", "--norm_pix_loss", "--input_size", "8", "--blr", "1e-3",
       "--output_dir", run, "--steps", "2", *SHORT)  # fmt: skip
    asked = config(run)["config"]
    expected = {"batch_size": 8, "accum_iter": 2, "min_lr": 1e-5, "warmup_epochs": 0.01, "weight_decay": 0.01}
    assert {k: asked["train"][k] for k in expected} == expected and asked["train"]["blr"] == 1e-3
    assert asked["policy"]["mask_ratio"] == 0.5 and asked["model"]["norm_pix_loss"] is True
    assert asked["data"]["img_size"] == 8


def test_a_record_without_the_recipe_keys_loads_with_what_it_ran():
    from test_records import GOLDEN  # a format-2 run written before the recipe's flags

    record = RunRecord.read(GOLDEN)
    assert "accum_iter" not in record.train and "blr" not in record.config["train"]
    cfg = record.train_config
    assert (cfg.train.accum_iter, cfg.train.min_lr, cfg.resolved.lr, cfg.train.lr) == (1, 0.0, 1.5e-3, 1.5e-3)
    assert RunConfig.from_dict(record.config).train.blr is None


# ---- real processes: SIGTERM + resume, and non-finite micro-batches ---------------------------------

ACCUM = ["--policy", "random", "--steps", "120", "--batch-size", "16", "--accum-iter", "2", "--log-every", "3",
         "--ckpt-every", "1000"]  # fmt: skip


@pytest.mark.slow
def test_an_accumulated_run_stopped_by_sigterm_resumes_bit_identically(tmp_path):
    full, run = tmp_path / "full", tmp_path / "stopped"
    reference = pretrain("--out", full, *ACCUM)
    proc = pretrain("--out", run, *ACCUM)
    exit_code, err = signal_after(proc, run, 3, signal.SIGTERM)
    assert exit_code == 143, err
    step = stopped_step(err, run, "maskkit pretrain --resume")
    stream = load_checkpoint(list_checkpoints(run / "checkpoints")[-1])["streams"]["train"]
    per_epoch = config(run)["dataset"]["splits"]["train"] // 16  # micro-batches of the sampler's epoch
    assert stream["epoch"] * per_epoch + stream["cursor"] // 16 == 2 * step  # two micro-batches a step
    finish(pretrain("--resume", run))
    finish(reference)
    assert 0 < step < 120 and lines(run) == lines(full)
    assert_same_run(full, run)


def test_parse_inject_nan_takes_a_micro_batch_of_the_train_stream():
    assert parse_inject_nan("train:3/2,val:4") == {"train": {(3, 2)}, "val": {4}}
    for bad in ("val:3/2", "train:3/0", "train:3/"):
        with pytest.raises(ValueError, match="train:STEP/M"):
            parse_inject_nan(bad)


def test_skip_nonfinite_drops_every_micro_batch_of_the_step(monkeypatch):
    # the second micro-batch of step 2: after the first one's backward
    monkeypatch.setenv(INJECT_NAN_ENV, "train:2/2")
    flat = {"batch_size": 8, "accum_iter": 2, "steps": 4, "warmup_steps": 0, "mask_noise": "sample"}
    bad = build("random", skip_nonfinite=True, **flat)
    monkeypatch.delenv(INJECT_NAN_ENV)
    ref = build("random", **flat)
    bad.step(), ref.step()
    before = {"mae": {k: v.clone() for k, v in bad.mae.state_dict().items()},
              "opt": bad.optimizer.state_dict(), "sched": bad.train_step.scheduler.state_dict()}  # fmt: skip
    out = bad.step()
    assert out["skipped"] == 1.0 and math.isnan(out["loss"]) and bad.skipped == 1 and bad.step_count == 2
    assert all(torch.equal(v, before["mae"][k]) for k, v in bad.mae.state_dict().items())
    assert bad.train_step.scheduler.state_dict() == before["sched"]
    opt = bad.optimizer.state_dict()
    assert opt["param_groups"] == before["opt"]["param_groups"]
    moments = before["opt"]["state"]
    assert all(torch.equal(opt["state"][i]["exp_avg"], moments[i]["exp_avg"]) for i in opt["state"])
    assert all(p.grad is None for p in bad.mae.parameters())  # the first micro-batch's gradient is gone
    assert bad.loaders["train"].stream.position == 4  # the skipped step still took its two micro-batches
    # the reference takes the same two micro-batches without learning from them, then both go on alike
    ref.loaders["train"].next(), ref.loaders["train"].next()
    ref.step_count += 1
    bad.step(), ref.step()
    for (name, p), q in zip(ref.mae.named_parameters(), bad.mae.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_a_real_accumulated_run_skips_a_non_finite_micro_batch_or_stops_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv(INJECT_NAN_ENV, "train:3/2")
    args = ["pretrain", "--steps", "5", "--batch-size", "8", "--accum-iter", "2", *SHORT]
    fails("non-finite pretrain loss (nan) at step 3", *args, "--out", tmp_path / "stops")
    ok(*args, "--skip-nonfinite", "--out", tmp_path / "skips")
    logged = metrics(tmp_path / "skips")
    assert [m["skipped"] for m in logged] == [0, 0, 1, 1, 1]
    assert all(math.isfinite(m["loss"]) for m in logged if m["step"] != 3)
    final = load_checkpoint(tmp_path / "skips" / "model.pt")["mae"]
    assert all(torch.isfinite(v).all() for v in final.values())
