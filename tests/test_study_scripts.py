"""The research scripts under examples/study import only maskkit's public API: every name they import from a
maskkit module is in that module's `__all__` (or is itself a public maskkit module), and each script still
parses its command line (`--help`)."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

STUDY = Path(__file__).resolve().parents[1] / "examples" / "study"
SCRIPTS = sorted(STUDY.glob("*.py"))


def maskkit_imports(path: Path) -> list[tuple[str, str]]:
    """(module, name) of every `from maskkit... import name` in the script."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "maskkit":
            found += [(node.module, alias.name) for alias in node.names]
    return found


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_a_study_script_imports_only_public_names(script):
    for module_name, name in maskkit_imports(script):
        module = importlib.import_module(module_name)
        public = getattr(module, "__all__", None)
        try:  # a public submodule, e.g. `from maskkit import run`
            importlib.import_module(f"{module_name}.{name}")
            assert not name.startswith("_")
            continue
        except ModuleNotFoundError:
            pass
        assert public is not None, f"{script.name}: {module_name} declares no __all__"
        assert name in public, f"{script.name} imports {module_name}.{name}, which is not in its __all__"


@pytest.mark.parametrize("script", ["summarize.py", "convert_results.py"])
@pytest.mark.slow
def test_the_study_scripts_still_run(script):
    proc = subprocess.run([sys.executable, str(STUDY / script), "--help"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "usage" in proc.stdout.lower()
