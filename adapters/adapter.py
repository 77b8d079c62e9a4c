"""What a model adapter is: one kind of `--model KIND:ARG`, registered in `ADAPTERS`, in one file.

    @register_adapter("mine", card=Card(idea="MAEs of my codebase", allowed={"width": "int >= 1"}))
    class MyAdapter(ModelAdapter):
        forms = ("mine:WIDTH",)                       # how its specs are written, for messages

        def __init__(self, width: int = 64) -> None:  # the spec's parts: the card's options
            self.width = width

        @classmethod
        def parse(cls, arg: str) -> MyAdapter:         # "mine:ARG" -> an instance; one-line ValueError
            return cls(int(arg))

        @property
        def spec(self) -> ModelSpec:                  # the canonical value a run records
            return ModelSpec("mine", str(self.width))

        def build(self, request: BuildRequest) -> nn.Module:  # the MAE protocol over a fresh model
            ...

An instance is one parsed spec; `maskkit.adapters.models` parses (`parse_model_spec`) and builds
(`create_mae_from_spec`) through this registry, so a new kind needs no edit elsewhere. A spec without
`KIND:` names an entry of `DEFAULT_KIND` (a timm preset). The helpers here (`seeded`, `check_built`,
`one_line`, ...) are shared by the adapters' builders.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from maskkit.registry import Card, Registry

__all__ = [
    "ADAPTERS",
    "DEFAULT_KIND",
    "BuildRequest",
    "ModelAdapter",
    "ModelSpec",
    "register_adapter",
]

#: the kind of a spec written without `KIND:` (a bare preset name)
DEFAULT_KIND = "timm"

ADAPTERS: Registry[ModelAdapter] = Registry("adapter", entry_point_group="maskkit.adapters", builtins="maskkit.adapters")


def register_adapter(name: Any = None, *, card: Card | None = None, overwrite: bool = False) -> Any:
    """Register a `ModelAdapter` class as the model kind `name` (`--model NAME:ARG`); see the module docstring."""
    return ADAPTERS.register(name, card=card, overwrite=overwrite)


@dataclass(frozen=True)
class ModelSpec:
    """A parsed `--model` spec; `str(spec)` is its canonical form (absolute paths), which parses back to it."""

    kind: str  # a registered adapter: "timm" | "official" | "hf" | a plugin's
    target: str  # preset name | absolute .py path | "tiny" | absolute .json path | a plugin's argument
    callable: str | None = None  # official only: the class or factory in the file

    @property
    def arg(self) -> str:
        """The ARG of `KIND:ARG`: the target, and the callable after a ':' where there is one."""
        return self.target if self.callable is None else f"{self.target}:{self.callable}"

    @property
    def requires_patch_size(self) -> bool:
        """Whether `create_mae_from_spec` needs an explicit `patch_size` (timm presets: the run chooses it)."""
        return ADAPTERS.get(self.kind).requires_patch_size

    def __str__(self) -> str:
        return self.target if self.kind == DEFAULT_KIND else f"{self.kind}:{self.arg}"


@dataclass(frozen=True)
class BuildRequest:
    """What the run asks of a builder: the spec, image sizes (H, W), channels, patch size, loss target, seed, options,
    and for clips [B, C, T, H, W] the frames T (None: images, or a video builder's own default)."""

    spec: ModelSpec
    img_size: Any  # as given: int or (H, W)
    sizes: tuple[int, int]
    in_chans: int
    patch_size: int | None
    norm_pix_loss: bool
    seed: int
    options: dict[str, Any]
    num_frames: int | None = None  # T of a video source's clips; an image MAE's builder ignores it


class ModelAdapter:
    """One kind of MAE codebase behind `--model KIND:ARG`; an instance is one parsed spec.

    The constructor takes the spec's parts as keyword options (the card lists them); `parse` reads
    them from ARG, `spec` writes them back canonically, `build` makes the model.
    """

    #: how this kind's specs are written, joined into the grammar of messages ("official:PATH.py[:CALLABLE]")
    forms: ClassVar[tuple[str, ...]] = ()
    #: whether `build` needs an explicit patch size (the run then picks one, from `preferred_patch_size`)
    requires_patch_size: ClassVar[bool] = False

    @classmethod
    def parse(cls, arg: str) -> ModelAdapter:
        """The adapter for `KIND:ARG` (ARG non-empty and stripped); a one-line ValueError when ARG is bad."""
        raise NotImplementedError(f"{cls.__name__} does not implement parse")

    @property
    def spec(self) -> ModelSpec:
        """The canonical, comparable value of this spec (recorded in a run's config.json)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement spec")

    def build(self, request: BuildRequest) -> nn.Module:
        """A freshly initialised MAE (the MAE protocol, maskkit.mae) for the request; one-line ValueErrors."""
        raise NotImplementedError(f"{type(self).__name__} does not implement build")

    def preferred_patch_size(self) -> int | None:
        """The model's own patch size, for the run's automatic choice; None lets `build` choose."""
        return None
