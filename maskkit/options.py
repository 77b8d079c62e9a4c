"""The policy's and the hypergradient's own options on a `maskkit pretrain` command line.

`option_extras` reads them from `--<policy>-<option> VALUE` / `--<hypergrad>-<option> VALUE` extras and
`--policy-opt` / `--hypergrad-opt option=VALUE` pairs, as text (the registries type them). Shared by the
command line (cli/options.py) and the study files of `maskkit ablate` (maskkit/ablate/options.py).
`shown_path` is how every message shows a file name; `two_spellings` finds an option given under two
of its spellings.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any


def shown_path(path: str | bytes | os.PathLike[Any], *, quoted: bool = False) -> str:
    """A path as one line of a message: bytes that are not UTF-8 as \\xNN, newlines, tabs and other
    unprintable characters escaped as Python writes them; anything else (accents included) as it is.
    `quoted`: a name that needed escaping is also put in quotes, its `\\` and `'` escaped, so that it cannot
    be misread (the study files' messages)."""
    text = os.fsdecode(path)  # bytes that are not UTF-8 arrive as lone surrogates U+DC80..U+DCFF
    if text.isprintable():  # lone surrogates are not printable
        return text
    out = []
    for ch in text:
        if 0xDC80 <= ord(ch) <= 0xDCFF:
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        elif quoted and ch in "\\'":
            out.append("\\" + ch)
        elif ch.isprintable():
            out.append(ch)
        else:
            out.append(repr(ch)[1:-1])
    return "'" + "".join(out) + "'" if quoted else "".join(out)


def two_spellings(given: Iterable[tuple[str, str]]) -> str | None:
    """The message for an option given under two spellings (`--batch-size 8 --batch_size 32`), or None.

    `given`: (option, spelling) in command-line order. The same spelling twice is allowed (the last
    wins, as in a shell: `maskkit ablate` layers an arm's options over the study's that way).
    """
    first: dict[str, str] = {}
    for option, spelling in given:
        seen = first.setdefault(option, spelling)
        if seen != spelling:
            return f"{seen} and {spelling} are two spellings of one option; give it once"
    return None


def option_extras(
    policy: str, hypergrad: str, extra: list[str], policy_pairs: list[str], hypergrad_pairs: list[str]
) -> dict[str, tuple[dict[str, str], dict[str, str]]]:
    """Raw options of the policy and the hypergradient from `--<policy>-<option> VALUE` and
    `--<hypergrad>-<option> VALUE` extras and `--policy-opt` / `--hypergrad-opt option=VALUE` pairs.

    Returns {"policy" | "hypergrad": ({option: value text}, {option: how it was spelled})}; a bare
    `--<name>-<flag>` of a boolean option is "true".
    """
    from maskkit.mlo import HYPERGRADS
    from maskkit.policies import POLICIES

    owners = {"policy": (POLICIES, policy), "hypergrad": (HYPERGRADS, hypergrad)}
    found: dict[str, tuple[dict[str, str], dict[str, str]]] = {kind: ({}, {}) for kind in owners}
    i = 0
    while i < len(extra):
        token = extra[i]
        if not token.startswith("--"):
            raise ValueError(f"unexpected argument {token!r}: options start with --")
        name, eq, value = token[2:].partition("=")
        kind = next((k for k, (_, n) in owners.items() if name.startswith(n.replace("_", "-") + "-")), None)
        if kind is None:
            for k, (registry, chosen) in owners.items():
                other = next((n for n in registry.names() if name.startswith(n.replace("_", "-") + "-")), None)
                if other is not None:
                    label = "policy" if k == "policy" else "hypergradient"
                    raise ValueError(f"option --{name} is for {label} {other!r}, but --{k} is {chosen!r}")
            raise ValueError(f"no such option: --{name}")
        registry, owner = owners[kind]
        key = name[len(owner) + 1 :].replace("-", "_")
        if not eq:
            annotations = {o.name: o.annotation for o in registry.options(owner)}
            if i + 1 < len(extra) and not extra[i + 1].startswith("--"):
                value = extra[i + 1]
                i += 1
            elif "bool" in annotations.get(key, "bool"):
                value = "true"  # a bare boolean flag
            else:
                raise ValueError(f"option --{name} needs a value")
        _once(found[kind][1], key, f"--{name}")
        found[kind][0][key], found[kind][1][key] = value, f"--{name}"
        i += 1
    for kind, pairs in (("policy", policy_pairs), ("hypergrad", hypergrad_pairs)):
        for pair in pairs:
            key, eq, value = pair.partition("=")
            if not eq:
                raise ValueError(f"--{kind}-opt expects option=value, got {pair!r}")
            key = key.strip().replace("-", "_")
            _once(found[kind][1], key, f"--{kind}-opt {pair}")
            found[kind][0][key], found[kind][1][key] = value, f"--{kind}-opt {pair}"
    return found


def _once(spelled: dict[str, str], key: str, spelling: str) -> None:
    """ValueError when option `key` was already given under another spelling (`two_spellings`)."""
    if key in spelled:
        stem = lambda s: s.partition("=")[0]  # noqa: E731 - "--policy-opt mode=hint": its value is no spelling
        error = two_spellings([(key, stem(spelled[key])), (key, stem(spelling))])
        if error is not None:
            raise ValueError(error)
