"""No import circles and no heavy imports on `import maskkit`.

The import graph of maskkit's own modules (every `import` / `from ... import` in a module, at the top or
inside a function, outside `if TYPE_CHECKING:`; an edge goes to the most specific maskkit module named)
has no cycle; each module imports on its own in a fresh interpreter state (nothing of maskkit loaded
before it); `import maskkit` does not import `higher` (only the differentiable unroll needs it)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: package name -> folder, as pyproject.toml installs them
PACKAGES = {"maskkit": ROOT / "maskkit", "maskkit.adapters": ROOT / "adapters", "maskkit.cli": ROOT / "cli"}


def modules() -> dict[str, Path]:
    """Every maskkit module name -> its file."""
    found: dict[str, Path] = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if package == "maskkit" and parts and parts[0] in ("adapters", "cli"):
                continue
            found[".".join([package, *parts])] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The maskkit modules that module `name` imports (see the module docstring)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_package = path.name == "__init__.py"
    base = name if is_package else name.rpartition(".")[0]
    targets: set[str] = set()

    def resolve(module: str | None, level: int) -> str:
        if level == 0:
            return module or ""
        anchor = base.split(".")
        anchor = anchor[: len(anchor) - (level - 1)]
        return ".".join([*anchor, module] if module else anchor)

    def most_specific(candidate: str) -> str | None:
        while candidate and candidate not in known:
            candidate = candidate.rpartition(".")[0]
        return candidate or None

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    hit = most_specific(alias.name)
                    if hit:
                        targets.add(hit)
            elif isinstance(child, ast.ImportFrom):
                module = resolve(child.module, child.level)
                for alias in child.names:
                    hit = most_specific(f"{module}.{alias.name}") if module else None
                    if hit:
                        targets.add(hit)
            visit(child)

    visit(tree)
    targets.discard(name)
    return targets


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a list of modules, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = dfs(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = dfs(node)
            if found:
                return found
    return None


def test_the_import_graph_of_maskkit_has_no_cycle():
    found = modules()
    known = set(found)
    graph = {name: imports_of(name, path, known) for name, path in found.items()}
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


@pytest.mark.slow
def test_every_module_imports_on_its_own():
    names = [n for n in modules() if not n.endswith("__main__")]
    script = (
        "import importlib, sys\n"
        "import torch  # shared by all; loaded once to keep this fast\n"
        "failed = []\n"
        f"for name in {names!r}:\n"
        "    for key in [k for k in sys.modules if k == 'maskkit' or k.startswith('maskkit.')]:\n"
        "        del sys.modules[key]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as err:\n"
        "        failed.append(f'{name}: {type(err).__name__}: {err}')\n"
        "print('\\n'.join(failed))\n"
        "sys.exit(1 if failed else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_import_maskkit_does_not_import_higher_and_the_unroll_still_loads_on_use():
    script = (
        "import sys, maskkit\n"
        "print('higher' in sys.modules)\n"
        "maskkit.unroll  # the differentiable unroll: imports higher now\n"
        "print('higher' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "True"]
