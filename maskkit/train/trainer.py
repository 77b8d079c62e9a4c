"""The training loop: `Trainer` runs any `TrainStep` and owns what every run shares.

It draws the batches (`maskkit.data.Loader`: seeded streams of global batches, this rank's shard,
augmentation keyed by sample), keeps the mask generator and global RNG, guards against non-finite numbers (`maskkit.train.guard`),
logs metrics (`MetricsLog`) and, beside them, throughput (`PerfMeter`: perf.jsonl; a `RunLogger` such as
TensorBoard gets both), checkpoints (format `STATE_VERSION`, unchanged: step, skipped,
world_size, streams, ranks, window, config and the step's own keys) and stops on signals
(`StopSignals`). It knows nothing of which step it runs: `step_kind` picks it from the policy's
card (`learns`), `make_step` builds it.

    trainer = Trainer(mae, policy, batcher, splits, TrainConfig(train, mlo, resolved), device, learns="nothing")
    train(trainer, "runs/demo", stop=StopSignals())
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from maskkit.checkpoint import (
    checkpoint_path,
    prune_checkpoints,
    rng_state,
    save_checkpoint,
    set_rng_state,
    verify_checkpoint,
)
from maskkit.compile import compile_blocks
from maskkit.data import Batcher, BatchStream, Loader
from maskkit.distributed import (
    SINGLE,
    DistContext,
    any_flag,
    average_gradients_on_step,
    broadcast_module_,
    gather_objects,
    max_int,
    mean_floats,
)
from maskkit.train.choose import check_step, make_step, policy_learns, step_kind
from maskkit.train.config import TrainConfig
from maskkit.train.guard import INJECT_NAN_ENV, nonfinite_error, nonfinite_weights, parse_inject_nan
from maskkit.train.loggers import RunLogger, mask_picture, scalars_of
from maskkit.train.metrics import MetricsLog
from maskkit.train.perf import PerfMeter
from maskkit.train.signals import StopSignals, TrainingStopped
from maskkit.train.step import StepParts, TrainStep

STATE_VERSION = 2
#: the throughput log beside metrics.jsonl (one line per metrics.jsonl line, wall clock: see `train`)
PERF_FILE = "perf.jsonl"
#: offset between the generator seeds of neighbouring ranks
RANK_SEED_STRIDE = 7919


def _generator(device: torch.device, seed: int) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


class Trainer:
    """One pretraining run: call `step()` `config.steps` times (or `train`), checkpoint with `save()`.

    Args:
        mae: an MAE implementing `maskkit.mae.MAEProtocol`, on `device`.
        policy: a MaskPolicy; one whose card learns from labels is trained by the MLO engine.
        batcher: builds normalised batches from the dataset.
        splits: disjoint index arrays `train` (pretraining + head), `val` (masker), `test` (unused here).
        config: the run's `train` and `mlo` sections and what it resolved (`TrainConfig`).
        device: where the batches go.
        dist: the process group; each rank takes its shard of every global batch
            (batch_size * world_size), draws its own masks, and every optimizer averages its gradients first.
        learns: the policy card's `learns` (default: read from the policy's registered class).
    """

    def __init__(
        self,
        mae: nn.Module,
        policy: nn.Module,
        batcher: Batcher,
        splits: dict[str, np.ndarray],
        config: TrainConfig,
        device: torch.device,
        dist: DistContext = SINGLE,
        *,
        learns: str | None = None,
    ) -> None:
        self.mae, self.policy, self.batcher, self.splits = mae, policy, batcher, splits
        self.config, self.device, self.dist = config, device, dist
        self.step_count = 0
        self.skipped = 0
        t = config.train
        t.check()  # every choice option, in one place
        if config.world_size != dist.world_size:
            raise ValueError(f"the run is set up for {config.world_size} processes but {dist.world_size} are running")
        kind = step_kind(policy_learns(policy) if learns is None else learns, config.mlo)
        check_step(kind, config)
        # the train loader augments each sample by its key (seed, step, global position): the same crops for
        # any number of processes or workers; the policies' random draws come from a generator per rank
        pretrain = splits.get("pretrain", splits["train"])  # the official layout's whole train folder
        self.loaders = {"train": self._loader(pretrain, t.seed, "train", augment=True, labels=False)}
        rank_seed = t.seed + RANK_SEED_STRIDE * dist.rank
        self.generators = {"mask": _generator(device, rank_seed + 2)}
        self.inject_nan = parse_inject_nan(os.environ.get(INJECT_NAN_ENV))
        if t.channels_last:  # only 4-d tensors change layout: the patch embedding's convolution
            mae.to(memory_format=torch.channels_last)
        compile_blocks(mae, t.compile)  # in place: names and checkpoints unchanged; "none": nothing
        if callable(getattr(policy, "bind", None)):  # a policy built without the MAE's sizes learns them now
            policy.bind(embed_dim=mae.embed_dim, num_patches=mae.num_patches)
            policy.to(device)
        parts = StepParts(mae, policy, config, learns or policy_learns(policy), device, batcher.data,
                          self._batches, self.generators["mask"], dist)  # fmt: skip
        self.train_step: TrainStep = make_step(kind, parts)
        self._window: dict[str, tuple[float, int]] = {}
        #: throughput (perf.jsonl, the progress bar): wall clock only, never in metrics or checkpoints
        self.perf = PerfMeter(self.loaders["train"].stream.batch_size * t.accum_iter, device)  # effective batch
        if dist.enabled:  # same start everywhere, then every optimizer averages its gradients first
            for module in (self.mae, self.policy, self.head):
                if module is not None:
                    broadcast_module_(module, dist)
            self._hooks = [average_gradients_on_step(opt, dist) for opt in self.train_step.optimizers()]

    # ---- what the step holds --------------------------------------------------------------

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The MAE's optimizer."""
        return self.train_step.optimizer

    @property
    def head(self) -> nn.Module | None:
        """The classification head of a step that learns from labels, else None."""
        return self.train_step.head

    @property
    def engine(self) -> Any:
        """The MLO engine of an `MLOStep`, else None."""
        return getattr(self.train_step, "engine", None)

    @property
    def progress(self) -> float:
        """How far the run has come, in [0, 1]: what the policy's schedules (guided_ramp) read."""
        return min(1.0, self.step_count / max(self.config.steps, 1))

    @property
    def epoch(self) -> float:
        """Epochs of the train split seen so far, in steps of the effective batch (batch x world x
        accum): an epoch is train split // effective batch steps, as `TrainSettings.steps_per_epoch`
        (and the official MAE's len(data_loader) // accum_iter)."""
        per_epoch = max(self.loaders["train"].batches_per_epoch // self.config.train.accum_iter, 1)
        return self.step_count / per_epoch

    @property
    def streams(self) -> dict[str, BatchStream]:
        """The loaders' samplers (global index batches; their positions are the checkpoint's `streams`)."""
        return {name: loader.stream for name, loader in self.loaders.items()}

    def weights(self) -> dict[str, Any]:
        """The final weights (model.pt): mae, policy, step, and head where there is one."""
        final = {"mae": self.mae.state_dict(), "policy": self.policy.state_dict(), "step": self.step_count}
        if self.head is not None:
            final["head"] = self.head.state_dict()
        return final

    # ---- batches --------------------------------------------------------------------------

    def _loader(self, indices: np.ndarray, seed: int, name: str, *, augment: bool, labels: bool,
                batch_size: int | None = None) -> Loader:
        """This rank's loader over GLOBAL batches of batch_size per rank x world_size (seeded by `seed`)."""
        return Loader(self.batcher, indices, batch_size or self.config.train.batch_size, seed, rank=self.dist.rank,
                      world_size=self.dist.world_size, augment=augment, labels=labels, split=name)  # fmt: skip

    def _batches(self, stream: str, split: str, seed_offset: int, batch_size: int | None) -> Callable[[], Any]:
        """Open loader `stream` over `split` (no augmentation) and return what draws its next (images, labels)."""
        loader = self._loader(self.splits[split], self.config.seed + seed_offset, split, augment=False, labels=True,
                              batch_size=batch_size)  # fmt: skip
        self.loaders[stream] = loader

        def batch() -> tuple[torch.Tensor, torch.Tensor]:
            drawn = loader.next()
            return self._poison(drawn.images, stream), drawn.labels

        return batch

    def _poison(self, images: torch.Tensor, stream: str, micro: int = 0) -> torch.Tensor:
        """Fault injection (MASKKIT_INJECT_NAN): NaN pixels in this stream's batch at this step
        (every micro-batch of it, or micro-batch `micro` alone for an entry STEP/M, M = micro + 1)."""
        faults, step = self.inject_nan.get(stream, ()), self.step_count + 1
        if step in faults or (step, micro + 1) in faults:
            images = images.clone()
            images[0] = float("nan")  # one bad image is enough to poison the whole batch's loss
        return images

    def _sample_noise(self, batch: int, micro: int = 0) -> torch.Tensor:
        """Masking noise [b, N] keyed by (seed, step, global sample position): the same for any world size.

        The position counts the step's images in the order the stream yields them: micro-batch m
        (--accum-iter) of rank r holds positions m*b*world + r*b .. + b-1, so a step's masks depend on
        its effective batch only: K micro-batches of b on W processes get those of one batch of
        K*b*W on one process (and the same images, within an epoch of the sampler).
        """
        n = self.mae.num_patches
        first = (micro * self.dist.world_size + self.dist.rank) * batch
        rows = []
        for i in range(batch):
            key = (self.config.seed * 1_000_003 + self.step_count * 100_003 + first + i) % (2**62)
            rows.append(torch.rand(n, generator=torch.Generator().manual_seed(key)))
        return torch.stack(rows).to(self.device)

    # ---- one iteration --------------------------------------------------------------------

    def step(self) -> dict[str, float]:
        """One training iteration, one optimizer step (over --accum-iter micro-batches); returns its
        metrics (loss, lr, and the step's own; with accumulation each the mean over the micro-batches).

        A non-finite loss, hypergradient or weight on any rank raises NonFiniteError on every rank
        before anything is saved; with `skip_nonfinite` the batch is skipped instead (no update at
        any level, optimizer states untouched, the gradients of every micro-batch dropped) and counted in
        `self.skipped`.
        """
        t = self.config.train
        self.mae.train()
        agree = lambda bad: any_flag(bad is not None, self.dist)  # noqa: E731
        metrics, bad = self._micro_batches(t.accum_iter, agree)
        if bad is not None:
            if not t.skip_nonfinite:
                raise self._error(bad, metrics)
            self.train_step.undo()
            self.skipped += 1
            self.step_count += 1
            self.perf.step_done()
            return {**metrics, "skipped": 1.0}
        self.train_step.commit()
        metrics = mean_floats(metrics, self.dist)  # the same numbers on every rank, hence in the log
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        self.step_count += 1
        self.perf.step_done()
        for key, value in metrics.items():  # per-key sums and counts: masker metrics come every few steps
            total, count = self._window.get(key, (0.0, 0))
            self._window[key] = (total + value, count + 1)
        return metrics

    def _micro_batches(self, k: int, agree: Any) -> tuple[dict[str, float], str | None]:
        """Run the step's K micro-batches (--accum-iter; K = 1: the one batch); their mean metrics and,
        when any rank found a non-finite number, its level (else None).

        Micro-batch m is the stream's next batch: step s takes batches s*K .. s*K + K - 1, also when
        it is skipped. The masks: --mask-noise sample keys micro-batch m's rows by their position in
        the step (`_sample_noise`); the rank noise draws each micro-batch's in turn from the rank's
        generator (for the random policy on CPU: torch.rand(K*b, N) row for row; CUDA's generator and
        policies that draw more than one tensor per batch give other, equally distributed masks).
        """
        t = self.config.train
        parts, level = [], None
        for m in range(k):
            if level is not None:  # a bad micro-batch ends the step: the rest are drawn, not run
                self._next_train_batch()
                continue
            images = self._poison(self._next_train_batch().images, "train", m)  # [B, C, H, W]
            if t.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            context: dict[str, Any] = {"generator": self.generators["mask"], "progress": self.progress}
            if t.mask_noise == "sample":
                context["noise"] = self._sample_noise(images.shape[0], m)
            metrics, bad = self.train_step.run(images, context, agree=agree, undoable=t.skip_nonfinite,
                                               micro=(m, k))  # fmt: skip
            parts.append(metrics)
            if agree(bad):
                level = bad or ""  # "": another rank's
        if k == 1:
            return parts[0], level
        return _mean_metrics(parts), level

    def _next_train_batch(self) -> Any:
        """The train loader's next batch, the wait for it counted as data wait (`perf`)."""
        with self.perf.waiting():
            return self.loaders["train"].next()

    def _error(self, level: str | None, metrics: dict[str, float]) -> Exception:
        return nonfinite_error(level, metrics, self.step_count + 1, self.dist.rank if self.dist.enabled else None)

    def pop_window(self) -> dict[str, float]:
        """Mean of every metric since the last call (what a metrics.jsonl line holds)."""
        means = {k: total / count for k, (total, count) in sorted(self._window.items())}
        self._window = {}
        return means

    def can_checkpoint(self) -> bool:
        """False while the step cannot be saved alone (an open unroll window)."""
        return self.train_step.can_checkpoint()

    # ---- state ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the run exactly (weights_only-loadable).

        Under torchrun every rank must call it (the ranks' generator and RNG states are gathered).
        """
        own = {"generators": {name: g.get_state().cpu() for name, g in self.generators.items()}, "rng": rng_state(),
               "loaders": {name: loader.state_dict() for name, loader in self.loaders.items()}}  # this rank's
        state: dict[str, Any] = {
            "version": STATE_VERSION,
            "step": self.step_count,
            "skipped": self.skipped,
            "world_size": self.dist.world_size,
            "streams": {name: s.state_dict() for name, s in self.streams.items()},
            "ranks": gather_objects(own, self.dist),  # [world_size] generator + RNG states, rank order
            "window": {k: [total, count] for k, (total, count) in self._window.items()},
            "config": self.config.to_dict(),
        }
        state.update(self.train_step.state_dict())  # "engine", or mae / policy / optimizer / scheduler
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`; ValueError if it belongs to a different kind of run."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"checkpoint format {state.get('version')!r} is not {STATE_VERSION}")
        if ("engine" in state) != ("engine" in self.train_step.state_keys):
            raise ValueError("checkpoint and run disagree on whether the policy is learned")
        if int(state.get("world_size", 1)) != self.dist.world_size or len(state["ranks"]) != self.dist.world_size:
            raise ValueError(
                f"the checkpoint was written by {state.get('world_size')} process(es); resume with the same "
                f"number (torchrun --nproc_per_node {state.get('world_size')}), not {self.dist.world_size}"
            )
        try:
            self.train_step.load_state_dict(state)
            own = state["ranks"][self.dist.rank]
            loaders = own.get("loaders", state["streams"])  # each rank's own (checkpoints before: the shared streams)
            for name, loader in self.loaders.items():
                loader.load_state_dict(loaders[name])
            for name, gen in self.generators.items():  # checkpoints before keyed augmentation also hold "augment"
                gen.set_state(own["generators"][name])
        except (KeyError, RuntimeError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
            raise ValueError(f"checkpoint does not match this run: {first}") from None
        set_rng_state(own["rng"])
        self.skipped = int(state.get("skipped", 0))
        self._window = {k: (float(total), int(count)) for k, (total, count) in state["window"].items()}
        self.step_count = int(state["step"])

    def save(self, ckpt_dir: str | Path) -> Path:
        """Checkpoint the run into `ckpt_dir` atomically (rank 0 writes) and prune old ones.

        Refuses (NonFiniteError) to write non-finite weights; older checkpoints are pruned only
        after the new one has been read back and its checksum verified.
        """
        bad = nonfinite_weights(self.train_step.modules())
        if any_flag(bad is not None, self.dist):
            raise self._error(bad, {})
        path = checkpoint_path(ckpt_dir, self.step_count)
        state = self.state_dict()  # a collective under torchrun: every rank takes part
        if self.dist.is_main:
            digest = save_checkpoint(path, state)
            verify_checkpoint(path, digest)
            prune_checkpoints(ckpt_dir, self.config.train.keep_checkpoints)
        return path


def _mean_metrics(parts: list[dict[str, float]]) -> dict[str, float]:
    """Each metric's mean over the micro-batches that report it (the logged loss: the K micro-batches' mean)."""
    keys = dict.fromkeys(k for part in parts for k in part)
    return {k: sum(p[k] for p in parts if k in p) / sum(k in p for p in parts) for k in keys}


#: the name the run layer and tests have always used
Pretrainer = Trainer


def train(
    trainer: Trainer,
    run_dir: str | Path,
    *,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    stop: StopSignals | None = None,
    logger: RunLogger | None = None,
    log_images_every: int = 0,
) -> list[dict[str, Any]]:
    """Run `trainer` to `config.steps`, logging every `log_every` and checkpointing every `ckpt_every`.

    Returns the records written to metrics.jsonl by this call (under torchrun: only rank 0 writes,
    every rank returns the same records). Beside each metrics.jsonl line, perf.jsonl gets the step's
    throughput (`PerfMeter`, measured from this call's start: wall clock, so never in metrics.jsonl);
    `logger` (rank 0's; `maskkit.train.loggers`) gets the scalars of both lines and, every
    `log_images_every` steps (0: never), a picture of the masks (`mask_picture`, which draws none of the
    run's random numbers).

    With `stop` (a `StopSignals`, on every rank), a stop asked for during a step ends the run after
    that step: if an unrolled hypergradient window is open (`can_checkpoint()` False) the steps
    go on until it closes; then a checkpoint is written (collectively) and `TrainingStopped` is
    raised. Under torchrun the ranks agree after every step on whether any of them was signalled,
    so all stop at the same step. A stop asked for during the last step lets the run finish.
    """
    t, steps = trainer.config.train, trainer.config.steps
    run_dir = Path(run_dir)
    main = trainer.dist.is_main
    log = MetricsLog(run_dir / "metrics.jsonl") if main else None
    perf_log = MetricsLog(run_dir / PERF_FILE) if main else None
    logger = logger if main else None
    ckpt_dir = run_dir / "checkpoints"
    written = []
    pending = False
    stopping = 0  # the signal every rank agreed to stop on; 0 while none
    trainer.perf.start()
    while trainer.step_count < steps:
        metrics = trainer.step()
        step = trainer.step_count
        if on_step is not None:
            on_step(step, metrics)
        logged = step % t.log_every == 0 or step == steps
        if logged:
            record = {"step": step, "epoch": round(trainer.epoch, 4), **trainer.pop_window()}
            if t.skip_nonfinite:
                record["skipped"] = trainer.skipped  # batches skipped so far (non-finite numbers)
            perf = {"step": step, **trainer.perf.pop()}
            with trainer.perf.excluded():  # what observing takes is no training time
                if log is not None and perf_log is not None:
                    log.append(record)
                    perf_log.append(perf)
                if logger is not None:
                    logger.log(step, {**scalars_of(record, "metrics"), **scalars_of(perf, "perf")})
            written.append(record)
        if logger is not None and log_images_every and step % log_images_every == 0:
            with trainer.perf.excluded():
                logger.image(step, "masks", mask_picture(trainer))
        saved = None
        if (step % t.ckpt_every == 0 or step == steps or pending) and trainer.can_checkpoint():
            saved = trainer.save(ckpt_dir)
            pending = False
        elif step % t.ckpt_every == 0:
            pending = True  # an unroll window is open: checkpoint as soon as it closes
        if stop is not None and step < steps:
            if not stopping:  # a collective under torchrun: every rank asks every step until they agree
                stopping = max_int(stop.signum or 0, trainer.dist)
            if stopping and trainer.can_checkpoint():
                raise TrainingStopped(step, stopping, saved or trainer.save(ckpt_dir))
    return written
