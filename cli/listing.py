"""`maskkit list KIND`: the card of every registered entry of one kind (adapters, datasets, hypergrads, policies).

Each kind is a `maskkit.registry.Registry` named in `REGISTRIES` as "module:attribute" and imported only
when listed, so this module imports none of them and a kind added later is one more table row. A card
is what `Registry.card` says: name, paper, idea, and every option with its default and allowed values.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from maskkit.registry import EntryCard, Registry

from .printing import cli_value

#: what `maskkit list` can list: kind -> "module:attribute" of its Registry
REGISTRIES: Mapping[str, str] = {
    "adapters": "maskkit.adapters:ADAPTERS",
    "datasets": "maskkit.data:DATASETS",
    "hypergrads": "maskkit.mlo:HYPERGRADS",
    "policies": "maskkit.policies:POLICIES",
}


class ListingError(ValueError):
    """An unknown kind, or a registry that cannot be imported: one line."""


def load_registry(kind: str, registries: Mapping[str, str] | None = None) -> Registry[Any]:
    """The Registry listed as `kind` (in `registries`, default `REGISTRIES`), imported by name; a one-line
    ListingError if unknown or unavailable."""
    registries = REGISTRIES if registries is None else registries
    if kind not in registries:
        raise ListingError(f"unknown kind {kind!r} for maskkit list; choose {_choices(registries)}")
    module_name, _, attribute = registries[kind].partition(":")
    try:
        registry = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as err:
        raise ListingError(f"cannot list {kind}: {registries[kind]} is not available ({err})") from None
    if not isinstance(registry, Registry):
        raise ListingError(f"cannot list {kind}: {registries[kind]} is not a maskkit.registry.Registry")
    return registry


def entry_cards(kind: str, registries: Mapping[str, str] | None = None) -> list[EntryCard]:
    """The card of every entry of `kind` (plugins included), sorted by name."""
    registry = load_registry(kind, registries)
    return [registry.card(name) for name in registry.names()]


def print_cards(console: Console, kind: str, cards: list[EntryCard]) -> None:
    """Two tables: the entries (name, paper, idea), then their options (default, allowed values)."""
    what = cards[0].kind if cards else kind
    entries = Table(title=f"{kind} ({len(cards)} registered)", show_lines=True)
    entries.add_column(what, style="bold", overflow="fold")
    entries.add_column("paper", overflow="fold")
    entries.add_column("idea", overflow="fold")
    for card in cards:  # Text cells: "[0, 1]" and the like are not rich markup
        entries.add_row(Text(card.name), Text(card.paper), Text(card.idea))
    console.print(entries)
    options = Table(title=f"{what} options")
    for column in (what, "option", "default", "allowed values"):
        options.add_column(column, overflow="fold")
    for card in cards:
        for i, option in enumerate(card.options):
            options.add_row(Text(card.name), Text(option.name), Text(cli_value(option.default)),
                            Text(option.allowed), end_section=i == len(card.options) - 1)  # fmt: skip
    console.print(options)


def list_command(
    kind: str = typer.Argument(..., metavar="KIND", help=f"What to list: {', '.join(REGISTRIES)}."),
) -> None:
    """List the registered entries of one kind (third-party ones included): name, paper, idea, options."""
    try:
        cards = entry_cards(kind)
    except ValueError as err:  # an unknown kind, or a plugin that fails to load: one line
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        Console(stderr=True, soft_wrap=True).print(f"Error: {text}", markup=False, highlight=False)
        raise typer.Exit(code=1) from None
    print_cards(Console(), kind, cards)


def _choices(registries: Mapping[str, str]) -> str:
    names = list(registries)
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else "".join(names)
