"""The patch files for facebookresearch/mae (maskkit.adapters.official_mae.official_patches, docs/official-mae.md).

Offline: each patch parses (hunk header counts match their lines, at most 3 context lines around a
change), touches exactly the expected official files, the patches chain (each file's post-image blob is
the next patch's pre-image), they add `--policy`, `--policy_options`, `--max_iters_per_epoch` and `--mlo`, and
they import only public maskkit names. With MASKKIT_OFFICIAL_MAE=/path/to/a/clone of the official
repository (holding the pinned commit): `git apply --check`, then `git apply`, of each in order on the
pinned commit's files (copied to a temporary folder; the clone is not touched).
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from maskkit.adapters.official_mae import OFFICIAL_MAE_COMMIT, official_patches

#: the official files each patch touches, by patch number
EXPECTED_FILES = {
    1: {"main_pretrain.py", "engine_pretrain.py", "util/misc.py", "util/pos_embed.py"},
    2: {"main_pretrain.py", "engine_pretrain.py"},
    3: {"main_pretrain.py"},
    4: {"main_pretrain.py", "engine_pretrain.py", "util/misc.py"},
}
HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@ ?(.*)$")
MAX_CONTEXT = 3  # git's default: a diff, not a copy of the official code


@dataclass
class Hunk:
    heading: str  # the function context git prints after the second @@
    lines: list[str]

    @property
    def added(self) -> list[str]:
        return [line[1:] for line in self.lines if line.startswith("+")]


@dataclass
class FileDiff:
    path: str
    old_blob: str
    new_blob: str
    hunks: list[Hunk] = field(default_factory=list)


def parse_patch(text: str) -> list[FileDiff]:
    """The file diffs of a `git format-patch` file; AssertionError where a hunk's counts do not match its lines."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("diff --git "))
    files: list[FileDiff] = []
    i = start
    while i < len(lines):
        header = lines[i]
        assert header.startswith("diff --git a/"), f"line {i + 1}: expected 'diff --git', got {header!r}"
        path = header.split(" b/", 1)[1]
        index = re.match(r"^index ([0-9a-f]+)\.\.([0-9a-f]+) 100644$", lines[i + 1])
        assert index, f"{path}: expected an 'index' line of a changed file, got {lines[i + 1]!r}"
        assert lines[i + 2] == f"--- a/{path}" and lines[i + 3] == f"+++ b/{path}", f"{path}: bad ---/+++ lines"
        diff = FileDiff(path, index.group(1), index.group(2))
        i += 4
        while i < len(lines) and lines[i].startswith("@@"):
            m = HUNK.match(lines[i])
            assert m, f"bad hunk header {lines[i]!r}"
            old_count = int(m.group(2) or 1)
            new_count = int(m.group(4) or 1)
            i += 1
            body: list[str] = []
            old = new = 0
            while old < old_count or new < new_count:
                assert i < len(lines), f"{path}: hunk {m.group(0)!r} ends early"
                line = lines[i]
                kind = line[:1]
                assert kind in (" ", "+", "-", "\\"), f"{path}: line {i + 1} is not a diff line: {line!r}"
                old += kind in (" ", "-")
                new += kind in (" ", "+")
                body.append(line)
                i += 1
            assert (old, new) == (old_count, new_count), f"{path}: hunk {m.group(0)!r} counts {old},{new}"
            diff.hunks.append(Hunk(m.group(5), body))
        assert diff.hunks, f"{path}: no hunks"
        files.append(diff)
    return files


@pytest.fixture(scope="module")
def patches() -> dict[int, list[FileDiff]]:
    paths = official_patches()
    assert [int(p.name[:4]) for p in paths] == sorted(EXPECTED_FILES), [p.name for p in paths]
    return {int(p.name[:4]): parse_patch(p.read_text(encoding="utf-8")) for p in paths}


def added_lines(patches: dict[int, list[FileDiff]], number: int, path: str) -> list[str]:
    return [line for f in patches[number] if f.path == path for h in f.hunks for line in h.added]


def test_each_patch_touches_exactly_the_expected_official_files(patches):
    for number, files in patches.items():
        assert {f.path for f in files} == EXPECTED_FILES[number], number
        assert len(files) == len({f.path for f in files}), f"patch {number} names a file twice"


def test_context_is_at_most_three_lines_around_each_change(patches):
    for number, files in patches.items():
        for f in files:
            for hunk in f.hunks:
                kinds = "".join(line[:1] for line in hunk.lines if not line.startswith("\\"))
                assert kinds.strip(" "), f"patch {number}, {f.path}: a hunk that changes nothing"
                assert len(kinds) - len(kinds.lstrip(" ")) <= MAX_CONTEXT, (number, f.path, hunk.heading)
                assert len(kinds) - len(kinds.rstrip(" ")) <= MAX_CONTEXT, (number, f.path, hunk.heading)
                # between two changes git keeps a hunk whole only up to twice the context
                inner = re.findall(r" +", kinds.strip(" "))
                assert all(len(run) <= 2 * MAX_CONTEXT for run in inner), (number, f.path, hunk.heading)


def test_patches_chain_in_order(patches):
    """A file's post-image in one patch is its pre-image in the next patch that touches it."""
    last: dict[str, str] = {}
    for number in sorted(patches):
        for f in patches[number]:
            if f.path in last:
                assert f.old_blob == last[f.path], f"patch {number} does not apply on top of the one before for {f.path}"
            last[f.path] = f.new_blob


def test_the_patches_add_the_policy_iteration_cap_and_mlo_arguments(patches):
    policy = added_lines(patches, 3, "main_pretrain.py")
    cap_main = added_lines(patches, 2, "main_pretrain.py")
    cap_engine = added_lines(patches, 2, "engine_pretrain.py")
    assert any("add_argument('--policy'," in line for line in policy)
    assert any("add_argument('--policy_options'," in line for line in policy)
    assert any("use_policy(model, policy)" in line for line in policy)
    assert any("add_argument('--max_iters_per_epoch', default=None," in line for line in cap_main)
    assert any("args.max_iters_per_epoch" in line for line in cap_engine)
    assert any("add_argument('--mlo', action='store_true'," in line for line in added_lines(patches, 4, "main_pretrain.py"))
    assert any("engine.step(samples)" in line for line in added_lines(patches, 4, "engine_pretrain.py"))
    # the arguments go into the official argparser
    for number, name in ((3, "'--policy',"), (2, "'--max_iters_per_epoch',"), (4, "'--mlo',")):
        [hunk] = [h for f in patches[number] if f.path == "main_pretrain.py" for h in f.hunks
                  if any(name in line for line in h.added)]
        assert hunk.heading == "def get_args_parser():", hunk.heading
    # no patch changes the model file: without --policy the model masks with its own random_masking
    assert all(f.path != "models_mae.py" for files in patches.values() for f in files)


def test_the_patches_import_only_public_maskkit_names(patches):
    imports = [
        line for files in patches.values() for f in files for h in f.hunks for line in h.added
        if "maskkit" in line and "import" in line
    ]
    assert imports
    for line in imports:
        m = re.match(r"^from (maskkit[\w.]*) import ([\w, ]+?)\s*(#.*)?$", line)
        assert m, f"unexpected maskkit import line: {line!r}"
        module = importlib.import_module(m.group(1))
        for name in (n.strip() for n in m.group(2).split(",")):
            assert name in getattr(module, "__all__", ()), f"{m.group(1)}.{name} is not public"


def test_patches_ship_as_package_data():
    root = Path(__file__).resolve().parents[1]
    pyproject = (root / "pyproject.toml").read_text()
    assert '"maskkit.adapters" = ["official_mae_patches/*.patch"]' in pyproject
    assert all(p.parent.name == "official_mae_patches" for p in official_patches())


def test_git_apply_on_the_pinned_commit(tmp_path):
    checkout = os.environ.get("MASKKIT_OFFICIAL_MAE")
    if not checkout:
        pytest.skip("set MASKKIT_OFFICIAL_MAE to a clone of facebookresearch/mae to run git apply on it")
    git = shutil.which("git")
    if git is None:
        pytest.skip("git is not installed")

    def run(*args: str, cwd: Path | str) -> str:
        result = subprocess.run([git, *args], cwd=cwd, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"git {' '.join(args)}: {result.stderr.strip()}"
        return result.stdout

    found = subprocess.run([git, "cat-file", "-e", f"{OFFICIAL_MAE_COMMIT}^{{commit}}"], cwd=checkout,
                           capture_output=True, timeout=60)
    if found.returncode != 0:
        pytest.skip(f"{checkout} does not hold commit {OFFICIAL_MAE_COMMIT}")
    work = tmp_path / "mae"
    work.mkdir()
    run("init", "-q", cwd=work)
    for path in sorted(set().union(*EXPECTED_FILES.values())):
        target = work / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(subprocess.run([git, "show", f"{OFFICIAL_MAE_COMMIT}:{path}"], cwd=checkout,
                                          capture_output=True, check=True, timeout=60).stdout)
    for patch in official_patches():
        run("apply", "--check", str(patch), cwd=work)
        run("apply", str(patch), cwd=work)
    text = (work / "main_pretrain.py").read_text()
    assert "'--policy'" in text and "'--max_iters_per_epoch'" in text and "'--mlo'" in text
    assert "assert timm.__version__" not in text
