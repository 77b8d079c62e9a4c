"""One factory over every registered model adapter: `create_mae_from_spec(spec, ...)`, for `maskkit pretrain --model SPEC`.

Spec grammar (`parse_model_spec`): `NAME` is a timm size preset (`DEFAULT_KIND`), `KIND:ARG` the adapter
registered as KIND (`maskkit.adapters.ADAPTERS`) reading ARG. The built-in kinds:
- `NAME` or `timm:NAME`: a timm size preset of `maskkit.adapters.timm` ("micro", "pilot", "tiny", ...);
- `official:PATH[:CALLABLE]`: a facebookresearch/mae-style `models_mae.py` of the user's, by path
  (relative paths are resolved), and a class or factory function in it (default `MaskedAutoencoderViT`);
- `hf:tiny`: a CPU-sized transformers `ViTMAEForPreTraining` (`HF_TINY`);
- `hf:PATH.json`: a transformers `ViTMAEConfig` JSON file (e.g. a checkpoint's `config.json`);
- `video:NAME`: a size preset of the built-in video MAE (`maskkit.adapters.video_mae`: "micro" ... "vit-b");
- `hf-video:tiny`, `hf-video:PATH.json` or `hf-video:DIR`: a transformers `VideoMAEForPreTraining` (clips);
- `videomae:PATH[:CALLABLE]`: an MCG-NJU/VideoMAE-style `modeling_pretrain.py` of the user's, by path (default
  `PretrainVisionTransformer`).

The data fix `img_size`, `in_chans`, `num_frames` (clips) and `norm_pix_loss`; `options` (`--model-opt key=value`, see
`parse_model_options`) set everything else the codebase accepts. Weights depend only on `seed`
(the global RNG is left untouched). The result is the MAE protocol (maskkit.mae) over the model.
"""

from __future__ import annotations

import json
from typing import Any

from torch import nn

from .adapter import ADAPTERS, DEFAULT_KIND, BuildRequest, ModelAdapter, ModelSpec
from .build import positive_int
from .kind_hf import HF_TINY
from .kind_official import DEFAULT_OFFICIAL_CALLABLE, load_official_module

__all__ = [
    "DEFAULT_OFFICIAL_CALLABLE",
    "HF_TINY",
    "ModelSpec",
    "check_model_options",
    "create_mae_from_spec",
    "load_official_module",
    "model_adapter",
    "parse_model_options",
    "parse_model_spec",
    "preferred_patch_size",
    "spec_grammar",
]

#: option names the run sets from the data and its own arguments; refused in `options`.
_RESERVED_OPTIONS = (
    "img_size",
    "image_size",
    "in_chans",
    "num_channels",
    "patch_size",
    "norm_pix_loss",
    "seed",
    "num_frames",
)


# ---- the spec ---------------------------------------------------------------------------------


def spec_grammar() -> str:
    """Every registered kind's spec forms, in registration order: "a timm preset name, timm:NAME, ... or hf:PATH.json"."""
    forms = [form for kind in ADAPTERS.names(registered_order=True) for form in ADAPTERS.get(kind).forms]
    return ", ".join(forms[:-1]) + " or " + forms[-1] if len(forms) > 1 else "".join(forms)


def model_adapter(spec: str | ModelSpec) -> ModelAdapter:
    """The registered adapter instance for a spec (text or parsed); a one-line ValueError for a bad one."""
    if isinstance(spec, ModelSpec):
        return _parse(spec.kind, spec.arg)
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"model spec must be {spec_grammar()}; got {spec!r}")
    text = spec.strip()
    kind, sep, rest = text.partition(":")
    if not sep:
        kind, rest = DEFAULT_KIND, text
    elif kind not in ADAPTERS:
        raise ValueError(f"unknown model kind {kind!r} in {spec!r}; expected {spec_grammar()}")
    if not rest:
        raise ValueError(f"model spec {spec!r} names no {kind} model; expected {spec_grammar()}")
    return _parse(kind, rest)


def _parse(kind: str, arg: str) -> ModelAdapter:
    """The adapter `kind` parsing `arg`; an exception raised inside a plugin adapter is one line naming it."""
    adapter = ADAPTERS.get(kind)
    try:
        return adapter.parse(arg)
    except Exception as err:
        raise ADAPTERS.plugin_error(adapter, "parse", err)  # noqa: B904 (chained by plugin_error)


def parse_model_spec(spec: str) -> ModelSpec:
    """Parse a `--model` spec (module docstring grammar); paths become absolute, presets must exist."""
    return model_adapter(spec).spec


def preferred_patch_size(spec: str | ModelSpec) -> int | None:
    """The model's own patch size for the run's automatic choice (a timm preset's), or None to let its
    builder choose (official callables, hf configs)."""
    return model_adapter(spec).preferred_patch_size()


#: (width, heads) option pairs of the adapters: the heads must be a positive integer dividing the width
_WIDTH_HEADS = (
    ("embed_dim", "num_heads"), ("decoder_embed_dim", "decoder_num_heads"),
    ("hidden_size", "num_attention_heads"), ("decoder_hidden_size", "decoder_num_attention_heads"),
)  # fmt: skip
#: further size options that must be positive integers where given
_POSITIVE = ("depth", "decoder_depth", "num_hidden_layers", "decoder_num_hidden_layers")


def check_model_options(spec: str | ModelSpec, options: dict[str, Any]) -> None:
    """One-line ValueError, before anything is built, for a size option that is not a positive integer or
    attention heads that do not divide the width (the width a timm or video preset has where not given)."""
    own: dict[str, Any] = {}
    adapter = model_adapter(spec)
    if adapter.spec.kind in ("timm", "video"):
        from .timm import get_preset
        from .video_mae import get_video_preset

        preset = (get_preset if adapter.spec.kind == "timm" else get_video_preset)(adapter.spec.target)
        own = {k: getattr(preset, k) for k in ("embed_dim", "num_heads", "decoder_embed_dim", "decoder_num_heads")}
    for name in [n for pair in _WIDTH_HEADS for n in pair] + list(_POSITIVE):
        if name in options:
            value = options[name]
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"--model-opt {name} must be a positive integer, got {value!r}")
    for width_key, heads_key in _WIDTH_HEADS:
        if width_key not in options and heads_key not in options:
            continue
        width, heads = options.get(width_key, own.get(width_key)), options.get(heads_key, own.get(heads_key))
        if width is not None and heads is not None and width % heads:
            raise ValueError(f"--model-opt {heads_key}={heads} does not divide the width {width_key}={width} "
                             f"of model {str(adapter.spec)!r}")  # fmt: skip


def parse_model_options(pairs: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Repeatable `key=value` strings -> {key: value}; a value is JSON when it parses (64, 0.5, true,
    "x", [1, 2]), else the raw string. A repeated key keeps its last value."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = str(pair).partition("=")
        key = key.strip()
        if not sep:
            raise ValueError(f"model option {pair!r} must be key=value")
        if not key.isidentifier():
            raise ValueError(f"model option {pair!r}: {key!r} is not a valid option name")
        try:
            options[key] = json.loads(raw)
        except ValueError:
            options[key] = raw
    return options


# ---- the factory ------------------------------------------------------------------------------


def create_mae_from_spec(
    spec: str | ModelSpec,
    *,
    img_size: int | tuple[int, int],
    in_chans: int,
    patch_size: int | None = None,
    norm_pix_loss: bool = False,
    seed: int = 0,
    options: dict[str, Any] | None = None,
    num_frames: int | None = None,
) -> nn.Module:
    """Build the MAE of `spec` (see `parse_model_spec`) for images [B, in_chans, H, W], or for clips [B, in_chans,
    num_frames, H, W] when `num_frames` is given (a video kind's; an image kind ignores it), wrapped in the MAE protocol.

    patch_size: required for timm and video presets; None keeps an official callable's or a config file's own
    (4 for `hf:tiny`). Bad specs, sizes and options raise a one-line ValueError.
    """
    adapter = model_adapter(spec)
    sizes = _check_sizes(img_size, in_chans, patch_size)
    if num_frames is not None and not positive_int(num_frames):
        raise ValueError(f"num_frames must be a positive integer, got {num_frames!r}")
    options = dict(options or {})
    reserved = sorted(set(options) & set(_RESERVED_OPTIONS))
    if reserved:
        raise ValueError(
            f"model option {reserved[0]!r} is set by the run (from the data and its arguments), not by an option"
        )
    request = BuildRequest(adapter.spec, img_size, sizes, in_chans, patch_size, bool(norm_pix_loss), seed, options,
                           num_frames)  # fmt: skip
    try:
        return adapter.build(request)
    except Exception as err:
        raise ADAPTERS.plugin_error(adapter, "build", err)  # noqa: B904 (chained by plugin_error)


def _check_sizes(img_size: Any, in_chans: Any, patch_size: Any) -> tuple[int, int]:
    """(H, W) of `img_size`, after checking the three sizes are positive integers."""
    sizes = tuple(img_size) if isinstance(img_size, (tuple, list)) else (img_size, img_size)
    if len(sizes) != 2 or not all(positive_int(s) for s in sizes):
        raise ValueError(f"img_size must be a positive integer or (H, W), got {img_size!r}")
    if not positive_int(in_chans):
        raise ValueError(f"in_chans must be a positive integer, got {in_chans!r}")
    if patch_size is not None and not positive_int(patch_size):
        raise ValueError(f"patch_size must be a positive integer, got {patch_size!r}")
    if patch_size is not None and any(s % patch_size for s in sizes):
        raise ValueError(f"img_size {img_size!r} is not divisible by patch_size {patch_size}")
    return sizes  # type: ignore[return-value]
