"""The drop-in examples run end to end on CPU with tiny sizes and report finite losses."""

from __future__ import annotations

import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, *args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.slow
def test_official_mae_drop_in_trains_with_a_policy():
    out = run_example("official_mae_drop_in.py", "--policy", "attention", "--epochs", "2", "--num_samples", "128")
    losses = [float(v) for v in re.findall(r"Averaged stats: loss: ([-\d.e+naif]+)", out)]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    final = re.search(r"final loss: (\S+) \(policy attention\)", out)
    assert final and float(final.group(1)) == round(losses[-1], 6)


@pytest.mark.slow
def test_official_mae_drop_in_trains_hpm_with_the_loops_own_optimizer():
    out = run_example("official_mae_drop_in.py", "--policy", "hpm", "--epochs", "1", "--num_samples", "128")
    final = re.search(r"final loss: (\S+) \(policy hpm\)", out)
    assert final and math.isfinite(float(final.group(1)))


def test_official_mae_drop_in_header_diff_has_at_most_five_changed_lines():
    text = (EXAMPLES / "official_mae_drop_in.py").read_text()
    header = text.split('"""')[1]
    changed = [line for line in header.splitlines() if re.match(r"\s{4}[+-]", line)]
    assert 1 <= len(changed) <= 5
    assert len(re.findall(r"# maskkit$", text, flags=re.M)) == len(changed)  # the code matches the diff


def load_swap_policies():
    spec = importlib.util.spec_from_file_location("maskkit_example_swap_policies", EXAMPLES / "swap_policies.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_swap_policies_prints_one_finite_row_per_policy(capsys):
    from maskkit import list_policies

    load_swap_policies().main(["--steps", "2", "--batch_size", "8"])
    out = capsys.readouterr().out
    rows = dict(re.findall(r"^(\w+)\s+(\S+\s+\S+)$", out, flags=re.M))
    swap = load_swap_policies()
    image_policies = [name for name in list_policies() if name not in swap.CLIP_POLICIES]
    assert set(image_policies) <= set(rows) and set(swap.CLIP_POLICIES) <= set(list_policies())
    for name in image_policies:
        train_loss, eval_loss = (float(v) for v in rows[name].split())
        assert math.isfinite(train_loss) and math.isfinite(eval_loss) and eval_loss > 0


def test_swap_policies_is_deterministic_on_the_official_double(capsys):
    swap = load_swap_policies()
    args = ["--model", "official", "--steps", "2", "--batch_size", "8", "--seed", "3"]
    first, second = swap.main(args), swap.main(args)
    assert first == second and all(math.isfinite(v) for pair in first.values() for v in pair)
    other_seed = swap.main(args[:-1] + ["4"])
    assert other_seed != first
