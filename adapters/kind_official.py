"""The `official` model kind: `--model official:PATH.py[:CALLABLE]`, a facebookresearch/mae-style `models_mae.py`.

The user's file is imported by path (relative paths are resolved; `load_official_module`), and a class
or factory function in it (default `MaskedAutoencoderViT`) builds the model under `timm_compat`, wrapped
by `maskkit.adapters.official_mae.wrap`.

patch_size of an official callable: passed only when its signature names `patch_size` (the class
`MaskedAutoencoderViT`); a factory taking only `**kwargs` (`mae_vit_base_patch16`) sets its own, and a
given patch_size must then equal it (else a one-line ValueError). None keeps the callable's own.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import sys
import types
from pathlib import Path
from typing import Any, Callable

from torch import nn

from maskkit.registry import Card

from . import official_mae
from .adapter import BuildRequest, ModelAdapter, ModelSpec, register_adapter
from .build import absolute, check_built, one_line, seeded

DEFAULT_OFFICIAL_CALLABLE = "MaskedAutoencoderViT"


@register_adapter(
    "official",
    card=Card(
        idea="the user's own facebookresearch/mae models_mae.py, by path, and a class or factory in it",
        paper="He et al., CVPR 2022",
        allowed={"path": "a .py file (made absolute)", "callable": "a class or function defined in the file"},
    ),
)
class OfficialAdapter(ModelAdapter):
    """An official-MAE `models_mae.py` of the user's (`--model official:PATH.py[:CALLABLE]`)."""

    forms = ("official:PATH.py[:CALLABLE]",)

    def __init__(self, path: str, callable: str = DEFAULT_OFFICIAL_CALLABLE) -> None:
        self.path = str(absolute(path))
        self.callable = callable

    @classmethod
    def parse(cls, arg: str) -> OfficialAdapter:
        # a last ':'-part that is an identifier (and not a .py path) is the callable
        head, sep, tail = arg.rpartition(":")
        if sep and head and tail.isidentifier():
            path_text, name = head, tail
        else:
            path_text, name = arg, DEFAULT_OFFICIAL_CALLABLE
        if absolute(path_text).suffix != ".py":
            raise ValueError(f"official: expects a Python file (models_mae.py), got {path_text!r}")
        return cls(path_text, name)

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec("official", self.path, self.callable)

    def build(self, request: BuildRequest) -> nn.Module:
        spec = request.spec
        module = load_official_module(self.path)
        fn = getattr(module, self.callable, None)
        file = Path(self.path).name
        if fn is None:
            defined = _defined_callables(module)
            shown = ", ".join(defined[:12]) + (", ..." if len(defined) > 12 else "")
            raise ValueError(
                f"official model file {file} has no callable {self.callable!r} (it defines: {shown or 'nothing'})"
            )
        if not callable(fn):
            raise ValueError(f"{self.callable!r} in official model file {file} is not callable")
        kwargs = _official_kwargs(request, fn, self.callable, file)

        def build() -> nn.Module:
            with official_mae.timm_compat(module):  # the official file was written for timm 0.3.2
                return fn(**kwargs)

        try:
            model = seeded(request.seed, build)
        except TypeError as err:
            raise ValueError(f"{self.callable} in {file} rejected its arguments: {one_line(err)}") from None
        try:
            mae = official_mae.wrap(model)
        except TypeError as err:
            raise ValueError(f"{spec}: {one_line(err)}") from None
        check_built(request, mae)
        return mae


_OFFICIAL_MODULES: dict[str, types.ModuleType] = {}  # absolute path -> module


def load_official_module(path: str | Path) -> types.ModuleType:
    """Import a `models_mae.py` by path, once per resolved path (later calls return the same module).

    It is registered in `sys.modules` under a name unique to its path, and its folder is on
    `sys.path` while it runs, so sibling imports of the official repo (`util.pos_embed`) resolve.
    """
    resolved = absolute(str(path))
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
        raise ValueError(f"cannot import official model file {key}: {type(err).__name__}: {one_line(err)}") from err
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


def _official_kwargs(req: BuildRequest, fn: Callable[..., Any], name: str, file: str) -> dict[str, Any]:
    """The keyword arguments for the official callable; `patch_size` only when its signature names it."""
    sizes, patch_size, options = req.sizes, req.patch_size, req.options
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
                raise ValueError(f"{name} in {file} {what} {key!r} (its parameters: {', '.join(params)})")
    return {**kwargs, **options}
