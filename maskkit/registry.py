"""The registries: a generic `Registry`, in the style of timm's `register_model` / `create_model`, used for every kind of
thing a user plugs in: masking policies, model adapters, data sources and hypergradient methods.

    DATASETS = Registry("dataset", entry_point_group="maskkit.datasets")

    @DATASETS.register("mine", card=Card(idea="my images"))
    class MySource: ...

    DATASETS.create("mine", **options)     # DATASETS.names(), DATASETS.card("mine"), DATASETS.get("mine")

This module imports none of what it registers. Third-party entries arrive in two ways, loaded on
the first look-up of a registry:
- modules named in the `MASKKIT_PLUGINS` environment variable (comma-separated; imported once per
  process, looked up in the current directory first, as `python -m` does), which may register
  entries of any kind;
- installed packages' entry points in the registry's group (`maskkit.policies`,
  `maskkit.adapters`, `maskkit.datasets`, `maskkit.hypergrads`).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import inspect
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, NamedTuple, TypeVar

T = TypeVar("T")

PLUGINS_ENV = "MASKKIT_PLUGINS"


class CardOption(NamedTuple):
    """One option of a card: (name, default, allowed-values text)."""

    name: str
    default: Any
    allowed: str


@dataclass(frozen=True)
class Card:
    """What a registered entry says about itself: a short citation ("-" for none), a one-line idea, and the
    allowed values of its options as text ("a | b", "[0, 1]", "int >= 1"); the options themselves and their
    defaults are read from the constructor's signature (`Registry.card`)."""

    idea: str = ""
    paper: str = "-"
    allowed: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class EntryCard:
    """An entry at a glance: kind, name, paper, idea, and its options with defaults and allowed values."""

    kind: str
    name: str
    paper: str
    idea: str
    options: tuple[CardOption, ...]


@dataclass(frozen=True)
class Option:
    """One constructor argument of a registered entry: name, default (None when required), annotation text."""

    name: str
    default: Any
    annotation: str


def signature_options(factory: Callable[..., Any]) -> list[Option]:
    """The keyword options a constructor takes, with defaults and annotation text (for help and the CLI)."""
    options = []
    for param in inspect.signature(factory).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        default = None if param.default is param.empty else param.default
        annotation = param.annotation if isinstance(param.annotation, str) else getattr(
            param.annotation, "__name__", str(param.annotation)
        )
        options.append(Option(param.name, default, "" if param.annotation is param.empty else annotation))
    return options


_plugin_modules_loaded = False


def load_plugin_modules(kind: str = "") -> list[str]:
    """Import the modules named in MASKKIT_PLUGINS (once per process); returns their names.

    `kind` names the registry that asked, for the one-line error of a module that fails to import."""
    global _plugin_modules_loaded
    if _plugin_modules_loaded:
        return []
    _plugin_modules_loaded = True
    names = [m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(",") if m.strip()]
    with _current_directory_first() if names else contextlib.nullcontext():
        for name in names:
            try:
                importlib.import_module(name)
            except Exception as err:  # a plugin's own failure, reported in one line
                what = f"{kind} plugin" if kind else "plugin"
                raise ValueError(f"cannot import {what} {name!r} named in {PLUGINS_ENV}: {err}") from None
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


class Registry(Generic[T]):
    """Named factories of one kind, with cards and plugin loading.

    Args:
        kind: what an entry is, for messages and cards ("policy", "adapter", "dataset", "hypergrad").
        entry_point_group: the entry-point group third-party packages register under.
        builtins: a module to import before the first look-up, whose import registers the built-in
            entries (by name, so that this module imports nothing it registers); None if the
            registering module is imported anyway.
    """

    def __init__(self, kind: str, entry_point_group: str, *, builtins: str | None = None) -> None:
        self.kind = kind
        self.entry_point_group = entry_point_group
        self.builtins = builtins
        self._entries: dict[str, Callable[..., T]] = {}
        self._cards: dict[str, Card] = {}
        self._loaded = False

    # ---- registering --------------------------------------------------------------------------

    def register(self, name: Any = None, *, card: Card | None = None, overwrite: bool = False) -> Any:
        """Register a class or factory under `name` (default: its `registry_name`, else its lower-cased name).

        Usable bare (`@REG.register`) or with a name (`@REG.register("mine", card=Card(...))`).
        Re-registering a taken name raises ValueError unless `overwrite=True`.
        """

        def decorator(fn: Callable[..., T], key: str | None = None) -> Callable[..., T]:
            key = key or getattr(fn, "registry_name", None) or fn.__name__.lower()
            if key in self._entries and self._entries[key] is not fn and not overwrite:
                raise ValueError(f"a {self.kind} named {key!r} is already registered ({self._entries[key]!r})")
            self._entries[key] = fn
            if card is not None:
                self._cards[key] = card
            return fn

        if callable(name):  # bare decorator
            return decorator(name)
        return lambda fn: decorator(fn, name)

    def unregister(self, name: str) -> None:
        """Remove an entry (tests and plugin reloads)."""
        self._entries.pop(name, None)
        self._cards.pop(name, None)

    # ---- looking up ---------------------------------------------------------------------------

    def load(self) -> None:
        """Import the built-ins, the MASKKIT_PLUGINS modules and this group's entry points (once)."""
        if self._loaded:
            return
        self._loaded = True
        if self.builtins is not None:
            importlib.import_module(self.builtins)
        load_plugin_modules(self.kind)
        for entry in importlib.metadata.entry_points(group=self.entry_point_group):
            try:
                entry.load()
            except Exception as err:
                raise ValueError(
                    f"cannot load {self.kind} plugin entry point {entry.name!r} ({entry.value}): {err}"
                ) from None

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        self.load()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self.load()
        return name in self._entries

    def get(self, name: str) -> Callable[..., T]:
        """The class or factory registered as `name`; a one-line ValueError naming the registered ones."""
        self.load()
        try:
            return self._entries[name]
        except KeyError:
            raise ValueError(f"unknown {self.kind} {name!r}; registered: {', '.join(sorted(self._entries))}") from None

    def options(self, name: str) -> list[Option]:
        """The constructor's keyword options, with defaults."""
        return signature_options(self.get(name))

    def create(self, name: str, **kwargs: Any) -> T:
        """Build the entry `name` from keyword options (checked against its signature: one-line ValueError)."""
        factory = self.get(name)
        try:
            inspect.signature(factory).bind(**kwargs)
        except TypeError as err:
            raise ValueError(f"bad options for {self.kind} {name!r}: {err}") from None
        return factory(**kwargs)

    def card(self, name: str) -> EntryCard:
        """The entry's card: its registered `Card` (else the first docstring line), options from its signature."""
        factory = self.get(name)
        card = self._cards.get(name)
        if card is None:
            doc = inspect.cleandoc(getattr(factory, "__doc__", None) or "")
            card = Card(idea=doc.splitlines()[0] if doc else "")
        options = tuple(
            CardOption(o.name, o.default, card.allowed.get(o.name) or o.annotation or "any") for o in self.options(name)
        )
        return EntryCard(self.kind, name, card.paper, card.idea, options)


# ---- masking policies (moving onto Registry; see issue 21) ----------------------------------

import json  # noqa: E402

F = TypeVar("F", bound=Callable[..., Any])
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


ENTRY_POINT_GROUP = "maskkit.policies"
_plugins_loaded = False


def load_plugins() -> list[str]:
    """Import third-party policy modules (MASKKIT_PLUGINS and `maskkit.policies` entry points) once per process."""
    global _plugins_loaded
    if _plugins_loaded:
        return []
    _plugins_loaded = True
    global _plugin_modules_loaded
    _plugin_modules_loaded = False  # a test that resets _plugins_loaded re-reads MASKKIT_PLUGINS
    names = load_plugin_modules("policy")
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
