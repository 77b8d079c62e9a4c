"""Batches: which samples (`BatchStream`), as which tensors (`Batcher`), and both in one resumable `Loader`.

- `BatchStream`: seeded endless epochs of index batches; its position is a small state dict.
- `Batcher`: index batches -> normalised, optionally augmented tensors on a device.
- `Loader`: a stream, a rank's shard of each global batch, keyed augmentation and an optional
  one-batch-ahead prefetch on a background thread; `state_dict()` is the stream's, so it restores
  mid-epoch exactly (and reads a trainer checkpoint's stream state as it is).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from maskkit.data.augment import crop_flip, random_resized_crop_flip
from maskkit.data.source import DataError, DataSource
from maskkit.data.stats import normalize


class BatchStream:
    """An endless, seeded sequence of index batches over `indices` (an epoch is a fresh permutation).

    Epoch e uses the permutation drawn from numpy's Generator seeded with (seed, e), so the
    position (epoch, cursor) is the whole state: `state_dict()` / `load_state_dict()` resume
    exactly. Incomplete last batches are dropped; the batch size is capped at len(indices).
    """

    def __init__(self, indices: np.ndarray, batch_size: int, seed: int) -> None:
        if len(indices) == 0:
            raise ValueError("BatchStream needs at least one index")
        if batch_size < 1:
            raise ValueError(f"batch size must be a positive integer, got {batch_size!r}")
        self.indices = np.asarray(indices, dtype=np.int64)
        self.batch_size = min(int(batch_size), len(self.indices))
        self.seed = int(seed)
        self.epoch = 0
        self.cursor = 0
        self._order: np.ndarray | None = None

    @property
    def batches_per_epoch(self) -> int:
        return len(self.indices) // self.batch_size

    @property
    def position(self) -> int:
        """How many batches came before the next one (epoch x batches_per_epoch + batches into this epoch)."""
        return self.epoch * self.batches_per_epoch + self.cursor // self.batch_size

    def _permutation(self) -> np.ndarray:
        if self._order is None:
            rng = np.random.default_rng([self.seed, self.epoch])
            self._order = self.indices[rng.permutation(len(self.indices))]
        return self._order

    def next(self) -> np.ndarray:
        """The next batch of indices, [batch_size]."""
        if self.cursor + self.batch_size > len(self.indices):
            self.epoch += 1
            self.cursor = 0
            self._order = None
        batch = self._permutation()[self.cursor : self.cursor + self.batch_size]
        self.cursor += self.batch_size
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["batch_size"]) != self.batch_size or int(state["seed"]) != self.seed:
            raise ValueError("batch stream state is from a different batch size or seed")
        self.epoch = int(state["epoch"])
        self.cursor = int(state["cursor"])
        self._order = None


@dataclass
class Batcher:
    """Turns index batches into normalised tensors on a device, with optional MAE augmentation."""

    data: DataSource
    mean: list[float]
    std: list[float]
    device: torch.device
    augment: str = "none"  # resolved: "none" or "crop-flip"

    def images(
        self, index: np.ndarray, generator: torch.Generator | None = None, *,
        keys: Sequence[Sequence[int]] | None = None,
    ) -> Tensor:
        """Normalised images [B, C, H, W] on the device; with crop-flip, augmented when `keys` (one per
        image: `crop_flip`) or `generator` (`random_resized_crop_flip`) is given."""
        x = self.data.floats(index)
        if self.augment == "crop-flip" and keys is not None:
            x = crop_flip(x, keys)
        elif self.augment == "crop-flip" and generator is not None:
            x = random_resized_crop_flip(x, generator)
        return normalize(x, self.mean, self.std).to(self.device)

    def labels(self, index: np.ndarray) -> Tensor:
        if self.data.labels is None:
            raise DataError(f"dataset {self.data.name!r} has no labels")
        return self.data.labels[torch.from_numpy(np.asarray(index))].to(self.device)


def shard(index: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Rank `rank`'s contiguous part of a global batch: positions r*b .. r*b+b-1, b = len // world_size."""
    b = len(index) // world_size
    return index[rank * b : (rank + 1) * b]


class Batch(NamedTuple):
    """One rank's batch: dataset indices [b], normalised images [b, C, H, W], labels [b] (None if unlabeled)."""

    index: np.ndarray
    images: Tensor
    labels: Tensor | None


class Loader:
    """Seeded endless batches of `indices` from `batcher.data`, as this rank's normalised tensors.

    Args:
        batcher: the source, normalisation, device and augmentation ("none" | "crop-flip").
        indices: the split's dataset indices.
        batch_size: per rank; the global batch is batch_size x world_size (capped at len(indices)).
        seed: the stream's seed (epoch e is the permutation seeded with (seed, e)).
        rank, world_size: this process's shard of every global batch (`shard`).
        augment_seed: first element of every augmentation key (default `seed`). The sample at global
            position p of batch n (n counted from the start, kept by the state) is augmented by
            `crop_flip` with key (augment_seed, n, p): the same images on any number of ranks.
        augment: False never augments (labeled and validation batches); True augments as `batcher.augment` says.
        prefetch: prepare the next batch on a background thread while the caller uses this one.
        labels: False leaves `Batch.labels` None (a stream whose labels nobody reads: MAE pretraining).
        split: the split's name, for the message when it is too small for the processes.
    """

    def __init__(
        self, batcher: Batcher, indices: np.ndarray, batch_size: int, seed: int, *, rank: int = 0,
        world_size: int = 1, augment_seed: int | None = None, augment: bool = True, prefetch: bool = False,
        labels: bool = True, split: str | None = None,
    ) -> None:
        self.batcher = batcher
        self.rank, self.world_size = int(rank), int(world_size)
        self.stream = BatchStream(indices, batch_size * self.world_size, seed)
        if self.stream.batch_size < self.world_size:
            what = f"the {split} split ({len(indices)} images)" if split else f"a split of {len(indices)} images"
            raise ValueError(f"{what} is too small for {self.world_size} processes")
        self.augment_seed = int(seed if augment_seed is None else augment_seed)
        self.augment = bool(augment)
        self.prefetch = bool(prefetch)
        self.with_labels = bool(labels) and batcher.data.labels is not None
        self._pool: ThreadPoolExecutor | None = None
        self._ahead: tuple[dict[str, int], Future[Batch]] | None = None  # (state before it, the batch)

    @property
    def batch_size(self) -> int:
        """This rank's batch size."""
        return self.stream.batch_size // self.world_size

    @property
    def batches_per_epoch(self) -> int:
        return self.stream.batches_per_epoch

    def _make(self, number: int, global_index: np.ndarray) -> Batch:
        index = shard(global_index, self.rank, self.world_size)
        first = self.rank * len(index)
        keys = [(self.augment_seed, number, first + i) for i in range(len(index))]
        images = self.batcher.images(index, keys=keys if self.augment else None)
        labels = self.batcher.labels(index) if self.with_labels else None
        return Batch(index, images, labels)

    def _draw(self) -> tuple[dict[str, int], tuple[int, np.ndarray]]:
        """(the stream state before it, (batch number, global indices)) of the next global batch."""
        state = self.stream.state_dict()
        global_index = self.stream.next()  # [batch_size x world_size]
        return state, (self.stream.position - 1, global_index)

    def next(self) -> Batch:
        """This rank's next batch."""
        if self._ahead is not None:
            _, future = self._ahead
            self._ahead = None
            batch = future.result()
        else:
            _, (number, global_index) = self._draw()
            batch = self._make(number, global_index)
        if self.prefetch:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="maskkit-prefetch")
            state, args = self._draw()
            self._ahead = (state, self._pool.submit(self._make, *args))
        return batch

    def state_dict(self) -> dict[str, int]:
        """The position after the last batch `next` returned (a prefetched one is not counted)."""
        return dict(self._ahead[0]) if self._ahead is not None else self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict()` (or a `BatchStream` state of the same global batch size and seed)."""
        if self._ahead is not None:
            self._ahead[1].result()
            self._ahead = None
        self.stream.load_state_dict(state)

    def close(self) -> None:
        """Stop the prefetch thread (the loader still works: it starts again on the next `next`)."""
        if self._ahead is not None:
            self.stream.load_state_dict(self._ahead[0])
            self._ahead[1].result()
            self._ahead = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
