"""The one builder of a run: config -> resolved record -> built run (-> trainer).

`resolve` turns a `RunConfig` and its data into a `RunRecord` (the data's statistics and splits,
the model's builder and init seed, the policy's typed options, every training setting);
`build_run` turns a record into a `Run` (data, splits, batcher, MAE, policy), exactly as
config.json describes it; `build_trainer` gives a built run its trainer. `new_run` (resolve, then
build) serves `create_run` and the policy gallery's untrained set-up; `build_run` alone serves
resume, load, evaluate and visualize. The order of construction here is the order in which the
global torch RNG is drawn (MAE from its own seed, then the policy, then the trainer's head), so it
is part of every run's result.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from maskkit.data import (
    DEFAULT_FRACTIONS,
    Batcher,
    DataChangedError,
    DataError,
    DataSource,
    ImageData,
    channel_stats,
    check_classes,
    data_fingerprint,
    default_workers,
    fingerprint_change,
    frames_of,
    load_dataset,
    make_splits,
    recorded_spec,
    resolve_augment,
)
from maskkit.data.splits import split_rule
from maskkit.distributed import SINGLE, DistContext
from maskkit.mae import is_video_mae
from maskkit.plan import check_ratio
from maskkit.policies import create_policy, policy_card, policy_options
from maskkit.train import Pretrainer, Resolved, TrainConfig
from maskkit.train.config import MAX_STEPS, check_device

from .config import FORMAT_VERSION, DataConfig, ModelConfig, RunConfig, RunError
from .record import RunRecord

#: fewest patches an automatically chosen patch size may give.
MIN_AUTO_PATCHES = 16


class RunWarning(UserWarning):
    """What a run changed from its request (e.g. a batch size clamped to the split); the CLI prints one line."""


class DataChangeWarning(UserWarning):
    """A run's data changed since it was pretrained and is used anyway (`trust_data_change`); one CLI line."""


@dataclass
class Run:
    """A run built from its record: data, splits, batcher, MAE and policy (untrained)."""

    record: RunRecord
    data: ImageData
    splits: dict[str, np.ndarray]
    batcher: Batcher
    mae: nn.Module
    policy: nn.Module
    device: torch.device
    data_changed: str | None = None  # what changed in the data since pretraining, when trusted anyway


def resolve_device(name: str, dist: DistContext = SINGLE) -> torch.device:
    """'auto' -> cuda if available else cpu; else a device that exists here; under torchrun on CUDA, cuda:LOCAL_RANK."""
    try:
        device = check_device(name)
    except ValueError as err:
        raise RunError(str(err)) from None
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    return device


# ---- the model and the policy -----------------------------------------------------------------


def model_spec(name: str) -> Any:
    """The parsed `--model` spec (`maskkit.adapters.models.ModelSpec`: kind, absolute paths); RunError if bad."""
    from maskkit.adapters.models import parse_model_spec

    try:
        return parse_model_spec(name)
    except ValueError as err:
        raise RunError(str(err)) from None


def model_kind(name: str) -> str:
    """'timm' for a preset, else the prefix of `official:...` / `hf:...`."""
    return model_spec(name).kind


def choose_patch_size(model: str, img_size: tuple[int, int], patch_size: int | None) -> int | None:
    """The given patch size, checked; without one, the adapter's own (`preferred_patch_size`, e.g. a timm
    preset's) if it divides the image into >= 16 patches, else the largest size below it that does; None
    when the adapter has none (its builder chooses)."""
    height, width = img_size
    if patch_size is not None:
        if patch_size < 1:
            raise RunError(f"--patch-size must be a positive integer, got {patch_size}")
        if height % patch_size or width % patch_size:
            raise RunError(f"--patch-size {patch_size}: image size {height}x{width} is not divisible by patch size "
                           f"{patch_size}")  # fmt: skip
        return patch_size
    from maskkit.adapters import preferred_patch_size

    model_spec(model)  # a bad spec: one line naming it
    base = preferred_patch_size(model)
    if base is None:
        return None
    for p in range(base, 0, -1):
        if height % p == 0 and width % p == 0 and (height // p) * (width // p) >= MIN_AUTO_PATCHES:
            return p
    raise RunError(f"no patch size divides image size {height}x{width}; pass --patch-size")


def build_mae(model: dict[str, Any]) -> nn.Module:
    """The MAE of a record's `model` section, freshly initialised from its seed (any adapter)."""
    from maskkit.adapters.models import create_mae_from_spec

    name = model.get("name", model.get("preset"))  # format 1 spelled it preset / overrides
    options = model.get("options", model.get("overrides", {}))
    frames = {"num_frames": model["num_frames"]} if model.get("num_frames") is not None else {}  # a video MAE's
    return create_mae_from_spec(
        name, img_size=model["img_size"], patch_size=model["patch_size"], in_chans=model["in_chans"],
        norm_pix_loss=model["norm_pix_loss"], seed=model["init_seed"], options=options, **frames,
    )  # fmt: skip


def policy_kwargs(name: str, options: dict[str, Any], ratio: float, mae: nn.Module) -> dict[str, Any]:
    """Constructor arguments: the user's options, the mask ratio, and embed_dim/num_patches from the MAE."""
    accepted = {o.name for o in policy_options(name)}
    kwargs = dict(options)
    if "ratio" in accepted:
        kwargs["ratio"] = ratio
    for key in ("embed_dim", "num_patches"):
        if key in accepted and key not in kwargs:
            kwargs[key] = getattr(mae, key)
    return kwargs


# ---- config -> resolved record ----------------------------------------------------------------


def load_data(data: DataConfig) -> ImageData:
    """The images a `DataConfig` names (downloaded if it says so)."""
    return load_dataset(data.dataset, data.data_dir, download=data.download, img_size=data.img_size,
                        num_frames=data.num_frames, sampling_rate=data.sampling_rate)  # fmt: skip


#: images a lazy source's channel statistics are estimated from (seeded sample of the pretraining split)
STATS_SAMPLE = 512
#: ImageNet's per-channel mean and std (RGB), what the official MAE normalises with
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def split_statistics(data: DataSource, index: np.ndarray, seed: int) -> tuple[list[float], list[float], str]:
    """(mean, std, how): exact over the split for data in memory; for a source that decodes files, ImageNet's
    for RGB (as MAE) and, for grey images, an estimate from a seeded sample of STATS_SAMPLE images."""
    if not callable(getattr(data, "pixels", None)):
        mean, std = channel_stats(data, index)
        return mean, std, "exact over the train split"
    if data.in_chans == 3:
        return list(IMAGENET_MEAN), list(IMAGENET_STD), "ImageNet's (RGB, as the official MAE)"
    pick = np.sort(np.random.default_rng(seed).choice(index, size=min(STATS_SAMPLE, len(index)), replace=False))
    mean, std = channel_stats(data, pick, chunk=64)
    return mean, std, f"estimated from {len(pick)} images of the pretraining split (seed {seed})"


def pretrain_split(splits: dict[str, np.ndarray]) -> np.ndarray:
    """What the MAE pretrains on: the whole train folder of the official layout, else the train split."""
    return splits.get("pretrain", splits["train"])


def dataset_section(
    name: str, data_dir: str | None, img_size: int | None, data: ImageData, seed: int, augment: str,
    fractions: dict[str, float],
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The record's `dataset` section (statistics of the train split, split sizes) and the splits."""
    splits = make_splits(data, seed, fractions)
    mean, std, stats = split_statistics(data, pretrain_split(splits), seed)
    section = {
        "name": recorded_spec(name),  # paths absolute: usable from any directory; source options kept
        "data_dir": None if data_dir is None else str(Path(data_dir).resolve()),
        "img_size_override": img_size,
        "image_size": list(data.image_size),
        "in_chans": data.in_chans,
        "num_images": len(data),
        "num_classes": data.num_classes,
        "labeled": data.labels is not None,
        "layout": data.layout,  # how an image folder was read (None for the other kinds)
        "mean": mean,
        "std": std,
        "augment": resolve_augment(augment, data.image_size, frames_of(data)),
        "split_seed": seed,
        "split_fractions": fractions,
        "splits": {k: len(v) for k, v in splits.items()},
        "split_rule": split_rule(data),
        "stats": stats,
        "fingerprint": data_fingerprint(data),  # evaluate, visualize and --resume check the data against it
        **_frames(data),  # a video source's frames per clip (absent for images: their records stay as they were)
    }
    return section, splits


def _frames(data: Any) -> dict[str, int]:
    """{"num_frames": T} for a video source (clips [C, T, H, W]), else nothing."""
    frames = frames_of(data)
    return {} if frames is None else {"num_frames": frames}


def model_section(model: ModelConfig, data: ImageData, seed: int) -> dict[str, Any]:
    """The record's `model` section before the model is built (`build_run` adds its sizes)."""
    height, width = data.image_size
    return {
        "name": str(model_spec(model.name)),  # canonical: file paths absolute, so the run resumes from anywhere
        "options": dict(model.options),
        "img_size": height if height == width else [height, width],
        "patch_size": choose_patch_size(model.name, data.image_size, model.patch_size),
        "in_chans": data.in_chans,
        "norm_pix_loss": model.norm_pix_loss,
        "init_seed": seed,
        **_frames(data),
    }


def train_section(config: RunConfig, train_split: int, world_size: int) -> dict[str, Any]:
    """The record's `train` section: every training setting resolved (steps and warm-up in steps of the
    effective batch, mask ratio, processes, the peak lr of --lr or --blr)."""
    t = config.train
    per_step = t.batch_size * world_size  # images of one micro-batch over the processes
    if t.accum_iter > 1 and t.effective_batch(world_size) > train_split:
        raise RunError(f"--accum-iter {t.accum_iter}: a step of {t.effective_batch(world_size)} images "
                       f"({per_step} x {t.accum_iter}) is more than the train split ({train_split} images); "
                       f"at most {max(train_split // per_step, 1)} here")  # fmt: skip
    steps = t.total_steps(train_split, world_size)
    if steps > MAX_STEPS:
        raise RunError(f"--epochs {t.epochs} is {steps:,} steps here, more than the most a run takes ({MAX_STEPS:,})")
    warmup = t.warmup(steps, train_split, world_size)
    lr = t.peak_lr(world_size)
    if t.min_lr > lr:
        raise RunError(f"--min-lr {t.min_lr} is above the peak learning rate {lr}")
    resolved = Resolved(steps, warmup, config.policy.ratio(), world_size, lr=lr)
    return TrainConfig(t, config.mlo, resolved).to_dict()


def clamp_batch(config: RunConfig, train_split: int, world_size: int) -> RunConfig:
    """`config` with a --batch-size above the train split clamped to it (the loader caps it anyway), with a
    RunWarning, so config.json records what runs; unchanged under several processes."""
    size = config.train.batch_size
    if world_size != 1 or size <= train_split:
        return config
    warnings.warn(f"--batch-size {size} is larger than the train split ({train_split} images); running and "
                  f"recording --batch-size {train_split}", RunWarning, stacklevel=3)  # fmt: skip
    return replace(config, train=replace(config.train, batch_size=train_split))


def check_data_fits(config: RunConfig, data: ImageData) -> None:
    """A policy trained from labels needs a labelled data set (of at least two classes unless the masker is frozen)."""
    pol, name = config.policy, config.data.dataset
    if not pol.learnable():
        return
    if data.labels is None:
        raise RunError(f"policy {pol.name!r} learns from labels, but dataset {name!r} has none "
                       "(use --policy random or attention)")  # fmt: skip
    if not config.mlo.freeze_masker:
        try:
            check_classes(data, f"policy {pol.name!r}")
        except DataError as err:
            raise RunError(f"{err} (use --policy random or attention)") from None


def resolve(
    config: RunConfig, data: ImageData, device: torch.device, *, world_size: int = 1, command: list[str] | None = None
) -> RunRecord:
    """The record of a new run of `config` on `data`: every section resolved but the model's sizes."""
    from maskkit import __version__

    check_data_fits(config, data)
    d, seed = config.data, config.train.seed
    section, splits = dataset_section(d.dataset, d.data_dir, d.img_size, data, seed, d.augment, dict(DEFAULT_FRACTIONS))
    pool = len(pretrain_split(splits))
    config, pol = clamp_batch(config, pool, world_size), config.policy
    return RunRecord(
        dataset=section, model=model_section(config.model, data, seed),
        policy={"name": pol.name, "options": pol.typed_options(), "learnable": pol.learnable()},
        train=train_section(config, pool, world_size), device=str(device),
        versions={"maskkit": __version__, "torch": torch.__version__},
        command=list(sys.argv if command is None else command), config=config.to_dict(),
        format_version=FORMAT_VERSION,
    )  # fmt: skip


# ---- resolved record -> built run -> trainer ----------------------------------------------------


def data_change(record: RunRecord, data: Any) -> str | None:
    """What changed in `data` since the run of `record` was pretrained on it ("content changed (sha256 ...)"),
    or None: unchanged, or a run recorded before fingerprints (not checked)."""
    recorded = record.resolved.data.fingerprint
    if recorded is None:
        return None
    return fingerprint_change(recorded, data_fingerprint(data))


def check_data(
    record: RunRecord, data: Any, *, run_dir: str | Path | None = None, trust_data_change: bool = False
) -> str | None:
    """RunError (one line naming the dataset and what changed) when `data` is not what the run was pretrained
    on; with `trust_data_change`, a `DataChangeWarning` instead. Returns what changed, or None."""
    changed = data_change(record, data)
    if changed is None:
        return None
    run = "the run" if run_dir is None else f"run {run_dir}"
    text = f"data of {run} changed since it was pretrained: {record.resolved.data.name}: {changed}"
    if not trust_data_change:
        raise RunError(f"{text}; pass --trust-data-change to use it anyway")
    warnings.warn(DataChangeWarning(f"{text}; using it anyway, as --trust-data-change asks"), stacklevel=3)
    return changed


def build_run(
    record: RunRecord, device: torch.device | None = None, data: ImageData | None = None, *,
    run_dir: str | Path | None = None, trust_data_change: bool = False,
) -> Run:
    """Data, splits, normalisation, MAE and policy exactly as config.json describes them.

    `data`: the images of a new run (`new_run`), already read; the record then gets the model's
    sizes and the mask ratio is checked against them. Without it they are read as the record says (an
    image folder from the file index kept in `run_dir`, its listing checked against the folder) and
    checked against the record's fingerprint (`check_data`: a RunError naming `run_dir` and what
    changed, unless `trust_data_change`).
    """
    device = resolve_device(record.device) if device is None else device
    ds, asked, new, changed = record.resolved.data, record.asked, data is not None, None
    if data is None:
        try:
            data = load_dataset(ds.name, ds.data_dir, download=False, img_size=ds.img_size_override,
                                cache_dir=run_dir, check=not trust_data_change, num_frames=asked.data.num_frames,
                                sampling_rate=asked.data.sampling_rate)  # fmt: skip
        except DataChangedError as err:
            raise RunError(f"{err}; pass --trust-data-change to use it anyway") from None
        except DataError as err:
            raise RunError(str(err)) from None
        changed = check_data(record, data, run_dir=run_dir, trust_data_change=trust_data_change)
    splits = make_splits(data, ds.split_seed, ds.split_fractions)
    sizes = {k: len(v) for k, v in splits.items()}
    if sizes != ds.splits:
        raise RunError(f"dataset {ds.name!r} no longer gives the run's splits ({sizes} vs {ds.splits})")
    workers = asked.data.num_workers
    batcher = Batcher(data, ds.mean, ds.std, device, ds.augment,
                      num_workers=default_workers(data) if workers is None else int(workers),
                      skip_bad=asked.data.skip_bad_images)  # fmt: skip
    try:
        mae = build_mae(record.model).to(device)
    except (TypeError, KeyError) as err:
        if not new:
            raise
        raise RunError(f"cannot build model {asked.model.name!r}: {err}") from None
    _check_kinds(asked.model.name, mae, ds.name, data)
    ratio, pol = record.resolved.train.resolved.mask_ratio, record.resolved.policy
    if new:
        record.model.update(patch_size=int(mae.patch_size), num_patches=mae.num_patches, embed_dim=mae.embed_dim)
        check_ratio(ratio, mae.num_patches)
    policy = create_policy(pol.name, **policy_kwargs(pol.name, pol.options, ratio, mae))
    return Run(record, data, splits, batcher, mae, policy.to(device), device, changed)


def _check_kinds(model: str, mae: nn.Module, dataset: str, data: Any) -> None:
    """RunError naming both when a video MAE meets images or an image MAE meets clips."""
    clips = frames_of(data) is not None
    if is_video_mae(mae) == clips:
        return
    if clips:
        raise RunError(f"dataset {dataset!r} holds clips of {data.num_frames} frames, but model {model!r} is an image "
                       "MAE; pass a video MAE, e.g. --model video:micro")  # fmt: skip
    raise RunError(f"model {model!r} is a video MAE, but dataset {dataset!r} holds images; pass a video source "
                   "(e.g. --dataset movingdigits) or an image MAE")  # fmt: skip


def new_run(
    config: RunConfig, data: ImageData, device: torch.device, *, world_size: int = 1, command: list[str] | None = None
) -> Run:
    """config -> resolved record -> built run: a new run of `config` on `data`, its record complete."""
    return build_run(resolve(config, data, device, world_size=world_size, command=command), device, data)


def build_trainer(run: Run, dist: DistContext = SINGLE, *, steps: int | None = None) -> Pretrainer:
    """The trainer of a built run, with the settings of its record's `train` section (`steps`: extended to).

    Builds the optimizers and, for a learnable policy, the MLO engine and its head (from the
    global torch RNG, after the policy): may fail with a one-line error.
    """
    cfg = run.record.train_config  # the trainer's own copy: `steps` extends it
    if steps is not None:
        cfg.steps = steps
    # a memory layout, not one of the record's training numbers: config.json's request says it (on --resume too)
    cfg.train.channels_last = run.record.asked.train.channels_last
    learns = policy_card(run.record.resolved.policy.name).learns
    return Pretrainer(run.mae, run.policy, run.batcher, run.splits, cfg, run.device, dist, learns=learns)


__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "MIN_AUTO_PATCHES", "STATS_SAMPLE", "DataChangeWarning", "Run", "RunWarning",
    "build_mae", "build_run", "build_trainer", "check_data", "choose_patch_size", "data_change", "dataset_section",
    "model_kind", "model_section", "model_spec", "new_run", "policy_kwargs", "pretrain_split", "resolve",
    "resolve_device", "split_statistics",
]  # fmt: skip
