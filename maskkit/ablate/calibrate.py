"""Equal cost: the steps an equal-cost arm gets to match its partner's budget.

Equal wall time: each arm's cost per pretraining step is measured by a short calibration in one
process, interleaved as `maskkit bench` does (every round, every arm trains one masker cycle in turn,
so a load that comes and goes hits all arms alike); the median seconds of a cycle over the timed rounds,
per step. The partner's steps x its cost / the arm's cost, rounded, is the arm's budget.

Equal FLOPs: the cost model of `maskkit bench` (`maskkit.mlo_bench.predicted_ratios`: a learned
masker's iteration against a plain MAE step, from pass counts and FLOPs at the model preset's own size;
1 for every policy that is not trained by MLO, whose own networks are small next to the MAE).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from .options import check_args
from .study import Study, StudyError

__all__ = ["calibrate", "equal_steps", "flops_ratio", "measure_step_costs"]


def measure_step_costs(configs: dict[str, Any], steps: int = 20, warmup: int = 3, cycle: int = 2) -> dict[str, float]:
    """Seconds per pretraining step of each `RunConfig`, interleaved in this process (median over rounds)."""
    from maskkit.run.builder import build_trainer, load_data, new_run

    trainers = {}
    for name, config in configs.items():
        torch.manual_seed(config.train.seed)
        run = new_run(config, load_data(config.data), torch.device("cpu"))
        trainers[name] = build_trainer(run)
    times: dict[str, list[float]] = {name: [] for name in trainers}
    rounds = max(1, steps // cycle)
    for round_ in range(warmup + rounds):
        for name, trainer in trainers.items():
            start = time.perf_counter()
            for _ in range(cycle):
                trainer.step()
            if round_ >= warmup:
                times[name].append((time.perf_counter() - start) / cycle)
    return {name: statistics.median(ts) for name, ts in times.items()}


def flops_ratio(config: Any) -> float:
    """One iteration's FLOPs over a plain MAE step's, by `maskkit bench`'s cost model."""
    from maskkit.mlo_bench import predicted_ratios

    if not config.policy.learnable() or config.mlo.freeze_masker:
        return 1.0
    if config.mlo.masker_every != 2:
        raise StudyError("equal FLOPs: the cost model counts a masker step every 2 MAE steps (--masker-every 2)")
    try:
        model = predicted_ratios(config.model.name, config.policy.ratio())
    except (KeyError, ValueError):
        raise StudyError(f"equal FLOPs: the cost model knows timm presets only, not --model {config.model.name}") from None
    if config.mlo.hypergrad == "unroll":
        if config.mlo.unroll_steps != 1:
            raise StudyError("equal FLOPs: the cost model has unroll with --unroll-steps 1 only")
        return model["mlo_unroll_k1"]
    return model["mlo_darts_direct" if config.mlo.darts_paths == "direct" else "mlo_darts"]


def equal_steps(partner_steps: int, partner_cost: float, own_cost: float) -> int:
    """The steps of cost `own_cost` that fit in `partner_steps` steps of cost `partner_cost` (at least 1)."""
    return max(1, round(partner_steps * partner_cost / own_cost))


def calibrate(study: Study, chosen: dict[str, str], threads: int = 1) -> dict[str, Any]:
    """The equal-cost budgets of the study: {"costs": {arm: {...}}, "steps": {arm: n}, "basis": {arm: ...}}.

    Wall-time arms and their partners are measured together in one interleaved calibration; FLOPs
    arms use the cost model. `chosen`: each select arm's value (a partner may be one).
    """
    configs, out = {}, {"costs": {}, "steps": {}, "basis": {}, "threads": threads}
    pairs = [(n, a.equal_cost) for n, a in study.arms.items() if a.equal_cost is not None]
    for name, eq in pairs:
        for arm in (name, eq.of):
            configs[arm] = check_args(study.options(arm, chosen.get(arm)), f"arms.{arm}")
            configs[arm].train.seed = study.seeds[0]
    timed = sorted({a for n, eq in pairs if eq.basis == "wall time" for a in (n, eq.of)})
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        seconds = measure_step_costs({a: configs[a] for a in timed}, study.calibration["steps"],
                                     study.calibration["warmup"]) if timed else {}  # fmt: skip
    finally:
        torch.set_num_threads(previous)
    for arm, value in seconds.items():
        out["costs"][arm] = {"seconds_per_step": value, "basis": "wall time"}
    for name, eq in pairs:
        partner_steps = study.budget(eq.of)[0]
        if eq.basis == "wall time":
            steps = equal_steps(partner_steps, seconds[eq.of], seconds[name])
        else:
            for arm in (name, eq.of):
                out["costs"].setdefault(f"{arm} (flops)", {"flops_ratio": flops_ratio(configs[arm]), "basis": "flops"})
            steps = equal_steps(partner_steps, flops_ratio(configs[eq.of]), flops_ratio(configs[name]))
        out["steps"][name] = steps
        out["basis"][name] = eq.basis
    return out
