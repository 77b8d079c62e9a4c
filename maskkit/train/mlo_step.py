"""`MLOStep`: one iteration of the MLO engine (`maskkit.mlo.MLOEngine`): a pretrain step with the learned
masker's plan and, every `masker_every` iterations, a head step and a masker step by hypergradient.

`engine_config` is the one place the `mlo` section becomes the engine's `MLOConfig`.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from maskkit.data import check_classes
from maskkit.distributed import differentiable_mean
from maskkit.mae import check_images
from maskkit.mlo import HYPERGRADS, MLOConfig, MLOEngine
from maskkit.optim import create_optimizer
from maskkit.train.config import ACCUM_MLO, TrainConfig
from maskkit.train.guard import nonfinite_metric, nonfinite_weights
from maskkit.train.plain import mae_optimizer
from maskkit.train.step import Agree, StepParts


class ClassifierHead(nn.Module):
    """Level-2 model of MLO-MAE: a linear classifier on the encoder's CLS features."""

    def __init__(self, embed_dim: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(embed_dim, num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.02)
        nn.init.zeros_(self.fc.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # [B, D] -> [B, K]
        return self.fc(features)


def engine_config(config: TrainConfig) -> MLOConfig:
    """The engine's config from the run's `mlo` section, its mask ratio and `--amp`."""
    m = config.mlo
    return MLOConfig(
        ratio=config.resolved.mask_ratio, amp=config.train.amp, masker_every=m.masker_every,
        unroll_steps=m.unroll_steps, hypergrad=m.hypergrad, masker_start=m.masker_start, level2=m.level2,
        masker_reg=m.masker_reg, darts_paths=m.darts_paths, darts_fd=m.darts_fd,
        hypergrad_options=HYPERGRADS.coerce(m.hypergrad, m.hypergrad_options),
    )  # fmt: skip


class MLOStep:
    """One `MLOEngine.step` per iteration; `undo` restores the engine's state from before it."""

    state_keys = ("engine",)

    def __init__(self, engine: MLOEngine) -> None:
        self.engine = engine
        self.mae, self.policy, self.head = engine.mae, engine.masker, engine.head
        self.optimizer = engine.mae_optimizer
        self._snapshot: dict[str, Any] | None = None

    @staticmethod
    def check(config: TrainConfig) -> None:
        """What the engine cannot do with these settings: one-line ValueError."""
        t = config.train
        if t.accum_iter > 1:
            raise ValueError(ACCUM_MLO)
        if t.mask_noise != "rank":
            raise ValueError("--mask-noise sample needs a policy that takes noise (e.g. random), not the learned one")

    @classmethod
    def build(cls, parts: StepParts) -> MLOStep:
        """The engine over (MAE, masker, head): labeled batches from the train split, validation from val."""
        cfg, m = parts.config, parts.config.mlo
        optimizer, scheduler = mae_optimizer(parts.mae, cfg)
        check_classes(parts.data, "a learnable policy")  # its head classifies: labels of two classes or more
        head = ClassifierHead(parts.mae.embed_dim, parts.data.num_classes).to(parts.device)
        train_batches = parts.batches("labeled", "train", 10, m.labeled_batch_size)
        val_batches = parts.batches("val", "val", 20, m.labeled_batch_size)
        # the reference's head and masker optimizers: AdamW with torch's defaults (betas 0.9/0.999, wd 0.01)
        head_opt = create_optimizer(m.head_optimizer, head, lr=m.head_lr, weight_decay=0.01, betas=(0.9, 0.999))
        masker_opt = create_optimizer(
            m.masker_optimizer, parts.policy.parameters(), lr=m.masker_lr, weight_decay=0.01, betas=(0.9, 0.999)
        )
        engine = MLOEngine(
            parts.mae, parts.policy, head, mae_optimizer=optimizer, head_optimizer=head_opt,
            masker_optimizer=masker_opt, schedulers={"mae": scheduler}, config=engine_config(cfg),
            train_batches=train_batches, val_batches=val_batches, generator=parts.generator,
            grad_sync=differentiable_mean(parts.dist),  # unrolled steps bypass optimizer.step()
        )  # fmt: skip
        if cfg.train.skip_nonfinite and not engine.can_undo_step():
            raise ValueError(f"--skip-nonfinite with --hypergrad {m.hypergrad} needs a hypergradient window of one step "
                             "(--unroll-steps 1): a bad batch inside a longer unroll window cannot be undone alone")
        return cls(engine)

    def modules(self) -> dict[str, nn.Module | None]:
        return {"MAE": self.mae, "masker": self.policy, "head": self.head}

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.optimizer, self.engine.head_optimizer, self.engine.masker_optimizer]

    def run(
        self, images: Tensor, context: dict[str, Any], *, agree: Agree | None = None, undoable: bool = False,
        micro: tuple[int, int] = (0, 1),
    ) -> tuple[dict[str, float], str | None]:
        """The engine's step (already applied); non-finite metrics or weights are reported for `undo`.

        `micro` must be (0, 1): the engine takes no gradient accumulation (`check` refuses it)."""
        if micro != (0, 1):
            raise ValueError(ACCUM_MLO)
        check_images(self.mae, images)  # an empty or misshapen batch: one line before the engine runs
        self._snapshot = copy.deepcopy(self.engine.state_dict()) if undoable else None
        raw = self.engine.step(images, progress=context.get("progress"))
        metrics = {k: float(v) for k, v in raw.items() if k not in ("step", "lr_mae")}
        metrics["loss"] = metrics.pop("pretrain_loss")
        return metrics, nonfinite_metric(metrics) or nonfinite_weights(self.modules())

    def commit(self) -> None:
        self._snapshot = None  # the engine has stepped already

    def undo(self) -> None:
        if self._snapshot is None:
            raise RuntimeError("MLOStep.undo needs run(..., undoable=True)")
        self.engine.load_state_dict(self._snapshot)  # undo the pretrain, head and masker steps
        self._snapshot = None

    def can_checkpoint(self) -> bool:
        """False while an unrolled hypergradient window is open (mid masker cycle)."""
        return self.engine.can_checkpoint()

    def state_dict(self) -> dict[str, Any]:
        return {"engine": self.engine.state_dict()}  # MAE, masker, head, optimizers, schedulers

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.engine.load_state_dict(state["engine"])
