"""maskkit.video_bench: every policy measured or reported with its refusal on a space-time grid, the trainer's step
with and without decoder masking, and `maskkit bench --grid` (no timing assertions)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from maskkit import list_policies
from maskkit.cli.app import app
from maskkit.policies import create_sized_policy
from maskkit.video_bench import bench_video_policies, bench_video_step, parse_grid, run_video_bench

GRID = (2, 4, 4)  # 32 tokens; clips [2, 3, 4, 64, 64] with the default 2 x 16 x 16 tubelets


def own_refusal(name: str, dim: int = 32) -> str | None:
    """The policy's own one-line error on the grid at ratio 0.9, called directly (None when it masks the tokens)."""
    n = math.prod(GRID)
    try:
        policy = create_sized_policy(name, ratio=0.9, embed_dim=dim, num_patches=n)
        clips = torch.randn(1, 3, 4, 64, 64)  # [1, C, T, H, W]
        policy(torch.zeros(1, n, dim), ratio=0.9, noise=torch.rand(1, n), grid=GRID, images=clips,
               attention=torch.rand(1, n).softmax(dim=1))  # fmt: skip
    except (ValueError, TypeError) as err:
        return str(err).strip().splitlines()[0]
    return None


def test_every_policy_is_measured_or_reported_with_its_refusal():
    torch.set_num_threads(1)
    result = bench_video_policies(GRID, 0.9, batch=2, dim=32, repeats=1, warmup=0)
    assert (result["grid"], result["num_patches"], result["clip"]) == ("2x4x4", 32, [3, 4, 64, 64])
    names = [row["name"] for row in result["rows"]]
    assert names[:2] == ["mae_random_masking", "random_policy"]
    measured = {name.removesuffix("_policy") for name in names[1:]}
    assert measured | set(result["refused"]) == set(list_policies())
    assert not measured & set(result["refused"])
    for name in list_policies():  # the same verdict, and the same one-line reason, as the policy's own call
        assert result["refused"].get(name) == own_refusal(name), name
    by = {row["name"]: row for row in result["rows"]}
    for row in result["rows"]:
        assert row["seconds"] > 0 and math.isfinite(row["seconds"]) and row["peak_mem_mb"] >= 0
        if row["baseline"] is not None:
            assert row["ratio"] == pytest.approx(row["seconds"] / by[row["baseline"]]["seconds"])
    assert by["random_policy"]["baseline"] == "mae_random_masking"
    assert all(by[n]["baseline"] == "random_policy" for n in names[2:])


def test_grid_and_preset_errors_are_one_line_naming_the_option():
    assert parse_grid("8x14x14") == (8, 14, 14) and parse_grid(" 2X4x4") == (2, 4, 4)
    for bad in ("8x14", "8x0x14", "axbxc", "8x14x14x2", ""):
        with pytest.raises(ValueError, match="--grid must be a space-time token grid"):
            parse_grid(bad)
    with pytest.raises(ValueError, match="--preset must be one of"):
        run_video_bench("2x4x4", "huge")
    with pytest.raises(ValueError, match="--batch must be a positive integer"):
        run_video_bench("2x4x4", "trivial", batch=0)


def test_the_step_rows_time_the_trainers_step_and_count_the_decoded_tokens():
    torch.set_num_threads(1)
    result = bench_video_step("micro", batch=2, decoders=(None,), repeats=1, warmup=0)
    (row,) = result["rows"]
    # micro: 64 tokens at ratio 0.9 keep int(64 x 0.1) = 6 visible; the decoder reconstructs the other 58
    assert (result["grid"], result["num_patches"], row["name"], row["decoded"]) == ("4x4x4", 64, "plain", 58)
    assert row["seconds"] > 0 and row["baseline"] is None


def test_bench_command_with_grid_writes_measured_rows_and_refusals(tmp_path):
    torch.set_num_threads(1)
    runner = CliRunner()
    out = tmp_path / "video.json"
    result = runner.invoke(app, ["bench", "--preset", "trivial", "--grid", "2x4x4", "--json", str(out)])
    assert result.exit_code == 0, result.output
    payload = json.loads(out.read_text())
    measured = {row["name"].removesuffix("_policy") for row in payload["rows"][1:]}
    assert measured | set(payload["refused"]) == set(list_policies())
    for name in payload["refused"]:
        assert f"{name}: not measured on the 2x4x4 grid at ratio 0.9" in " ".join(result.output.split())
    for args, message in ((["--grid", "2x4"], "--grid must be a space-time token grid"),
                          (["--grid", "2x4x4", "--plans"], "--grid times the policies on a space-time grid alone")):
        result = runner.invoke(app, ["bench", "--preset", "trivial", *args])
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 1 and len(lines) == 1 and message in lines[0], result.output


def test_the_decoder_rows_decode_the_rules_subset():
    decoder = pytest.importorskip("maskkit.policies.decoder")
    torch.set_num_threads(1)
    result = bench_video_step("micro", batch=2, repeats=1, warmup=0)
    by = {row["name"]: row for row in result["rows"]}
    assert list(by) == ["plain", "decoder_runningcell_0.5", "decoder_random_0.5"]
    assert by["plain"]["decoded"] == 58
    from maskkit.policies import RandomPolicy

    plan = RandomPolicy(0.9)(torch.zeros(2, 64, 8), generator=torch.Generator().manual_seed(0))
    for rule in ("runningcell", "random"):  # the rule's own subset size for 58 hidden tokens of the 4x4x4 grid
        m = decoder.apply_decoder_rule(plan, rule, 0.5, grid=(4, 4, 4), generator=torch.Generator().manual_seed(0))
        row = by[f"decoder_{rule}_0.5"]
        assert row["decoded"] == m.num_decoded < 58 and row["baseline"] == "plain"
        assert row["ratio"] == pytest.approx(row["seconds"] / by["plain"]["seconds"])
