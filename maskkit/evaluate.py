"""Downstream evaluation of a pretrained MAE encoder: MAE's linear probe and full fine-tuning.

Linear probe (MAE, He et al. 2022, appendix A.2): the encoder is frozen, its CLS features go
through BatchNorm1d without affine parameters and a linear layer (weights trunc-normal, std
0.01), trained with LARS (torch-optimizer), warm-up then cosine LR, no weight decay. The
features are computed once (no augmentation), which makes the probe cheap. Fine-tuning trains
the whole encoder plus a linear head with AdamW and MAE's no-decay groups. Both report top-1
accuracy on a held-out test split.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskkit.data import Batcher, BatchStream, Loader, check_classes
from maskkit.optim import create_optimizer, warmup_cosine
from maskkit.settings import flag

__all__ = [
    "EvalResult",
    "FINETUNE_BATCH_SIZE",
    "FINETUNE_EPOCHS",
    "FINETUNE_HEAD",
    "FINETUNE_LR",
    "FinetuneModel",
    "LINEAR_BASE_LR",
    "LINEAR_BATCH_SIZE",
    "LINEAR_EPOCHS",
    "LINEAR_HEAD",
    "LinearProbeHead",
    "MIN_DEFAULT_STEPS",
    "MIN_FINETUNE_STEPS",
    "MAX_SEED",
    "accuracy",
    "check_settings",
    "default_epochs",
    "evaluate_encoder",
    "extract_features",
    "finetune",
    "linear_probe",
]

#: the linear probe's default epochs and batch size (MAE's)
LINEAR_EPOCHS = 90
LINEAR_BATCH_SIZE = 256
#: base learning rate of the linear probe (lr = base x batch / 256). MAE uses 0.1 with its own LARS,
#: which rescales every weight update by its trust ratio even without weight decay; torch-optimizer's
#: LARS rescales only with weight decay, so at weight decay 0 it is SGD with momentum and needs a
#: larger step (1.0 probes 8x8 digits well in ~1000 steps).
LINEAR_BASE_LR = 1.0
#: fine-tuning's default epochs, batch size and AdamW learning rate
FINETUNE_EPOCHS = 50
FINETUNE_BATCH_SIZE = 128
FINETUNE_LR = 1e-3
#: fewest optimizer steps the default number of epochs gives (small data sets get more epochs).
MIN_DEFAULT_STEPS = 1000
#: fewest optimizer steps fine-tuning's default gives (it trains the whole encoder: its length follows the data)
MIN_FINETUNE_STEPS = 100

#: the heads, as eval.json names them
LINEAR_HEAD = "BatchNorm1d(affine=False) + Linear on the frozen encoder's CLS features"
FINETUNE_HEAD = "Linear on the CLS features, the whole encoder trained"
#: progress callback of the evaluation loops: on_step(step, total) after each optimizer step, step 1..total
StepCallback = Callable[[int, int], None]


#: largest seed: numpy's and torch's generators both take any integer in [0, 2^63 - 1]
MAX_SEED = 2**63 - 1


def check_settings(*, epochs: int | None = None, batch_size: int | None = None, lr: float | None = None,
                   seed: int = 0) -> None:
    """The evaluation's numbers, checked before any work: ValueError naming the setting as the command line
    spells it (`--lr must be a finite positive number, got inf`). None means the protocol's default."""
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if value is not None and (not _integer(value) or value < 1):
            raise ValueError(f"{flag(name)} must be a positive integer, got {value!r}")
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr)
                           or lr <= 0):  # fmt: skip
        raise ValueError(f"--lr must be a finite positive number, got {lr!r}")
    if not _integer(seed) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"--seed must be an integer in [0, 2^63 - 1], got {seed!r}")


def _integer(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def default_epochs(epochs: int, num_train: int, batch_size: int, min_steps: int = MIN_DEFAULT_STEPS) -> int:
    """`epochs`, raised so that there are at least `min_steps` steps of full batches."""
    per_epoch = max(num_train // max(batch_size, 1), 1)
    return max(epochs, -(-min_steps // per_epoch))


@dataclass
class EvalResult:
    """Accuracy of one protocol (fractions in [0, 1]) and every setting it was trained with, as resolved
    (the defaults filled in), so that a score is never separated from how it was made."""

    protocol: str
    top1: float
    train_top1: float
    epochs: int
    num_train: int
    num_test: int
    batch_size: int
    lr: float
    weight_decay: float
    optimizer: str
    momentum: float | None  # LARS's; None for AdamW (its betas are torch's defaults)
    warmup_epochs: int
    seed: int
    head: str  # what is trained on the encoder's CLS features


def _in_order(images: Batcher | Callable[[np.ndarray], Tensor], index: np.ndarray, batch_size: int) -> Any:
    """Normalised batches [b, C, H, W] of the images at `index`, in order: a Batcher's `batches` (its worker
    processes), or `images(idx)` chunk by chunk."""
    if isinstance(images, Batcher):
        return images.batches(index, batch_size)
    return (images(index[s : s + batch_size]) for s in range(0, len(index), batch_size))


@torch.no_grad()
def extract_features(
    mae: nn.Module, images: Batcher | Callable[[np.ndarray], Tensor], index: np.ndarray, batch_size: int = 256
) -> Tensor:
    """CLS features [n, D] of the images at `index` (a Batcher, read by its workers, or `images(idx)` ->
    normalised [b, C, H, W])."""
    was_training = mae.training
    mae.eval()
    chunks = [mae.features(x).float() for x in _in_order(images, index, batch_size)]
    mae.train(was_training)
    return torch.cat(chunks)


@torch.no_grad()
def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy of logits [n, K] against labels [n]."""
    return (logits.argmax(dim=1) == labels).float().mean().item()


class LinearProbeHead(nn.Sequential):
    """BatchNorm1d(D, affine=False, eps=1e-6) -> Linear(D, K), as MAE's linear probing head."""

    def __init__(self, embed_dim: int, num_classes: int) -> None:
        fc = nn.Linear(embed_dim, num_classes)
        nn.init.trunc_normal_(fc.weight, std=0.01)
        nn.init.zeros_(fc.bias)
        super().__init__(nn.BatchNorm1d(embed_dim, affine=False, eps=1e-6), fc)


def linear_probe(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    num_classes: int,
    *,
    epochs: int = 90,
    batch_size: int = 256,
    lr: float = 0.1,
    optimizer: str = "lars",
    warmup_epochs: int = 10,
    seed: int = 0,
    on_step: StepCallback | None = None,
) -> EvalResult:
    """Train MAE's probing head on fixed features [n, D]; top-1 on the test features.

    `lr` is the actual learning rate (MAE: base 0.1 x batch / 256); LARS momentum 0.9, no weight decay.
    `on_step(step, total)` is called after every optimizer step.
    """
    if len(train_features) == 0 or len(test_features) == 0:
        raise ValueError("the linear probe needs non-empty train and test sets")
    device = train_features.device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = LinearProbeHead(train_features.shape[1], num_classes).to(device)
    opt = create_optimizer(optimizer, head.parameters(), lr=lr, weight_decay=0.0, momentum=0.9)
    stream = BatchStream(np.arange(len(train_features)), batch_size, seed)
    steps = max(epochs * stream.batches_per_epoch, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, warmup_cosine(steps, min(warmup_epochs * stream.batches_per_epoch, steps // 2))
    )
    head.train()
    for step in range(1, steps + 1):
        idx = torch.from_numpy(stream.next()).to(device)
        loss = F.cross_entropy(head(train_features[idx]), train_labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if on_step is not None:
            on_step(step, steps)
    head.eval()
    with torch.no_grad():
        train_acc = accuracy(head(train_features), train_labels)
        test_acc = accuracy(head(test_features), test_labels)
    return EvalResult("linear", test_acc, train_acc, epochs, len(train_features), len(test_features),
                      batch_size=batch_size, lr=lr, weight_decay=0.0, optimizer=optimizer, momentum=0.9,
                      warmup_epochs=warmup_epochs, seed=seed, head=LINEAR_HEAD)  # fmt: skip


class FinetuneModel(nn.Module):
    """The MAE's encoder (through `features`) plus a linear head; the decoder is unused."""

    def __init__(self, mae: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.mae = mae
        self.head = nn.Linear(mae.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

    def forward(self, images: Tensor) -> Tensor:  # [B, C, H, W] -> [B, K]
        return self.head(self.mae.features(images))


def finetune(
    mae: nn.Module,
    batcher: Batcher,
    train_index: np.ndarray,
    test_index: np.ndarray,
    *,
    epochs: int = 20,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    optimizer: str = "adamw",
    warmup_epochs: int = 2,
    seed: int = 0,
    on_step: StepCallback | None = None,
) -> EvalResult:
    """Fine-tune a copy of the encoder with a linear head on `train_index`; top-1 on `test_index`.

    Training batches use the batcher's augmentation (MAE crop + flip where it suits the size).
    The MAE passed in is left unchanged. `on_step(step, total)` is called after every optimizer step.
    """
    data = batcher.data
    num_classes = data.num_classes
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FinetuneModel(copy.deepcopy(mae), num_classes).to(batcher.device)
    opt = create_optimizer(optimizer, model, lr=lr, weight_decay=weight_decay)
    loader = Loader(batcher, train_index, batch_size, seed, augment=True, labels=True, split="train")
    steps = max(epochs * loader.batches_per_epoch, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, warmup_cosine(steps, min(warmup_epochs * loader.batches_per_epoch, steps // 2))
    )
    model.train()
    for step in range(1, steps + 1):
        batch = loader.next()  # crop + flip keyed by (seed, step, position), in the batcher's workers
        loss = F.cross_entropy(model(batch.images), batch.labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if on_step is not None:
            on_step(step, steps)
    loader.close()
    model.eval()

    def top1(index: np.ndarray) -> float:
        with torch.no_grad():
            logits = torch.cat([model(x) for x in batcher.batches(index, 256)])
        return accuracy(logits, batcher.labels(index))

    return EvalResult("finetune", top1(test_index), top1(train_index), epochs, len(train_index), len(test_index),
                      batch_size=batch_size, lr=lr, weight_decay=weight_decay, optimizer=optimizer, momentum=None,
                      warmup_epochs=warmup_epochs, seed=seed, head=FINETUNE_HEAD)  # fmt: skip


def evaluate_encoder(
    mae: nn.Module,
    batcher: Batcher,
    splits: dict[str, np.ndarray],
    protocol: str = "linear",
    *,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    seed: int = 0,
    score_split: str = "test",
    on_step: StepCallback | None = None,
    on_plan: Callable[[str], None] | None = None,
) -> EvalResult:
    """Run `protocol` ("linear" or "finetune") on the labeled `train` split, scored on `score_split`.

    Defaults (the constants above): linear LINEAR_EPOCHS (90) epochs, batch LINEAR_BATCH_SIZE (256),
    LARS lr LINEAR_BASE_LR (1.0) x batch/256; finetune FINETUNE_EPOCHS (50) epochs, batch
    FINETUNE_BATCH_SIZE (128), AdamW lr FINETUNE_LR (1e-3); batches are capped at the train split's
    size, and on small data the epochs grow until there are at least MIN_DEFAULT_STEPS optimizer
    steps for the (cheap) linear probe, MIN_FINETUNE_STEPS for fine-tuning, whose length therefore
    scales with the data. `on_plan(text)` is told the length before training starts ("finetune: 50
    epochs x 9 steps of 128 = 450 steps"); `on_step(step, total)` reports the progress of the training loop. score_split "test" (default) reports the held-out result;
    "val" is for choosing settings without looking at the test split (the learned masker also
    uses `val` for its validation loss, so a learned arm's `val` score is slightly optimistic).
    """
    check_settings(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
    check_classes(batcher.data, "evaluation")  # labels of at least two classes (DataError, a ValueError)
    if score_split not in ("test", "val"):
        raise ValueError(f"score_split must be 'test' or 'val', got {score_split!r}")
    if len(splits.get(score_split, ())) == 0:
        raise ValueError(f"the run has no {score_split!r} split to score on")
    train_index, test_index = splits["train"], splits[score_split]

    def plan(name: str, epochs: int, bs: int) -> int:
        per_epoch = max(len(train_index) // bs, 1)
        if on_plan is not None:
            on_plan(f"{name}: {epochs} epochs x {per_epoch} steps of {bs} = {epochs * per_epoch} steps "
                    f"(--epochs sets it)")  # fmt: skip
        return epochs

    if protocol == "linear":
        bs = min(batch_size or LINEAR_BATCH_SIZE, len(train_index))
        epochs = plan("linear probe", default_epochs(LINEAR_EPOCHS, len(train_index), bs) if epochs is None
                      else epochs, bs)  # fmt: skip
        feats = extract_features(mae, batcher, np.concatenate([train_index, test_index]))
        n = len(train_index)
        labels = batcher.labels(np.concatenate([train_index, test_index]))
        return linear_probe(
            feats[:n], labels[:n], feats[n:], labels[n:], batcher.data.num_classes,
            epochs=epochs,
            batch_size=bs,
            lr=(LINEAR_BASE_LR * bs / 256) if lr is None else lr,
            seed=seed,
            on_step=on_step,
        )  # fmt: skip
    if protocol == "finetune":
        bs = min(batch_size or FINETUNE_BATCH_SIZE, len(train_index))
        default = default_epochs(FINETUNE_EPOCHS, len(train_index), bs, MIN_FINETUNE_STEPS)
        return finetune(
            mae, batcher, train_index, test_index,
            epochs=plan("fine-tune", default if epochs is None else epochs, bs),
            batch_size=bs,
            lr=FINETUNE_LR if lr is None else lr,
            seed=seed,
            on_step=on_step,
        )  # fmt: skip
    raise ValueError(f"unknown evaluation protocol {protocol!r}; use linear or finetune")
