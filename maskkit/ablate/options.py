"""`maskkit pretrain` options in a study file: TOML tables or argument lists, checked against `RunConfig`.

An arm's options are either an argument list (`["--policy", "hpm"]`) or a table (`{policy = "hpm",
batch-size = 64, freeze-masker = true}`: a key is the option without its dashes, `true` a switch). Each
known option is one field of `RunConfig`'s sections (the same table `maskkit pretrain` makes its options
from); what is left must be the policy's or the hypergradient's own (`--attention-mode high`), typed by
their registries. `check_args` builds the `RunConfig` and runs its one check, so a study file with a bad
option fails before anything runs, naming the option.
"""

from __future__ import annotations

import typing
from dataclasses import MISSING, dataclass, fields
from typing import Any

from maskkit.run import SECTIONS, RunConfig

#: options the study sets itself (per run) or that make no sense inside a study
MANAGED = {
    "--out": "each run's directory is chosen by the study",
    "--resume": "the study resumes interrupted runs itself",
    "--seed": "the study's `seeds` set it",
    "--steps": "set `steps` in [study] or on the arm",
    "--epochs": "set `epochs` in [study] or on the arm",
    "--progress": "the study shows its own progress",
    "--no-progress": "the study shows its own progress",
    "--trust-unverified": "only for --resume",
}


class OptionError(ValueError):
    """A bad `maskkit pretrain` option in a study file; one line naming it."""


@dataclass(frozen=True)
class Flag:
    """One `maskkit pretrain` option: its section and field, and how its value is typed."""

    section: str
    field: str
    kind: type  # bool, int, float, str or dict (a repeatable key=value)


def _kind(hint: Any) -> type:
    if typing.get_origin(hint) is dict:
        return dict
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def pretrain_flags() -> dict[str, Flag]:
    """Every `maskkit pretrain` option of a run setting, by spelling (`--batch-size`, `--model`, ...)."""
    out: dict[str, Flag] = {}
    for section, kind in SECTIONS.items():
        hints = typing.get_type_hints(kind)
        for f in fields(kind):
            if not f.metadata.get("cli", True):
                continue
            spellings = f.metadata.get("flags") or ("--" + f.name.replace("_", "-"),)
            for spelling in spellings:
                out[spelling] = Flag(section, f.name, _kind(hints[f.name]))
    return out


def to_args(options: Any, where: str) -> list[str]:
    """An argument list from a TOML list or table (see the module docstring); OptionError naming `where`."""
    if isinstance(options, list):
        if not all(isinstance(o, (str, int, float)) and not isinstance(o, bool) for o in options):
            raise OptionError(f"{where}: an argument list holds strings and numbers only")
        return [str(o) for o in options]
    if not isinstance(options, dict):
        raise OptionError(f"{where}: options are a table or an argument list, got {type(options).__name__}")
    args: list[str] = []
    for key, value in options.items():
        spelling = "--" + str(key).lstrip("-").replace("_", "-")
        for item in value if isinstance(value, list) else [value]:
            if item is True:
                args.append(spelling)
            elif item is False:
                continue  # a switch left off
            elif isinstance(item, (str, int, float)):
                args += [spelling, str(item)]
            else:
                raise OptionError(f"{where}.{key}: expected a string, number or true, got {type(item).__name__}")
    return args


def _typed(text: str, kind: type, spelling: str, where: str) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise OptionError(f"{where}: {spelling} expects {kind.__name__}, got {text!r}") from None


def check_args(args: list[str], where: str) -> RunConfig:
    """The `RunConfig` these `maskkit pretrain` arguments ask for, fully checked (OptionError naming the option)."""
    from maskkit.adapters.models import parse_model_options
    from maskkit.mlo import HYPERGRADS
    from maskkit.options import option_extras
    from maskkit.policies import coerce_policy_options

    known = pretrain_flags()
    sections: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    pairs: dict[tuple[str, str], list[str]] = {}
    extras: list[str] = []
    i = 0
    while i < len(args):
        token = args[i]
        spelling, eq, inline = token.partition("=")
        if not token.startswith("--"):
            raise OptionError(f"{where}: unexpected argument {token!r} (options start with --)")
        if spelling in MANAGED:
            raise OptionError(f"{where}: {spelling} is not allowed in a study ({MANAGED[spelling]})")
        flag = known.get(spelling)
        if flag is None:  # the policy's or hypergradient's own: typed by its registry below
            extras.append(token)
            if not eq and i + 1 < len(args) and not args[i + 1].startswith("--"):
                extras.append(args[i + 1])
                i += 1
            i += 1
            continue
        if flag.kind is bool:
            if eq:
                raise OptionError(f"{where}: {spelling} is a switch and takes no value")
            sections[flag.section][flag.field] = True
            i += 1
            continue
        if eq:
            value = inline
        elif i + 1 < len(args):
            value = args[i + 1]
            i += 1
        else:
            raise OptionError(f"{where}: {spelling} needs a value")
        if flag.kind is dict:
            pairs.setdefault((flag.section, flag.field), []).append(value)
        else:
            sections[flag.section][flag.field] = _typed(value, flag.kind, spelling, where)
        i += 1
    policy = sections["policy"].get("name", _default("policy", "name"))
    hypergrad = sections["mlo"].get("hypergrad", _default("mlo", "hypergrad"))
    try:
        found = option_extras(policy, hypergrad, extras, pairs.get(("policy", "options"), []),
                              pairs.get(("mlo", "hypergrad_options"), []))
        sections["policy"]["options"] = coerce_policy_options(policy, *found["policy"])
        sections["mlo"]["hypergrad_options"] = (
            HYPERGRADS.coerce(hypergrad, *found["hypergrad"]) if hypergrad in HYPERGRADS else {}
        )
        sections["model"]["options"] = parse_model_options(pairs.get(("model", "options"), []))
        config = RunConfig.from_dict(sections)
        config.check()
    except (ValueError, TypeError, KeyError) as err:
        raise OptionError(f"{where}: {str(err).strip().splitlines()[0]}") from None
    return config


def _default(section: str, name: str) -> Any:
    f = next(f for f in fields(SECTIONS[section]) if f.name == name)
    return f.default_factory() if f.default is MISSING else f.default
