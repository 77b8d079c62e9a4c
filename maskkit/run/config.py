"""The run's configuration schema: `RunConfig` and its sections, declared once and checked once.

Each `maskkit pretrain` option is one field of one section (`maskkit.settings.setting` carries its
help text and flags; cli/options.py makes the options from them). `RunConfig.check` is the one
place where the settings are validated, section by section, before any data is read or any file
written; `RunConfig.to_dict` / `from_dict` are the JSON round trip kept in config.json.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from maskkit.plan import check_ratio
from maskkit.policies import coerce_policy_options, policy_card, policy_options
from maskkit.settings import flag, setting
from maskkit.train.config import ACCUM_MLO, MLOSettings, TrainSettings

__all__ = [
    "AUGMENT", "DEFAULT_MASK_RATIO", "DEFAULT_MODEL", "FINITE_SETTINGS", "FORMAT_VERSION", "MAX_FRAMES", "MAX_IMG_SIZE",
    "MAX_SEED", "MAX_WORKERS", "SECTIONS", "DataConfig", "ModelConfig", "PolicyConfig", "RunConfig", "RunError", "default_ratio",
]  # fmt: skip

#: version of config.json; 1 is the layout before `RunConfig` (read as is), 2 adds `format_version` and `config`.
FORMAT_VERSION = 2
#: training iterations when neither steps nor epochs are given
#: the default model: small enough for a CPU-minutes run on 8x8 digits (patch 2 -> 16 patches).
DEFAULT_MODEL = "micro"
#: the mask ratio of a policy without a default of its own (MAE's)
DEFAULT_MASK_RATIO = 0.75
AUGMENT = ("auto", "none", "crop-flip")
#: largest --img-size: the images are held in memory at this side (1024^2 x 3 bytes each), and a ViT's
#: attention grows with the fourth power of the side
MAX_IMG_SIZE = 1024
#: largest --num-frames and --sampling-rate (VideoMAE samples 16 frames at a rate of 2 to 4)
MAX_FRAMES = 1024
#: most worker processes per stream
MAX_WORKERS = 64
#: largest --seed: numpy's and torch's generators both take any integer in [0, 2^63 - 1]
MAX_SEED = 2**63 - 1
#: (section, field) of the real-valued settings that must be finite and non-negative
FINITE_SETTINGS = (
    ("train", "lr"), ("train", "weight_decay"), ("train", "epochs"),
    ("mlo", "head_lr"), ("mlo", "masker_lr"), ("mlo", "masker_reg"),
)  # fmt: skip


class RunError(ValueError):
    """A run that cannot be created, resumed or read; its message is one line."""


def _one_line(check: Any, *args: Any) -> None:
    """Run `check(*args)`, turning its ValueError into a RunError with the same message."""
    try:
        check(*args)
    except ValueError as err:
        raise RunError(str(err)) from None


def default_ratio(name: str) -> float:
    """A policy's own default mask ratio (its constructor's `ratio`), or DEFAULT_MASK_RATIO."""
    own = {o.name: o.default for o in policy_options(name)}.get("ratio")
    return float(own) if isinstance(own, (int, float)) else DEFAULT_MASK_RATIO


@dataclass
class DataConfig:
    """Which images, at which size, with which augmentation."""

    dataset: str = setting(
        "digits", "A registered data set (maskkit list datasets): digits | mnist5k | photos8 | mnist | "
        "fashion-mnist | cifar10 | cifar100 | imagefolder:PATH | npz:PATH | clips: movingdigits | clipfolder:PATH | "
        "a plugin's NAME[:ARG]."
    )
    data_dir: str | None = setting(None, "Where torchvision datasets live.")
    download: bool = setting(False, "Download a torchvision dataset into --data-dir.")
    img_size: int | None = setting(
        None, "Side of the square the images are cropped and resized to (default: image folders: their common "
        "size if they share one with sides <= 224, else 224; other data: as stored).",
        flags=("--img-size", "--input_size"),
    )  # fmt: skip
    num_frames: int | None = setting(
        None, "Frames per clip of a video source (VideoMAE's --num_frames; default: the source's own, 16 for clip "
        "folders).", flags=("--num-frames", "--num_frames"),
    )  # fmt: skip
    sampling_rate: int | None = setting(
        None, "Stride between the sampled frames of a clip file (VideoMAE's --sampling_rate; default: the "
        "source's own, 4 for clip folders).", flags=("--sampling-rate", "--sampling_rate"),
    )  # fmt: skip
    augment: str = setting("auto", "auto: MAE crop + flip for images of side >= 32, else none | none | crop-flip.")
    num_workers: int | None = setting(
        None, "Worker processes reading each stream's batches (default: none for data in memory or a folder of "
        "under 1000 images; else the cores less one, at most 8). The batches do not depend on it.", flags=("--num-workers", "--num_workers"),
    )  # fmt: skip
    skip_bad_images: bool = setting(
        False, "An undecodable image file is replaced in its batch by another of the batch, with a warning naming "
        "it, instead of stopping the run."
    )

    def check(self) -> None:
        if self.augment not in AUGMENT:
            raise RunError(f"{flag('augment')} must be one of {', '.join(AUGMENT)}, got {self.augment!r}")
        if self.num_workers is not None and not 0 <= self.num_workers <= MAX_WORKERS:
            raise RunError(f"--num-workers must be an integer in [0, {MAX_WORKERS}], got {self.num_workers}")
        for name in ("num_frames", "sampling_rate"):
            value = getattr(self, name)
            if value is not None and not 1 <= value <= MAX_FRAMES:
                raise RunError(f"{flag(name)} must be an integer in [1, {MAX_FRAMES}], got {value}")
        if self.img_size is not None and not 1 <= self.img_size <= MAX_IMG_SIZE:
            raise RunError(f"--img-size must be an integer in [1, {MAX_IMG_SIZE}], got {self.img_size}")


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
    norm_pix_loss: bool = setting(
        False, "Normalise each target patch (MAE).", flags=("--norm-pix-loss", "--norm_pix_loss")
    )

    def check(self) -> None:
        if self.patch_size is not None and self.patch_size < 1:
            raise RunError(f"--patch-size must be a positive integer, got {self.patch_size}")
        from maskkit.adapters.models import check_model_options

        _one_line(check_model_options, self.name, self.options)  # e.g. heads that do not divide the width


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
        None, "Fraction of patches hidden, in (0, 1) (default: the policy's own: 0.75, simmim 0.6 as in SimMIM, tube "
        "and motion 0.9 as in VideoMAE).",
        flags=("--mask-ratio", "--mask_ratio"),
    )  # fmt: skip

    def ratio(self) -> float:
        """The mask ratio the run uses: --mask-ratio, else the policy's own default (else 0.75)."""
        return self.mask_ratio if self.mask_ratio is not None else default_ratio(self.name)

    def typed_options(self) -> dict[str, Any]:
        """The options checked against the policy's constructor and typed (ValueError naming the option)."""
        return coerce_policy_options(self.name, self.options)

    def learnable(self) -> bool:
        """Whether the policy is trained from labels (a `learnable` one, via the MLO engine)."""
        return policy_card(self.name).learns == "labels"

    def check(self) -> None:
        if self.mask_ratio is not None:
            _one_line(check_ratio, self.mask_ratio)


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
        """Validate every setting that needs no data or model (one-line errors); nothing is read or written.

        The one place the settings are checked: each section's own `check`, then what spans sections
        (the learned masker's settings need a learnable policy), the policy's options against its
        constructor and the model spec.
        """
        self.policy.check()
        _one_line(self.mlo.check)
        if not self.policy.learnable() and self.mlo.changed():
            flags = ", ".join(flag(n) for n in self.mlo.changed())
            raise RunError(f"{flags} only apply to a learnable policy (e.g. --policy learned), not {self.policy.name!r}")
        _one_line(self.train.check)
        if self.train.accum_iter > 1 and self.policy.learnable() and not self.mlo.freeze_masker:
            raise RunError(ACCUM_MLO)
        if self.train.decoder_ratio is not None and self.policy.learnable() and not self.mlo.freeze_masker:
            raise RunError(f"--decoder-ratio is not yet supported with a masker the MLO engine trains ({self.policy.name!r}); "
                           "use it with a policy that does not learn from labels, or --freeze-masker")  # fmt: skip
        self.check_numbers()
        self.data.check()
        self.model.check()
        self.policy.typed_options()

    def check_numbers(self) -> None:
        """The seed in [0, MAX_SEED]; learning rates, weight decay and the like finite and non-negative."""
        seed = self.train.seed
        if not 0 <= seed <= MAX_SEED:
            raise RunError(f"--seed must be an integer in [0, 2^63 - 1], got {seed}")
        for section, name in FINITE_SETTINGS:
            value = getattr(getattr(self, section), name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise RunError(f"{flag(name)} must be a finite non-negative number, got {value}")
