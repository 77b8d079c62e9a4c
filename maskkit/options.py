"""The policy's and the hypergradient's own options on a `maskkit pretrain` command line.

`option_extras` reads them from `--<policy>-<option> VALUE` / `--<hypergrad>-<option> VALUE` extras and
`--policy-opt` / `--hypergrad-opt option=VALUE` pairs, as text (the registries type them). Shared by the
command line (cli/options.py) and the study files of `maskkit ablate` (maskkit/ablate/options.py).
"""

from __future__ import annotations


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
            raise ValueError(f"unexpected argument {token!r}")
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
        found[kind][0][key], found[kind][1][key] = value, f"--{name}"
        i += 1
    for kind, pairs in (("policy", policy_pairs), ("hypergrad", hypergrad_pairs)):
        for pair in pairs:
            key, eq, value = pair.partition("=")
            if not eq:
                raise ValueError(f"--{kind}-opt expects option=value, got {pair!r}")
            key = key.strip().replace("-", "_")
            found[kind][0][key], found[kind][1][key] = value, f"--{kind}-opt {pair}"
    return found
