"""Batches: which samples (`BatchStream`), as which tensors (`Batcher`), and both in one resumable `Loader`.

- `BatchStream`: seeded endless epochs of index batches; its position is a small state dict.
- `Batcher`: index batches -> normalised, optionally augmented tensors on a device.

Images [B, C, H, W] and clips [B, C, T, H, W] (a source with `num_frames`) take the same paths: a sample
is [C, H, W] or [C, T, H, W], everything else (keys, workers, resume) is per sample.
- `Loader`: a stream, a rank's shard of each global batch, keyed augmentation and an optional
  one-batch-ahead prefetch on a background thread; `state_dict()` is the stream's, so it restores
  mid-epoch exactly (and reads a trainer checkpoint's stream state as it is).
"""

from __future__ import annotations

import atexit
import os
import signal
import threading
import warnings
import weakref
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from maskkit.data.augment import crop_flip, key_draws
from maskkit.data.source import DataError, DataSource, DataWarning, sample_dims
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
    """Turns index batches into normalised tensors on a device, with optional MAE augmentation.

    Two paths, the same numbers for any number of worker processes:
    - a source held in memory (`ImageData`) is gathered, augmented and normalised a batch at a time
      (`images`), in the calling process unless `num_workers` > 0;
    - a source that decodes files (`pixels(i, draws)`: a lazy image folder) is read sample by sample
      (`sample`), in `num_workers` worker processes, each sample cropped by its own key.
    `finish` moves a batch of samples to the device (non-blocking from pinned memory) and normalises it.
    Clips ([C, T, H, W] samples) go the same ways; in memory, crop-flip crops all frames of a clip alike,
    and a file source's `pixels` gives its clips as it decodes and crops them, passed on as they are.
    """

    data: DataSource
    mean: list[float]
    std: list[float]
    device: torch.device
    augment: str = "none"  # resolved: "none" or "crop-flip"
    num_workers: int = 0  # worker processes per loader (0: the calling process)
    skip_bad: bool = False  # an unreadable file is replaced in its batch and counted, instead of an error

    @property
    def per_sample(self) -> bool:
        """Whether the source decodes samples one at a time (`pixels`), rather than holding them in memory."""
        return callable(getattr(self.data, "pixels", None))

    def sample(self, i: int, key: Sequence[int] | None = None) -> Tensor:
        """Sample i un-normalised, [C, H, W] or [C, T, H, W] (uint8 from a file source, else float in [0, 1]),
        cropped and flipped by `key` (`crop_flip`'s draws) under crop-flip augmentation, else as `images`
        gives it."""
        crop = self.augment == "crop-flip" and key is not None
        if self.per_sample:
            return self.data.pixels(int(i), key_draws(key) if crop else None)
        x = self.data.floats(np.asarray([i]))  # [1, C, H, W] or [1, C, T, H, W]
        return (crop_flip(x, [key]) if crop else x)[0]

    def finish(self, x: Tensor) -> Tensor:
        """A batch of `sample`s [B, C, H, W] (clips [B, C, T, H, W]) -> normalised float32 on the device."""
        return self.prepare(x.to(self.device, non_blocking=x.is_pinned()))

    def prepare(self, x: Tensor) -> Tensor:
        """Samples [B, C, H, W] or one [C, H, W] (clips: [B, C, T, H, W] or one [C, T, H, W]; uint8 or float in
        [0, 1]) -> normalised float32, where they are."""
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x
        one = x.dim() == sample_dims(self.data)
        return normalize(x[None], self.mean, self.std)[0] if one else normalize(x, self.mean, self.std)

    @property
    def prepares_in_workers(self) -> bool:
        """Whether the workers hand over finished batches: on CPU they normalise (the training process has no
        core to spare for it); for an accelerator they send 8-bit samples, a quarter of the bytes, and the
        device normalises them."""
        return self.device.type == "cpu"

    def ready(self, images: Tensor) -> Tensor:
        """A `_Reader` batch as callers get it, normalised on the device (on CPU the reader normalised it)."""
        return images if self.prepares_in_workers else self.finish(images)

    def images(self, index: np.ndarray, *, keys: Sequence[Sequence[int] | None] | None = None) -> Tensor:
        """Normalised images [B, C, H, W] (clips [B, C, T, H, W]) on the device; with crop-flip, augmented when
        `keys` (one per image: `crop_flip`) are given. A file source reads them as a worker would (`_Reader`)."""
        if self.per_sample:
            keys = [None] * len(index) if keys is None else keys
            fetched = _checked(_Reader(self, True, False).fetch(list(zip(index, keys, strict=True))), self.skip_bad)
            return self.ready(fetched.images)
        x = self.data.floats(index)
        if self.augment == "crop-flip" and keys is not None:
            x = crop_flip(x, keys)
        return normalize(x, self.mean, self.std).to(self.device)

    def labels(self, index: np.ndarray) -> Tensor:
        if self.data.labels is None:
            raise DataError(f"dataset {self.data.name!r} has no labels")
        return self.data.labels[torch.from_numpy(np.asarray(index))].to(self.device)

    def batches(self, index: np.ndarray, batch_size: int) -> Iterator[Tensor]:
        """The images at `index` in order, normalised, `batch_size` at a time, read by the worker processes
        (evaluation's passes over a split: features, test accuracy)."""
        chunks = [index[s : s + batch_size] for s in range(0, len(index), batch_size)]
        if self.num_workers == 0 or len(chunks) < 2:
            yield from (self.images(chunk) for chunk in chunks)
            return
        reader = _Reader(self, augment=False, labels=False)
        workers = _track(iter(_data_loader(reader, [[(int(i), None) for i in chunk] for chunk in chunks], self,
                                           persistent=False)))  # fmt: skip
        try:
            for batch in workers:
                yield self.ready(_checked(batch, self.skip_bad).images)
        finally:
            _stop(workers)


def shard(index: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Rank `rank`'s contiguous part of a global batch: positions r*b .. r*b+b-1, b = len // world_size."""
    b = len(index) // world_size
    return index[rank * b : (rank + 1) * b]


class Batch(NamedTuple):
    """One rank's batch: dataset indices [b], normalised images [b, C, H, W] (clips [b, C, T, H, W]), labels [b]
    (None if unlabeled)."""

    index: np.ndarray
    images: Tensor
    labels: Tensor | None


class Loader:
    """Seeded endless batches of `indices` from `batcher.data`, as this rank's normalised tensors.

    Args:
        batcher: the source, normalisation, device and augmentation ("none" | "crop-flip"), and how many
            worker processes read the batches (`batcher.num_workers`; `num_workers` overrides it).
        indices: the split's dataset indices.
        batch_size: per rank; the global batch is batch_size x world_size (capped at len(indices)).
        seed: the stream's seed (epoch e is the permutation seeded with (seed, e)).
        rank, world_size: this process's shard of every global batch (`shard`).
        augment_seed: first element of every augmentation key (default `seed`). The sample at global
            position p of batch n (n counted from the start, kept by the state) is augmented by
            `crop_flip` with key (augment_seed, n, p): the same images on any number of ranks or workers.
        augment: False never augments (labeled and validation batches); True augments as `batcher.augment` says.
        prefetch: prepare the next batch on a background thread while the caller uses this one (no workers).
        labels: False leaves `Batch.labels` None (a stream whose labels nobody reads: MAE pretraining).
        split: the split's name, for the message when it is too small for the processes.

    With worker processes (torch's DataLoader, persistent for the loader's life, pinned memory on CUDA)
    the batch sampler starts at the stream's position and the workers run ahead; `state_dict()` is the
    position after the last batch this loader returned, so a resume continues exactly, with any number
    of workers.
    """

    def __init__(
        self, batcher: Batcher, indices: np.ndarray, batch_size: int, seed: int, *, rank: int = 0,
        world_size: int = 1, augment_seed: int | None = None, augment: bool = True, prefetch: bool = False,
        labels: bool = True, split: str | None = None, num_workers: int | None = None,
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
        self.num_workers = int(batcher.num_workers if num_workers is None else num_workers)
        self.skipped: list[str] = []  # unreadable files replaced in their batch (batcher.skip_bad)
        self._pool: ThreadPoolExecutor | None = None
        self._ahead: tuple[dict[str, int], Future[Batch]] | None = None  # (state before it, the batch)
        self._workers: Iterator[Fetched] | None = None

    @property
    def batch_size(self) -> int:
        """This rank's batch size."""
        return self.stream.batch_size // self.world_size

    @property
    def batches_per_epoch(self) -> int:
        return self.stream.batches_per_epoch

    def _keys(self, number: int, global_index: np.ndarray) -> tuple[np.ndarray, list[tuple[int, ...] | None]]:
        """This rank's indices of global batch `number`, and each one's augmentation key (None: not augmented)."""
        index = shard(global_index, self.rank, self.world_size)
        first = self.rank * len(index)
        if not self.augment:
            return index, [None] * len(index)
        return index, [(self.augment_seed, number, first + i) for i in range(len(index))]

    def _make(self, number: int, global_index: np.ndarray) -> Batch:
        index, keys = self._keys(number, global_index)
        if self.batcher.per_sample:
            reader = _Reader(self.batcher, self.augment, self.with_labels)
            fetched = self._checked(reader.fetch(list(zip(index, keys, strict=True))))
            return Batch(index, self.batcher.ready(fetched.images), self._labels(fetched))
        images = self.batcher.images(index, keys=keys if self.augment else None)
        labels = self.batcher.labels(index) if self.with_labels else None
        return Batch(index, images, labels)

    def _labels(self, fetched: Fetched) -> Tensor | None:
        return None if fetched.labels is None else fetched.labels.to(self.batcher.device)

    def _checked(self, fetched: Fetched) -> Fetched:
        self.skipped += _checked(fetched, self.batcher.skip_bad).skipped
        return fetched

    def _draw(self) -> tuple[dict[str, int], tuple[int, np.ndarray]]:
        """(the stream state before it, (batch number, global indices)) of the next global batch."""
        state = self.stream.state_dict()
        global_index = self.stream.next()  # [batch_size x world_size]
        return state, (self.stream.position - 1, global_index)

    def next(self) -> Batch:
        """This rank's next batch."""
        if self.num_workers > 0:
            return self._next_from_workers()
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

    def _next_from_workers(self) -> Batch:
        if self._workers is None:
            sampler = _BatchKeys(self, self.stream.state_dict())
            self._workers = _track(iter(_data_loader(_Reader(self.batcher, self.augment, self.with_labels),
                                                     sampler, self.batcher, self.num_workers)))  # fmt: skip
        fetched = self._checked(next(self._workers))
        index = shard(self.stream.next(), self.rank, self.world_size)  # the main stream follows the workers
        if not np.array_equal(index, fetched.index):
            raise RuntimeError("the loader's workers and its stream disagree on the batch")  # a bug, not bad input
        return Batch(index, self.batcher.ready(fetched.images), self._labels(fetched))

    def state_dict(self) -> dict[str, int]:
        """The position after the last batch `next` returned (a prefetched one is not counted)."""
        return dict(self._ahead[0]) if self._ahead is not None else self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict()` (or a `BatchStream` state of the same global batch size and seed)."""
        if self._ahead is not None:
            self._ahead[1].result()
            self._ahead = None
        self._stop_workers()  # they restart from the new position
        self.stream.load_state_dict(state)

    def close(self) -> None:
        """Stop the prefetch thread and the worker processes (the loader still works: they start again)."""
        if self._ahead is not None:
            self.stream.load_state_dict(self._ahead[0])
            self._ahead[1].result()
            self._ahead = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._stop_workers()

    def _stop_workers(self) -> None:
        if self._workers is not None:
            _stop(self._workers)
            self._workers = None


# ---- the worker side: reading samples by key -----------------------------------------------------------


class Fetched(NamedTuple):
    """What a worker returns for one batch: the indices, the samples [b, C, H, W] or [b, C, T, H, W] (normalised when the batcher
    `prepares_in_workers`, else 8-bit or float in [0, 1]), labels [b] or None, the files it could not read
    (replaced in the batch under skip_bad), and the first error if any."""

    index: np.ndarray
    images: Tensor | None
    labels: Tensor | None
    skipped: list[str]
    error: str | None


class _Reader(torch.utils.data.Dataset):
    """The samples of `batcher` by (index, key): what each worker process computes, one batch at a time."""

    def __init__(self, batcher: Batcher, augment: bool, labels: bool) -> None:
        self.batcher, self.augment, self.labels = batcher, augment, labels

    def __len__(self) -> int:
        return len(self.batcher.data)

    def fetch(self, items: Sequence[tuple[int, Sequence[int] | None]]) -> Fetched:
        """A whole batch: an unreadable file is an error, or (skip_bad) replaced by the next readable sample."""
        index = np.asarray([int(i) for i, _ in items], dtype=np.int64)
        samples: list[Tensor | None] = []
        skipped: list[str] = []
        for i, key in items:
            try:
                samples.append(self.batcher.sample(int(i), key if self.augment else None))
            except DataError as err:
                if not self.batcher.skip_bad:
                    return Fetched(index, None, None, [], str(err))
                samples.append(None)
                skipped.append(str(err))
        good = [k for k, x in enumerate(samples) if x is not None]
        if not good:
            return Fetched(index, None, None, skipped, f"no readable image in a batch: {skipped[0]}")
        use = [max([g for g in good if g < k], default=good[0]) if x is None else k for k, x in enumerate(samples)]
        if self.batcher.prepares_in_workers:  # per sample: each one's arithmetic stays in the cache
            samples = [None if x is None else self.batcher.prepare(x) for x in samples]
        # default_collate stacks straight into shared memory inside a worker (no copy on the way out)
        images = torch.utils.data.default_collate([samples[k] for k in use])
        labels = None
        if self.labels and self.batcher.data.labels is not None:
            labels = self.batcher.data.labels[torch.from_numpy(index[use])]
        return Fetched(index, images, labels, skipped, None)

    __getitems__ = fetch

    def __getitem__(self, item: tuple[int, Sequence[int] | None]) -> Fetched:
        return self.fetch([item])


def _checked(fetched: Fetched, skip_bad: bool) -> Fetched:
    """`fetched`, or its error as a one-line DataError; the skipped files as one warning each."""
    if fetched.error is not None:
        raise DataError(fetched.error.splitlines()[0] + ("" if skip_bad else " (--skip-bad-images skips such files)"))
    for message in fetched.skipped:
        warnings.warn(f"skipped: {message}", DataWarning, stacklevel=3)
    return fetched


class _BatchKeys:
    """The DataLoader's batch sampler: this rank's (index, key) lists of the loader's stream from `state` on."""

    def __init__(self, loader: Loader, state: dict[str, int]) -> None:
        self.loader, self.state = loader, dict(state)

    def __iter__(self) -> Iterator[list[tuple[int, tuple[int, ...] | None]]]:
        stream = BatchStream(self.loader.stream.indices, self.loader.stream.batch_size, self.loader.stream.seed)
        stream.load_state_dict(self.state)
        while True:
            number = stream.position  # (at an epoch's end: the next epoch's first batch, as `Loader._draw` counts)
            index, keys = self.loader._keys(number, stream.next())
            yield [(int(i), k) for i, k in zip(index, keys, strict=True)]


def _identity(batch: Fetched) -> Fetched:
    return batch


#: seconds a worker keeps serving after a SIGTERM (one sent to the whole process group by torchrun or a
#: scheduler, while the main process finishes its step and checkpoints) before it exits
WORKER_TERM_GRACE = 30.0


def _term_later(signum: int, frame: Any) -> None:
    """A worker's SIGTERM: exit after WORKER_TERM_GRACE seconds, not at once (see `_quiet_worker`)."""
    timer = threading.Timer(WORKER_TERM_GRACE, os._exit, args=(0,))
    timer.daemon = True
    timer.start()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one timer is enough


def _quiet_worker(_: int) -> None:
    """Worker start-up: the stop signals sent to a whole process group (Ctrl-C's SIGINT, a scheduler's
    SIGUSR1, torchrun's or a scheduler's SIGTERM) are the main process's to handle: it finishes its step
    and checkpoints while the workers still serve it, then shuts them down (`shutdown_workers`; they also
    end when it dies). SIGINT and SIGUSR1 are ignored; SIGTERM ends the worker WORKER_TERM_GRACE seconds
    later, so that a worker the main process could not stop still goes. Under a SLURM job submitted through
    submitit (maskkit.slurm), SLURM signals every process of the job ahead of its time limit with submitit's
    signal (SIGUSR2, or SUBMITIT_PREEMPT_SIGNAL's): ignored as well."""
    preempt = "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2").upper().removeprefix("SIG")
    for name in dict.fromkeys(("SIGINT", "SIGUSR1", "SIGUSR2", preempt)):
        if hasattr(signal, name) and name not in ("SIGTERM", "SIGKILL", "SIGSTOP"):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _term_later)


#: the worker pools now running (a DataLoader iterator each), shut down at exit before multiprocessing's
#: own exit handler, which would otherwise wait on workers that ignore its SIGTERM
_LIVE: weakref.WeakSet[Any] = weakref.WeakSet()


def _stop(workers: Any) -> None:
    """Shut one worker pool down: its workers finish their queue item and exit."""
    _LIVE.discard(workers)
    shutdown = getattr(workers, "_shutdown_workers", None)
    if callable(shutdown):
        shutdown()


def shutdown_workers() -> None:
    """Stop every worker pool of this process (run at exit; safe to call at any time)."""
    for workers in list(_LIVE):
        _stop(workers)


def _track(workers: Any) -> Any:
    """Remember a new worker pool, and (re-)register `shutdown_workers` at exit so that it runs before
    multiprocessing's own exit handler (atexit runs the last registered first)."""
    _LIVE.add(workers)
    atexit.unregister(shutdown_workers)
    atexit.register(shutdown_workers)
    return workers


def _data_loader(
    reader: _Reader, batches: Any, batcher: Batcher, num_workers: int | None = None, *, persistent: bool = True
) -> Any:
    """torch's DataLoader over `reader` with the batch sampler `batches`: pinned memory on CUDA, workers that
    persist (an endless sampler: one pool for the loader's life) unless `persistent` is False."""
    workers = batcher.num_workers if num_workers is None else num_workers
    return torch.utils.data.DataLoader(
        reader, batch_sampler=batches, num_workers=workers, collate_fn=_identity,
        pin_memory=batcher.device.type == "cuda", worker_init_fn=_quiet_worker,
        persistent_workers=persistent and workers > 0, prefetch_factor=2 if workers > 0 else None,
    )  # fmt: skip


#: fewest files for which a file source gets worker processes by default (below it, starting the processes
#: costs more than decoding in the training process)
MIN_FILES_FOR_WORKERS = 1000


def default_workers(data: DataSource) -> int:
    """--num-workers' default: none for data held in memory (gathering a batch is faster than sending it
    between processes) or for fewer than MIN_FILES_FOR_WORKERS files; for a larger source that decodes
    files, the cores this process may use less one for the training loop, at most 8."""
    if not callable(getattr(data, "pixels", None)) or len(data) < MIN_FILES_FOR_WORKERS:
        return 0
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(0, min(8, cores - 1))
