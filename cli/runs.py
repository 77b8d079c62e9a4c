"""Run directories: what `maskkit pretrain` writes and how `evaluate`/`visualize` rebuild a run from it.

A run directory holds `config.json` (everything needed to repeat the run), `metrics.jsonl`,
`checkpoints/checkpoint-<step>.pt` (+ `.sha256`), `model.pt` (final weights), `summary.json`,
and later `eval.json` and pictures. `RunSpec` is the content of config.json; `build_run`
turns it back into data, splits, MAE and policy.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from maskkit.adapters.timm import create_mae, get_preset
from maskkit.checkpoint import CheckpointError, atomic_write_text, load_checkpoint, load_latest
from maskkit.data import (
    Batcher,
    ImageData,
    channel_stats,
    load_dataset,
    make_splits,
    parse_dataset,
    resolve_augment,
)
from maskkit.registry import create_policy, get_policy_class, policy_options

CONFIG = "config.json"
METRICS = "metrics.jsonl"
MODEL = "model.pt"
SUMMARY = "summary.json"
EVAL = "eval.json"
CHECKPOINTS = "checkpoints"

#: the default model: small enough for a CPU-minutes run on 8x8 digits (patch 2 -> 16 patches).
DEFAULT_MODEL = "micro"

#: fewest patches an automatically chosen patch size may give.
MIN_AUTO_PATCHES = 16


@dataclass
class RunSpec:
    """The content of config.json."""

    dataset: dict[str, Any]
    model: dict[str, Any]
    policy: dict[str, Any]
    train: dict[str, Any]
    device: str = "cpu"
    versions: dict[str, str] = field(default_factory=dict)
    command: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2, sort_keys=True) + "\n"

    @classmethod
    def read(cls, run_dir: str | Path) -> RunSpec:
        path = Path(run_dir) / CONFIG
        if not Path(run_dir).is_dir():
            raise ValueError(f"run directory {run_dir} does not exist")
        if not path.is_file():
            raise ValueError(f"{run_dir} is not a run directory (no {CONFIG})")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            return cls(**raw)
        except (json.JSONDecodeError, TypeError) as err:
            raise ValueError(f"{path} is not a maskkit run configuration: {err}") from None


@dataclass
class Run:
    """A run rebuilt from its spec: data, splits, batcher, MAE and policy (untrained)."""

    spec: RunSpec
    data: ImageData
    splits: dict[str, np.ndarray]
    batcher: Batcher
    mae: nn.Module
    policy: nn.Module
    device: torch.device


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if available else cpu; otherwise a torch device that exists here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r} requested but MPS is not available")
    return device


def choose_patch_size(preset: str, img_size: tuple[int, int], patch_size: int | None) -> int:
    """The given patch size, checked; else the preset's if it divides the image into >= 16 patches,
    else the largest size below it that does."""
    height, width = img_size
    if patch_size is not None:
        if patch_size < 1:
            raise ValueError(f"patch size must be a positive integer, got {patch_size}")
        if height % patch_size or width % patch_size:
            raise ValueError(f"image size {height}x{width} is not divisible by patch size {patch_size}")
        return patch_size
    base = get_preset(preset).patch_size
    for p in range(base, 0, -1):
        if height % p == 0 and width % p == 0 and (height // p) * (width // p) >= MIN_AUTO_PATCHES:
            return p
    raise ValueError(f"no patch size divides image size {height}x{width}; pass --patch-size")


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


def build_run(spec: RunSpec, device: torch.device | None = None) -> Run:
    """Data, splits, normalisation, MAE and policy exactly as config.json describes them."""
    device = resolve_device(spec.device) if device is None else device
    ds = spec.dataset
    data = load_dataset(ds["name"], ds.get("data_dir"), download=False, img_size=ds.get("img_size_override"))
    splits = make_splits(data, ds["split_seed"], ds["split_fractions"])
    sizes = {k: len(v) for k, v in splits.items()}
    if sizes != ds["splits"]:
        raise ValueError(f"dataset {ds['name']!r} no longer gives the run's splits ({sizes} vs {ds['splits']})")
    batcher = Batcher(data, ds["mean"], ds["std"], device, ds["augment"])
    mae = build_mae(spec.model).to(device)
    pol = spec.policy
    policy = create_policy(pol["name"], **policy_kwargs(pol["name"], pol["options"], spec.train["mask_ratio"], mae))
    return Run(spec, data, splits, batcher, mae, policy.to(device), device)


def untrained_setup(
    dataset: str, data_dir: str | None, preset: str, seed: int, device: torch.device
) -> tuple[nn.Module, Batcher, np.ndarray]:
    """An untrained MAE of `preset` sized for `dataset` (patch size as pretrain chooses it), a batcher
    normalised by the train split's statistics (no augmentation) and the test split's indices."""
    data = load_dataset(dataset, data_dir, download=False)
    splits = make_splits(data, seed)
    mean, std = channel_stats(data, splits["train"])
    patch = choose_patch_size(preset, data.image_size, None)
    mae = create_mae(preset, img_size=tuple(data.image_size), patch_size=patch, in_chans=data.in_chans, seed=seed)
    return mae.to(device), Batcher(data, mean, std, device), splits["test"]


def build_mae(model: dict[str, Any]) -> nn.Module:
    """The MAE of a config's `model` section, freshly initialised from its seed."""
    return create_mae(
        model["preset"],
        img_size=model["img_size"],
        patch_size=model["patch_size"],
        in_chans=model["in_chans"],
        norm_pix_loss=model["norm_pix_loss"],
        seed=model["init_seed"],
        **model.get("overrides", {}),
    )


def dataset_section(
    name: str, data_dir: str | None, img_size: int | None, data: ImageData, seed: int, augment: str,
    fractions: dict[str, float],
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The config's `dataset` section (statistics of the train split, split sizes) and the splits."""
    splits = make_splits(data, seed, fractions)
    mean, std = channel_stats(data, splits["train"])
    kind, path = parse_dataset(name)
    section = {
        "name": name if path is None else f"{kind}:{Path(path).resolve()}",  # usable from any directory
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
        "augment": resolve_augment(augment, data.image_size),
        "split_seed": seed,
        "split_fractions": fractions,
        "splits": {k: len(v) for k, v in splits.items()},
    }
    return section, splits


def needs_labels(policy_name: str) -> bool:
    """Whether the policy is trained from labels (a `learnable` one, via the MLO engine)."""
    return bool(getattr(get_policy_class(policy_name), "learnable", False))


def check_writable(directory: Path) -> None:
    """Create `directory` if needed and prove a file can be written there; ValueError otherwise."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        reason = err.strerror or str(err)
        raise ValueError(f"cannot write to output directory {directory}: {reason}") from None


def load_weights(run: Run, run_dir: str | Path) -> dict[str, Any]:
    """Load the run's final weights (model.pt) or else its newest good checkpoint into run.mae/policy.

    Returns {"source": path, "step": int, "head": state or None}.
    """
    run_dir = Path(run_dir)
    final = run_dir / MODEL
    if final.is_file():
        state = load_checkpoint(final, map_location=run.device)
        source = final
    else:
        try:
            source, ckpt, _ = load_latest(run_dir / CHECKPOINTS, map_location=run.device)
        except CheckpointError as err:
            raise ValueError(f"run {run_dir} has no usable weights: {err}") from None
        state = weights_from_checkpoint(ckpt)
    try:
        run.mae.load_state_dict(state["mae"])
        run.policy.load_state_dict(state["policy"])
    except (KeyError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0]
        raise ValueError(f"weights in {source} do not fit the run's model: {first}") from None
    return {"source": str(source), "step": int(state.get("step", 0)), "head": state.get("head")}


def weights_from_checkpoint(state: dict[str, Any]) -> dict[str, Any]:
    """{"mae", "policy", "head", "step"} out of a training checkpoint (plain or MLO engine)."""
    if "engine" in state:
        eng = state["engine"]
        return {"mae": eng["mae"], "policy": eng["masker"], "head": eng["head"], "step": state["step"]}
    return {"mae": state["mae"], "policy": state["policy"], "head": None, "step": state["step"]}


def merge_json(path: Path, key: str, value: Any) -> dict[str, Any]:
    """Set `key` in the JSON object at `path` (created if absent), written atomically."""
    current: dict[str, Any] = {}
    if path.is_file():
        try:
            current = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            raise ValueError(f"{path} is not valid JSON; move it away to write new results") from None
    current[key] = value
    atomic_write_text(path, json.dumps(current, indent=2, sort_keys=True) + "\n")
    return current
