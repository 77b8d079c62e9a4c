"""`TrainStep`: what one training iteration does, behind one protocol, and the ONE place a run's step is chosen.

The trainer (`maskkit.train.trainer`) draws the batch, owns the streams, generators, the non-finite
guard, signals and checkpoints; a step only turns images into updated weights:

    metrics, bad = step.run(images, context, agree=agree, undoable=skip_nonfinite)
    if agree(bad): step.undo()        # non-finite somewhere: nothing of this iteration remains
    else: step.commit()

`PlainStep` (maskkit.train.plain) is the MAE step plus the policy's own auxiliary loss; `MLOStep`
(maskkit.train.mlo_step) is one `MLOEngine` step. `make_step` picks one from what the policy's card
says it `learns` (nothing | reconstruction | labels) and `--freeze-masker`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from maskkit.train.config import TrainConfig

#: `agree(bad)`: whether any process found a non-finite number (a collective under torchrun)
Agree = Callable[[Any], bool]


@runtime_checkable
class TrainStep(Protocol):
    """One training iteration over (MAE, policy[, head]) with its optimizers; state for checkpoints."""

    mae: nn.Module
    policy: nn.Module
    head: nn.Module | None
    optimizer: torch.optim.Optimizer  # the MAE's (its learning rate is logged as `lr`)
    state_keys: tuple[str, ...]  # the checkpoint keys `state_dict` fills

    def modules(self) -> dict[str, nn.Module | None]:
        """Named modules whose weights the guard checks (and that start equal on every rank)."""
        ...

    def optimizers(self) -> list[torch.optim.Optimizer]:
        """Every optimizer (under torchrun each averages its gradients before stepping)."""
        ...

    def run(
        self, images: Tensor, context: dict[str, Any], *, agree: Agree, undoable: bool,
        micro: tuple[int, int] = (0, 1),
    ) -> tuple[dict[str, float], str | None]:
        """Do the iteration's work on images [B, C, H, W]; return its metrics and what went non-finite (or None).

        `context` holds the policy's context (generator, progress, noise); `undoable` keeps what
        `undo` needs; `micro` (m, K): micro-batch m of K of one accumulated step (--accum-iter), whose
        `commit` comes after the last (a step that cannot accumulate refuses K > 1)."""
        ...

    def commit(self) -> None:
        """Apply the iteration's update where `run` left it pending."""
        ...

    def undo(self) -> None:
        """Drop every effect of the iteration (--skip-nonfinite)."""
        ...

    def can_checkpoint(self) -> bool:
        """False while the state cannot be saved alone (an open unroll window)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """The step's part of a checkpoint, under `state_keys`."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from a checkpoint holding `state_keys`."""
        ...


#: what a policy's card may say it learns from
LEARNS = ("nothing", "reconstruction", "labels")


@dataclass
class StepParts:
    """What a step is built from: the models, the run's training config, and the trainer's services."""

    mae: nn.Module
    policy: nn.Module
    config: TrainConfig
    learns: str  # the policy card's `learns`
    device: torch.device
    data: Any  # the dataset (`maskkit.data.ImageData`): labels for a step that learns from them
    batches: Callable[[str, str, int, int | None], Callable[[], Any]]  # (stream, split, seed offset, size)
    generator: torch.Generator  # the policies' random draws
    dist: Any = None  # the process group (`maskkit.distributed.DistContext`)
