"""Golden runs: `maskkit pretrain` for random, attention, hpm, adamae, learned darts and learned unroll, and a
SIGKILL + --resume, reproduce the recorded metrics.jsonl and model.pt tensors bit for bit (fixtures made before
the run layer's redesign by `python tests/golden/record.py --write`); a run directory written by that older code
still resumes to the recorded result. The photos8-* cases do the same for every registered policy on 32-px
grey images, where crop-and-flip augmentation is on (issue 30, item 8; recorded after the keyed augmentation)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "golden"))
import record  # noqa: E402

HERE = Path(__file__).resolve().parent / "golden"


@pytest.mark.parametrize("case", [*record.CASES, "resume"])
@pytest.mark.slow
def test_golden_run_is_bit_identical(tmp_path, case):
    expected = json.loads(record.fixture(record.RESUME_OF if case == "resume" else case).read_text())
    result = record.compute([case], tmp_path)[case]
    assert result["metrics"] == expected["metrics"]
    assert result["step"] == expected["step"]
    assert result["tensors"] == expected["tensors"]
    if case in record.CROP_FLIP:
        assert result["augment"] == expected["augment"] == "crop-flip"


def test_every_registered_policy_has_a_crop_flip_golden_case():
    """Issue 30 (item 8): a policy added to the registry gets a 32-px crop-and-flip golden case and fixture (issue 31:
    or, made for clips, a golden run on clips)."""
    from maskkit import list_policies

    covered = {args[args.index("--policy") + 1] for args in record.CROP_FLIP.values()}
    clips = {args[args.index("--policy") + 1] for args in record.VIDEO.values()}
    assert set(list_policies()) <= covered | clips  # a policy made for clips has its golden run on clips
    assert {"tube", "frame", "motion"} <= clips
    for case in record.CROP_FLIP:
        assert json.loads(record.fixture(case).read_text())["augment"] == "crop-flip"


@pytest.mark.slow
def test_run_directory_of_the_previous_format_resumes_to_the_recorded_result(tmp_path):
    run = tmp_path / "old"
    shutil.copytree(HERE / "run-v2", run)
    cmd = [sys.executable, "-m", "maskkit.cli", "pretrain", "--no-progress", "--resume", str(run), "--steps", "4"]
    proc = subprocess.run(cmd, env=record.ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    expected = json.loads((HERE / "run-v2-resumed.json").read_text())
    assert record.digest(run) == expected
