"""The pretraining loop behind `maskkit pretrain`: MAE + policy (+ MLO engine), seeded and resumable.

`Pretrainer` owns every piece of a run's state (MAE, policy, classification head, optimizers,
schedulers, MLO engine, batch-stream positions, generators and global RNG states) and gives it
back as ONE state dict (`state_dict()`), so a checkpoint restores the run exactly. With a
`learnable` policy (the learned masker) each step is one MLO engine step; otherwise it is a
plain MAE step through `mae_step_loss`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
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
)
from maskkit.data import Batcher, BatchStream
from maskkit.mae import mae_step_loss
from maskkit.optim import create_optimizer, warmup_cosine

STATE_VERSION = 1


@dataclass
class TrainConfig:
    """Optimisation settings of a pretraining run (MAE defaults where they apply)."""

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
    # the learned masker (MLO engine)
    hypergrad: str = "darts"
    masker_every: int = 2
    unroll_steps: int = 1
    head_optimizer: str = "adamw"
    head_lr: float = 1e-2
    masker_optimizer: str = "adamw"
    masker_lr: float = 1e-3


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
    """

    def __init__(
        self,
        mae: nn.Module,
        policy: nn.Module,
        batcher: Batcher,
        splits: dict[str, np.ndarray],
        config: TrainConfig,
        device: torch.device,
    ) -> None:
        self.mae = mae
        self.policy = policy
        self.batcher = batcher
        self.config = config
        self.device = device
        self.step_count = 0
        seed = config.seed
        self.streams = {"train": BatchStream(splits["train"], config.batch_size, seed)}
        # generators on CPU for augmentation, on the device for the policies' random draws
        self.generators = {"augment": _generator(torch.device("cpu"), seed + 1), "mask": _generator(device, seed + 2)}
        self.optimizer = create_optimizer(config.optimizer, mae, lr=config.lr, weight_decay=config.weight_decay)
        schedule = warmup_cosine(config.steps, config.warmup_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.head: nn.Module | None = None
        self.engine: Any = None
        if getattr(policy, "learnable", False):
            self._build_engine(splits)
        self._window: dict[str, tuple[float, int]] = {}

    # ---- the learned masker ---------------------------------------------------------------

    def _build_engine(self, splits: dict[str, np.ndarray]) -> None:
        """MLOEngine over (MAE, masker, head): labeled batches from `train`, validation from `val`."""
        try:
            from maskkit.mlo import MLOConfig, MLOEngine
        except ImportError as err:  # the engine ships with maskkit; this only guards partial installs
            raise ValueError(f"the learned policy needs the MLO engine (maskkit.mlo): {err}") from None
        cfg = self.config
        data = self.batcher.data
        if data.labels is None:
            raise ValueError(f"a learnable policy needs labels, but dataset {data.name!r} has none")
        self.head = ClassifierHead(self.mae.embed_dim, data.num_classes).to(self.device)
        self.streams["labeled"] = BatchStream(splits["train"], cfg.batch_size, cfg.seed + 10)
        self.streams["val"] = BatchStream(splits["val"], cfg.batch_size, cfg.seed + 20)
        # the reference's head and masker optimizers: AdamW with torch's defaults (betas 0.9/0.999, wd 0.01)
        head_opt = create_optimizer(
            cfg.head_optimizer, self.head, lr=cfg.head_lr, weight_decay=0.01, betas=(0.9, 0.999)
        )
        masker_opt = create_optimizer(
            cfg.masker_optimizer, self.policy.parameters(), lr=cfg.masker_lr, weight_decay=0.01, betas=(0.9, 0.999)
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
                ratio=cfg.mask_ratio,
                masker_every=cfg.masker_every,
                unroll_steps=cfg.unroll_steps,
                hypergrad=cfg.hypergrad,
            ),
            train_batches=lambda: self._labeled_batch("labeled"),
            val_batches=lambda: self._labeled_batch("val"),
            generator=self.generators["mask"],
        )

    def _labeled_batch(self, stream: str) -> tuple[torch.Tensor, torch.Tensor]:
        index = self.streams[stream].next()
        return self.batcher.images(index), self.batcher.labels(index)

    # ---- steps --------------------------------------------------------------------------------

    def step(self) -> dict[str, float]:
        """One training iteration; returns its metrics (loss, lr, and the engine's own)."""
        index = self.streams["train"].next()
        images = self.batcher.images(index, self.generators["augment"])  # [B, C, H, W]
        self.mae.train()
        if self.engine is not None:
            raw = self.engine.step(images)
            metrics = {k: float(v) for k, v in raw.items() if k not in ("step", "lr_mae")}
            metrics["loss"] = metrics.pop("pretrain_loss")
        else:
            out = mae_step_loss(
                self.mae, self.policy, images, ratio=self.config.mask_ratio, generator=self.generators["mask"]
            )
            loss = out.loss
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite MAE loss ({loss.item()}) at step {self.step_count + 1}")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            metrics = {"loss": loss.item()}
        if not math.isfinite(metrics["loss"]):
            raise FloatingPointError(f"non-finite loss ({metrics['loss']}) at step {self.step_count + 1}")
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        self.step_count += 1
        for key, value in metrics.items():  # per-key sums and counts: masker metrics come every few steps
            total, count = self._window.get(key, (0.0, 0))
            self._window[key] = (total + value, count + 1)
        return metrics

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
        """Everything needed to continue the run exactly (weights_only-loadable)."""
        state: dict[str, Any] = {
            "version": STATE_VERSION,
            "step": self.step_count,
            "streams": {name: s.state_dict() for name, s in self.streams.items()},
            "generators": {name: g.get_state() for name, g in self.generators.items()},
            "rng": rng_state(),
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
            for name, gen in self.generators.items():
                gen.set_state(state["generators"][name])
        except (KeyError, RuntimeError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
            raise ValueError(f"checkpoint does not match this run: {first}") from None
        set_rng_state(state["rng"])
        self._window = {k: (float(total), int(count)) for k, (total, count) in state["window"].items()}
        self.step_count = int(state["step"])

    def save(self, ckpt_dir: str | Path) -> Path:
        """Checkpoint the run into `ckpt_dir` atomically and prune old ones."""
        path = checkpoint_path(ckpt_dir, self.step_count)
        save_checkpoint(path, self.state_dict())
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


def train(
    trainer: Pretrainer,
    run_dir: str | Path,
    *,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run `trainer` to `config.steps`, logging every `log_every` and checkpointing every `ckpt_every`.

    Returns the records written to metrics.jsonl by this call.
    """
    cfg = trainer.config
    run_dir = Path(run_dir)
    log = MetricsLog(run_dir / "metrics.jsonl")
    ckpt_dir = run_dir / "checkpoints"
    written = []
    pending = False
    while trainer.step_count < cfg.steps:
        metrics = trainer.step()
        step = trainer.step_count
        if on_step is not None:
            on_step(step, metrics)
        if step % cfg.log_every == 0 or step == cfg.steps:
            record = {"step": step, "epoch": round(trainer.epoch, 4), **trainer.pop_window()}
            log.append(record)
            written.append(record)
        if (step % cfg.ckpt_every == 0 or step == cfg.steps or pending) and trainer.can_checkpoint():
            trainer.save(ckpt_dir)
            pending = False
        elif step % cfg.ckpt_every == 0:
            pending = True  # an unroll window is open: checkpoint as soon as it closes
    return written
