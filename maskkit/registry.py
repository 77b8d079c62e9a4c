"""Policy registry in the style of timm's `register_model` / `create_model`.

A third-party policy plugs in with one decorator and is then usable by name everywhere,
the CLI included:

    @register_policy("center")
    class CenterPolicy(MaskPolicy): ...

    policy = create_policy("center", ratio=0.6)

`policy_card(name)` describes a policy: its paper, idea, what it learns from and its options
with defaults and allowed values (declared by built-ins as `card_info`, derived for others).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import inspect
import json
import os
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, TypeVar

_REGISTRY: dict[str, Callable[..., Any]] = {}

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class PolicyOption:
    """One constructor argument of a registered policy, for help tables and CLI pass-through."""

    name: str
    default: Any
    annotation: str


#: what a policy's parameters learn from: no parameters, the MAE's own reconstruction loss
#: (`aux_loss`), or downstream labels (a `learnable` policy, trained by the MLO engine).
LEARNS = ("nothing", "reconstruction", "labels")


#: allowed values of the options that mean the same in every built-in policy, written once here; a
#: card's own `allowed` entry overrides one (e.g. `uniform` takes only ratio 0.75).
COMMON_ALLOWED: Mapping[str, str] = {
    "ratio": "(0, 1)",
    "guided_fraction": "[0, 1]",
    "guided_ramp": "[0, 1]",
    "embed_dim": "int >= 1 | None",
    "num_patches": "int >= 1 | None",
    "hidden_dim": "int >= 1",
    "pos_dim": "int >= 0, multiple of 4",
    "loss_weight": ">= 0",
}


@dataclass(frozen=True)
class CardInfo:
    """What a policy class declares for its `PolicyCard` (class attribute `card_info`); `allowed` maps
    each option to its allowed values as text: "high | low | hint", "[0, 1]", "(0, 1)", "int >= 1 | None"
    (options listed in COMMON_ALLOWED need no entry)."""

    paper: str
    idea: str
    learns: str
    allowed: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.learns not in LEARNS:
            raise ValueError(f"learns must be one of {LEARNS}, got {self.learns!r}")

    def allowed_values(self, option: str) -> str | None:
        """The option's allowed values: the card's own entry, else the shared COMMON_ALLOWED one."""
        return self.allowed.get(option) or COMMON_ALLOWED.get(option)


class CardOption(NamedTuple):
    """One option of a policy card: (name, default, allowed-values text)."""

    name: str
    default: Any
    allowed: str


@dataclass(frozen=True)
class PolicyCard:
    """A policy at a glance: short citation ("-" for none), one-line idea, what it learns from, options."""

    name: str
    paper: str
    idea: str
    learns: str  # one of LEARNS
    options: tuple[CardOption, ...]


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


def policy_card(name: str) -> PolicyCard:
    """The policy's card: from its class's own `card_info`, else derived (first docstring line, paper "-",
    learns from `learnable` / `aux_loss`, allowed values from the annotations)."""
    factory = get_policy_class(name)
    info = vars(factory).get("card_info") if isinstance(factory, type) else None  # not inherited
    if isinstance(info, CardInfo):
        options = tuple(CardOption(o.name, o.default, info.allowed_values(o.name) or o.annotation or "any")
                        for o in policy_options(name))  # fmt: skip
    else:  # a third-party class without a card: its annotations say what it takes
        doc = inspect.cleandoc(factory.__doc__ or "")  # its own docstring: a class's is not inherited
        info = CardInfo(paper="-", idea=doc.splitlines()[0] if doc else "", learns=_derived_learns(factory))
        options = tuple(CardOption(o.name, o.default, o.annotation or "any") for o in policy_options(name))
    return PolicyCard(name, info.paper, info.idea, info.learns, options)


def _derived_learns(factory: Callable[..., Any]) -> str:
    """'labels' for a `learnable` class, 'reconstruction' for one that overrides `aux_loss`, else 'nothing'."""
    from maskkit.policies.base import MaskPolicy

    if getattr(factory, "learnable", False):
        return "labels"
    if isinstance(factory, type) and issubclass(factory, MaskPolicy) and factory.aux_loss is not MaskPolicy.aux_loss:
        return "reconstruction"
    return "nothing"


def policy_summary(name: str) -> str:
    """First line of the policy's docstring."""
    doc = inspect.getdoc(get_policy_class(name)) or ""
    return doc.splitlines()[0] if doc else ""


PLUGINS_ENV = "MASKKIT_PLUGINS"
ENTRY_POINT_GROUP = "maskkit.policies"
_plugins_loaded = False


def load_plugins() -> list[str]:
    """Import third-party policy modules so that their `@register_policy` runs; returns their names.

    Modules come from the `MASKKIT_PLUGINS` environment variable (comma-separated module names),
    looked up in the current directory first, as `python -m` would (a console script's import path
    starts with its own folder instead), and from installed packages' `maskkit.policies` entry
    points. Runs once per process.
    """
    global _plugins_loaded
    if _plugins_loaded:
        return []
    _plugins_loaded = True
    names = [m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(",") if m.strip()]
    with _current_directory_first() if names else contextlib.nullcontext():
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


@contextlib.contextmanager
def _current_directory_first() -> Iterator[None]:
    """The current directory at the front of sys.path while the plugins (and what they import) load."""
    cwd = os.getcwd()
    present = any(os.path.abspath(entry or os.curdir) == cwd for entry in sys.path[:1])
    if not present:
        sys.path.insert(0, cwd)
        importlib.invalidate_caches()
    try:
        yield
    finally:
        if not present and cwd in sys.path:
            sys.path.remove(cwd)


def _ensure_builtins() -> None:
    # Importing the package registers the built-in policies; plugins register theirs.
    import maskkit.policies  # noqa: F401

    load_plugins()


#: policy constructor arguments a run fills itself (from the mask ratio and the model)
AUTO_POLICY_OPTIONS = ("ratio", "embed_dim", "num_patches")


def convert_option(value: str, annotation: str, what: str) -> Any:
    """Parse a string by its annotation ('int', 'float', 'bool', 'str', 'X | None'); else JSON, else as is."""
    parts = [p.strip() for p in annotation.split("|")] if annotation else []
    if "None" in parts and value.lower() in ("none", "null"):
        return None
    base = next((p for p in parts if p != "None"), "")
    try:
        if base == "int":
            return int(value)
        if base == "float":
            return float(value)
        if base == "bool":
            lowered = value.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if base == "str":
            return value
    except ValueError:
        raise ValueError(f"{what} expects {base}, got {value!r}") from None
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def coerce_policy_options(name: str, options: dict[str, Any], spelled: dict[str, str] | None = None) -> dict[str, Any]:
    """`options` checked against the policy's constructor, string values typed by its annotations.

    `spelled` names how each key was given (e.g. `--attention-mode`) for the one-line errors.
    """
    known = {o.name: o for o in policy_options(name) if o.name not in AUTO_POLICY_OPTIONS}
    choices = ", ".join(f"--{name.replace('_', '-')}-{k.replace('_', '-')}" for k in known) or "none"
    spelled = spelled or {}
    typed: dict[str, Any] = {}
    for key, value in options.items():
        what = spelled.get(key, f"policy option {key!r}")
        if key in AUTO_POLICY_OPTIONS:
            hint = "--mask-ratio" if key == "ratio" else "the model"
            raise ValueError(f"policy option {key!r} is set from {hint}, not from {what}")
        if key not in known:
            raise ValueError(f"policy {name!r} has no option {key!r} ({what}); its options: {choices}")
        typed[key] = convert_option(value, known[key].annotation, what) if isinstance(value, str) else value
    return typed
