"""`maskkit pretrain`'s options, made from `maskkit.run.RunConfig`'s fields: each option is declared once, there.

`config_command` gives a command function the signature typer reads: one option per field
(`--<field-name>`, or the field's own `flags`), its default and help from the field. The policy's
own options and the hypergradient's come as `--<policy>-<option> VALUE` / `--<hypergrad>-<option> VALUE`
extras or `--policy-opt` / `--hypergrad-opt option=VALUE` pairs and are typed by the library
(`maskkit.policies.coerce_policy_options`, `maskkit.mlo.HYPERGRADS.coerce`).

`check_arguments` reads any command's arguments before click parses them (the `maskkit` group calls
it): one option under two of its spellings (`--batch-size 8 --batch_size 32`, `--out D --output_dir E`)
and an empty or blank path are refused, where click would let the last spelling win or run in `.`.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from dataclasses import MISSING, Field, fields
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from typer.core import TyperGroup

from maskkit.options import option_extras, two_spellings
from maskkit.run import SECTIONS, RunConfig
from maskkit.settings import flag

from .runner import CommandError, one_line_errors

#: options of `maskkit pretrain` that are not run settings
EXTRA_OPTIONS: dict[str, tuple[Any, Any]] = {
    "out": (Optional[Path], typer.Option(None, "--out", "--output_dir",
                                         help="Run directory to create (default runs/<date-time>).")),
    "resume": (Optional[Path], typer.Option(None, help="Continue the run in this directory from its last checkpoint.")),
    "progress": (bool, typer.Option(True, "--progress/--no-progress", help="Show the progress bar.")),
    "trust_unverified": (bool, typer.Option(
        False, "--trust-unverified", help="With --resume: use a checkpoint that has no .sha256 checksum file.")),
    "trust_data_change": (bool, typer.Option(
        False, "--trust-data-change",
        help="With --resume: use the run's data even if it changed since the run was pretrained (its "
        "fingerprint in config.json).")),
}


def _param_name(f: Field) -> str:
    return f.metadata.get("param") or f.name


def _cli_type(f: Field, hint: Any) -> Any:
    """The type typer parses: a dict of options is a repeatable key=value list; X | None is Optional[X]."""
    if typing.get_origin(hint) is dict:
        return list[str]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if args and len(args) < len(typing.get_args(hint)):
        return Optional[args[0]]
    return hint


def _option(f: Field) -> Any:
    help_text = f.metadata.get("help", "")
    flags = list(f.metadata.get("flags") or [])
    if f.default_factory is not MISSING:  # a dict of options: repeatable
        return typer.Option([], *flags, help=help_text)
    if isinstance(f.default, bool) and not flags:
        flags = [flag(f.name)]  # a switch, off by default
    return typer.Option(f.default, *flags, help=help_text)


def config_fields() -> list[tuple[str, Field, Any]]:
    """(section, field, typer type) of every command-line setting, in RunConfig's order."""
    out = []
    for section, kind in SECTIONS.items():
        hints = typing.get_type_hints(kind)
        out += [(section, f, _cli_type(f, hints[f.name])) for f in fields(kind) if f.metadata.get("cli", True)]
    return out


def config_command(
    func: Callable[..., Any], more: dict[str, tuple[Any, Any]] | None = None
) -> Callable[..., Any]:
    """Give `func(ctx, **values)` one typer option per RunConfig field, plus EXTRA_OPTIONS and `more`."""
    params = [inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)]
    annotations: dict[str, Any] = {"ctx": typer.Context, "return": None}
    for _, f, kind in config_fields():
        name = _param_name(f)
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=_option(f), annotation=kind))
        annotations[name] = kind
    for name, (kind, option) in {**EXTRA_OPTIONS, **(more or {})}.items():
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind))
        annotations[name] = kind
    func.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    func.__annotations__ = annotations
    return func


def config_from_values(
    values: dict[str, Any], policy_options: dict[str, Any], model_options: dict[str, Any],
    hypergrad_options: dict[str, Any] | None = None,
) -> RunConfig:
    """The RunConfig of the parsed values (by parameter name); the option dicts already parsed."""
    sections: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for section, f, _ in config_fields():
        sections[section][f.name] = values[_param_name(f)]
    sections["policy"]["options"] = policy_options
    sections["model"]["options"] = model_options
    sections["mlo"]["hypergrad_options"] = dict(hypergrad_options or {})
    return RunConfig.from_dict(sections)


def given_on_command_line(ctx: typer.Context, name: str) -> bool:
    """Whether option `name` was typed (not defaulted); by name, as typer ships its own copy of click."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "COMMANDLINE"


def policy_extras(policy: str, extra: list[str], pairs: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """The policy's part of `option_extras`: ({option: value text}, {option: how it was spelled})."""
    return option_extras(policy, "", extra, pairs, [])["policy"]


#: options typed as text that name a path (click.Path-typed options and arguments are found by their type)
TEXT_PATHS = ("data_dir",)


def _is_path(param: Any) -> bool:
    """Whether a click parameter names a path (typed Path, or one of TEXT_PATHS); by attributes, as typer may ship
    its own copy of click (its parameters then keep their annotation in `type_descriptor`)."""
    annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    kind = getattr(getattr(param, "type", None), "name", None)
    return annotation is Path or kind == "path" or param.name in TEXT_PATHS


def check_arguments(command: Any, args: list[str]) -> None:
    """CommandError (one line) when `args` give one of `command`'s (a click command's) options under two
    spellings (the same spelling twice is allowed: the last wins, as `two_spellings` says) or an empty or
    blank path."""
    options = [p for p in command.params if p.param_type_name == "option"]
    spelled = {s: p for p in options for s in (*p.opts, *p.secondary_opts)}
    positional = [p for p in command.params if p.param_type_name == "argument"]
    given: list[tuple[str, str]] = []
    i = 0
    while i < len(args) and args[i] != "--":
        token = args[i]
        name, eq, inline = token.partition("=") if token.startswith("--") else (token, "", "")
        param = spelled.get(name)
        takes_value = param is not None and not param.is_flag and not param.count
        value = inline if eq else args[i + 1] if takes_value and i + 1 < len(args) else None
        if param is not None and not param.multiple:
            given.append((param.name or name, name))
        if param is not None and takes_value and value is not None and _is_path(param) and not value.strip():
            raise CommandError(f"{name} is an empty path ({value!r}); give a file or folder name")
        if param is None and token.startswith("-") and not eq:  # an option click does not know (a policy's own)
            i += 1 if i + 1 < len(args) and not args[i + 1].startswith("-") else 0
        elif param is None and not token.startswith("-") and positional:
            argument = positional.pop(0)
            if _is_path(argument) and not token.strip():
                shown = (getattr(argument, "metavar", None) or argument.name or "argument").upper()
                raise CommandError(f"{shown} is an empty path ({token!r}); give a folder name")
        i += 2 if takes_value and not eq else 1
    error = two_spellings(given)
    if error is not None:
        raise CommandError(error)


class CheckedGroup(TyperGroup):
    """A command group whose commands' arguments are checked before click parses them (`check_arguments`: one
    option under two spellings, an empty path), as one line on stderr: `maskkit` and `maskkit ablate`."""

    def resolve_command(self, ctx: Any, args: list[str]) -> tuple[str | None, Any, list[str]]:
        name, command, rest = super().resolve_command(ctx, args)
        if command is not None and not hasattr(command, "commands"):  # a command; a group checks its own
            with one_line_errors(Console(stderr=True, soft_wrap=True)):
                check_arguments(command, rest)
        return name, command, rest
