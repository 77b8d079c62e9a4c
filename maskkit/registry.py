"""The registries: a generic `Registry`, in the style of timm's `register_model` / `create_model`, used for every kind of
thing a user plugs in: masking policies, model adapters, data sources and hypergradient methods.

    DATASETS = Registry("dataset", entry_point_group="maskkit.datasets")

    @DATASETS.register("mine", card=Card(idea="my images"))
    class MySource: ...

    DATASETS.create("mine", **options)     # DATASETS.names(), DATASETS.card("mine"), DATASETS.get("mine")

This module imports none of what it registers. Third-party entries arrive in two ways, loaded on
the first look-up of a registry:
- modules named in the `MASKKIT_PLUGINS` environment variable (comma-separated; each imported once
  per process, looked up in the current directory first, as `python -m` does), which may register
  entries of any kind;
- installed packages' entry points in the registry's group (`maskkit.policies`,
  `maskkit.adapters`, `maskkit.datasets`, `maskkit.hypergrads`).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import inspect
import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, NamedTuple, TypeVar

T = TypeVar("T")

PLUGINS_ENV = "MASKKIT_PLUGINS"

#: the package whose entries are built in (a class or function defined under it is maskkit's own code)
BUILTIN_PACKAGE = "maskkit"


class PluginError(ValueError):
    """A plug-in's code raised, or its output failed a check: one line naming the plug-in (its registered name).

    The plug-in's own exception is chained as the cause (`MASKKIT_DEBUG=1` shows its traceback in the CLI).
    """


def is_builtin(obj: Any) -> bool:
    """Whether `obj` (a class, a function, or an instance of a class) is defined in maskkit itself."""
    owner = obj if isinstance(obj, type) or inspect.isroutine(obj) else type(obj)
    module = getattr(owner, "__module__", None) or ""
    return module == BUILTIN_PACKAGE or module.startswith(BUILTIN_PACKAGE + ".")


def plugin_error(label: str, obj: Any, what: str, err: BaseException) -> BaseException:
    """What to raise for `err`, raised while `obj` (named `label` in messages, e.g. "policy 'mine'") ran `what`:
    the error itself when `obj` is maskkit's own code (a bug: its traceback stays) or `err` is already a
    `PluginError`, else a one-line PluginError naming the plug-in, `what` and the exception, `err` its cause."""
    if is_builtin(obj) or isinstance(err, PluginError) or not isinstance(err, Exception):
        return err
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    wrapped = PluginError(f"{label} (plug-in) failed in {what}: {type(err).__name__}" + (f": {text}" if text else ""))
    wrapped.__cause__ = err
    return wrapped


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


_imported_plugins: set[str] = set()  # MASKKIT_PLUGINS modules imported so far (each once per process)


def load_plugin_modules(kind: str = "") -> list[str]:
    """Import the modules named in MASKKIT_PLUGINS that this process has not imported yet; returns their names.

    The variable is read at each call (a registry calls it on its first look-up), so a module named later
    is still found. `kind` names the registry that asked, for the one-line error of a module that fails.
    """
    names = [m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(",") if m.strip()]
    names = [name for name in dict.fromkeys(names) if name not in _imported_plugins]
    with _current_directory_first() if names else contextlib.nullcontext():
        for name in names:
            try:
                importlib.import_module(name)
            except Exception as err:  # a plugin's own failure, reported in one line
                what = f"{kind} plugin" if kind else "plugin"
                raise ValueError(f"cannot import {what} {name!r} named in {PLUGINS_ENV}: {err}") from None
            _imported_plugins.add(name)
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
        card_of: reads the card an entry carries itself (e.g. a class attribute), for entries
            registered without one; None if entries carry none.
    """

    def __init__(
        self,
        kind: str,
        entry_point_group: str,
        *,
        builtins: str | None = None,
        card_of: Callable[[Callable[..., Any]], Card | None] | None = None,
    ) -> None:
        self.kind = kind
        self.entry_point_group = entry_point_group
        self.builtins = builtins
        self.card_of = card_of
        self._entries: dict[str, Callable[..., T]] = {}  # in registration order
        self._cards: dict[str, tuple[Callable[..., T], Card]] = {}  # name -> (the factory it describes, card)
        self._loaded = False

    # ---- registering --------------------------------------------------------------------------

    def register(self, name: Any = None, *, card: Card | None = None, overwrite: bool = False) -> Any:
        """Register a class or factory under `name` (default: its `registry_name`, else its lower-cased name).

        Usable bare (`@REG.register`) or with a name (`@REG.register("mine", card=Card(...))`).
        Re-registering a taken name raises ValueError unless `overwrite=True`. A card belongs to the
        factory it was registered with: a replacement without one gets a card derived from itself.
        """

        def decorator(fn: Callable[..., T], key: str | None = None) -> Callable[..., T]:
            key = key or getattr(fn, "registry_name", None) or fn.__name__.lower()
            if key in self._entries and self._entries[key] is not fn and not overwrite:
                raise ValueError(f"a {self.kind} named {key!r} is already registered ({self._entries[key]!r})")
            self._entries[key] = fn
            if card is not None:
                self._cards[key] = (fn, card)
            return fn

        if callable(name):  # bare decorator
            return decorator(name)
        return lambda fn: decorator(fn, name)

    def unregister(self, name: str) -> None:
        """Remove an entry (tests and plugin reloads)."""
        self._entries.pop(name, None)
        self._cards.pop(name, None)

    # ---- looking up ---------------------------------------------------------------------------

    def load(self, *, again: bool = False) -> list[str]:
        """Import the built-ins, the MASKKIT_PLUGINS modules and this group's entry points: once, or `again`
        (what was added to MASKKIT_PLUGINS or installed since). Returns the plugin modules and entry points
        loaded by this call."""
        if self._loaded and not again:
            return []
        self._loaded = True
        if self.builtins is not None:
            importlib.import_module(self.builtins)
        loaded = load_plugin_modules(self.kind)
        for entry in importlib.metadata.entry_points(group=self.entry_point_group):
            try:
                entry.load()
            except Exception as err:
                raise ValueError(
                    f"cannot load {self.kind} plugin entry point {entry.name!r} ({entry.value}): {err}"
                ) from None
            loaded.append(entry.value)
        return loaded

    def names(self, *, registered_order: bool = False) -> list[str]:
        """Every registered name, sorted (or in the order they were registered: built-ins first)."""
        self.load()
        return list(self._entries) if registered_order else sorted(self._entries)

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

    def name_of(self, obj: Any) -> str | None:
        """The name `obj` (an entry, or an instance of a class entry) is registered under, else None."""
        owner = obj if isinstance(obj, type) or inspect.isroutine(obj) else type(obj)
        return next((name for name, entry in self._entries.items() if entry is owner), None)

    def label(self, obj: Any) -> str:
        """How messages name `obj`: "policy 'mine'" for a registered entry, else its kind and class name."""
        name = self.name_of(obj)
        owner = obj if isinstance(obj, type) or inspect.isroutine(obj) else type(obj)
        return f"{self.kind} {name!r}" if name is not None else f"{self.kind} {getattr(owner, '__name__', owner)}"

    def plugin_error(self, obj: Any, what: str, err: BaseException) -> BaseException:
        """What to raise for `err`, raised while entry `obj` ran `what` (e.g. "make_plan"): the error itself when
        `obj` is maskkit's own code (a bug: its traceback stays) or `err` is already a `PluginError`, else a
        one-line PluginError naming the plug-in, `what` and the exception, with `err` chained as its cause."""
        return plugin_error(self.label(obj), obj, what, err)

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

    def coerce(
        self, name: str, options: Mapping[str, Any], spelled: Mapping[str, str] | None = None, *,
        exclude: tuple[str, ...] = (),
    ) -> dict[str, Any]:
        """`options` checked against entry `name`'s constructor, string values typed by its annotations.

        `spelled` names how each key was given (e.g. `--darts-r`) for the one-line errors; `exclude`:
        constructor arguments that are not options (set by the caller).
        """
        known = {o.name: o for o in self.options(name) if o.name not in exclude}
        choices = ", ".join(f"--{name.replace('_', '-')}-{k.replace('_', '-')}" for k in known) or "none"
        spelled = spelled or {}
        typed: dict[str, Any] = {}
        for key, value in options.items():
            what = spelled.get(key, f"{self.kind} option {key!r}")
            if key not in known:
                raise ValueError(f"{self.kind} {name!r} has no option {key!r} ({what}); its options: {choices}")
            typed[key] = convert_option(value, known[key].annotation, what) if isinstance(value, str) else value
        return typed

    def card(self, name: str) -> EntryCard:
        """The entry's card: its registered `Card`, else the one it carries (`card_of`), else its docstring's first
        line; the options, with defaults, from its signature."""
        factory = self.get(name)
        owner, card = self._cards.get(name, (None, None))
        if card is None or owner is not factory:  # none, or the card of an entry since replaced
            card = self.card_of(factory) if self.card_of is not None else None
        if card is None:
            doc = inspect.cleandoc(getattr(factory, "__doc__", None) or "")  # its own: not inherited
            card = Card(idea=doc.splitlines()[0] if doc else "")
        options = tuple(
            CardOption(o.name, o.default, card.allowed.get(o.name) or o.annotation or "any") for o in self.options(name)
        )
        return EntryCard(self.kind, name, card.paper, card.idea, options)


def convert_option(value: str, annotation: str, what: str) -> Any:
    """Parse a string by its annotation ('int', 'float', 'bool', 'str', 'X | None'); else JSON, else as is.

    `what` names the option as the user spelled it, for the one-line ValueError of a bad value."""
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
