"""`maskkit bench` at a trivial size: the JSON's keys, rows, baselines and ratios; masker parameter counts."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from maskkit.bench import bench_policy_overhead, count_parameters, masker_parameter_counts, sized_policies
from maskkit.cli.app import app
from maskkit.policies import create_policy, list_policies

#: a row per built-in policy that masks an image grid: random and attention their own, the rest `<name>_policy` vs
#: random_policy (tube masks an image as one time slice; frame and motion need clips: no row on images)
ZOO_ROWS = ("adamae", "block", "colornoise", "hpm", "learned", "simmim", "tube", "uniform")
CLIP_ONLY = ("frame", "motion")
#: the checks' rows (`maskkit bench --plans`): plans with and without weights, a plugin source's samples, hypergradients
CHECK_ROWS = {
    "random_plan_unchecked": None,
    "random_plan_checked": "random_plan_unchecked",
    "weighted_plan_unchecked": None,
    "weighted_plan_checked": "weighted_plan_unchecked",
    "source_read_unchecked": None,
    "source_read_checked": "source_read_unchecked",
    "masker_grads_check": None,
}
ROWS = {
    "mae_random_masking": None,
    "random_policy": "mae_random_masking",
    "attention_policy": "random_policy",
    **{f"{name}_policy": "random_policy" for name in ZOO_ROWS},
    **CHECK_ROWS,
    "mae_step": None,
    "hpm_step": "mae_step",
    "mlo_darts": "mae_step",
    "mlo_darts_direct": "mae_step",
    "mlo_unroll_k1": "mae_step",
    "mlo_unroll_k2": "mae_step",
}


@pytest.mark.slow
def test_bench_json_trivial(tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", "--preset", "trivial", "--device", "cpu", "--json", str(out)])
    assert result.exit_code == 0, result.output
    payload = json.loads(out.read_text())
    assert {"device", "torch", "rows", "params"} <= set(payload)
    assert payload["device"] == "cpu" and payload["torch"] == torch.__version__
    rows = {r["name"]: r for r in payload["rows"]}
    assert list(rows) == list(ROWS)  # every row once, in this order
    for name, baseline in ROWS.items():
        row = rows[name]
        assert {"name", "seconds", "peak_mem_mb", "baseline", "ratio"} <= set(row)
        assert row["baseline"] == baseline
        assert row["seconds"] > 0 and row["peak_mem_mb"] >= 0
        if baseline is not None:
            assert row["ratio"] == pytest.approx(row["seconds"] / rows[baseline]["seconds"])
    att = rows["attention_policy"]  # the encoder pass that reads attention is part of its cost
    assert att["includes_encoder"] is True
    assert att["select_ratio"] == pytest.approx(att["select_seconds"] / rows["random_policy"]["seconds"])
    assert {p["num_patches"] for p in payload["params"]} == {256, 196}


@pytest.mark.slow
def test_bench_compile_adds_each_mlo_row_compiled_interleaved():
    from maskkit.bench import run_bench
    from maskkit.mlo_bench import DEFAULT_NAMES

    rows = {r["name"]: r for r in run_bench("trivial", "cpu", repeats=1, compile="eager")["rows"]}
    for name in DEFAULT_NAMES:
        compiled = rows[f"{name}@eager"]
        assert compiled["baseline"] == "mae_step" and compiled["rss_mb"] is None
        assert compiled["ratio"] == pytest.approx(compiled["seconds"] / rows["mae_step"]["seconds"])
    with pytest.raises(ValueError, match="--compile must be none or a torch.compile backend"):
        run_bench("trivial", "cpu", repeats=1, compile="turbo")


def test_every_policy_that_sizes_alone_can_build_gets_a_row():
    assert set(list_policies()) - {"random", "attention", *CLIP_ONLY} == set(ZOO_ROWS)
    assert list(sized_policies(16, 8, 0.75)) == list(ZOO_ROWS)  # sorted, as the rows
    # uniform masks only at ratio 0.75 and on an even grid: left out otherwise, nothing else is
    assert list(sized_policies(16, 8, 0.5)) == [n for n in ZOO_ROWS if n != "uniform"]
    assert list(sized_policies(9, 8, 0.75)) == [n for n in ZOO_ROWS if n != "uniform"]
    rows = bench_policy_overhead(batch=2, num_patches=9, dim=8, repeats=1, warmup=0)
    assert [r["name"] for r in rows][3:] == [f"{n}_policy" for n in ZOO_ROWS if n != "uniform"]


def test_masker_parameter_counts_match_built_maskers():
    """Meta-device counts equal those of maskers really built (small width, so it is cheap)."""
    rows = masker_parameter_counts(embed_dim=32, sizes={"a": 16, "b": 9})
    for row in rows:
        for arch in ("paper", "token"):
            built = create_policy("learned", arch=arch, embed_dim=32, num_patches=row["num_patches"])
            assert row[arch] == count_parameters(built)
        assert row["ratio"] == pytest.approx(row["paper"] / row["token"])


def test_attention_row_rejects_mismatched_encoder():
    from maskkit.adapters.timm import create_mae

    with pytest.raises(ValueError, match="patches"):
        bench_policy_overhead(
            batch=2, num_patches=17, dim=64, repeats=1, warmup=0, encoder=create_mae("micro")
        )


def test_cost_model_flops_equal_torch_flop_counter_on_timm_blocks():
    """block_flops / cls_only_block_flops against torch's own FLOP count of a timm block (an independent count)."""
    from timm.models.vision_transformer import Block
    from torch.utils.flop_counter import FlopCounterMode

    from maskkit.adapters.vit_attention import cls_only_block
    from maskkit.mlo_bench import block_flops, cls_only_block_flops

    block = Block(dim=64, num_heads=4, mlp_ratio=4.0).eval()
    block.attn.fused_attn = False  # count the plain matmuls
    x = torch.randn(1, 17, 64)
    with torch.no_grad(), FlopCounterMode(display=False) as full:
        block(x)
    with torch.no_grad(), FlopCounterMode(display=False) as cls_only:
        cls_only_block(block, x)
    assert full.get_total_flops() == block_flops(17, 64)
    assert cls_only.get_total_flops() == cls_only_block_flops(17, 64)


def test_cost_model_ratios_follow_the_pass_counts():
    from maskkit.adapters.timm import get_preset
    from maskkit.mlo_bench import block_flops, cls_only_block_flops, predicted_ratios

    model = predicted_ratios("tiny")
    p = get_preset("tiny")  # 32x32, patch 4: 64 patches, 16 visible
    f = p.depth * block_flops(17, p.embed_dim) + p.decoder_depth * block_flops(65, p.decoder_embed_dim)
    u = (p.depth - 1) * block_flops(65, p.embed_dim) + cls_only_block_flops(65, p.embed_dim)
    assert model["num_patches"] == 64 and model["unmasked_over_masked"] == u / f
    assert model["mlo_darts"] == (8 * f + 6 * u) / (6 * f)
    assert model["mlo_darts_direct"] < model["mlo_darts"] < model["mlo_unroll_k1"]
    assert model["mlo_darts_direct_half"] == (8 * f + 2 * u) / (6 * f)


def test_the_half_labeled_batch_contender_draws_half_batches():
    from maskkit.mlo_bench import make_contender

    for name, labeled in (("mlo_darts_direct", 8), ("mlo_darts_direct_half", 4)):
        engine = make_contender(name, preset="micro", batch=8, val_batch=8).engine
        assert engine.config.darts_paths == "direct"
        for source in (engine.train_batches, engine.val_batches):
            images, labels = source()
            assert images.shape[0] == labels.shape[0] == labeled, name


def test_bench_plans_times_the_random_plan_with_the_check_on_and_off_at_b256_n196(tmp_path):
    from maskkit.plan import plan_checks_enabled, set_plan_checks

    out = tmp_path / "plans.json"
    previous = set_plan_checks(False)  # the bench restores whatever was set
    try:
        result = CliRunner().invoke(app, ["bench", "--plans", "--preset", "trivial", "--json", str(out)])
        assert not plan_checks_enabled()
    finally:
        set_plan_checks(previous)
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == list(CHECK_ROWS)
    off, on = rows["random_plan_unchecked"], rows["random_plan_checked"]
    assert (off["baseline"], off["ratio"], on["baseline"]) == (None, None, "random_plan_unchecked")
    for row in (off, on):
        assert (row["batch"], row["num_patches"]) == (256, 196)
        assert row["seconds"] > 0 and row["peak_mem_mb"] >= 0
    assert on["ratio"] == pytest.approx(on["seconds"] / off["seconds"])
    assert on["overhead_pct"] == pytest.approx(100 * (on["ratio"] - 1))
    assert on["check_seconds"] == pytest.approx(on["seconds"] - off["seconds"])
    text = " ".join(result.stdout.split())  # the console wraps long lines
    assert f"plan check (random policy, B=256, N=196): {on['seconds'] * 1e3:.3f} ms checked vs " in text
    assert f"overhead {on['overhead_pct']:+.1f}%" in text
    for name in ("weighted_plan_checked", "source_read_checked"):  # the weighted plan, a plugin source's samples
        row, base = rows[name], rows[CHECK_ROWS[name]]
        assert row["ratio"] == pytest.approx(row["seconds"] / base["seconds"]) and base["seconds"] > 0
        assert row["check_seconds"] == pytest.approx(row["seconds"] - base["seconds"])
    source = rows["source_read_checked"]
    assert f"source sample check (256 samples 3x32x32): {source['seconds'] * 1e3:.3f} ms checked" in text
    assert rows["masker_grads_check"]["seconds"] > 0 and "hypergradient check (" in text


def test_cpu_peak_memory_is_the_running_sum_of_allocations_and_frees():
    from maskkit.measure import peak_memory_mb

    def calls():
        a = torch.ones(2**20)  # 4 MiB
        b = torch.ones(2**18)  # + 1 MiB while a lives: the peak, 5 MiB
        del a
        c = torch.ones(2**19)  # 2 MiB with b: 3 MiB, below the peak
        return b, c

    assert peak_memory_mb(calls, torch.device("cpu")) == 5.0
    assert peak_memory_mb(lambda: None, torch.device("cpu")) == 0.0
