"""The run layer: one typed, versioned `RunConfig`, `create_run` / `resume_run`, and the run-directory format.

A run directory holds `config.json` (the `RunConfig` as asked for, and what it resolved to: the
data's statistics and splits, the model's sizes, the steps), `metrics.jsonl`,
`checkpoints/checkpoint-<step>.pt` (+ `.sha256`), `model.pt` (final weights), `summary.json`, and
later `eval.json` and pictures. This module owns that format; `maskkit pretrain`, `evaluate` and
`visualize` only parse options into these calls and print what comes back.

    config = RunConfig(data=DataConfig("digits"), policy=PolicyConfig("random"), train=TrainSettings(steps=50))
    prepared = create_run(config, "runs/demo")      # validates everything, then writes config.json
    summary = train_run(prepared)                   # metrics, checkpoints, model.pt, summary.json
    prepared = resume_run("runs/demo", steps=100)   # continues from the newest checkpoint
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from maskkit.checkpoint import (
    CheckpointError,
    atomic_write_text,
    list_checkpoints,
    load_checkpoint,
    load_latest,
    save_checkpoint,
)
from maskkit.compile import NO_COMPILE, check_backend
from maskkit.data import (
    DEFAULT_FRACTIONS,
    Batcher,
    DataError,
    ImageData,
    channel_stats,
    check_classes,
    load_dataset,
    make_splits,
    parse_dataset,
    resolve_augment,
)
from maskkit.distributed import SINGLE, DistContext, barrier, broadcast_object
from maskkit.plan import check_ratio
from maskkit.policies import coerce_policy_options, create_policy, get_policy_class, policy_options
from maskkit.settings import flag, setting
from maskkit.training import (
    AMP_MODES,
    MASK_NOISE,
    MetricsLog,
    MLOSettings,
    Pretrainer,
    StopSignals,
    TrainConfig,
    train,
)

CONFIG = "config.json"
METRICS = "metrics.jsonl"
MODEL = "model.pt"
SUMMARY = "summary.json"
EVAL = "eval.json"
CHECKPOINTS = "checkpoints"

#: version of config.json; 1 is the layout before `RunConfig` (read as is), 2 adds `format_version` and `config`.
FORMAT_VERSION = 2
#: training iterations when neither steps nor epochs are given
DEFAULT_STEPS = 600
#: the default model: small enough for a CPU-minutes run on 8x8 digits (patch 2 -> 16 patches).
DEFAULT_MODEL = "micro"
#: fewest patches an automatically chosen patch size may give.
MIN_AUTO_PATCHES = 16
AUGMENT = ("auto", "none", "crop-flip")


class RunError(ValueError):
    """A run that cannot be created, resumed or read; its message is one line."""


# ---- the configuration ------------------------------------------------------------------------

#: the mask ratio of a policy without a default of its own (MAE's)
DEFAULT_MASK_RATIO = 0.75


@dataclass
class DataConfig:
    """Which images, at which size, with which augmentation."""

    dataset: str = setting(
        "digits", "digits | mnist | fashion-mnist | cifar10 | cifar100 | imagefolder:PATH | npz:PATH."
    )
    data_dir: str | None = setting(None, "Where torchvision datasets live.")
    download: bool = setting(False, "Download a torchvision dataset into --data-dir.")
    img_size: int | None = setting(None, "Resize images to this side (default: as stored).")
    augment: str = setting("auto", "auto: MAE crop + flip for images of side >= 32, else none | none | crop-flip.")


@dataclass
class ModelConfig:
    """The MAE: a timm preset, the user's official-MAE file, or a Hugging Face ViTMAE config."""

    name: str = setting(
        DEFAULT_MODEL,
        "MAE: a timm preset (micro, pilot, tiny, small, vit-b, ...), official:PATH/models_mae.py[:CALLABLE], "
        "hf:tiny or hf:PATH/config.json.",
        param="model", flags=("--model",),
    )  # fmt: skip
    options: dict[str, Any] = setting(
        default_factory=dict, help="Model option key=value passed to the builder (repeatable).",
        param="model_opt", flags=("--model-opt",),
    )  # fmt: skip
    patch_size: int | None = setting(None, "Patch side (default: the model's, if it fits the images).")
    norm_pix_loss: bool = setting(False, "Normalise each target patch (MAE).")


@dataclass
class PolicyConfig:
    """Which patches are hidden: a registered policy, its options, the mask ratio."""

    name: str = setting(
        "random", "Masking policy (maskkit policies lists them); random: the safe choice (docs/results.md, issue 12).",
        param="policy", flags=("--policy",),
    )  # fmt: skip
    options: dict[str, Any] = setting(
        default_factory=dict, help="Policy option as option=value (repeatable), or --<policy>-<option> VALUE.",
        param="policy_opt", flags=("--policy-opt",),
    )  # fmt: skip
    mask_ratio: float | None = setting(
        None, "Fraction of patches hidden, in (0, 1) (default: the policy's own: 0.75, simmim 0.6 as in SimMIM)."
    )

    def ratio(self) -> float:
        """The mask ratio the run uses: --mask-ratio, else the policy's own default (else 0.75)."""
        return self.mask_ratio if self.mask_ratio is not None else default_ratio(self.name)


@dataclass
class TrainSettings:
    """Length, optimiser, seed, device, logging and checkpoints of the MAE's pretraining."""

    steps: int | None = setting(None, f"Training iterations (default {DEFAULT_STEPS}).")
    epochs: float | None = setting(None, "Training length in epochs of the train split (instead of --steps).")
    batch_size: int = setting(128, "Images per iteration.")
    lr: float = setting(1.5e-3, "MAE learning rate (peak of warm-up + cosine).")
    weight_decay: float = setting(0.05, "MAE weight decay (none on biases, norms, embeddings, tokens).")
    warmup_steps: int | None = setting(None, "Linear warm-up iterations (default 5% of the steps).")
    optimizer: str = setting(
        "adamw", "MAE optimizer: adamw | adam | sgd | lamb | lars | ... (torch-optimizer); the learned "
        "policy's hypergradient needs adamw, adam or sgd.",
    )  # fmt: skip
    seed: int = setting(0, "Seed of splits, initialisation, batches, masks.")
    device: str = setting("auto", "auto | cpu | cuda | cuda:N.")
    log_every: int = setting(10, "Write a metrics.jsonl line every this many steps.")
    ckpt_every: int = setting(100, "Checkpoint every this many steps (and at the end).")
    keep_checkpoints: int = setting(
        2, "How many checkpoints to keep (the newest).", flags=("--keep-checkpoints", "--keep-last")
    )
    skip_nonfinite: bool = setting(
        False, "Skip a batch with a non-finite loss or hypergradient (counted in metrics.jsonl) instead of stopping."
    )
    amp: str = setting(
        "none", "bf16: autocast the MAE forward of the real pretrain steps to bfloat16 (hypergradients stay float32)."
    )
    compile: str = setting(
        NO_COMPILE, "none | a torch.compile backend (inductor, aot_eager, ...): compile the MAE's encoder and decoder "
        "blocks for the pretrain steps; the exact unroll always runs them eagerly.",
    )  # fmt: skip
    mask_noise: str = setting(
        "rank", "rank: each process draws its own masks; sample: random-policy masks keyed by step and sample "
        "(same for any process count).",
    )  # fmt: skip


#: RunConfig's sections, in the order of config.json and of `maskkit pretrain --help`
SECTIONS: dict[str, type] = {
    "data": DataConfig, "model": ModelConfig, "policy": PolicyConfig, "mlo": MLOSettings, "train": TrainSettings,
}  # fmt: skip


@dataclass
class RunConfig:
    """Everything a pretraining run is asked to do; JSON round trip with `to_dict` / `from_dict`."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    mlo: MLOSettings = field(default_factory=MLOSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunConfig:
        """Strict: unknown sections or keys, or another version, give a one-line RunError."""
        if not isinstance(raw, dict):
            raise RunError(f"a run configuration is a JSON object, got {type(raw).__name__}")
        version = raw.get("version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise RunError(f"run configuration version {version!r} is not {FORMAT_VERSION} (this maskkit's)")
        unknown = sorted(set(raw) - set(SECTIONS) - {"version"})
        if unknown:
            raise RunError(f"unknown run configuration section(s): {', '.join(unknown)}")
        sections = {}
        for name, kind in SECTIONS.items():
            values = raw.get(name, {})
            if not isinstance(values, dict):
                raise RunError(f"run configuration section {name!r} is not an object")
            bad = sorted(set(values) - {f.name for f in fields(kind)})
            if bad:
                raise RunError(f"unknown key(s) in run configuration section {name!r}: {', '.join(bad)}")
            sections[name] = kind(**values)
        return cls(**sections, version=version)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> RunConfig:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as err:
            raise RunError(f"a run configuration is not valid JSON: {err}") from None

    def check(self) -> None:
        """Validate every setting that needs no data or model (one-line RunError); nothing is written."""
        t = self.train
        try:
            if self.policy.mask_ratio is not None:
                check_ratio(self.policy.mask_ratio)
            self.mlo.check()
        except ValueError as err:
            raise RunError(str(err)) from None
        policy_class = get_policy_class(self.policy.name)
        if not getattr(policy_class, "learnable", False) and self.mlo.changed():
            flags = ", ".join(flag(n) for n in self.mlo.changed())
            raise RunError(f"{flags} only apply to a learnable policy (e.g. --policy learned), not {self.policy.name!r}")
        if t.steps is not None and t.epochs is not None:
            raise RunError("give --steps or --epochs, not both")
        if t.steps is not None and t.steps < 1:
            raise RunError(f"--steps must be a positive integer, got {t.steps}")
        if t.epochs is not None and not t.epochs > 0:
            raise RunError(f"--epochs must be positive, got {t.epochs}")
        for name in ("batch_size", "log_every", "ckpt_every", "keep_checkpoints"):
            if getattr(t, name) < 1:
                raise RunError(f"{flag(name)} must be a positive integer, got {getattr(t, name)}")
        if t.warmup_steps is not None and t.warmup_steps < 0:
            raise RunError(f"--warmup-steps must be a non-negative integer, got {t.warmup_steps}")
        for name, value, allowed in (("augment", self.data.augment, AUGMENT), ("amp", t.amp, AMP_MODES),
                                     ("mask_noise", t.mask_noise, MASK_NOISE)):  # fmt: skip
            if value not in allowed:
                raise RunError(f"{flag(name)} must be one of {', '.join(allowed)}, got {value!r}")
        try:
            check_backend(t.compile)
        except ValueError as err:
            raise RunError(str(err)) from None
        if self.model.patch_size is not None and self.model.patch_size < 1:
            raise RunError(f"--patch-size must be a positive integer, got {self.model.patch_size}")


# ---- config.json: the request and what it resolved to --------------------------------------


@dataclass
class RunRecord:
    """The content of config.json: the `RunConfig` asked for and the sections it resolved to.

    `dataset` (statistics, splits), `model` (builder, sizes, init seed), `policy` (name, typed
    options), `train` (`TrainConfig`), `device`, `versions`, `command`. Runs written before
    format 2 have no `config`; they load and resume all the same.
    """

    dataset: dict[str, Any]
    model: dict[str, Any]
    policy: dict[str, Any]
    train: dict[str, Any]
    device: str = "cpu"
    versions: dict[str, str] = field(default_factory=dict)
    command: list[str] = field(default_factory=list)
    config: dict[str, Any] | None = None
    format_version: int = 1

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @property
    def train_config(self) -> TrainConfig:
        return TrainConfig.from_dict(self.train)

    @classmethod
    def read(cls, run_dir: str | Path) -> RunRecord:
        """config.json of `run_dir`; a one-line RunError for a missing, foreign or newer file."""
        path = Path(run_dir) / CONFIG
        if not Path(run_dir).is_dir():
            raise RunError(f"run directory {run_dir} does not exist")
        if not path.is_file():
            raise RunError(f"{run_dir} is not a run directory (no {CONFIG})")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise RunError(f"{path} is not a maskkit run configuration: {err}") from None
        if not isinstance(raw, dict):
            raise RunError(f"{path} is not a maskkit run configuration")
        version = raw.get("format_version", 1)
        if version not in (1, FORMAT_VERSION):
            raise RunError(f"{path} has run format {version!r}; this maskkit reads formats 1 and {FORMAT_VERSION}")
        unknown = sorted(set(raw) - {f.name for f in fields(cls)})
        missing = sorted({"dataset", "model", "policy", "train"} - set(raw))
        if unknown or missing:
            what = f"unknown keys {', '.join(unknown)}" if unknown else f"missing {', '.join(missing)}"
            raise RunError(f"{path} is not a maskkit run configuration of format {version} ({what})")
        return cls(**raw)


# ---- building a run's parts -------------------------------------------------------------------


@dataclass
class Run:
    """A run rebuilt from its record: data, splits, batcher, MAE and policy (untrained)."""

    record: RunRecord
    data: ImageData
    splits: dict[str, np.ndarray]
    batcher: Batcher
    mae: nn.Module
    policy: nn.Module
    device: torch.device


def resolve_device(name: str, dist: DistContext = SINGLE) -> torch.device:
    """'auto' -> cuda if available else cpu; else a device that exists here; under torchrun on CUDA, cuda:LOCAL_RANK."""
    if name == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise RunError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RunError(f"device {name!r} requested but CUDA is not available")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise RunError(f"device {name!r} requested but MPS is not available")
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    return device


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
    """The given patch size, checked; for a timm preset without one, the preset's if it divides the image
    into >= 16 patches, else the largest size below it that does; None lets another builder choose."""
    height, width = img_size
    if patch_size is not None:
        if patch_size < 1:
            raise RunError(f"patch size must be a positive integer, got {patch_size}")
        if height % patch_size or width % patch_size:
            raise RunError(f"image size {height}x{width} is not divisible by patch size {patch_size}")
        return patch_size
    if model_kind(model) != "timm":
        return None
    from maskkit.adapters.timm import get_preset

    base = get_preset(model).patch_size
    for p in range(base, 0, -1):
        if height % p == 0 and width % p == 0 and (height // p) * (width // p) >= MIN_AUTO_PATCHES:
            return p
    raise RunError(f"no patch size divides image size {height}x{width}; pass --patch-size")


def build_mae(model: dict[str, Any]) -> nn.Module:
    """The MAE of a record's `model` section, freshly initialised from its seed (any adapter)."""
    from maskkit.adapters.models import create_mae_from_spec

    name = model.get("name", model.get("preset"))  # format 1 spelled it preset / overrides
    options = model.get("options", model.get("overrides", {}))
    return create_mae_from_spec(
        name, img_size=model["img_size"], patch_size=model["patch_size"], in_chans=model["in_chans"],
        norm_pix_loss=model["norm_pix_loss"], seed=model["init_seed"], options=options,
    )  # fmt: skip


def default_ratio(name: str) -> float:
    """A policy's own default mask ratio (its constructor's `ratio`), or DEFAULT_MASK_RATIO."""
    own = {o.name: o.default for o in policy_options(name)}.get("ratio")
    return float(own) if isinstance(own, (int, float)) else DEFAULT_MASK_RATIO


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


def build_run(record: RunRecord, device: torch.device | None = None) -> Run:
    """Data, splits, normalisation, MAE and policy exactly as config.json describes them."""
    device = resolve_device(record.device) if device is None else device
    ds = record.dataset
    data = load_dataset(ds["name"], ds.get("data_dir"), download=False, img_size=ds.get("img_size_override"))
    splits = make_splits(data, ds["split_seed"], ds["split_fractions"])
    sizes = {k: len(v) for k, v in splits.items()}
    if sizes != ds["splits"]:
        raise RunError(f"dataset {ds['name']!r} no longer gives the run's splits ({sizes} vs {ds['splits']})")
    batcher = Batcher(data, ds["mean"], ds["std"], device, ds["augment"])
    mae = build_mae(record.model).to(device)
    pol = record.policy
    policy = create_policy(pol["name"], **policy_kwargs(pol["name"], pol["options"], record.train["mask_ratio"], mae))
    return Run(record, data, splits, batcher, mae, policy.to(device), device)


def untrained_setup(
    dataset: str, data_dir: str | None, model: str, seed: int, device: torch.device
) -> tuple[nn.Module, Batcher, np.ndarray]:
    """An untrained MAE of `model` sized for `dataset` (patch size as pretrain chooses it), a batcher
    normalised by the train split's statistics (no augmentation) and the test split's indices."""
    data = load_dataset(dataset, data_dir, download=False)
    splits = make_splits(data, seed)
    mean, std = channel_stats(data, splits["train"])
    section = model_section(ModelConfig(name=model), data, seed)
    mae = build_mae(section)
    return mae.to(device), Batcher(data, mean, std, device), splits["test"]


def model_section(model: ModelConfig, data: ImageData, seed: int) -> dict[str, Any]:
    """The record's `model` section before the model is built (its sizes are added after)."""
    height, width = data.image_size
    return {
        "name": str(model_spec(model.name)),  # canonical: file paths absolute, so the run resumes from anywhere
        "options": dict(model.options),
        "img_size": height if height == width else [height, width],
        "patch_size": choose_patch_size(model.name, data.image_size, model.patch_size),
        "in_chans": data.in_chans,
        "norm_pix_loss": model.norm_pix_loss,
        "init_seed": seed,
    }


def dataset_section(
    name: str, data_dir: str | None, img_size: int | None, data: ImageData, seed: int, augment: str,
    fractions: dict[str, float],
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The record's `dataset` section (statistics of the train split, split sizes) and the splits."""
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
    """Create `directory` if needed and prove a file can be written there; RunError otherwise."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        reason = err.strerror or str(err)
        raise RunError(f"cannot write to output directory {directory}: {reason}") from None


def fresh_run_dir(base: Path) -> Path:
    """`base`, or base-2, base-3, ... if it is taken (two runs started in the same second)."""
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


# ---- create, resume, train --------------------------------------------------------------------


@dataclass
class PreparedRun:
    """A run ready to train: its directory, record, trainer, and where it starts from."""

    out: Path
    record: RunRecord
    trainer: Pretrainer
    source: str = "the start"  # the checkpoint it resumes from
    warnings: list[str] = field(default_factory=list)

    def resume_command(self) -> str:
        """How to continue this run: under torchrun, with the same number of processes."""
        dist = self.trainer.dist
        if dist.enabled:
            return f"torchrun --nproc_per_node {dist.world_size} -m maskkit.cli pretrain --resume {self.out}"
        return f"maskkit pretrain --resume {self.out}"


def total_steps(train: TrainSettings, train_split: int) -> int:
    """Steps from --steps, or --epochs of the train split, or the default."""
    if train.epochs is not None:
        per_epoch = max(train_split // min(train.batch_size, train_split), 1)
        return max(round(train.epochs * per_epoch), 1)
    return DEFAULT_STEPS if train.steps is None else train.steps


def create_run(
    config: RunConfig, out: str | Path | None = None, *, dist: DistContext = SINGLE, command: list[str] | None = None
) -> PreparedRun:
    """Validate `config`, build data, MAE, policy and trainer, then write `out`/config.json.

    Every check runs before anything is written; `out` defaults to runs/<date-time>. Under
    torchrun every rank calls it and rank 0 alone writes.
    """
    from maskkit import __version__

    config.check()
    t, pol = config.train, config.policy
    torch.manual_seed(t.seed)  # whatever initialises from the global RNG (policies, head) is seeded
    options = coerce_policy_options(pol.name, pol.options)
    dev = resolve_device(t.device, dist)
    if out is None:
        out = broadcast_object(
            fresh_run_dir(Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")) if dist.is_main else None, dist
        )  # one directory for all ranks: rank 0's
    out = Path(out)
    if any((out / name).exists() for name in (CONFIG, METRICS, MODEL, CHECKPOINTS)):
        raise RunError(f"{out} already holds a run; continue it with --resume {out} or choose another --out")
    if out.exists() and not out.is_dir():
        raise RunError(f"cannot write to output directory {out}: it is a file")
    model_kind(config.model.name)  # an unknown builder fails before the data is read

    d = config.data
    data = load_dataset(d.dataset, d.data_dir, download=d.download, img_size=d.img_size)
    learns = needs_labels(pol.name)
    if learns and data.labels is None:
        raise RunError(f"policy {pol.name!r} learns from labels, but dataset {d.dataset!r} has none "
                       "(use --policy random or attention)")  # fmt: skip
    if learns and not config.mlo.freeze_masker:
        try:
            check_classes(data, f"policy {pol.name!r}")
        except DataError as err:
            raise RunError(f"{err} (use --policy random or attention)") from None
    section, splits = dataset_section(d.dataset, d.data_dir, d.img_size, data, t.seed, d.augment, dict(DEFAULT_FRACTIONS))
    model = model_section(config.model, data, t.seed)
    try:
        mae = build_mae(model).to(dev)
    except (TypeError, KeyError) as err:
        raise RunError(f"cannot build model {config.model.name!r}: {err}") from None
    model.update(patch_size=int(mae.patch_size), num_patches=mae.num_patches, embed_dim=mae.embed_dim)
    ratio = pol.ratio()
    check_ratio(ratio, mae.num_patches)
    policy = create_policy(pol.name, **policy_kwargs(pol.name, options, ratio, mae)).to(dev)

    steps = total_steps(t, len(splits["train"]))
    train_cfg = TrainConfig(
        steps=steps, batch_size=t.batch_size, lr=t.lr, weight_decay=t.weight_decay, optimizer=t.optimizer,
        warmup_steps=t.warmup_steps if t.warmup_steps is not None else steps // 20, mask_ratio=ratio,
        seed=t.seed, log_every=t.log_every, ckpt_every=t.ckpt_every, keep_checkpoints=t.keep_checkpoints,
        mlo=config.mlo, skip_nonfinite=t.skip_nonfinite, amp=t.amp, mask_noise=t.mask_noise,
        compile=t.compile, world_size=dist.world_size,
    )  # fmt: skip
    batcher = Batcher(data, section["mean"], section["std"], dev, section["augment"])
    trainer = Pretrainer(mae, policy, batcher, splits, train_cfg, dev, dist)  # builds optimizers and engine: may fail
    record = RunRecord(
        dataset=section, model=model,
        policy={"name": pol.name, "options": options, "learnable": bool(getattr(policy, "learnable", False))},
        train=asdict(train_cfg), device=str(dev),
        versions={"maskkit": __version__, "torch": torch.__version__},
        command=list(sys.argv if command is None else command), config=config.to_dict(),
        format_version=FORMAT_VERSION,
    )  # fmt: skip
    barrier(dist)  # every rank has checked the directory before rank 0 writes
    if dist.is_main:
        check_writable(out)
        atomic_write_text(out / CONFIG, record.to_json())
    return PreparedRun(out, record, trainer)


def resume_run(
    run_dir: str | Path, *, steps: int | None = None, device: str = "auto", dist: DistContext = SINGLE
) -> PreparedRun:
    """The run in `run_dir`, from its newest good checkpoint (or from step 0, with a warning, if it has none).

    `steps` extends the run (written to config.json); `device` 'auto' means the run's own.
    """
    run_dir = Path(run_dir)
    record = RunRecord.read(run_dir)
    dev = resolve_device(record.device if device == "auto" else device, dist)
    path, state, warnings = None, None, []
    if list_checkpoints(run_dir / CHECKPOINTS):
        try:
            path, state, skipped = load_latest(run_dir / CHECKPOINTS)
        except CheckpointError as err:
            raise RunError(f"cannot resume {run_dir}: {err}") from None
        warnings += [f"skipped {problem}" for problem in skipped]
    start = 0 if state is None else int(state["step"])
    cfg = record.train_config
    torch.manual_seed(cfg.seed)  # as a new run seeds itself: starting over repeats it exactly
    run = build_run(record, dev)
    if steps is not None:
        if steps <= start:
            raise RunError(f"--steps {steps} does not go beyond the checkpoint's step {start}")
        cfg.steps = steps
    elif start >= cfg.steps:
        raise RunError(f"run {run_dir} is complete ({start} of {cfg.steps} steps); extend it with --steps N")
    if cfg.world_size != dist.world_size:
        raise RunError(
            f"run {run_dir} was trained by {cfg.world_size} process(es); resume it with the same number "
            f"(torchrun --nproc_per_node {cfg.world_size}), not {dist.world_size}"
        )
    trainer = Pretrainer(run.mae, run.policy, run.batcher, run.splits, cfg, dev, dist)
    if state is not None:
        trainer.load_state_dict(state)
    barrier(dist)  # every rank has read the checkpoint before rank 0 changes the directory
    if dist.is_main:
        check_writable(run_dir)
        if steps is not None and steps != record.train["steps"]:
            record.train["steps"] = steps
            atomic_write_text(run_dir / CONFIG, record.to_json())
        MetricsLog(run_dir / METRICS).truncate_after(trainer.step_count)
    if path is None:
        warnings.append(f"{run_dir} has no checkpoint (it was stopped before its first); starting over from step 0")
    return PreparedRun(run_dir, record, trainer, "the start" if path is None else path.name, warnings)


def train_run(
    prepared: PreparedRun,
    *,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    stop: StopSignals | None = None,
) -> dict[str, Any]:
    """Train to the end, then write model.pt and summary.json (rank 0); returns the summary.

    Raises `maskkit.training.TrainingStopped` after checkpointing when `stop` was signalled, and
    `FloatingPointError` on a non-finite number (the last good checkpoint stays).
    """
    trainer, out = prepared.trainer, prepared.out
    start, t0 = trainer.step_count, time.perf_counter()
    records = train(trainer, out, on_step=on_step, stop=stop)
    seconds = time.perf_counter() - t0
    images = (trainer.step_count - start) * trainer.streams["train"].batch_size
    summary = {
        "steps": trainer.step_count,
        "steps_this_call": trainer.step_count - start,
        "seconds": round(seconds, 3),
        "images_per_second": round(images / max(seconds, 1e-9), 1),
        "final": records[-1] if records else {},
        "model": str(out / MODEL),
    }
    if trainer.dist.is_main:  # rank 0 writes the final weights and the summary
        final = {"mae": trainer.mae.state_dict(), "policy": trainer.policy.state_dict(), "step": trainer.step_count}
        if trainer.head is not None:
            final["head"] = trainer.head.state_dict()
        save_checkpoint(out / MODEL, final)
        atomic_write_text(out / SUMMARY, json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary


# ---- a finished run: weights, evaluation ------------------------------------------------------


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
            raise RunError(f"run {run_dir} has no usable weights: {err}") from None
        state = weights_from_checkpoint(ckpt)
    try:
        run.mae.load_state_dict(state["mae"])
        run.policy.load_state_dict(state["policy"])
    except (KeyError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0]
        raise RunError(f"weights in {source} do not fit the run's model: {first}") from None
    return {"source": str(source), "step": int(state.get("step", 0)), "head": state.get("head")}


def load_run(run_dir: str | Path, device: str | torch.device = "auto", *, weights: bool = True) -> Run:
    """A finished (or checkpointed) run rebuilt with its trained encoder and masker (`weights=False`: untrained)."""
    record = RunRecord.read(run_dir)
    run = build_run(record, device if isinstance(device, torch.device) else resolve_device(device))
    if weights:
        load_weights(run, run_dir)
    return run


def load_encoder(run_dir: str | Path, device: str | torch.device = "auto") -> nn.Module:
    """The run's trained MAE (its adapter's MAE-protocol module; `.features(images)` gives [B, D])."""
    return load_run(run_dir, device).mae


def load_masker(run_dir: str | Path, device: str | torch.device = "auto") -> nn.Module:
    """The run's trained masking policy (e.g. the learned masker), ready for `use_policy` or a MaskPlan."""
    return load_run(run_dir, device).policy


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
            raise RunError(f"{path} is not valid JSON; move it away to write new results") from None
    current[key] = value
    atomic_write_text(path, json.dumps(current, indent=2, sort_keys=True) + "\n")
    return current


def evaluate_run(
    run_dir: str | Path,
    protocol: str = "linear",
    *,
    init: str = "pretrained",
    split: str = "test",
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    seed: int = 0,
    device: str = "auto",
    on_step: Callable[[int, int], None] | None = None,
) -> tuple[str, dict[str, Any]]:
    """Score the run's encoder (linear probe or fine-tune) and record it in eval.json; returns (key, record).

    The key is `<protocol>` (`-random` for the untrained encoder) with `@val` when scored on val.
    """
    from maskkit.evaluate import evaluate_encoder

    run_dir = Path(run_dir)
    record = RunRecord.read(run_dir)
    if protocol not in ("linear", "finetune") or init not in ("pretrained", "random") or split not in ("test", "val"):
        raise RunError(f"unknown evaluation {protocol!r}/{init!r}/{split!r}: protocol linear|finetune, "
                       "init pretrained|random, split test|val")  # fmt: skip
    if not record.dataset.get("labeled", True):
        raise RunError(f"dataset {record.dataset['name']!r} has no labels to evaluate with")
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if value is not None and value < 1:
            raise RunError(f"{flag(name)} must be a positive integer, got {value}")
    run = build_run(record, resolve_device(device))
    source = {"source": "random initialisation", "step": 0}
    if init == "pretrained":
        source = load_weights(run, run_dir)
    check_writable(run_dir)
    result = evaluate_encoder(
        run.mae, run.batcher, run.splits, protocol, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
        score_split=split, on_step=on_step,
    )  # fmt: skip
    key = (protocol if init == "pretrained" else f"{protocol}-random") + ("@val" if split == "val" else "")
    entry = {**asdict(result), "init": init, "weights": source["source"], "step": source["step"], "seed": seed}
    merge_json(run_dir / EVAL, key, entry)
    return key, entry


# ---- pictures ---------------------------------------------------------------------------------


@dataclass
class Picture:
    """What `picture` wrote: the image, the ratio, the gallery's policies and why any was not drawn."""

    image: Any  # PIL.Image
    ratio: float
    policies: list[str]
    not_drawn: dict[str, str]


def policy_names(spec: str) -> list[str]:
    """'all' -> every registered policy; 'a,b' -> those names (checked, duplicates dropped, order kept)."""
    from maskkit.policies import list_policies

    if spec.strip() == "all":
        return list_policies()
    names = list(dict.fromkeys(n.strip() for n in spec.split(",") if n.strip()))
    if not names:
        raise RunError(f"--policies expects 'all' or comma-separated policy names, got {spec!r}")
    for name in names:
        get_policy_class(name)  # unknown names: one line naming the registered ones
    return names


def picture(
    output: Path,
    run_dir: str | Path | None = None,
    *,
    policies: str | None = None,
    mask_ratio: float | None = None,
    dataset: str | None = None,
    data_dir: str | None = None,
    model: str | None = None,
    num_images: int = 8,
    tile: int = 96,
    seed: int = 0,
    device: str = "auto",
) -> Picture:
    """Write a PNG of a run's masks (image, hidden patches, heat map, reconstruction) or a policy gallery.

    With `policies` ('all' or 'a,b'): one column per policy on the same test images at one ratio,
    on `run_dir`'s model and data if given, else on an untrained `model` (default micro) over
    `dataset` (default digits).
    """
    from io import BytesIO

    from maskkit.checkpoint import atomic_write_bytes
    from maskkit.visualize import mask_grid, policy_gallery

    output = Path(output)
    if num_images < 1 or tile < 8:
        raise RunError("--num-images must be >= 1 and --tile >= 8")
    if output.suffix.lower() != ".png":
        raise RunError(f"output {output} must end in .png")
    if run_dir is None and policies is None:
        raise RunError("give RUN_DIR (a run's masks) or --policies all|NAME,... (a gallery of policies)")
    if run_dir is not None and (dataset, data_dir, model) != (None, None, None):
        raise RunError("--dataset, --data-dir and --model are for a gallery without RUN_DIR")
    names = None if policies is None else policy_names(policies)
    if mask_ratio is not None:
        check_ratio(mask_ratio)
    dev = resolve_device(device)
    if run_dir is not None:
        run = load_run(run_dir, dev)
        mae, batcher, pool = run.mae, run.batcher, run.splits["test"]
        ratio = run.record.train["mask_ratio"] if mask_ratio is None else mask_ratio
    else:
        mae, batcher, pool = untrained_setup(dataset or "digits", data_dir, model or DEFAULT_MODEL, seed, dev)
        ratio = DEFAULT_MASK_RATIO if mask_ratio is None else mask_ratio
    check_ratio(ratio, mae.num_patches)
    check_writable(output.parent if str(output.parent) else Path("."))
    notes: dict[str, str] = {}
    if names is None:
        image = mask_grid(mae, run.policy, batcher, pool, ratio=ratio, num_images=num_images, tile=tile, seed=seed)
    else:
        image, notes = policy_gallery(mae, batcher, pool, names, ratio=ratio, num_images=num_images, tile=tile, seed=seed)
    buffer = BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(output, buffer.getvalue())
    return Picture(image, ratio, names or [], notes)
