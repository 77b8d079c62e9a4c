"""Equal cost: the FLOPs basis is `maskkit bench`'s cost model, the wall-time basis an interleaved
measurement in one process, and an equal-cost arm gets the steps that fit in its partner's budget."""

from __future__ import annotations

import pytest

from maskkit.ablate import StudyError, parse_study
from maskkit.ablate.calibrate import calibrate, equal_steps, flops_ratio, measure_step_costs
from maskkit.ablate.options import check_args
from maskkit.mlo_bench import predicted_ratios


def study(basis: str, model: str = "pilot") -> dict:
    return {
        "study": {"data": "digits", "seeds": [0], "steps": 100, "baseline": "random", "options": {"model": model}},
        "evaluations": {"linear": {}},
        "calibration": {"steps": 2, "warmup": 0},
        "arms": {
            "random": {"options": {"policy": "random"}},
            "mlo": {"options": ["--policy", "learned", "--learned-selection", "gumbel"]},
            "random-eq": {"options": {"policy": "random"}, "equal_cost": {"of": "mlo", "basis": basis}},
        },
    }


def test_the_flops_ratio_is_the_bench_cost_model():
    model = predicted_ratios("pilot")
    assert flops_ratio(check_args(["--model", "pilot", "--policy", "learned"], "x")) == model["mlo_darts"]
    direct = check_args(["--model", "pilot", "--policy", "learned", "--darts-paths", "direct"], "x")
    assert flops_ratio(direct) == model["mlo_darts_direct"]
    assert flops_ratio(check_args(["--model", "pilot", "--policy", "learned", "--freeze-masker"], "x")) == 1.0
    assert flops_ratio(check_args(["--model", "pilot", "--policy", "hpm"], "x")) == 1.0
    with pytest.raises(StudyError, match="--masker-every 2"):
        flops_ratio(check_args(["--model", "pilot", "--policy", "learned", "--masker-every", "3"], "x"))


def test_equal_flops_gives_the_partners_steps_times_its_cost_ratio():
    result = calibrate(parse_study(study("flops")), {})
    assert result["basis"] == {"random-eq": "flops"}
    assert result["steps"]["random-eq"] == round(100 * predicted_ratios("pilot")["mlo_darts"])
    assert equal_steps(1632, 0.40743, 0.11547) == 5758  # issue 12's MNIST-5k equal-time row


def test_equal_wall_time_measures_both_arms_interleaved(one_thread):
    result = calibrate(parse_study(study("wall time", model="micro")), {}, threads=1)
    costs = {arm: result["costs"][arm]["seconds_per_step"] for arm in ("mlo", "random-eq")}
    assert all(c > 0 for c in costs.values())
    assert result["steps"]["random-eq"] == equal_steps(100, costs["mlo"], costs["random-eq"])


def test_measure_step_costs_times_every_config(one_thread):
    configs = {name: check_args(["--model", "micro", "--policy", name], name) for name in ("random", "block")}
    for config in configs.values():
        config.train.steps = 10
    costs = measure_step_costs(configs, steps=2, warmup=0)
    assert set(costs) == {"random", "block"} and all(c > 0 for c in costs.values())
