"""The conformance suite every registered hypergradient method passes; a new method is one more CASE.

Each case runs the method through `MLOEngine` (not its internals) on test_hypergrad's float64
problem and checks: the masker gradient it hands the masker optimizer against central finite
differences of the validation loss after the real steps (`outer_loss`, no maskkit.mlo code);
its card and options (round trip through `HYPERGRADS.create` and `MLOConfig`); and a
`state_dict` round trip of the engine that continues bit for bit.
"""

from __future__ import annotations

import copy
import io
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from test_hypergrad import fd_directional, make_problem, random_directions, rel_err

from maskkit.mlo import HYPERGRADS, Hypergradient, MLOConfig, MLOEngine


@dataclass(frozen=True)
class Case:
    """One method under test: its name and options, the problem it is checked on, and its accuracy."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    opt_name: str = "sgd"  # optimizer of the MAE and the head (test_hypergrad.make_problem)
    k: int = 1  # masker_every: pretrain steps per masker step
    seed: int = 0
    frozen_head: bool = False  # head lr 0: C' = C (for methods that leave out the finetune path)
    tol: float = 1e-4  # relative error of the directional derivatives against finite differences

    def __str__(self) -> str:
        return f"{self.name}{self.options}-{self.opt_name}-k{self.k}"


#: darts' only approximation is its finite difference (radius r): under 1e-4 relative on these problems
CASES = [
    Case("darts", seed=11, tol=5e-4),
    Case("darts", {"fd": "central", "scale": "optimizer", "r": 0.01}, opt_name="adamw", seed=13, tol=5e-4),
    Case("darts", {"paths": "direct"}, seed=14, frozen_head=True, tol=5e-4),
    Case("unroll", {"steps": 1}, opt_name="adamw", seed=1),
    Case("unroll", {"steps": 2}, opt_name="sgd", k=2, seed=2),
]


def problem_for(case: Case) -> dict:
    problem = make_problem(case.opt_name, seed=case.seed, k=case.k)
    if case.frozen_head:
        for group in problem["head_opt"].param_groups:
            group["lr"] = 0.0
    return problem


def engine_for(case: Case, problem: dict, masker_lr: float = 0.0) -> MLOEngine:
    """An engine over the problem's models (not copied) running the case's method."""
    config = MLOConfig(hypergrad=case.name, masker_every=case.k, hypergrad_options=dict(case.options))
    masker_opt = torch.optim.SGD(problem["masker"].parameters(), lr=masker_lr)
    return MLOEngine(problem["mae"], problem["masker"], problem["head"], mae_optimizer=problem["mae_opt"],
                     head_optimizer=problem["head_opt"], masker_optimizer=masker_opt, config=config)


def engine_masker_grad(case: Case, problem: dict) -> torch.Tensor:
    """The gradient the engine hands the masker optimizer after one masker cycle, flattened."""
    engine = engine_for(case, copy.deepcopy(problem))
    seen = []
    engine._masker_update = lambda grads: seen.append([g.detach().clone() for g in grads]) or 0.0
    for images in problem["images"]:
        engine.step(images, train_batch=problem["train"], val_batch=problem["val"])
    assert len(seen) == 1, "one masker step per cycle"
    return torch.cat([g.reshape(-1) for g in seen[0]])


# ---- the checks (also run by tests/test_plugin_hypergrad.py on a method written there) ------------


def check_matches_finite_differences(case: Case) -> None:
    problem = problem_for(case)
    grad = engine_masker_grad(case, problem)
    dirs = random_directions(problem)
    fd = fd_directional(problem, dirs)  # 12 directional derivatives of the validation loss
    assert fd.norm() > 1e-6  # the downstream signal reaches the masker at all
    assert rel_err(dirs @ grad, fd) < case.tol, rel_err(dirs @ grad, fd)


def check_card_and_options(case: Case) -> None:
    assert case.name in HYPERGRADS.names()
    cls = HYPERGRADS.get(case.name)
    assert isinstance(cls, type) and issubclass(cls, Hypergradient) and cls.name == case.name
    card = HYPERGRADS.card(case.name)
    assert card.kind == "hypergrad" and card.name == case.name and card.idea and card.paper
    defaults = {o.name: o.default for o in card.options}
    assert set(case.options) <= set(defaults)
    assert all(o.allowed and o.allowed != "any" for o in card.options), card.options  # allowed values stated
    method = HYPERGRADS.create(case.name, **case.options)
    assert method.options() == {**defaults, **case.options}
    assert HYPERGRADS.create(case.name, **method.options()) == method  # options round trip
    config = MLOConfig(hypergrad=case.name, masker_every=case.k, hypergrad_options=dict(case.options))
    assert config.create_hypergrad() == method
    assert MLOConfig(**config.state()).create_hypergrad() == method  # and through the recorded config
    with pytest.raises(ValueError, match=f"bad options for hypergrad '{case.name}'"):
        HYPERGRADS.create(case.name, no_such_option=1)


def check_state_dict_round_trip(case: Case) -> None:
    """Two cycles, a checkpoint at the cycle boundary, two more: a fresh engine loaded from it continues
    bit for bit; no state_dict while a window is open."""
    problem = problem_for(case)
    engine = engine_for(case, copy.deepcopy(problem), masker_lr=0.1)
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64) for _ in range(4 * case.k)]
    labeled = dict(train_batch=problem["train"], val_batch=problem["val"])
    for x in batches[: 2 * case.k]:
        engine.step(x, **labeled)
        assert not (engine.hypergradient.window_open() and engine.can_checkpoint())  # never inside a window
        if engine.hypergradient.window_open():
            with pytest.raises(RuntimeError, match="window"):
                engine.state_dict()
    assert engine.can_checkpoint()
    buf = io.BytesIO()
    torch.save(engine.state_dict(), buf)
    ref = [engine.step(x, **labeled) for x in batches[2 * case.k :]]
    other = engine_for(case, problem_for(Case(case.name, case.options, case.opt_name, case.k, seed=case.seed + 1)),
                       masker_lr=0.1)  # different weights, same kinds
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert state["config"]["hypergrad"] == case.name
    other.load_state_dict(state)
    got = [other.step(x, **labeled) for x in batches[2 * case.k :]]
    assert got == ref
    for a, b in ((engine.mae, other.mae), (engine.head, other.head), (engine.masker, other.masker)):
        assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


# ---- every registered built-in ------------------------------------------------------------


@pytest.fixture(params=CASES, ids=str)
def case(request) -> Case:
    return request.param


def test_every_builtin_method_has_a_case():
    builtins = {n for n in HYPERGRADS.names() if HYPERGRADS.get(n).__module__.startswith("maskkit.")}
    assert builtins <= {c.name for c in CASES}


@pytest.mark.slow
def test_masker_gradient_matches_finite_differences_of_the_validation_loss(case):
    check_matches_finite_differences(case)


def test_card_and_options_round_trip(case):
    check_card_and_options(case)


def test_engine_state_dict_round_trip(case):
    check_state_dict_round_trip(case)
