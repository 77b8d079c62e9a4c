"""The pretraining loop behind `maskkit pretrain`: MAE + policy (+ MLO engine), seeded and resumable.

`Pretrainer` owns every piece of a run's state (MAE, policy, classification head, optimizers,
schedulers, MLO engine, batch-stream positions, generators and global RNG states) and gives it
back as ONE state dict (`state_dict()`), so a checkpoint restores the run exactly. With a
`learnable` policy (the learned masker) each step is one MLO engine step; otherwise it is a
plain MAE step through `mae_step_loss`.

`train(..., stop=StopSignals())` lets a scheduler stop a run: on SIGTERM or SIGINT it finishes the
step (and an open unroll window), writes a checkpoint and raises `TrainingStopped`.
"""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from maskkit.checkpoint import (
    atomic_write_text,
    checkpoint_path,
    prune_checkpoints,
    rng_state,
    save_checkpoint,
    set_rng_state,
    verify_checkpoint,
)
from maskkit.compile import NO_COMPILE, compile_blocks
from maskkit.data import Batcher, BatchStream, check_classes
from maskkit.diagnostics import plan_diagnostics
from maskkit.distributed import (
    SINGLE,
    DistContext,
    any_flag,
    average_gradients_on_step,
    broadcast_module_,
    differentiable_mean,
    gather_objects,
    max_int,
    mean_floats,
)
from maskkit.mae import mae_step_loss
from maskkit.mlo import DARTS_FDS, DARTS_PATHS, HYPERGRADS
from maskkit.optim import create_optimizer, warmup_cosine
from maskkit.settings import flag, setting

STATE_VERSION = 2

#: fault injection for tests: "STREAM:STEP[,STREAM:STEP...]" (STREAM train | labeled | val) fills the
#: batch that STREAM yields at training step STEP (1-based) with NaN pixels.
INJECT_NAN_ENV = "MASKKIT_INJECT_NAN"
STREAMS = ("train", "labeled", "val")
AMP_MODES = ("none", "bf16")
MASK_NOISE = ("rank", "sample")
#: offset between the generator seeds of neighbouring ranks
RANK_SEED_STRIDE = 7919


class NonFiniteError(FloatingPointError):
    """A non-finite loss, hypergradient or weight: the run stops before anything is saved."""


def parse_inject_nan(text: str | None) -> dict[str, set[int]]:
    """`MASKKIT_INJECT_NAN`'s value -> {stream: {steps}}; ValueError on a malformed entry."""
    faults: dict[str, set[int]] = {}
    for item in (text or "").replace(" ", "").split(","):
        if not item:
            continue
        stream, _, step = item.partition(":")
        if stream not in STREAMS or not step.isdigit() or int(step) < 1:
            raise ValueError(f"{INJECT_NAN_ENV} entries are STREAM:STEP with STREAM in {STREAMS}, got {item!r}")
        faults.setdefault(stream, set()).add(int(step))
    return faults


@dataclass
class MLOSettings:
    """The learned masker's multi-level optimisation, as a run sets it (`MLOConfig` adds the engine's internals).

    Declared once: `maskkit pretrain` makes one option of each field (`--masker-lr` ...), and a
    policy that is not `learnable` refuses any value other than these defaults.
    """

    hypergrad: str = setting(
        "darts", "Hypergradient: darts (finite differences) | unroll (exact, through --unroll-steps MAE steps)."
    )
    masker_every: int = setting(2, "Head and masker step after every this many MAE steps.")
    unroll_steps: int = setting(1, "MAE steps unrolled by --hypergrad unroll.")
    head_optimizer: str = setting("adamw", "Optimizer of the classification head (level 2).")
    head_lr: float = setting(1e-2, "Learning rate of the classification head (level 2).")
    masker_optimizer: str = setting("adamw", "Optimizer of the learned masker.")
    masker_lr: float = setting(1e-3, "Learning rate of the learned masker.")
    level2: str = setting(
        "head", "Level 2: head (a trained linear head, the paper) | ridge (a ridge probe refit on every "
        "labeled batch; needs darts)."
    )
    masker_start: int = setting(
        0, "Masker warm-up: MAE steps before the masker's first update (the head trains meanwhile)."
    )
    freeze_masker: bool = setting(False, "Control run: keep the learned masker at its initialisation (no MLO).")
    masker_reg: float = setting(
        0.0, "Anti-collapse: weight of KL(masker probabilities || mask ratio) in the masker's objective (0: off)."
    )
    darts_paths: str = setting(
        "both", "darts: both (the reference: through the pretrain and the head steps) | direct (the pretrain "
        "step only; cheaper, no backward over the labeled batch).",
    )  # fmt: skip
    darts_fd: str = setting(
        "central", "darts finite difference: central (two MAE forwards, error O(r^2)) | forward (one, error O(r)).",
    )  # fmt: skip
    labeled_batch_size: int | None = setting(
        None, "Labeled and validation images per masker step (default --batch-size); fewer is cheaper, noisier.",
    )  # fmt: skip

    #: the fields `MLOConfig` shares by name (the rest configure the optimizers, the control run, the batches)
    ENGINE_FIELDS = (
        "masker_every", "unroll_steps", "hypergrad", "masker_start", "level2", "masker_reg", "darts_paths", "darts_fd",
    )  # fmt: skip

    def check(self) -> None:
        """One-line ValueError for a setting out of range (the engine checks the rest)."""
        for name, allowed in (("hypergrad", tuple(HYPERGRADS.names())), ("level2", LEVEL2),
                              ("darts_paths", DARTS_PATHS), ("darts_fd", DARTS_FDS)):  # fmt: skip
            if getattr(self, name) not in allowed:
                raise ValueError(f"{flag(name)} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for name in ("masker_every", "unroll_steps", "labeled_batch_size"):  # labeled_batch_size None: --batch-size
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{flag(name)} must be a positive integer, got {value}")
        if self.masker_start < 0:
            raise ValueError(f"--masker-start must be a non-negative integer, got {self.masker_start}")
        if not self.masker_reg >= 0:
            raise ValueError(f"--masker-reg must be a non-negative number, got {self.masker_reg}")
        if self.level2 == "ridge" and self.hypergrad != "darts":
            raise ValueError("--level2 ridge needs --hypergrad darts")
        changed = self.changed()
        darts_only = [flag(n) for n in ("darts_paths", "darts_fd") if n in changed]
        if darts_only and self.hypergrad != "darts":
            raise ValueError(f"{', '.join(darts_only)}: only for --hypergrad darts, got --hypergrad {self.hypergrad}")
        if "darts_paths" in changed and self.level2 == "ridge":
            raise ValueError("--darts-paths applies to --level2 head (the ridge probe has no head step to skip)")

    def changed(self) -> list[str]:
        """The fields set to something other than their default."""
        return [f.name for f in fields(self) if getattr(self, f.name) != f.default]


LEVEL2 = ("head", "ridge")


@dataclass
class TrainConfig:
    """Optimisation settings of a pretraining run (MAE defaults where they apply); `mlo` for a learned masker."""

    steps: int = 1000
    batch_size: int = 128
    lr: float = 1.5e-3
    weight_decay: float = 0.05
    optimizer: str = "adamw"
    warmup_steps: int = 0
    mask_ratio: float = 0.75
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 100
    keep_checkpoints: int = 2
    mlo: MLOSettings = field(default_factory=MLOSettings)  # the learned masker (MLO engine)
    # robustness, precision, processes
    skip_nonfinite: bool = False  # skip a batch whose loss/hypergradient is not finite (else stop)
    amp: str = "none"  # "bf16": autocast the MAE forward of the real pretrain steps (hypergradients stay fp32)
    mask_noise: str = "rank"  # "sample": random-policy noise keyed by (step, global sample position)
    compile: str = NO_COMPILE  # a torch.compile backend: compile the MAE's transformer blocks (never in the unroll)
    world_size: int = 1  # processes (torchrun); batch_size is per process

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainConfig:
        """From `asdict()`; also the flat layout of runs written before `mlo` was its own section."""
        raw = dict(raw)
        mlo = dict(raw.pop("mlo", {}) or {})
        for name in [f.name for f in fields(MLOSettings)]:
            if name in raw:
                mlo[name] = raw.pop(name)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known) + sorted(set(mlo) - {f.name for f in fields(MLOSettings)})
        if unknown:
            raise ValueError(f"unknown training setting(s): {', '.join(unknown)}")
        return cls(**raw, mlo=MLOSettings(**mlo))


class ClassifierHead(nn.Module):
    """Level-2 model of MLO-MAE: a linear classifier on the encoder's CLS features."""

    def __init__(self, embed_dim: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(embed_dim, num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.02)
        nn.init.zeros_(self.fc.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # [B, D] -> [B, K]
        return self.fc(features)


def _generator(device: torch.device, seed: int) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


class Pretrainer:
    """One pretraining run: call `step()` `config.steps` times (or `run`), checkpoint with `state_dict()`.

    Args:
        mae: an MAE implementing `maskkit.mae.MAEProtocol`, on `device`.
        policy: a MaskPolicy; a `learnable` one is trained by the MLO engine and needs labels.
        batcher: builds normalised batches from the dataset.
        splits: disjoint index arrays `train` (pretraining + head), `val` (masker), `test` (unused here).
        config: optimisation settings.
        device: where the batches go.
        dist: the process group (`maskkit.distributed.init_from_env()`); each rank takes its shard
            of every global batch (config.batch_size * world_size), draws its own masks, and the
            gradients of every optimizer are averaged across ranks before each step.
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
    ) -> None:
        self.mae = mae
        self.policy = policy
        self.batcher = batcher
        self.config = config
        self.device = device
        self.dist = dist
        self.step_count = 0
        self.skipped = 0
        self._check_config(policy)
        seed = config.seed
        self.streams = {"train": self._stream(splits["train"], seed, "train")}
        # generators on CPU for augmentation, on the device for the policies' random draws; each rank its own
        rank_seed = seed + RANK_SEED_STRIDE * dist.rank
        self.generators = {
            "augment": _generator(torch.device("cpu"), rank_seed + 1),
            "mask": _generator(device, rank_seed + 2),
        }
        self.inject_nan = parse_inject_nan(os.environ.get(INJECT_NAN_ENV))
        compile_blocks(mae, config.compile)  # in place: names and checkpoints unchanged; "none": nothing
        if callable(getattr(policy, "bind", None)):  # a policy built without the MAE's sizes learns them now
            policy.bind(embed_dim=mae.embed_dim, num_patches=mae.num_patches)
            policy.to(device)
        # a policy with its own objective (e.g. hpm's loss predictor) trains with the MAE, in one optimizer
        trained = nn.ModuleDict({"mae": mae, "policy": policy}) if self._policy_trains_on_aux(policy) else mae
        self.optimizer = create_optimizer(config.optimizer, trained, lr=config.lr, weight_decay=config.weight_decay)
        schedule = warmup_cosine(config.steps, config.warmup_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.head: nn.Module | None = None
        self.engine: Any = None
        if getattr(policy, "learnable", False) and config.mlo.freeze_masker:
            policy.requires_grad_(False)  # same selection and loss weighting, plain MAE steps, no feedback
        elif getattr(policy, "learnable", False):
            self._build_engine(splits)
        self._window: dict[str, tuple[float, int]] = {}
        if dist.enabled:  # same start everywhere, then every optimizer averages its gradients first
            for module in (self.mae, self.policy, self.head):
                if module is not None:
                    broadcast_module_(module, dist)
            optimizers = [self.optimizer]
            if self.engine is not None:
                optimizers += [self.engine.head_optimizer, self.engine.masker_optimizer]
            self._hooks = [average_gradients_on_step(opt, dist) for opt in optimizers]

    @staticmethod
    def _policy_trains_on_aux(policy: nn.Module) -> bool:
        """Whether the policy's parameters train on its own `aux_loss` beside the MAE (not by the MLO engine)."""
        return bool(getattr(policy, "has_aux_loss", False)) and not getattr(policy, "learnable", False)

    @property
    def progress(self) -> float:
        """How far the run has come, in [0, 1]: what the policy's schedules (guided_ramp) read."""
        return min(1.0, self.step_count / max(self.config.steps, 1))

    def _check_config(self, policy: nn.Module) -> None:
        cfg, learned = self.config, getattr(policy, "learnable", False) and not self.config.mlo.freeze_masker
        if cfg.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {AMP_MODES}, got {cfg.amp!r}")
        if cfg.mask_noise not in MASK_NOISE:
            raise ValueError(f"mask_noise must be one of {MASK_NOISE}, got {cfg.mask_noise!r}")
        if cfg.world_size != self.dist.world_size:
            raise ValueError(f"the run is set up for {cfg.world_size} processes but {self.dist.world_size} are running")
        if learned and cfg.mask_noise != "rank":
            raise ValueError("--mask-noise sample needs a policy that takes noise (e.g. random), not the learned one")
        if learned and cfg.skip_nonfinite and cfg.mlo.hypergrad == "unroll" and cfg.mlo.unroll_steps > 1:
            raise ValueError("--skip-nonfinite with --hypergrad unroll needs --unroll-steps 1 "
                             "(a bad batch inside a longer unroll window cannot be undone alone)")

    def _stream(self, indices: np.ndarray, seed: int, name: str, batch_size: int | None = None) -> BatchStream:
        """A stream of GLOBAL batches (batch_size per rank x world_size, default the MAE's); `_shard` takes this
        rank's part."""
        world = self.dist.world_size
        stream = BatchStream(indices, (batch_size or self.config.batch_size) * world, seed)
        if stream.batch_size < world:
            raise ValueError(f"the {name} split ({len(indices)} images) is too small for {world} processes")
        return stream

    def _shard(self, index: np.ndarray) -> np.ndarray:
        """This rank's contiguous part of a global batch (rank r takes positions r*b .. r*b+b-1)."""
        b = len(index) // self.dist.world_size
        return index[self.dist.rank * b : (self.dist.rank + 1) * b]

    def _poison(self, images: torch.Tensor, stream: str) -> torch.Tensor:
        """Fault injection (MASKKIT_INJECT_NAN): NaN pixels in this stream's batch at this step."""
        if self.step_count + 1 in self.inject_nan.get(stream, ()):
            images = images.clone()
            images[0] = float("nan")  # one bad image is enough to poison the whole batch's loss
        return images

    # ---- the learned masker ---------------------------------------------------------------

    def _build_engine(self, splits: dict[str, np.ndarray]) -> None:
        """MLOEngine over (MAE, masker, head): labeled batches from `train`, validation from `val`."""
        try:
            from maskkit.mlo import MLOConfig, MLOEngine
        except ImportError as err:  # the engine ships with maskkit; this only guards partial installs
            raise ValueError(f"the learned policy needs the MLO engine (maskkit.mlo): {err}") from None
        cfg, mlo = self.config, self.config.mlo
        data = self.batcher.data
        check_classes(data, "a learnable policy")  # its head classifies: labels of two classes or more
        self.head = ClassifierHead(self.mae.embed_dim, data.num_classes).to(self.device)
        labeled = mlo.labeled_batch_size
        self.streams["labeled"] = self._stream(splits["train"], cfg.seed + 10, "train", labeled)
        self.streams["val"] = self._stream(splits["val"], cfg.seed + 20, "val", labeled)
        # the reference's head and masker optimizers: AdamW with torch's defaults (betas 0.9/0.999, wd 0.01)
        head_opt = create_optimizer(
            mlo.head_optimizer, self.head, lr=mlo.head_lr, weight_decay=0.01, betas=(0.9, 0.999)
        )
        masker_opt = create_optimizer(
            mlo.masker_optimizer, self.policy.parameters(), lr=mlo.masker_lr, weight_decay=0.01, betas=(0.9, 0.999)
        )
        self.engine = MLOEngine(
            self.mae,
            self.policy,
            self.head,
            mae_optimizer=self.optimizer,
            head_optimizer=head_opt,
            masker_optimizer=masker_opt,
            schedulers={"mae": self.scheduler},
            config=MLOConfig(
                ratio=cfg.mask_ratio, amp=cfg.amp, **{name: getattr(mlo, name) for name in MLOSettings.ENGINE_FIELDS}
            ),
            train_batches=lambda: self._labeled_batch("labeled"),
            val_batches=lambda: self._labeled_batch("val"),
            generator=self.generators["mask"],
            grad_sync=differentiable_mean(self.dist),  # unrolled steps bypass optimizer.step()
        )

    def _labeled_batch(self, stream: str) -> tuple[torch.Tensor, torch.Tensor]:
        index = self._shard(self.streams[stream].next())
        return self._poison(self.batcher.images(index), stream), self.batcher.labels(index)

    # ---- steps --------------------------------------------------------------------------------

    def step(self) -> dict[str, float]:
        """One training iteration; returns its metrics (loss, lr, and the engine's own).

        A non-finite loss, hypergradient or weight on any rank raises NonFiniteError on every rank
        before anything is saved; with `skip_nonfinite` the batch is skipped instead (no update at
        any level, optimizer states untouched) and counted in `self.skipped`.
        """
        cfg = self.config
        index = self._shard(self.streams["train"].next())
        images = self._poison(self.batcher.images(index, self.generators["augment"]), "train")  # [B, C, H, W]
        self.mae.train()
        if self.engine is not None:
            snapshot = copy.deepcopy(self.engine.state_dict()) if cfg.skip_nonfinite else None
            raw = self.engine.step(images, progress=self.progress)
            metrics = {k: float(v) for k, v in raw.items() if k not in ("step", "lr_mae")}
            metrics["loss"] = metrics.pop("pretrain_loss")
            bad = self._nonfinite_metric(metrics) or self._nonfinite_weights()
            if any_flag(bad is not None, self.dist):
                if snapshot is None:
                    raise self._error(bad, metrics)
                self.engine.load_state_dict(snapshot)  # undo the pretrain, head and masker steps
                return self._skip(metrics)
        else:
            context: dict[str, Any] = {"generator": self.generators["mask"], "progress": self.progress}
            if cfg.mask_noise == "sample":
                context["noise"] = self._sample_noise(images.shape[0])
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.amp == "bf16"):
                out = mae_step_loss(self.mae, self.policy, images, ratio=cfg.mask_ratio, **context)
            loss = out.loss.float() if cfg.amp == "bf16" else out.loss
            metrics = {"loss": loss.item(), **plan_diagnostics(self.policy, out.plan, out.per_patch)}
            if out.aux_loss is not None and self._policy_trains_on_aux(self.policy):
                metrics["policy_loss"] = float(out.aux_loss.detach())
                loss = loss + out.aux_loss.float()
            self.optimizer.zero_grad(set_to_none=True)
            finite = math.isfinite(metrics["loss"]) and math.isfinite(metrics.get("policy_loss", 0.0))
            bad = None if finite else "pretrain loss"
            if not any_flag(bad is not None, self.dist):
                loss.backward()
                bad = self._nonfinite_grads()
            if any_flag(bad is not None, self.dist):  # checked before the step: nothing to undo
                if not cfg.skip_nonfinite:
                    raise self._error(bad, metrics)
                self.optimizer.zero_grad(set_to_none=True)
                return self._skip(metrics)
            self.optimizer.step()  # (under torchrun, a pre-hook first averages the gradients)
            self.scheduler.step()
        metrics = mean_floats(metrics, self.dist)  # the same numbers on every rank, hence in the log
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        self.step_count += 1
        for key, value in metrics.items():  # per-key sums and counts: masker metrics come every few steps
            total, count = self._window.get(key, (0.0, 0))
            self._window[key] = (total + value, count + 1)
        return metrics

    # ---- non-finite numbers ---------------------------------------------------------------

    _LEVELS = (("loss", "pretrain loss"), ("head_loss", "head (finetune) loss"), ("val_loss", "validation loss"),
               ("masker_grad_norm", "masker hypergradient"))

    def _nonfinite_metric(self, metrics: dict[str, float]) -> str | None:
        for key, level in self._LEVELS:
            if key in metrics and not math.isfinite(metrics[key]):
                return level
        return None

    def _nonfinite_weights(self) -> str | None:
        for name, module in (("MAE", self.mae), ("masker", self.policy), ("head", self.head)):
            params = [p.detach() for p in module.parameters()] if module is not None else []
            if params and not bool(torch.isfinite(torch.stack(torch._foreach_norm(params))).all()):
                return f"{name} weights"
        return None

    def _nonfinite_grads(self) -> str | None:
        grads = [p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        if grads and not bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()):
            return "MAE gradient"
        return None

    def _error(self, level: str | None, metrics: dict[str, float]) -> NonFiniteError:
        value = {v: metrics.get(k) for k, v in self._LEVELS}.get(level or "")
        shown = f" ({value})" if value is not None else ""
        where = f" on rank {self.dist.rank}" if self.dist.enabled and level else ""
        return NonFiniteError(
            f"non-finite {level or 'number on another rank'}{shown}{where} at step {self.step_count + 1}; "
            "nothing from this step was saved (--skip-nonfinite skips such batches instead)"
        )

    def _skip(self, metrics: dict[str, float]) -> dict[str, float]:
        self.skipped += 1
        self.step_count += 1
        return {**metrics, "skipped": 1.0}

    def _sample_noise(self, batch: int) -> torch.Tensor:
        """Masking noise [b, N] keyed by (seed, step, global sample position): the same for any world size."""
        n = self.mae.num_patches
        first = self.dist.rank * batch
        rows = []
        for i in range(batch):
            key = (self.config.seed * 1_000_003 + self.step_count * 100_003 + first + i) % (2**62)
            rows.append(torch.rand(n, generator=torch.Generator().manual_seed(key)))
        return torch.stack(rows).to(self.device)

    def pop_window(self) -> dict[str, float]:
        """Mean of every metric since the last call (what a metrics.jsonl line holds)."""
        means = {k: total / count for k, (total, count) in sorted(self._window.items())}
        self._window = {}
        return means

    def can_checkpoint(self) -> bool:
        """False while an unrolled hypergradient window is open (mid masker cycle)."""
        if self.engine is None or self.engine.config.hypergrad != "unroll":
            return True
        return self.engine.step_count % self.engine.config.masker_every == 0

    @property
    def epoch(self) -> float:
        """Epochs of the train split seen so far."""
        stream = self.streams["train"]
        return self.step_count / stream.batches_per_epoch

    # ---- state ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the run exactly (weights_only-loadable).

        Under torchrun every rank must call it (the ranks' generator and RNG states are gathered).
        """
        own = {"generators": {name: g.get_state().cpu() for name, g in self.generators.items()}, "rng": rng_state()}
        state: dict[str, Any] = {
            "version": STATE_VERSION,
            "step": self.step_count,
            "skipped": self.skipped,
            "world_size": self.dist.world_size,
            "streams": {name: s.state_dict() for name, s in self.streams.items()},
            "ranks": gather_objects(own, self.dist),  # [world_size] generator + RNG states, rank order
            "window": {k: [total, count] for k, (total, count) in self._window.items()},
            "config": asdict(self.config),
        }
        if self.engine is not None:  # the engine's state holds MAE, masker, head, optimizers, schedulers
            state["engine"] = self.engine.state_dict()
        else:
            state["mae"] = self.mae.state_dict()
            state["policy"] = self.policy.state_dict()
            state["optimizer"] = self.optimizer.state_dict()
            state["scheduler"] = self.scheduler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`; ValueError if it belongs to a different kind of run."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"checkpoint format {state.get('version')!r} is not {STATE_VERSION}")
        if ("engine" in state) != (self.engine is not None):
            raise ValueError("checkpoint and run disagree on whether the policy is learned")
        if int(state.get("world_size", 1)) != self.dist.world_size or len(state["ranks"]) != self.dist.world_size:
            raise ValueError(
                f"the checkpoint was written by {state.get('world_size')} process(es); resume with the same "
                f"number (torchrun --nproc_per_node {state.get('world_size')}), not {self.dist.world_size}"
            )
        try:
            if self.engine is not None:
                self.engine.load_state_dict(state["engine"])
            else:
                self.mae.load_state_dict(state["mae"])
                self.policy.load_state_dict(state["policy"])
                self.optimizer.load_state_dict(state["optimizer"])
                self.scheduler.load_state_dict(state["scheduler"])
            for name, stream in self.streams.items():
                stream.load_state_dict(state["streams"][name])
            own = state["ranks"][self.dist.rank]
            for name, gen in self.generators.items():
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
        bad = self._nonfinite_weights()
        if any_flag(bad is not None, self.dist):
            raise self._error(bad, {})
        path = checkpoint_path(ckpt_dir, self.step_count)
        state = self.state_dict()  # a collective under torchrun: every rank takes part
        if self.dist.is_main:
            digest = save_checkpoint(path, state)
            verify_checkpoint(path, digest)
            prune_checkpoints(ckpt_dir, self.config.keep_checkpoints)
        return path


class MetricsLog:
    """metrics.jsonl: one JSON line per logged step, appended with flush + fsync."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def append(self, record: dict[str, Any]) -> None:
        import os

        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        records = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a torn last line after a crash
        return records

    def truncate_after(self, step: int) -> None:
        """Keep only the lines up to `step` (atomically), e.g. before resuming from that step."""
        kept = [r for r in self.read() if int(r.get("step", 0)) <= step]
        atomic_write_text(self.path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))


#: signals that ask a run to stop cleanly (SLURM and Kubernetes send SIGTERM before preemption; Ctrl-C is SIGINT)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """Context manager: while it is active, SIGTERM and SIGINT ask the run to stop instead of ending it.

    The first such signal is only recorded (`signum`); `train(..., stop=this)` reads it after every
    step. A second one gives up waiting: the previous handlers come back and the signal is
    delivered again (SIGINT then raises KeyboardInterrupt, SIGTERM ends the process). A signal
    that was ignored (SIG_IGN, e.g. SIGINT of a background job) stays ignored. The previous
    handlers are restored on exit. Outside the main thread nothing is installed (Python allows
    handlers there only), but `request()` still works.
    """

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS) -> None:
        self.signals = tuple(signals)
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()

    @property
    def requested(self) -> bool:
        """Whether a stop was asked for."""
        return self.signum is not None

    def request(self, signum: int = signal.SIGTERM) -> None:
        """Ask for a stop as if `signum` had arrived (the first request counts)."""
        if self.signum is None:
            self.signum = int(signum)

    def _restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)  # None: not set from Python
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum
            return
        previous = self._previous.get(signum, signal.SIG_DFL)
        self._restore()
        if callable(previous):
            previous(signum, frame)  # e.g. default_int_handler: KeyboardInterrupt
        else:
            signal.raise_signal(signum)  # the default action


def signal_exit_code(signum: int) -> int:
    """The exit status of a process ended by `signum`, as shells report it: 128 + signal number."""
    return 128 + int(signum)


class TrainingStopped(Exception):
    """`train` stopped on a signal after checkpointing: `step`, `signum`, the `checkpoint` written."""

    def __init__(self, step: int, signum: int, checkpoint: Path) -> None:
        self.step, self.signum, self.checkpoint = step, int(signum), Path(checkpoint)
        super().__init__(f"stopped by {self.signal_name} at step {step}; checkpoint {self.checkpoint}")

    @property
    def signal_name(self) -> str:
        try:
            return signal.Signals(self.signum).name
        except ValueError:
            return f"signal {self.signum}"

    @property
    def exit_code(self) -> int:
        """143 for SIGTERM, 130 for SIGINT."""
        return signal_exit_code(self.signum)


def train(
    trainer: Pretrainer,
    run_dir: str | Path,
    *,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    stop: StopSignals | None = None,
) -> list[dict[str, Any]]:
    """Run `trainer` to `config.steps`, logging every `log_every` and checkpointing every `ckpt_every`.

    Returns the records written to metrics.jsonl by this call (under torchrun: only rank 0 writes,
    every rank returns the same records).

    With `stop` (a `StopSignals`, on every rank), a stop asked for during a step ends the run after
    that step: if an unrolled hypergradient window is open (`can_checkpoint()` False) the steps
    go on until it closes; then a checkpoint is written (collectively) and `TrainingStopped` is
    raised. Under torchrun the ranks agree after every step on whether any of them was signalled,
    so all stop at the same step. A stop asked for during the last step lets the run finish.
    """
    cfg = trainer.config
    run_dir = Path(run_dir)
    log = MetricsLog(run_dir / "metrics.jsonl") if trainer.dist.is_main else None
    ckpt_dir = run_dir / "checkpoints"
    written = []
    pending = False
    stopping = 0  # the signal every rank agreed to stop on; 0 while none
    while trainer.step_count < cfg.steps:
        metrics = trainer.step()
        step = trainer.step_count
        if on_step is not None:
            on_step(step, metrics)
        if step % cfg.log_every == 0 or step == cfg.steps:
            record = {"step": step, "epoch": round(trainer.epoch, 4), **trainer.pop_window()}
            if cfg.skip_nonfinite:
                record["skipped"] = trainer.skipped  # batches skipped so far (non-finite numbers)
            if log is not None:
                log.append(record)
            written.append(record)
        saved = None
        if (step % cfg.ckpt_every == 0 or step == cfg.steps or pending) and trainer.can_checkpoint():
            saved = trainer.save(ckpt_dir)
            pending = False
        elif step % cfg.ckpt_every == 0:
            pending = True  # an unroll window is open: checkpoint as soon as it closes
        if stop is not None and step < cfg.steps:
            if not stopping:  # a collective under torchrun: every rank asks every step until they agree
                stopping = max_int(stop.signum or 0, trainer.dist)
            if stopping and trainer.can_checkpoint():
                raise TrainingStopped(step, stopping, saved or trainer.save(ckpt_dir))
    return written
