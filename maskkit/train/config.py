"""The `train` and `mlo` sections of a run, each option declared once (a `setting` field) and checked once.

`TrainSettings` (length, optimiser, precision, logging of the MAE's pretraining) and `MLOSettings` (the
learned masker's multi-level optimisation) are `RunConfig`'s sections; `maskkit pretrain` makes one
option of each field. What the run works out from them and from its data (the steps from --epochs,
the warm-up from --warmup-epochs or its default, the peak learning rate from --lr or --blr, the
policy's mask ratio, the process count) is `Resolved`. `TrainConfig` is what the trainer and the
steps receive: the two sections as they are plus `Resolved`; its flat `to_dict()` is the layout of
config.json's `train` section and of a checkpoint's `config` (format 2's, with `accum_iter` and
`min_lr` appended since: a record without them ran with 1 and 0).

The official MAE recipe's flags: --accum-iter K (one optimizer step is K micro-batches of
--batch-size per process: the effective batch is batch x K x processes), --blr (lr = blr x
effective batch / 256), --min-lr (the cosine's floor), --warmup-epochs and --epochs (in steps of
the effective batch: train split // effective batch per epoch); the official spellings
(--accum_iter, --batch_size, ...) are aliases.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any

import torch

from maskkit.compile import NO_COMPILE, check_backend
from maskkit.mlo import DARTS_FDS, DARTS_PATHS, HYPERGRADS, LEVEL2S
from maskkit.settings import flag, setting
from maskkit.train.loggers import LOGGERS, check_logger

#: training iterations when neither steps nor epochs are given
DEFAULT_STEPS = 600
#: the MAE's peak learning rate when neither --lr nor --blr is given
DEFAULT_LR = 1.5e-3
#: the batch size of the base learning rate rule: lr = blr x effective batch / BLR_BATCH (MAE, Goyal et al.)
BLR_BATCH = 256
AMP_MODES = ("none", "bf16")
#: --log-images-every's default, in --log-every intervals
IMAGES_EVERY = 10
MASK_NOISE = ("rank", "sample")
#: --decoder-rule: which hidden patches the decoder reconstructs under --decoder-ratio (maskkit.policies.decoder)
DECODER_RULES = ("auto", "random", "runningcell")
#: what --device takes, beside cuda:N
DEVICES = ("auto", "cpu", "cuda", "mps")
#: most micro-batches per optimizer step (--accum-iter); with data, a step also may not exceed the train split
MAX_ACCUM_ITER = 4096
#: most optimizer steps of a run (--steps, or what --epochs resolves to): beyond any real run, and a bound on loops
MAX_STEPS = 10**9
#: why the MLO engine (a learnable policy's step) takes no gradient accumulation (docs/cli.md)
ACCUM_MLO = ("--accum-iter above 1 needs a policy that the MLO engine does not train (or --freeze-masker): "
             "the learned masker's hypergradient differentiates one MAE step on one batch")


def device_kind(name: str, option: str = "--device") -> torch.device | None:
    """The device `name` spells (None for 'auto'), or a one-line ValueError naming `option` when it is not one
    maskkit runs on (meta, xla, a typo ...); whether this machine has it is `check_device`'s question."""
    if name == "auto":
        return None
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in DEVICES or (device.index is not None and device.type != "cuda"):
        raise ValueError(f"{option} {name!r} is not a device maskkit runs on; use auto, cpu, cuda, cuda:N or mps")
    return device


def check_device(name: str, option: str = "--device") -> torch.device:
    """The torch device `name` asks for ('auto': cuda when available, else cpu) if this machine has it; else a
    one-line ValueError naming `option` (CUDA or MPS absent, a CUDA index beyond the devices, not a device)."""
    device = device_kind(name, option)
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{option} {name!r}: CUDA is not available on this machine")
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.type == "cuda" and device.index is not None and device.index >= count:
        raise ValueError(f"{option} {name!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{option} {name!r}: MPS is not available on this machine")
    return device


@dataclass
class TrainSettings:
    """Length, optimiser, seed, device, logging and checkpoints of the MAE's pretraining."""

    steps: int | None = setting(None, f"Training iterations (default {DEFAULT_STEPS}).")
    epochs: float | None = setting(
        None, "Training length in epochs of the train split (instead of --steps): train split // effective batch "
        "steps each.",
    )  # fmt: skip
    batch_size: int = setting(
        128, "Images per micro-batch per process (the effective batch is this x --accum-iter x processes).",
        flags=("--batch-size", "--batch_size"),
    )  # fmt: skip
    accum_iter: int = setting(
        1, "Gradient accumulation: micro-batches of --batch-size per optimizer step; a step (what --steps, the "
        "schedule, logs and checkpoints count) sees batch x this x processes images.",
        flags=("--accum-iter", "--accum_iter"),
    )  # fmt: skip
    lr: float | None = setting(
        None, f"MAE peak learning rate (of warm-up + cosine; default {DEFAULT_LR}, or from --blr)."
    )
    blr: float | None = setting(
        None, f"Base learning rate (instead of --lr): lr = blr x effective batch / {BLR_BATCH}, the MAE rule."
    )
    min_lr: float = setting(
        0.0, "Floor of the cosine: lr = min_lr + (lr - min_lr) x 0.5 (1 + cos), as the official MAE.",
        flags=("--min-lr", "--min_lr"),
    )  # fmt: skip
    weight_decay: float = setting(
        0.05, "MAE weight decay (none on biases, norms, embeddings, tokens).", flags=("--weight-decay", "--weight_decay")
    )
    warmup_steps: int | None = setting(None, "Linear warm-up iterations (default 5% of the steps).")
    warmup_epochs: float | None = setting(
        None, "Linear warm-up in epochs of the train split (instead of --warmup-steps).",
        flags=("--warmup-epochs", "--warmup_epochs"),
    )  # fmt: skip
    optimizer: str = setting(
        "adamw", "MAE optimizer: adamw | adam | sgd | lamb | lars | ... (torch-optimizer); the learned "
        "policy's hypergradient needs adamw, adam or sgd.",
    )  # fmt: skip
    seed: int = setting(0, "Seed of splits, initialisation, batches, masks.")
    device: str = setting("auto", "auto | cpu | cuda | cuda:N.")
    log_every: int = setting(10, "Write a metrics.jsonl line (and a perf.jsonl line: throughput) every this many steps.")
    log: str = setting(
        "none", "Also log to: none | tensorboard (RUN/tensorboard: every metrics.jsonl and perf.jsonl number, and "
        "mask pictures; needs pip install \"maskkit[tensorboard]\"). metrics.jsonl stays the record. Under "
        "torchrun spell it --logger (torchrun takes --log for its own --log-dir).", flags=("--log", "--logger"),
    )  # fmt: skip
    log_images_every: int | None = setting(
        None, f"With --log tensorboard: a picture of the masks every this many steps (default {IMAGES_EVERY} x "
        "--log-every; 0: none).",
    )  # fmt: skip
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
    channels_last: bool = setting(
        False, "Images and the patch embedding's weights in channels-last memory layout (cuDNN's faster "
        "convolution layout on CUDA; the same numbers up to kernel rounding).",
    )  # fmt: skip
    mask_noise: str = setting(
        "rank", "rank: each process draws its own masks; sample: random-policy masks keyed by step and sample "
        "(same for any process count).",
    )  # fmt: skip

    decoder_ratio: float | None = setting(
        None, "Fraction of the hidden patches the decoder does not reconstruct (VideoMAE V2's decoder mask ratio, "
        "0.5 in its paper; CrossMAE's partial reconstruction): the loss is taken over the rest, and the built-in "
        "MAEs decode only those. Default: every hidden patch (MAE).",
    )  # fmt: skip
    decoder_rule: str = setting(
        "auto", "Which hidden patches the decoder reconstructs under --decoder-ratio: runningcell (VideoMAE V2) | "
        "random | auto: runningcell for clips, random for images.",
    )  # fmt: skip

    def check(self) -> None:
        """One-line ValueError for a setting out of range or not among its choices (needs no data or model)."""
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give --steps or --epochs, not both")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"--steps must be a positive integer, got {self.steps}")
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"--epochs must be positive, got {self.epochs}")
        for name in ("batch_size", "log_every", "ckpt_every", "keep_checkpoints", "accum_iter"):
            if getattr(self, name) < 1:
                raise ValueError(f"{flag(name)} must be a positive integer, got {getattr(self, name)}")
        if self.steps is not None and self.steps > MAX_STEPS:
            raise ValueError(f"--steps must be at most {MAX_STEPS:,}, got {self.steps}")
        if self.accum_iter > MAX_ACCUM_ITER:
            raise ValueError(f"--accum-iter must be at most {MAX_ACCUM_ITER}, got {self.accum_iter}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"--warmup-steps must be a non-negative integer, got {self.warmup_steps}")
        if self.lr is not None and self.blr is not None:
            raise ValueError("give --lr or --blr, not both")
        if self.warmup_steps is not None and self.warmup_epochs is not None:
            raise ValueError("give --warmup-steps or --warmup-epochs, not both")
        for name in ("lr", "blr", "min_lr", "warmup_epochs"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{flag(name)} must be a finite non-negative number, got {value}")
        if self.decoder_ratio is not None and not (math.isfinite(self.decoder_ratio) and 0 <= self.decoder_ratio < 1):
            raise ValueError(f"--decoder-ratio must lie in [0, 1), got {self.decoder_ratio}")
        if self.decoder_rule != "auto" and self.decoder_ratio is None:
            raise ValueError("--decoder-rule only applies with --decoder-ratio")
        for name, allowed in (("amp", AMP_MODES), ("mask_noise", MASK_NOISE), ("log", LOGGERS),
                              ("decoder_rule", DECODER_RULES)):  # fmt: skip
            if getattr(self, name) not in allowed:
                raise ValueError(f"{flag(name)} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.log_images_every is not None and self.log_images_every < 0:
            raise ValueError(f"--log-images-every must be a non-negative integer, got {self.log_images_every}")
        if self.log_images_every is not None and self.log == "none":
            raise ValueError("--log-images-every only applies with --log tensorboard")
        check_backend(self.compile)
        check_logger(self.log)  # tensorboard installed?
        device_kind(self.device)  # this machine's devices: `check_device`, when the run is built

    def images_every(self) -> int:
        """Steps between the logger's mask pictures: --log-images-every, default IMAGES_EVERY x --log-every;
        0 without a logger or with 0."""
        if self.log == "none":
            return 0
        return self.log_every * IMAGES_EVERY if self.log_images_every is None else self.log_images_every

    def effective_batch(self, world_size: int = 1) -> int:
        """Images per optimizer step: --batch-size x --accum-iter x processes."""
        return self.batch_size * self.accum_iter * world_size

    def steps_per_epoch(self, train_split: int, world_size: int = 1) -> int:
        """Optimizer steps in an epoch of the train split: train split // effective batch (at least 1).

        The official MAE's count (len(data_loader) // accum_iter, the loader dropping its last
        incomplete batch); `Trainer.epoch` divides by the same number.
        """
        return max(train_split // min(self.effective_batch(world_size), train_split), 1)

    def total_steps(self, train_split: int, world_size: int = 1) -> int:
        """Steps from --steps, or --epochs of the train split (in steps of the effective batch), or the default."""
        if self.epochs is not None:
            return max(round(self.epochs * self.steps_per_epoch(train_split, world_size)), 1)
        return DEFAULT_STEPS if self.steps is None else self.steps

    def warmup(self, steps: int, train_split: int, world_size: int = 1) -> int:
        """Warm-up steps: --warmup-steps, or --warmup-epochs in steps of the effective batch, or 5% of `steps`."""
        if self.warmup_epochs is not None:
            return round(self.warmup_epochs * self.steps_per_epoch(train_split, world_size))
        return self.warmup_steps if self.warmup_steps is not None else steps // 20

    def peak_lr(self, world_size: int = 1) -> float:
        """The MAE's peak learning rate: --lr, or --blr x effective batch / 256, or DEFAULT_LR."""
        if self.blr is not None:
            return self.blr * self.effective_batch(world_size) / BLR_BATCH
        return DEFAULT_LR if self.lr is None else self.lr


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
    hypergrad_options: dict[str, Any] = setting(
        default_factory=dict, help="Hypergradient option as option=value (repeatable), or --<hypergrad>-<option> "
        "VALUE (e.g. --darts-r 0.02, a plugin's --mine-alpha 2; maskkit list hypergrads).",
        param="hypergrad_opt", flags=("--hypergrad-opt",),
    )  # fmt: skip

    def check(self) -> None:
        """One-line ValueError for a setting out of range (the engine checks the rest)."""
        for name, allowed in (("hypergrad", tuple(HYPERGRADS.names())), ("level2", LEVEL2S),
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
        HYPERGRADS.coerce(self.hypergrad, self.hypergrad_options)  # each option the method's; typed when built
        changed = self.changed()
        darts_only = [flag(n) for n in ("darts_paths", "darts_fd") if n in changed]
        if darts_only and self.hypergrad != "darts":
            raise ValueError(f"{', '.join(darts_only)}: only for --hypergrad darts, got --hypergrad {self.hypergrad}")
        if "darts_paths" in changed and self.level2 == "ridge":
            raise ValueError("--darts-paths applies to --level2 head (the ridge probe has no head step to skip)")

    def changed(self) -> list[str]:
        """The fields set to something other than their default."""
        return [f.name for f in fields(self) if getattr(self, f.name) != _default(f)]


def _default(f: Any) -> Any:
    """A field's default value (its factory's product for a dict field)."""
    return f.default_factory() if f.default is MISSING else f.default


@dataclass
class Resolved:
    """What a run resolved from its sections, data and processes: not options, so in no section."""

    steps: int = 1000  # from --steps, --epochs or the default
    warmup_steps: int = 0  # --warmup-steps, default 5% of the steps
    mask_ratio: float = 0.75  # --mask-ratio, default the policy's own
    world_size: int = 1  # processes (torchrun); the batch size is per process
    lr: float = DEFAULT_LR  # the MAE's peak: --lr, or --blr x effective batch / 256, or the default


#: the record's flat layout (config.json `train`, a checkpoint's `config`), in its order; "mlo" is the section
RECORD_KEYS = (
    "steps", "batch_size", "lr", "weight_decay", "optimizer", "warmup_steps", "mask_ratio", "seed", "log_every",
    "ckpt_every", "keep_checkpoints", "mlo", "skip_nonfinite", "amp", "mask_noise", "compile", "world_size",
    "accum_iter", "min_lr", "decoder_ratio", "decoder_rule",
)  # fmt: skip
RESOLVED_KEYS = tuple(f.name for f in fields(Resolved))


class TrainConfig:
    """The training of one run: its `train` and `mlo` sections as they are, and what it resolved.

    `TrainConfig(train, mlo, resolved)`, or flat keywords in the record's layout
    (`TrainConfig(steps=50, batch_size=16)`): the resolved keys go to `Resolved`, the rest to the sections.
    Keys added to the record after its first runs (accum_iter, min_lr) default to what those runs did.
    Sections without `resolved` take the section's own peak learning rate (`TrainSettings.peak_lr`).
    """

    def __init__(
        self,
        train: TrainSettings | None = None,
        mlo: MLOSettings | None = None,
        resolved: Resolved | None = None,
        **flat: Any,
    ) -> None:
        unknown = sorted(set(flat) - set(RECORD_KEYS))
        if unknown:
            raise ValueError(f"unknown training setting(s): {', '.join(unknown)}")
        if flat and (train is not None or resolved is not None):
            raise ValueError("give TrainConfig sections or flat settings, not both")
        if resolved is None and train is not None:
            resolved = Resolved(lr=train.peak_lr())
        self.resolved = resolved or Resolved(**{k: flat[k] for k in RESOLVED_KEYS if k in flat})
        if train is None:  # the request that resolves to the same numbers
            own = {k: v for k, v in flat.items() if k not in RESOLVED_KEYS}
            r = self.resolved
            train = TrainSettings(steps=r.steps, warmup_steps=r.warmup_steps, lr=r.lr, **own)
        self.train = train
        self.mlo = mlo if mlo is not None else MLOSettings()

    @property
    def steps(self) -> int:
        """The run's length (resolved); setting it extends the run."""
        return self.resolved.steps

    @steps.setter
    def steps(self, value: int) -> None:
        self.resolved.steps = int(value)

    @property
    def seed(self) -> int:
        return self.train.seed

    @property
    def world_size(self) -> int:
        return self.resolved.world_size

    def to_dict(self) -> dict[str, Any]:
        """The flat record (config.json `train`, a checkpoint's `config`)."""
        values = {**asdict(self.train), **asdict(self.resolved), "mlo": asdict(self.mlo)}
        return {key: values[key] for key in RECORD_KEYS}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainConfig:
        """From `to_dict()`; also the flat layout of runs written before `mlo` was its own section."""
        raw = dict(raw)
        mlo = dict(raw.pop("mlo", {}) or {})
        names = {f.name for f in fields(MLOSettings)}
        for name in names & set(raw):
            mlo[name] = raw.pop(name)
        unknown = sorted(set(raw) - set(RECORD_KEYS)) + sorted(set(mlo) - names)
        if unknown:
            raise ValueError(f"unknown training setting(s): {', '.join(unknown)}")
        return cls(**raw, mlo=MLOSettings(**mlo))
