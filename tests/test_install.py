"""The installed import names: maskkit.adapters and maskkit.cli, nothing top-level."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SCRIPT = """
import importlib.util
import maskkit.adapters, maskkit.cli
print(importlib.util.find_spec("adapters"), importlib.util.find_spec("cli"))
"""


@pytest.mark.slow
def test_installed_subpackages_and_no_top_level_names(tmp_path):
    # run from an empty folder under /tmp, without PYTHONPATH, so only the installed package is seen
    # (the repository root holds folders named adapters/ and cli/)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["None", "None"]


def test_every_package_folder_is_listed_for_the_wheel():
    """A folder with an __init__.py that pyproject.toml does not list would be missing from a real install."""
    from pathlib import Path

    import pytest

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    root = Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {"maskkit": root / "maskkit", "maskkit.adapters": root / "adapters", "maskkit.cli": root / "cli"}
    found = set()
    for package, folder in folders.items():
        for init in folder.rglob("__init__.py"):
            parts = init.parent.relative_to(folder).parts
            if package == "maskkit" and parts and parts[0] in ("adapters", "cli"):
                continue
            found.add(".".join([package, *parts]))
    assert found == listed
