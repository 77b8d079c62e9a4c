"""Policy registry in the style of timm's `register_model` / `create_model`.

A third-party policy plugs in with one decorator and is then usable by name everywhere,
the CLI included:

    @register_policy("center")
    class CenterPolicy(MaskPolicy): ...

    policy = create_policy("center", ratio=0.6)
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import os
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

_REGISTRY: dict[str, Callable[..., Any]] = {}

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class PolicyOption:
    """One constructor argument of a registered policy, for help tables and CLI pass-through."""

    name: str
    default: Any
    annotation: str


def register_policy(name: str | F | None = None, *, overwrite: bool = False) -> Any:
    """Register a MaskPolicy class or factory under `name` (default: the lower-cased class name).

    Usable bare (`@register_policy`) or with a name (`@register_policy("mine")`).
    Re-registering a taken name raises ValueError unless `overwrite=True`.
    """

    def decorator(fn: F, key: str | None = None) -> F:
        key = key or getattr(fn, "policy_name", None) or fn.__name__.lower()
        if key in _REGISTRY and _REGISTRY[key] is not fn and not overwrite:
            raise ValueError(f"a policy named {key!r} is already registered ({_REGISTRY[key]!r})")
        _REGISTRY[key] = fn
        return fn

    if callable(name):  # bare decorator
        return decorator(name)
    return lambda fn: decorator(fn, name)


def list_policies() -> list[str]:
    """Names of every registered policy, sorted."""
    _ensure_builtins()
    return sorted(_REGISTRY)


def is_policy(name: str) -> bool:
    _ensure_builtins()
    return name in _REGISTRY


def get_policy_class(name: str) -> Callable[..., Any]:
    _ensure_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; registered: {', '.join(sorted(_REGISTRY))}") from None


def create_policy(name: str, **kwargs: Any) -> Any:
    """Build the policy registered as `name` with constructor arguments `kwargs`."""
    factory = get_policy_class(name)
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as err:
        raise ValueError(f"bad options for policy {name!r}: {err}") from None
    return factory(**kwargs)


def policy_options(name: str) -> list[PolicyOption]:
    """The keyword options a policy's constructor takes, with defaults (for help and the CLI)."""
    factory = get_policy_class(name)
    options = []
    for param in inspect.signature(factory).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        default = None if param.default is param.empty else param.default
        annotation = param.annotation if isinstance(param.annotation, str) else getattr(
            param.annotation, "__name__", str(param.annotation)
        )
        options.append(PolicyOption(param.name, default, "" if param.annotation is param.empty else annotation))
    return options


def policy_summary(name: str) -> str:
    """First line of the policy's docstring."""
    doc = inspect.getdoc(get_policy_class(name)) or ""
    return doc.splitlines()[0] if doc else ""


PLUGINS_ENV = "MASKKIT_PLUGINS"
ENTRY_POINT_GROUP = "maskkit.policies"
_plugins_loaded = False


def load_plugins() -> list[str]:
    """Import third-party policy modules so that their `@register_policy` runs; returns their names.

    Modules come from the `MASKKIT_PLUGINS` environment variable (comma-separated module names) and
    from installed packages' `maskkit.policies` entry points. Runs once per process.
    """
    global _plugins_loaded
    if _plugins_loaded:
        return []
    _plugins_loaded = True
    names = [m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(",") if m.strip()]
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as err:  # a plugin's own failure, reported in one line
            raise ValueError(f"cannot import policy plugin {name!r} named in {PLUGINS_ENV}: {err}") from None
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            entry.load()
        except Exception as err:
            raise ValueError(f"cannot load policy plugin entry point {entry.name!r} ({entry.value}): {err}") from None
        names.append(entry.value)
    return names


def _ensure_builtins() -> None:
    # Importing the package registers the built-in policies; plugins register theirs.
    import maskkit.policies  # noqa: F401

    load_plugins()
