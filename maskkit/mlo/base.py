"""The hypergradient protocol: how the masker's gradient of the validation loss is computed.

`MLOEngine` runs the schedule (a pretrain step every iteration, a head step and a masker step
every `masker_every`) and asks its `Hypergradient` only these questions, so it holds no
method names:

    method.check_config(config)                          at MLOConfig construction
    method.check_optimizers(mae_optimizer, head_optimizer)   at MLOEngine construction
    method.pretrain(engine, images, learning=, progress=)    every iteration -> PretrainStep
    method.masker_grads(engine, step, train_batch, val_batch)  masker iterations -> (grads, FinetuneStep)
    method.window_steps()                                pretrain steps one hypergradient spans
    method.window_open()                                 state carried across engine.step calls now
    method.can_checkpoint(engine)                        whether to checkpoint now (never in a window)
    method.reset()                                       drop an open window (load_state_dict)

A method is one class in one file, registered with a card and constructor options:

    @register_hypergrad("mine", card=Card(idea="...", paper="...", allowed={"alpha": "> 0"}))
    class Mine(Hypergradient):
        def __init__(self, alpha: float = 1.0) -> None:
            self.alpha = alpha                    # every option kept under its own name
        def masker_grads(self, engine, step, train_batch, val_batch): ...

`MLOConfig(hypergrad="mine", hypergrad_options={"alpha": 2.0})` selects it; third-party
packages register through the `maskkit.hypergrads` entry-point group or MASKKIT_PLUGINS.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor

from maskkit.registry import Card, PluginError, Registry, signature_options

if TYPE_CHECKING:
    import torch

    from maskkit.mlo.config import MLOConfig
    from maskkit.mlo.engine import MLOEngine
    from maskkit.mlo.steps import FinetuneStep, PretrainStep

Batch = tuple[Tensor, Tensor]

#: the registered hypergradient methods (built-ins: maskkit.mlo.darts, maskkit.mlo.unrolled)
HYPERGRADS: Registry[Hypergradient] = Registry("hypergrad", "maskkit.hypergrads", builtins="maskkit.mlo")


class Hypergradient:
    """One way to compute the masker's hypergradient; subclass it and override `masker_grads`.

    Class attributes:
        name: the registered name (set by `register_hypergrad`); option labels in messages are
            `<name>_<option>`, the CLI's `--<name>-<option>`.
        config_fields: option -> the `MLOConfig` field that holds it (the built-ins' keywords of
            before the registry, e.g. darts' `paths` is `darts_paths`); others come from
            `MLOConfig.hypergrad_options`.
        level2s: the level-2 kinds (MLOConfig.level2) the method supports.
    """

    name: ClassVar[str] = "hypergradient"
    config_fields: ClassVar[Mapping[str, str]] = {}
    level2s: ClassVar[tuple[str, ...]] = ("head",)

    @classmethod
    def held_fields(cls) -> Mapping[str, str]:
        """`config_fields` as the class itself declares it (a subclass registered under another name takes its
        options from `hypergrad_options`, not from its parent's fields)."""
        return vars(cls).get("config_fields", {})

    def label(self, option: str) -> str:
        """How messages name an option: `<name>_<option>` (e.g. darts_paths)."""
        return f"{self.name}_{option}"

    def options(self) -> dict[str, Any]:
        """The constructor's options as this instance holds them: `HYPERGRADS.create(name, **options())`
        builds an equal one."""
        return {o.name: getattr(self, o.name) for o in signature_options(type(self))}

    # ---- checks ---------------------------------------------------------------------------

    def check_config(self, config: MLOConfig) -> None:
        """ValueError when the engine's schedule does not suit the method (level2 is checked by MLOConfig)."""

    def check_optimizers(self, mae_optimizer: torch.optim.Optimizer, head_optimizer: torch.optim.Optimizer) -> None:
        """ValueError when the method cannot use an optimizer (at construction, not at the first masker step)."""

    # ---- one iteration --------------------------------------------------------------------

    def pretrain(self, engine: MLOEngine, images: Tensor, *, learning: bool,
                 progress: float | None) -> PretrainStep:
        """This iteration's pretrain step; `learning`: the iteration ends with a masker update.

        Default: the engine's real step, keeping nothing for the hypergradient."""
        return engine.pretrain(images, keep_params=False, progress=progress)

    def masker_grads(self, engine: MLOEngine, step: PretrainStep, train_batch: Batch,
                     val_batch: Batch) -> tuple[list[Tensor], FinetuneStep]:
        """After the cycle's last pretrain step `step`: take the level-2 step (head or probe) and return the
        validation loss's gradient w.r.t. the masker's trainable parameters (one tensor each) and that step."""
        raise NotImplementedError(f"{type(self).__name__} must implement masker_grads")

    # ---- windows that span several iterations ---------------------------------------------

    def window_steps(self) -> int:
        """Pretrain steps whose state one hypergradient carries across `engine.step` calls (1: none, so
        every call can be undone alone by restoring a `state_dict` taken before it)."""
        return 1

    def window_open(self) -> bool:
        """Whether a window is open now: state carried from an earlier `engine.step` (no `state_dict` then)."""
        return False

    def can_checkpoint(self, engine: MLOEngine) -> bool:
        """Whether the trainer should checkpoint now (never while a window is open)."""
        return not self.window_open()

    def reset(self) -> None:
        """Forget any open window (the engine's state was replaced)."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.options() == self.options()

    __hash__ = None  # type: ignore[assignment]  # mutable state (windows): not hashable


def check_masker_grads(method: Hypergradient, result: Any, params: list[Tensor]) -> tuple[list[Tensor], Any]:
    """`method.masker_grads`' result checked where it enters the engine: a pair (grads, FinetuneStep) with exactly
    one gradient per trainable masker parameter (`params`, in order), each a tensor of that parameter's shape
    (not None: a method with an unused parameter gives zeros, `zeros_for_none`). Else a one-line PluginError
    naming the method and the check (fewer gradients would update part of the masker). Non-finite values are
    the non-finite guard's (`masker_grad_norm`), which --skip-nonfinite can skip. Cost: Python comparisons."""
    from maskkit.mlo.steps import FinetuneStep

    who = f"{HYPERGRADS.label(method)}: masker_grads"
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        raise PluginError(f"{who} must return (gradients, FinetuneStep), got {type(result).__name__}")
    grads, step = result
    if not isinstance(step, FinetuneStep):
        raise PluginError(f"{who} must return a FinetuneStep second, got {type(step).__name__}")
    if not isinstance(grads, (tuple, list)):
        raise PluginError(f"{who} must return a list of gradients first, got {type(grads).__name__}")
    if len(grads) != len(params):
        raise PluginError(f"{who} returned {len(grads)} gradients for the masker's {len(params)} trainable "
                          "parameters (one each, in order)")  # fmt: skip
    for k, (g, p) in enumerate(zip(grads, params, strict=True)):
        if not isinstance(g, Tensor):
            raise PluginError(f"{who}: gradient {k} is {'None' if g is None else type(g).__name__}, not a tensor "
                              f"of its parameter's shape {tuple(p.shape)}")  # fmt: skip
        if g.shape != p.shape:
            raise PluginError(f"{who}: gradient {k} has shape {tuple(g.shape)}, but its parameter has "
                              f"{tuple(p.shape)}")  # fmt: skip
    return list(grads), step


def register_hypergrad(name: str, *, card: Card | None = None, overwrite: bool = False) -> Any:
    """Register a `Hypergradient` subclass under `name` (with its card); sets the class's `name`."""

    def decorator(cls: type[Hypergradient]) -> type[Hypergradient]:
        if not (isinstance(cls, type) and issubclass(cls, Hypergradient)):
            raise TypeError(f"register_hypergrad: {cls!r} is not a maskkit.mlo.Hypergradient subclass")
        HYPERGRADS.register(name, card=card, overwrite=overwrite)(cls)
        cls.name = name
        return cls

    return decorator
