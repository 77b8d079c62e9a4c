"""The masking-policy registry: `POLICIES`, a `maskkit.registry.Registry`, and the policy functions on it.

    @register_policy("mine")              # or bare: @register_policy -> the lower-cased class name
    class Mine(MaskPolicy): ...

    create_policy("mine", ratio=0.6)      # list_policies(), policy_options("mine"), policy_card("mine")

A policy class declares its card as the class attribute `card_info` (`CardInfo`: paper, idea, what it
learns from, allowed option values); a class without one gets a card derived from its docstring,
annotations and `learnable` / `aux_loss`. Third-party policies arrive through MASKKIT_PLUGINS or the
`maskkit.policies` entry-point group (`load_plugins`). This module imports only the generic registry
and the policy base types, so `maskkit.registry` never imports a policy.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from maskkit.policies import base as _base
from maskkit.policies.base import MaskPolicy
from maskkit.policies.card import COMMON_ALLOWED, LEARNS, CardInfo, PolicyCard
from maskkit.registry import PLUGINS_ENV, Card, Option, Registry, convert_option, signature_options

__all__ = [
    "AUTO_POLICY_OPTIONS",
    "COMMON_ALLOWED",
    "LEARNS",
    "PLUGINS_ENV",
    "POLICIES",
    "CardInfo",
    "PolicyCard",
    "PolicyOption",
    "coerce_policy_options",
    "convert_option",
    "create_policy",
    "create_sized_policy",
    "get_policy_class",
    "is_policy",
    "list_policies",
    "load_plugins",
    "policy_card",
    "policy_options",
    "policy_summary",
    "register_policy",
]

F = TypeVar("F", bound=Callable[..., Any])

#: one constructor argument of a registered policy (name, default, annotation text)
PolicyOption = Option

#: policy constructor arguments a run fills itself (from the mask ratio and the model)
AUTO_POLICY_OPTIONS = ("ratio", "embed_dim", "num_patches")


def _own_card(factory: Callable[..., Any]) -> Card | None:
    """The card a policy class declares itself (`card_info`, read from the class only: not inherited)."""
    info = vars(factory).get("card_info") if isinstance(factory, type) else None
    return info.registry_card() if isinstance(info, CardInfo) else None


POLICIES: Registry[Any] = Registry("policy", entry_point_group="maskkit.policies", card_of=_own_card)
_base.NAMES = POLICIES  # names policies in MaskPolicy's messages
ENTRY_POINT_GROUP = POLICIES.entry_point_group
_REGISTRY = POLICIES._entries  # name -> class or factory (tests restore it after registering their own)
_plugins_loaded = False  # load_plugins has run (reset it to read MASKKIT_PLUGINS again)


def register_policy(name: str | F | None = None, *, overwrite: bool = False) -> Any:
    """Register a MaskPolicy class or factory under `name` (default: its `policy_name`, else the lower-cased
    class name). Usable bare (`@register_policy`) or with a name (`@register_policy("mine")`).
    Re-registering a taken name raises ValueError unless `overwrite=True`.
    """

    def decorator(fn: F, key: str | None = None) -> F:
        key = key or getattr(fn, "policy_name", None) or fn.__name__.lower()
        return POLICIES.register(key, overwrite=overwrite)(fn)

    if callable(name):  # bare decorator
        return decorator(name)
    return lambda fn: decorator(fn, name)


def load_plugins() -> list[str]:
    """Import third-party policy modules (MASKKIT_PLUGINS and `maskkit.policies` entry points) once per process;
    returns the modules and entry points this call loaded."""
    global _plugins_loaded
    if _plugins_loaded:
        return []
    _plugins_loaded = True
    return POLICIES.load(again=True)


def _loaded() -> Registry[Any]:
    load_plugins()
    return POLICIES


def list_policies() -> list[str]:
    """Names of every registered policy, sorted."""
    return _loaded().names()


def is_policy(name: str) -> bool:
    """Whether a policy is registered as `name`."""
    return name in _loaded()


def get_policy_class(name: str) -> Callable[..., Any]:
    """The class or factory registered as `name`; a one-line ValueError naming the registered ones."""
    return _loaded().get(name)


def create_policy(name: str, **kwargs: Any) -> Any:
    """Build the policy registered as `name` with constructor arguments `kwargs`."""
    return _loaded().create(name, **kwargs)


def create_sized_policy(
    name: str, *, embed_dim: int, num_patches: int, ratio: float | None = None, **options: Any
) -> Any:
    """`create_policy(name, **options)` given the MAE's sizes: `ratio` (if not None), `embed_dim` and
    `num_patches` go to the constructor where it takes them, then to `bind` where it has one."""
    accepted = {o.name for o in policy_options(name)}
    sizes = {"ratio": ratio, "embed_dim": embed_dim, "num_patches": num_patches}
    kwargs = {k: v for k, v in sizes.items() if k in accepted and v is not None and k not in options}
    policy = create_policy(name, **kwargs, **options)
    if callable(getattr(policy, "bind", None)):
        policy.bind(embed_dim=embed_dim, num_patches=num_patches)
    return policy


def policy_options(name: str) -> list[PolicyOption]:
    """The keyword options a policy's constructor takes, with defaults (for help and the CLI)."""
    return signature_options(get_policy_class(name))


def policy_card(name: str) -> PolicyCard:
    """The policy's card: from its class's own `card_info`, else derived (first docstring line, paper "-",
    learns from `learnable` / `aux_loss`, allowed values from the annotations)."""
    factory = get_policy_class(name)
    entry = POLICIES.card(name)
    info = vars(factory).get("card_info") if isinstance(factory, type) else None  # not inherited
    learns = info.learns if isinstance(info, CardInfo) else _derived_learns(factory)
    return PolicyCard(name, entry.paper, entry.idea, learns, entry.options)


def _derived_learns(factory: Callable[..., Any]) -> str:
    """'labels' for a `learnable` class, 'reconstruction' for one that overrides `aux_loss`, else 'nothing'."""
    if getattr(factory, "learnable", False):
        return "labels"
    if isinstance(factory, type) and issubclass(factory, MaskPolicy) and factory.aux_loss is not MaskPolicy.aux_loss:
        return "reconstruction"
    return "nothing"


def policy_summary(name: str) -> str:
    """First line of the policy's docstring."""
    doc = inspect.getdoc(get_policy_class(name)) or ""
    return doc.splitlines()[0] if doc else ""


def coerce_policy_options(name: str, options: dict[str, Any], spelled: dict[str, str] | None = None) -> dict[str, Any]:
    """`options` checked against the policy's constructor, string values typed by its annotations.

    `spelled` names how each key was given (e.g. `--attention-mode`) for the one-line errors.
    """
    for key in options:
        if key in AUTO_POLICY_OPTIONS:
            what = (spelled or {}).get(key, f"policy option {key!r}")
            hint = "--mask-ratio" if key == "ratio" else "the model"
            raise ValueError(f"policy option {key!r} is set from {hint}, not from {what}")
    return POLICIES.coerce(name, options, spelled, exclude=AUTO_POLICY_OPTIONS)
