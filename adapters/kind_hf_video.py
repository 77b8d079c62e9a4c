"""The `hf-video` model kind: `--model hf-video:tiny` (a CPU-sized VideoMAE), `hf-video:PATH.json` (a
`VideoMAEConfig` file) or `hf-video:DIR` (a folder holding one as config.json, e.g. a downloaded checkpoint's).

Builds a transformers `VideoMAEForPreTraining` (the `hf` extra, imported on first use) for the run's clips,
freshly initialised from the seed (a checkpoint's weights are not loaded), wrapped by
`maskkit.adapters.hf_video.wrap`; `--model-opt` keys are VideoMAEConfig fields. The run sets the image size,
channels, frames (`num_frames`), patch size and `norm_pix_loss`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from torch import nn

from maskkit.registry import Card

from . import hf as hf_adapter
from . import hf_video
from .adapter import BuildRequest, ModelAdapter, ModelSpec, register_adapter
from .build import absolute, check_built, one_line, positive_int, seeded
from .kind_hf import HF_TINY, _check_hf_options, _hf_known_keys

#: `hf-video:tiny`: the VideoMAEConfig sizes (CPU scale). Patch size 4 unless given, tubelets of 2 frames.
HF_VIDEO_TINY: dict[str, Any] = {**HF_TINY, "tubelet_size": 2}  # hf:tiny's sizes, on tubelets
HF_VIDEO_TINY_PATCH_SIZE = 4
#: frames of `hf-video:tiny` when the run does not say (VideoMAE's 16)
HF_VIDEO_TINY_FRAMES = 16


@register_adapter(
    "hf-video",
    card=Card(
        idea="a Hugging Face transformers VideoMAEForPreTraining, masked through its own bool_masked_pos, "
        "with VideoMAE's own loss (ImageNet un-normalisation, per-channel tubelet targets)",
        paper="Tong et al., NeurIPS 2022",
        allowed={"config": "tiny | a VideoMAEConfig .json file | a folder holding config.json (made absolute)"},
    ),
)
class HFVideoAdapter(ModelAdapter):
    """A transformers VideoMAE (`--model hf-video:tiny`, `hf-video:PATH.json`, `hf-video:DIR`; the `hf` extra)."""

    forms = ("hf-video:tiny", "hf-video:PATH.json", "hf-video:DIR")

    def __init__(self, config: str = "tiny") -> None:
        self.config = config if config == "tiny" else str(absolute(config))

    @classmethod
    def parse(cls, arg: str) -> HFVideoAdapter:
        path = absolute(arg)
        if arg != "tiny" and path.suffix.lower() != ".json" and not path.is_dir():
            raise ValueError(f"hf-video: expects 'tiny', a VideoMAEConfig .json file or a folder holding config.json, "
                             f"got {arg!r}")  # fmt: skip
        return cls(arg)

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec("hf-video", self.config)

    def build(self, request: BuildRequest) -> nn.Module:
        spec, sizes, patch_size, options = request.spec, request.sizes, request.patch_size, request.options
        tf = hf_adapter._transformers()  # ImportError with the install hint when the extra is missing
        data = {
            "image_size": sizes[0] if sizes[0] == sizes[1] else list(sizes),
            "num_channels": request.in_chans,
            "norm_pix_loss": request.norm_pix_loss,
            **({} if request.num_frames is None else {"num_frames": request.num_frames}),
        }
        if self.config == "tiny":
            _check_hf_options(options, _hf_known_keys(tf.VideoMAEConfig()), "VideoMAEConfig")
            p = HF_VIDEO_TINY_PATCH_SIZE if patch_size is None else patch_size
            config = {"num_frames": HF_VIDEO_TINY_FRAMES, **HF_VIDEO_TINY, **data, "patch_size": p, **options}
            cfg = tf.VideoMAEConfig(**config)
            where = "hf-video:tiny"
        else:
            cfg, where = _read_config(tf, Path(self.config))
            _check_hf_options(options, _hf_known_keys(tf.VideoMAEConfig(), cfg), "VideoMAEConfig")
            for key, value in {**data, **({} if patch_size is None else {"patch_size": patch_size}), **options}.items():
                setattr(cfg, key, value)
        _check_config(cfg, sizes, where)
        build: Callable[[], nn.Module] = lambda: tf.VideoMAEForPreTraining(cfg)  # noqa: E731
        try:
            model = seeded(request.seed, build)
        except (TypeError, ValueError) as err:
            raise ValueError(f"cannot build {spec}: {one_line(err)}") from None
        mae = hf_video.wrap(model)
        check_built(request, mae)
        return mae


def _read_config(tf: Any, path: Path) -> tuple[Any, str]:
    """The VideoMAEConfig of a .json file or of a folder's config.json, and the file's name for messages."""
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"hf-video model config not found: {file}")
    try:
        cfg = tf.VideoMAEConfig.from_json_file(str(file))
    except (OSError, TypeError, ValueError) as err:  # TypeError: JSON that is not an object
        raise ValueError(f"cannot read VideoMAEConfig from {file}: {one_line(err)}") from None
    return cfg, file.name


def _check_config(cfg: Any, sizes: tuple[int, int], where: str) -> None:
    """One-line ValueError for sizes transformers would refuse deep inside (or silently mis-read)."""
    p, tube, frames = cfg.patch_size, cfg.tubelet_size, cfg.num_frames
    if not positive_int(p) or any(s % p for s in sizes):
        raise ValueError(f"{where}: patch_size {p!r} does not divide {sizes[0]}x{sizes[1]} frames; pass patch_size")
    if not positive_int(tube) or not positive_int(frames) or frames % tube:
        raise ValueError(f"{where}: tubelet_size {tube!r} does not divide num_frames {frames!r}")
    if cfg.num_channels != 3 and not cfg.norm_pix_loss:
        raise ValueError(f"{where}: transformers' VideoMAE un-normalises only 3-channel clips for its loss; "
                         f"{cfg.num_channels}-channel clips need --norm-pix-loss")  # fmt: skip
