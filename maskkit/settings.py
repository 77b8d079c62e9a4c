"""`setting()`: a dataclass field that carries its help text, so a configuration declares each option once.

`maskkit pretrain` makes one command-line option of every field of `maskkit.run.RunConfig`'s
sections from this metadata: the flag is `--<field-name>` unless `flags` says otherwise, the help
text is `help`, and `cli=False` keeps a field out of the command line.
"""

from __future__ import annotations

import dataclasses
from typing import Any


def setting(
    default: Any = dataclasses.MISSING,
    help: str = "",  # noqa: A002 - the name typer and argparse use
    *,
    default_factory: Any = dataclasses.MISSING,
    flags: tuple[str, ...] | None = None,
    param: str | None = None,
    cli: bool = True,
) -> Any:
    """A dataclass field with its help text and command-line spelling (flags, parameter name)."""
    meta = {"help": help, "flags": flags, "param": param, "cli": cli}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def flag(name: str) -> str:
    """How errors name a setting: its command-line spelling, `masker_lr` -> `--masker-lr`."""
    return "--" + name.replace("_", "-")
