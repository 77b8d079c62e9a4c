"""The `hf` model kind: `--model hf:tiny` (a CPU-sized ViTMAE) or `hf:PATH.json` (a `ViTMAEConfig` file).

Builds a transformers `ViTMAEForPreTraining` (the `hf` extra, imported on first use) for the run's
images, wrapped by `maskkit.adapters.hf.wrap`; `--model-opt` keys are ViTMAEConfig fields.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Callable

from torch import nn

from maskkit.registry import Card

from . import hf as hf_adapter
from .adapter import BuildRequest, ModelAdapter, ModelSpec, register_adapter
from .build import absolute, check_built, one_line, positive_int, seeded

#: `hf:tiny`: the ViTMAEConfig sizes (CPU scale: about 0.1M parameters). Patch size 4 unless given.
HF_TINY: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "decoder_hidden_size": 32,
    "decoder_num_hidden_layers": 1,
    "decoder_num_attention_heads": 4,
    "decoder_intermediate_size": 64,
}
HF_TINY_PATCH_SIZE = 4

#: keys of a ViTMAEConfig's `to_dict()` that describe the file, not the model.
_HF_META_KEYS = ("model_type", "transformers_version", "architectures")


@register_adapter(
    "hf",
    card=Card(
        idea="a Hugging Face transformers ViTMAEForPreTraining, masked through its own noise= argument",
        paper="He et al., CVPR 2022",
        allowed={"config": "tiny | a ViTMAEConfig .json file (made absolute)"},
    ),
)
class HFAdapter(ModelAdapter):
    """A transformers ViTMAE (`--model hf:tiny`, `--model hf:PATH.json`; needs the `hf` extra)."""

    forms = ("hf:tiny", "hf:PATH.json")

    def __init__(self, config: str = "tiny") -> None:
        self.config = config if config == "tiny" else str(absolute(config))

    @classmethod
    def parse(cls, arg: str) -> HFAdapter:
        if arg != "tiny" and absolute(arg).suffix.lower() != ".json":
            raise ValueError(f"hf: expects 'tiny' or a ViTMAEConfig .json file, got {arg!r}")
        return cls(arg)

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec("hf", self.config)

    def build(self, request: BuildRequest) -> nn.Module:
        spec, sizes, patch_size, options = request.spec, request.sizes, request.patch_size, request.options
        if sizes[0] != sizes[1]:
            raise ValueError(f"transformers ViTMAE needs square images, got {sizes[0]}x{sizes[1]}")
        tf = hf_adapter._transformers()  # ImportError with the install hint when the extra is missing
        data = {"image_size": sizes[0], "num_channels": request.in_chans, "norm_pix_loss": request.norm_pix_loss}
        if self.config == "tiny":
            p = HF_TINY_PATCH_SIZE if patch_size is None else patch_size
            _check_hf_options(options, _hf_known_keys(tf.ViTMAEConfig()))
            if sizes[0] % p:
                raise ValueError(
                    f"hf:tiny patch size {p} does not divide {sizes[0]}x{sizes[1]} images; pass patch_size"
                )
            config = {**HF_TINY, **data, "patch_size": p, **options}
            build: Callable[[], nn.Module] = lambda: hf_adapter.create_hf_mae(**config)  # noqa: E731
        else:
            path = Path(self.config)
            if not path.is_file():
                raise ValueError(f"hf model config not found: {path}")
            try:
                cfg = tf.ViTMAEConfig.from_json_file(str(path))
            except (OSError, ValueError) as err:
                raise ValueError(f"cannot read ViTMAEConfig from {path}: {one_line(err)}") from None
            _check_hf_options(options, _hf_known_keys(tf.ViTMAEConfig(), cfg))
            for key, value in {
                **data,
                **({} if patch_size is None else {"patch_size": patch_size}),
                **options,
            }.items():
                setattr(cfg, key, value)
            p = cfg.patch_size
            if not positive_int(p) or sizes[0] % p:
                raise ValueError(
                    f"{path.name}: patch_size {p!r} does not divide {sizes[0]}x{sizes[1]} images; pass patch_size"
                )
            build = lambda: tf.ViTMAEForPreTraining(cfg)  # noqa: E731
        try:
            model = seeded(request.seed, build)
        except (TypeError, ValueError) as err:
            raise ValueError(f"cannot build {spec}: {one_line(err)}") from None
        mae = hf_adapter.wrap(model)
        check_built(request, mae)
        return mae


def _hf_known_keys(*configs: Any) -> set[str]:
    keys: set[str] = set()
    for config in configs:
        keys |= set(config.to_dict())
    return {k for k in keys if not k.startswith("_") and k not in _HF_META_KEYS}


def _check_hf_options(options: dict[str, Any], known: set[str], config: str = "ViTMAEConfig") -> None:
    for key in options:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown {config} option {key!r}{hint}")
