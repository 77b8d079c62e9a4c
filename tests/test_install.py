"""The installed import names: maskkit.adapters and maskkit.cli, nothing top-level."""

from __future__ import annotations

import os
import subprocess
import sys

SCRIPT = """
import importlib.util
import maskkit.adapters, maskkit.cli
print(importlib.util.find_spec("adapters"), importlib.util.find_spec("cli"))
"""


def test_installed_subpackages_and_no_top_level_names(tmp_path):
    # run from an empty folder under /tmp, without PYTHONPATH, so only the installed package is seen
    # (the repository root holds folders named adapters/ and cli/)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["None", "None"]
