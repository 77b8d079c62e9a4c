"""`maskkit list KIND`: every registered entry's card (name, paper, idea, options with defaults and allowed values)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from maskkit.adapters import ADAPTERS
from maskkit.cli.app import app
from maskkit.cli.listing import REGISTRIES, ListingError, cli_value, entry_cards, load_registry
from maskkit.policies import POLICIES, policy_card, register_policy
from maskkit.policies import registry as policy_registry
from maskkit.registry import Registry

WIDE = {"COLUMNS": "400"}  # one table row per line


def _rows(output: str) -> list[list[str]]:
    """The cells of every table row in rich's output ('│ a │ b │' -> ['a', 'b'])."""
    return [[cell.strip() for cell in line.strip().strip("│").split("│")] for line in output.splitlines()
            if line.strip().startswith("│")]  # fmt: skip


@pytest.mark.parametrize(("kind", "registry"), [("policies", POLICIES), ("adapters", ADAPTERS)])
def test_list_prints_every_card_of_the_registry(kind, registry):
    result = CliRunner().invoke(app, ["list", kind], env=WIDE)
    assert result.exit_code == 0, result.output
    rows = _rows(result.output)
    assert f"{kind} ({len(registry.names())} registered)" in result.output
    for name in registry.names():
        card = registry.card(name)
        assert [card.name, card.paper, card.idea] in rows
        for option in card.options:
            assert [card.name, option.name, cli_value(option.default), option.allowed] in rows
    option_rows = [r for r in rows if len(r) == 4]
    assert len(option_rows) == sum(len(registry.card(n).options) for n in registry.names())


def test_policy_cards_of_the_registry_are_the_policy_cards():
    for name in POLICIES.names():
        entry, card = POLICIES.card(name), policy_card(name)
        assert (entry.kind, entry.name, entry.paper, entry.idea, entry.options) == (
            "policy", card.name, card.paper, card.idea, card.options)  # fmt: skip
    uniform = {o.name: o.allowed for o in POLICIES.card("uniform").options}
    attention = {o.name: o.allowed for o in POLICIES.card("attention").options}
    assert uniform["ratio"] == "0.75" and attention["ratio"] == "(0, 1)"  # its own entry, else the common one
    assert attention["mode"] == "high | low | hint" and attention["guided_fraction"] == "[0, 1]"


def test_a_third_party_entry_is_listed_with_its_derived_card():
    before = dict(policy_registry._REGISTRY)

    @register_policy("listed_test")
    class Listed(POLICIES.get("random")):
        """Hide at random, listed.

        Not part of the idea."""

        def __init__(self, ratio: float = 0.5, tag: str = "x") -> None:
            super().__init__(ratio)

    try:
        rows = _rows(CliRunner().invoke(app, ["list", "policies"], env=WIDE).output)
        assert ["listed_test", "-", "Hide at random, listed."] in rows
        assert ["listed_test", "ratio", "0.5", "float"] in rows and ["listed_test", "tag", "x", "str"] in rows
    finally:
        policy_registry._REGISTRY.clear()
        policy_registry._REGISTRY.update(before)


def test_an_unknown_kind_is_a_one_line_error():
    result = CliRunner().invoke(app, ["list", "widgets"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert lines == ["Error: unknown kind 'widgets' for maskkit list; choose adapters, datasets, hypergrads or policies"]


def test_the_kinds_are_named_registries_imported_lazily():
    assert REGISTRIES == {
        "adapters": "maskkit.adapters:ADAPTERS", "datasets": "maskkit.data:DATASETS",
        "hypergrads": "maskkit.mlo:HYPERGRADS", "policies": "maskkit.policies:POLICIES",
    }  # fmt: skip
    assert load_registry("adapters") is ADAPTERS and load_registry("policies") is POLICIES
    table = {"mine": "maskkit.no_such_module:THINGS", "plain": "maskkit.registry:PLUGINS_ENV",
             "here": "maskkit.adapters:ADAPTERS"}  # fmt: skip
    with pytest.raises(ListingError, match="cannot list mine: maskkit.no_such_module:THINGS is not available"):
        load_registry("mine", table)
    with pytest.raises(ListingError, match="is not a maskkit.registry.Registry"):
        load_registry("plain", table)
    with pytest.raises(ListingError, match="unknown kind 'policies' for maskkit list; choose mine, plain or here"):
        load_registry("policies", table)
    assert [c.name for c in entry_cards("here", table)] == ADAPTERS.names()


def test_a_new_registry_is_listed_by_adding_its_row(monkeypatch):
    import maskkit.cli.listing as listing

    things: Registry[object] = Registry("thing", "maskkit.test_things")

    @things.register("widget")
    def make_widget(size: int = 3, colour: str | None = None) -> dict:
        """A widget of some size."""
        return {"size": size, "colour": colour}

    monkeypatch.setattr(listing, "REGISTRIES", {**REGISTRIES, "things": f"{__name__}:THINGS"})
    monkeypatch.setitem(globals(), "THINGS", things)
    result = CliRunner().invoke(app, ["list", "things"], env=WIDE)
    assert result.exit_code == 0, result.output
    rows = _rows(result.output)
    assert ["widget", "-", "A widget of some size."] in rows
    assert ["widget", "size", "3", "int"] in rows and ["widget", "colour", "none", "str | None"] in rows
