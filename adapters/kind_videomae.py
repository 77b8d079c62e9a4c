"""The `videomae` model kind: `--model videomae:PATH.py[:CALLABLE]`, an MCG-NJU/VideoMAE-style `modeling_pretrain.py`.

The user's file is imported by path as the `official` kind does (`load_official_module`: its folder is on sys.path
while it runs, so its `from modeling_finetune import ...` resolves), inside `timm_registry_kept` (the real
`modeling_finetune.py` overwrites timm's `vit_base_patch16_224` and others). A class or factory in it (default
`PretrainVisionTransformer`) builds the model, wrapped by `maskkit.adapters.videomae.wrap` with the run's
`norm_pix_loss` as the loop's `--normlize_target`.

Sizes reach the callable only under the names its signature lists: `img_size`, `patch_size`, `encoder_in_chans`,
`tubelet_size`, `decoder_num_classes` (C * t * p * p, which the real decoder asserts) and the frames as
`all_frames` / `num_frames` where it takes them (v1's class does not: it always builds 16 frames). A factory taking
only `**kwargs` (`pretrain_videomae_base_patch16_224`) fixes its own sizes, which must then fit the clips (one
line otherwise). `--model-opt` keys go to the callable as they are (e.g. `encoder_depth=4`).
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

from torch import nn

from maskkit.registry import Card

from . import videomae as official_videomae
from .adapter import BuildRequest, ModelAdapter, ModelSpec, register_adapter
from .build import absolute, check_built, one_line, seeded
from .kind_official import _defined_callables, load_official_module

DEFAULT_VIDEOMAE_CALLABLE = "PretrainVisionTransformer"
#: the frames' parameter names a VideoMAE-style callable may take (v1's class takes neither)
_FRAMES_NAMES = ("all_frames", "num_frames")


@register_adapter(
    "videomae",
    card=Card(
        idea="the user's own MCG-NJU/VideoMAE modeling_pretrain.py, by path, and a class or factory in it; "
        "forward(x, mask) with a boolean mask, engine_for_pretraining's loss",
        paper="Tong et al., NeurIPS 2022",
        allowed={"path": "a .py file (made absolute)", "callable": "a class or function defined in the file"},
    ),
)
class VideoMAEAdapter(ModelAdapter):
    """An official-VideoMAE `modeling_pretrain.py` of the user's (`--model videomae:PATH.py[:CALLABLE]`)."""

    forms = ("videomae:PATH.py[:CALLABLE]",)

    def __init__(self, path: str, callable: str = DEFAULT_VIDEOMAE_CALLABLE) -> None:
        self.path = str(absolute(path))
        self.callable = callable

    @classmethod
    def parse(cls, arg: str) -> VideoMAEAdapter:
        head, sep, tail = arg.rpartition(":")  # a last ':'-part that is an identifier is the callable
        path_text, name = (head, tail) if sep and head and tail.isidentifier() else (arg, DEFAULT_VIDEOMAE_CALLABLE)
        if absolute(path_text).suffix != ".py":
            raise ValueError(f"videomae: expects a Python file (modeling_pretrain.py), got {path_text!r}")
        return cls(path_text, name)

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec("videomae", self.path, self.callable)

    def build(self, request: BuildRequest) -> nn.Module:
        module = load_videomae_module(self.path)
        fn = getattr(module, self.callable, None)
        file = Path(self.path).name
        if fn is None:
            defined = _defined_callables(module)
            shown = ", ".join(defined[:12]) + (", ..." if len(defined) > 12 else "")
            raise ValueError(f"VideoMAE model file {file} has no callable {self.callable!r} (it defines: "
                             f"{shown or 'nothing'})")  # fmt: skip
        if not callable(fn):
            raise ValueError(f"{self.callable!r} in VideoMAE model file {file} is not callable")
        kwargs = _videomae_kwargs(request, fn, self.callable, file)
        build: Callable[[], nn.Module] = lambda: fn(**kwargs)  # noqa: E731
        try:
            model = seeded(request.seed, build)
        except (TypeError, AssertionError, ValueError) as err:
            hint = "" if request.in_chans == 3 else (
                f" (VideoMAE's decoder predicts 3-channel tubelets; the data have {request.in_chans} channels)")
            raise ValueError(f"{self.callable} in {file} rejected its arguments: {one_line(err)}{hint}") from None
        try:
            mae = official_videomae.wrap(model, request.norm_pix_loss)
        except TypeError as err:
            raise ValueError(f"{request.spec}: {one_line(err)}") from None
        check_built(request, mae)
        return mae


def load_videomae_module(path: str | Path) -> types.ModuleType:
    """Import a `modeling_pretrain.py` by path once (`load_official_module`), leaving timm's registry as it was, with
    its sibling imports (`from modeling_finetune import ...`) resolved in its own folder (`siblings_isolated`)."""
    with official_videomae.timm_registry_kept(), siblings_isolated(absolute(str(path)).parent):
        return load_official_module(path)


@contextlib.contextmanager
def siblings_isolated(folder: Path) -> Iterator[None]:
    """While inside, a module named like a .py file of `folder` but loaded from elsewhere (another checkout's
    `modeling_finetune`) is out of sys.modules, so the import finds the folder's own; it is put back after."""
    names = [file.stem for file in folder.glob("*.py")]
    stale = {name: sys.modules.pop(name) for name in names if name in sys.modules and not _from(sys.modules[name], folder)}
    try:
        yield
    finally:
        sys.modules.update(stale)


def _from(module: types.ModuleType, folder: Path) -> bool:
    file = getattr(module, "__file__", None)
    return file is not None and Path(file).resolve().parent == folder


def _videomae_kwargs(req: BuildRequest, fn: Callable[..., Any], name: str, file: str) -> dict[str, Any]:
    """The keyword arguments for the callable: the sizes under the names its signature lists, then the options."""
    try:
        params = dict(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        params = {}
    named = {n: p for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    open_kwargs = not params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    options = req.options

    def own(key: str, fallback: Any) -> Any:  # the value the callable will use: option, else its default
        if key in options:
            return options[key]
        default = named[key].default if key in named else inspect.Parameter.empty
        return fallback if default is inspect.Parameter.empty else default

    sizes: dict[str, Any] = {
        "img_size": req.sizes[0] if req.sizes[0] == req.sizes[1] else req.sizes,
        "encoder_in_chans": req.in_chans,
    }
    if req.patch_size is not None:
        sizes["patch_size"] = req.patch_size
    if req.num_frames is not None:
        sizes.update({key: req.num_frames for key in _FRAMES_NAMES})
    if "decoder_num_classes" in named:
        p = sizes.get("patch_size", own("patch_size", 16))
        sizes["decoder_num_classes"] = req.in_chans * own("tubelet_size", 2) * p * p
    kwargs = {key: value for key, value in sizes.items() if key in named and key not in options}
    if not open_kwargs:
        for key in options:
            if key not in named:
                raise ValueError(f"{name} in {file} has no option {key!r} (its parameters: {', '.join(params)})")
    return {**kwargs, **options}
