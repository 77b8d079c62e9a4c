"""One factory over every MAE codebase: `create_mae_from_spec(spec, ...)`, for `maskkit pretrain --model SPEC`.

Spec grammar (`parse_model_spec`):
- `NAME` or `timm:NAME`: a timm size preset of `maskkit.adapters.timm` ("micro", "pilot", "tiny", ...);
- `official:PATH[:CALLABLE]`: a facebookresearch/mae-style `models_mae.py` of the user's, by path
  (relative paths are resolved), and a class or factory function in it (default `MaskedAutoencoderViT`);
- `hf:tiny`: a CPU-sized transformers `ViTMAEForPreTraining` (`HF_TINY`);
- `hf:PATH.json`: a transformers `ViTMAEConfig` JSON file (e.g. a checkpoint's `config.json`).

The data fix `img_size`, `in_chans` and `norm_pix_loss`; `options` (`--model-opt key=value`, see
`parse_model_options`) set everything else the codebase accepts. Weights depend only on `seed`
(the global RNG is left untouched). The result is the MAE protocol (maskkit.mae) over the model.

patch_size of an official callable: passed only when its signature names `patch_size` (the class
`MaskedAutoencoderViT`); a factory taking only `**kwargs` (`mae_vit_base_patch16`) sets its own, and a
given patch_size must then equal it (else a one-line ValueError). None keeps the callable's own.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import inspect
import json
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from . import hf as hf_adapter
from . import official_mae
from . import timm as timm_adapter

__all__ = [
    "HF_TINY",
    "ModelSpec",
    "create_mae_from_spec",
    "load_official_module",
    "parse_model_options",
    "parse_model_spec",
]

KINDS = ("timm", "official", "hf")
DEFAULT_OFFICIAL_CALLABLE = "MaskedAutoencoderViT"

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

#: option names the run sets from the data and its own arguments; refused in `options`.
_RESERVED_OPTIONS = (
    "img_size",
    "image_size",
    "in_chans",
    "num_channels",
    "patch_size",
    "norm_pix_loss",
    "seed",
)
#: keys of a ViTMAEConfig's `to_dict()` that describe the file, not the model.
_HF_META_KEYS = ("model_type", "transformers_version", "architectures")


# ---- the spec ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """A parsed `--model` spec; `str(spec)` is its canonical form (absolute paths), which parses back to it."""

    kind: str  # "timm" | "official" | "hf"
    target: str  # preset name | absolute .py path | "tiny" | absolute .json path
    callable: str | None = None  # official only: the class or factory in the file

    @property
    def requires_patch_size(self) -> bool:
        """Whether `create_mae_from_spec` needs an explicit `patch_size` (timm presets: the run chooses it)."""
        return self.kind == "timm"

    def __str__(self) -> str:
        if self.kind == "timm":
            return self.target
        if self.kind == "official":
            return f"official:{self.target}:{self.callable}"
        return f"hf:{self.target}"


_GRAMMAR = "a timm preset name, timm:NAME, official:PATH.py[:CALLABLE], hf:tiny or hf:PATH.json"


def parse_model_spec(spec: str) -> ModelSpec:
    """Parse a `--model` spec (module docstring grammar); paths become absolute, presets must exist."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"model spec must be {_GRAMMAR}; got {spec!r}")
    text = spec.strip()
    kind, sep, rest = text.partition(":")
    if not sep:
        kind, rest = "timm", text
    elif kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r} in {spec!r}; expected {_GRAMMAR}")
    if not rest:
        raise ValueError(f"model spec {spec!r} names no {kind} model; expected {_GRAMMAR}")

    if kind == "timm":
        timm_adapter.get_preset(rest)  # one-line ValueError listing the presets
        return ModelSpec("timm", rest)
    if kind == "hf":
        if rest == "tiny":
            return ModelSpec("hf", "tiny")
        path = _absolute(rest)
        if path.suffix.lower() != ".json":
            raise ValueError(f"hf: expects 'tiny' or a ViTMAEConfig .json file, got {rest!r}")
        return ModelSpec("hf", str(path))
    # official:PATH[:CALLABLE]; a last ':'-part that is an identifier (and not a .py path) is the callable
    head, sep, tail = rest.rpartition(":")
    if sep and head and tail.isidentifier():
        path_text, name = head, tail
    else:
        path_text, name = rest, DEFAULT_OFFICIAL_CALLABLE
    path = _absolute(path_text)
    if path.suffix != ".py":
        raise ValueError(f"official: expects a Python file (models_mae.py), got {path_text!r}")
    return ModelSpec("official", str(path), name)


def _absolute(path: str) -> Path:
    return Path(path).expanduser().resolve()


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


@dataclass(frozen=True)
class _Request:
    """What the run asks of a builder: the spec, image sizes (H, W), channels, patch size, loss target, seed, options."""

    spec: ModelSpec
    img_size: Any  # as given: int or (H, W)
    sizes: tuple[int, int]
    in_chans: int
    patch_size: int | None
    norm_pix_loss: bool
    seed: int
    options: dict[str, Any]


def create_mae_from_spec(
    spec: str | ModelSpec,
    *,
    img_size: int | tuple[int, int],
    in_chans: int,
    patch_size: int | None = None,
    norm_pix_loss: bool = False,
    seed: int = 0,
    options: dict[str, Any] | None = None,
) -> nn.Module:
    """Build the MAE of `spec` (see `parse_model_spec`) for images [B, in_chans, H, W], wrapped in the MAE protocol.

    patch_size: required for timm presets; None keeps an official callable's or a config file's own
    (4 for `hf:tiny`). Bad specs, sizes and options raise a one-line ValueError.
    """
    parsed = spec if isinstance(spec, ModelSpec) else parse_model_spec(spec)
    sizes = _check_sizes(img_size, in_chans, patch_size)
    options = dict(options or {})
    reserved = sorted(set(options) & set(_RESERVED_OPTIONS))
    if reserved:
        raise ValueError(
            f"model option {reserved[0]!r} is set by the run (from the data and its arguments), not by an option"
        )
    request = _Request(parsed, img_size, sizes, in_chans, patch_size, bool(norm_pix_loss), seed, options)
    builders = {"timm": _create_timm, "official": _create_official, "hf": _create_hf}
    return builders[parsed.kind](request)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_sizes(img_size: Any, in_chans: Any, patch_size: Any) -> tuple[int, int]:
    """(H, W) of `img_size`, after checking the three sizes are positive integers."""
    sizes = tuple(img_size) if isinstance(img_size, (tuple, list)) else (img_size, img_size)
    if len(sizes) != 2 or not all(_positive_int(s) for s in sizes):
        raise ValueError(f"img_size must be a positive integer or (H, W), got {img_size!r}")
    if not _positive_int(in_chans):
        raise ValueError(f"in_chans must be a positive integer, got {in_chans!r}")
    if patch_size is not None and not _positive_int(patch_size):
        raise ValueError(f"patch_size must be a positive integer, got {patch_size!r}")
    if patch_size is not None and any(s % patch_size for s in sizes):
        raise ValueError(f"img_size {img_size!r} is not divisible by patch_size {patch_size}")
    return sizes  # type: ignore[return-value]


def _seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    """`build()` right after `torch.manual_seed(seed)`, leaving the caller's CPU RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _check_built(req: _Request, mae: Any) -> None:
    """One-line ValueError when the built model does not fit the requested patch size, images or channels."""
    spec, sizes, in_chans, patch_size = req.spec, req.sizes, req.in_chans, req.patch_size
    p = int(mae.patch_size)
    if patch_size is not None and p != patch_size:
        raise ValueError(
            f"{spec} builds patch size {p}, not the requested {patch_size} "
            "(a callable that does not name patch_size in its signature keeps its own)"
        )
    if any(s % p for s in sizes) or mae.num_patches != (sizes[0] // p) * (sizes[1] // p):
        raise ValueError(
            f"{spec} builds {mae.num_patches} patches of size {p}, which does not fit {sizes[0]}x{sizes[1]} images"
        )
    if mae.in_chans != in_chans:
        raise ValueError(f"{spec} builds a model for {mae.in_chans} channels, not {in_chans}")


# ---- timm presets -----------------------------------------------------------------------------


def _create_timm(req: _Request) -> nn.Module:
    spec = req.spec
    if req.patch_size is None:
        raise ValueError(f"timm preset {spec.target!r} needs an explicit patch_size (the run chooses it)")
    try:
        return timm_adapter.create_mae(
            spec.target, img_size=req.img_size, patch_size=req.patch_size, in_chans=req.in_chans,
            norm_pix_loss=req.norm_pix_loss, seed=req.seed, **req.options,
        )  # fmt: skip
    except TypeError as err:
        raise ValueError(f"timm preset {spec.target!r} rejected its options: {_one_line(err)}") from None


# ---- official models_mae.py -------------------------------------------------------------------

_OFFICIAL_MODULES: dict[str, types.ModuleType] = {}  # absolute path -> module


def load_official_module(path: str | Path) -> types.ModuleType:
    """Import a `models_mae.py` by path, once per resolved path (later calls return the same module).

    It is registered in `sys.modules` under a name unique to its path, and its folder is on
    `sys.path` while it runs, so sibling imports of the official repo (`util.pos_embed`) resolve.
    """
    resolved = _absolute(str(path))
    key = str(resolved)
    if key in _OFFICIAL_MODULES:
        return _OFFICIAL_MODULES[key]
    if not resolved.is_file():
        raise ValueError(f"official model file not found: {key}")
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    name = f"maskkit_official_{resolved.stem if resolved.stem.isidentifier() else 'models'}_{digest}"
    loader_spec = importlib.util.spec_from_file_location(name, resolved)
    if loader_spec is None or loader_spec.loader is None:
        raise ValueError(f"cannot import official model file {key}")
    module = importlib.util.module_from_spec(loader_spec)
    folder = str(resolved.parent)
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    sys.modules[name] = module  # before running it: dataclasses and pickling look the module up
    try:
        loader_spec.loader.exec_module(module)
    except Exception as err:
        sys.modules.pop(name, None)
        raise ValueError(
            f"cannot import official model file {key}: {type(err).__name__}: {_one_line(err)}"
        ) from err
    finally:
        if added and folder in sys.path:
            sys.path.remove(folder)
    _OFFICIAL_MODULES[key] = module
    return module


def _defined_callables(module: types.ModuleType) -> list[str]:
    """Public classes and functions defined in `module` itself (not imported into it)."""
    return sorted(
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and (inspect.isfunction(value) or inspect.isclass(value))
        and getattr(value, "__module__", None) == module.__name__
    )


def _official_kwargs(req: _Request, fn: Callable[..., Any]) -> dict[str, Any]:
    """The keyword arguments for the official callable; `patch_size` only when its signature names it."""
    spec, sizes, patch_size, options = req.spec, req.sizes, req.patch_size, req.options
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    named = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    open_kwargs = not params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    kwargs: dict[str, Any] = {
        "img_size": sizes[0] if sizes[0] == sizes[1] else sizes,
        "in_chans": req.in_chans,
        "norm_pix_loss": req.norm_pix_loss,
    }
    if patch_size is not None and "patch_size" in named:
        kwargs["patch_size"] = patch_size
    if not open_kwargs:
        for key in [*kwargs, *options]:
            if key not in named:
                what = "has no option" if key in options else "cannot take"
                raise ValueError(
                    f"{spec.callable} in {Path(spec.target).name} {what} {key!r} (its parameters: {', '.join(params)})"
                )
    return {**kwargs, **options}


def _create_official(req: _Request) -> nn.Module:
    spec = req.spec
    module = load_official_module(spec.target)
    fn = getattr(module, spec.callable or DEFAULT_OFFICIAL_CALLABLE, None)
    file = Path(spec.target).name
    if fn is None:
        defined = _defined_callables(module)
        shown = ", ".join(defined[:12]) + (", ..." if len(defined) > 12 else "")
        raise ValueError(
            f"official model file {file} has no callable {spec.callable!r} (it defines: {shown or 'nothing'})"
        )
    if not callable(fn):
        raise ValueError(f"{spec.callable!r} in official model file {file} is not callable")
    kwargs = _official_kwargs(req, fn)

    def build() -> nn.Module:
        with official_mae.timm_compat(module):  # the official file was written for timm 0.3.2
            return fn(**kwargs)

    try:
        model = _seeded(req.seed, build)
    except TypeError as err:
        raise ValueError(f"{spec.callable} in {file} rejected its arguments: {_one_line(err)}") from None
    try:
        mae = official_mae.wrap(model)
    except TypeError as err:
        raise ValueError(f"{spec}: {_one_line(err)}") from None
    _check_built(req, mae)
    return mae


# ---- Hugging Face ViTMAE ----------------------------------------------------------------------


def _hf_known_keys(*configs: Any) -> set[str]:
    keys: set[str] = set()
    for config in configs:
        keys |= set(config.to_dict())
    return {k for k in keys if not k.startswith("_") and k not in _HF_META_KEYS}


def _check_hf_options(options: dict[str, Any], known: set[str]) -> None:
    for key in options:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown ViTMAEConfig option {key!r}{hint}")


def _create_hf(req: _Request) -> nn.Module:
    spec, sizes, patch_size, options = req.spec, req.sizes, req.patch_size, req.options
    if sizes[0] != sizes[1]:
        raise ValueError(f"transformers ViTMAE needs square images, got {sizes[0]}x{sizes[1]}")
    tf = hf_adapter._transformers()  # ImportError with the install hint when the extra is missing
    data = {"image_size": sizes[0], "num_channels": req.in_chans, "norm_pix_loss": req.norm_pix_loss}
    if spec.target == "tiny":
        p = HF_TINY_PATCH_SIZE if patch_size is None else patch_size
        _check_hf_options(options, _hf_known_keys(tf.ViTMAEConfig()))
        if sizes[0] % p:
            raise ValueError(
                f"hf:tiny patch size {p} does not divide {sizes[0]}x{sizes[1]} images; pass patch_size"
            )
        config = {**HF_TINY, **data, "patch_size": p, **options}
        build: Callable[[], nn.Module] = lambda: hf_adapter.create_hf_mae(**config)  # noqa: E731
    else:
        path = Path(spec.target)
        if not path.is_file():
            raise ValueError(f"hf model config not found: {path}")
        try:
            cfg = tf.ViTMAEConfig.from_json_file(str(path))
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read ViTMAEConfig from {path}: {_one_line(err)}") from None
        _check_hf_options(options, _hf_known_keys(tf.ViTMAEConfig(), cfg))
        for key, value in {
            **data,
            **({} if patch_size is None else {"patch_size": patch_size}),
            **options,
        }.items():
            setattr(cfg, key, value)
        p = cfg.patch_size
        if not _positive_int(p) or sizes[0] % p:
            raise ValueError(
                f"{path.name}: patch_size {p!r} does not divide {sizes[0]}x{sizes[1]} images; pass patch_size"
            )
        build = lambda: tf.ViTMAEForPreTraining(cfg)  # noqa: E731
    try:
        model = _seeded(req.seed, build)
    except (TypeError, ValueError) as err:
        raise ValueError(f"cannot build {spec}: {_one_line(err)}") from None
    mae = hf_adapter.wrap(model)
    _check_built(req, mae)
    return mae


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
