"""Differentiable unroll of K optimizer steps of a module, built on `higher`.

`unroll(module, optimizer)` yields a functional copy of the module (`higher`'s monkeypatch) and
steps it with a differentiable re-implementation of the real optimizer (torch.optim SGD, Adam,
AdamW, with torch's exact update order), so the fast weights are functions of whatever the inner
losses depended on (e.g. a masker's per-patch weights). `write_back()` then makes the unrolled
steps the real ones: module params and optimizer state become what `optimizer.step()` would give.

    with unroll(mae, opt) as u:
        for _ in range(K):
            u.step(inner_loss(u.fmodel))         # any method of the module works on u.fmodel
        hyper = torch.autograd.grad(outer_loss(u.fmodel), masker.parameters())
        u.write_back()

Notes:
- Initial fast weights are the module's own parameters, not copies (`higher`'s
  `copy_initial_weights=False`): gradients also reach them (`u.initial_params`). Hence call
  `write_back()` only after the last backward through the unroll; it writes the params in place
  and autograd would then (loudly) refuse to backprop through the stale graph.
- Buffers are shared with the module (not copied): e.g. BatchNorm running stats update as in
  real training.
- `first_order=True`: each inner gradient is taken without `create_graph`, so it is a constant.
  What still flows: the identity path of the update (d w_{k+1} / d w_k = I for SGD, times
  (1 - lr * wd) for decoupled decay, plus the derivative of coupled L2 terms and of momentum
  buffers that hold them), so gradients reach the initial weights but NOT parameters that only
  entered through the inner loss: `torch.autograd.grad(outer, masker_params, allow_unused=True)`
  gives None for them.
- Hyperparameters (lr, betas, weight decay, ...) are read from `optimizer.param_groups` at every
  step, so per-group settings and an LR scheduler's current lr are respected.
- Exactness: the update is torch.optim's single-tensor op sequence, so given the same gradients
  the fast weights and state equal `optimizer.step()`'s bit for bit. The gradients are equal too
  when the forwards use the same kernels: inside the block attention runs the math SDPA kernel,
  so a real step taken under `math_attention()` matches exactly, one under the fused kernel to
  rounding. Optimizer step hooks are not run.
- math SDPA: the kernel is chosen when a forward runs; forwards made outside the block whose
  graph will be double-backpropagated need `math_attention()` themselves.
- The differentiable optimizers and the check of what they support are in
  maskkit.mlo.diffopt (re-exported here).
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import higher
import higher.patch
import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from maskkit.compile import uncompiled
from maskkit.mlo.diffopt import (
    DifferentiableAdam,
    DifferentiableAdamW,
    DifferentiableSGD,
    UnrollError,
    _TorchExactOptimizer,
    check_optimizer,
)

__all__ = [
    "UnrollError",
    "Unroll",
    "unroll",
    "math_attention",
    "check_optimizer",
    "clear_cache",
    "DifferentiableSGD",
    "DifferentiableAdam",
    "DifferentiableAdamW",
]


@contextmanager
def math_attention() -> Iterator[None]:
    """Run scaled_dot_product_attention with the math kernel, which has a double backward.

    The fused CPU/CUDA kernels (flash, memory-efficient) have no derivative of their backward,
    so any backward through a `create_graph` inner step must also run inside this context.
    """
    with sdpa_kernel(SDPBackend.MATH):
        yield


# ---------------------------------------------------------------------------------------------
# The unroll context
# ---------------------------------------------------------------------------------------------


def _structure(module: nn.Module) -> tuple:
    """What higher's functional copy is built from: modules and parameters, by identity and name."""
    own = tuple((k, id(v)) for k, v in module._parameters.items() if v is not None)
    kids = tuple((k, _structure(c)) for k, c in module._modules.items() if c is not None)
    return (id(module), type(module), own, kids)


def _resync(module: nn.Module, fmodule: nn.Module) -> None:
    """Refresh a cached functional copy: plain attributes (e.g. `training`) and buffers, shared."""
    for name, value in module.__dict__.items():
        if name not in higher.patch._internal_attrs and name not in fmodule._parameters:
            object.__setattr__(fmodule, name, value)
    fmodule._buffers.clear()
    fmodule._buffers.update(module._buffers)
    for name, child in module._modules.items():
        if child is not None:
            _resync(child, fmodule._modules[name])


# id(module) -> [module, structure, functional copy, in use], most recent last. Building a copy
# creates one class per submodule (about 6 ms for a depth-4 ViT), so it is built once and
# refreshed on later unrolls. higher's copy holds the module in closures, so the cache holds the
# last _CACHE_SIZE modules alive; `clear_cache()` releases them.
_CACHE: OrderedDict[int, list] = OrderedDict()
_CACHE_SIZE = 4


def clear_cache() -> None:
    """Forget the cached functional copies (and release the modules they keep alive)."""
    _CACHE.clear()


@contextmanager
def _functional(module: nn.Module) -> Iterator[higher.patch._MonkeyPatchBase]:
    """higher's functional copy whose initial fast weights and buffers ARE the module's (no copies)."""
    structure = _structure(module)
    entry = _CACHE.get(id(module))
    if entry is not None and entry[0] is module and entry[1] == structure and not entry[3]:
        _CACHE.move_to_end(id(module))
        fmodel = entry[2]
    else:
        fmodel = higher.patch.make_functional(module)
        for fm in fmodel.modules():  # drop higher's module.parameters() generators
            object.__setattr__(fm, "_original_params", None)
        fmodel.update_params(list(module.parameters()))
        # Keep only the latest fast weights: the autograd graph holds what backward needs.
        fmodel.track_higher_grads = False
        if entry is None or entry[0] is not module or not entry[3]:  # never evict a copy in use
            entry = _CACHE[id(module)] = [module, structure, fmodel, False]
            _CACHE.move_to_end(id(module))
            while len(_CACHE) > _CACHE_SIZE:
                _CACHE.popitem(last=False)
        else:
            entry = [module, structure, fmodel, False]  # nested unroll of a module in use: not cached
    entry[3] = True
    _resync(module, fmodel)
    params = list(module.parameters())
    fmodel.update_params(params)
    fmodel._refill_params_box(None)
    try:
        yield fmodel
    finally:
        # Drop references to the fast weights (and through them the autograd graph).
        fmodel.update_params(params)
        fmodel._refill_params_box(None)
        entry[3] = False


@dataclass
class Unroll:
    """Handle yielded by `unroll`: the functional model, its fast weights, `step` and `write_back`.

    `fmodel` is valid inside the `with` block only (on exit it is reset to the module's weights,
    so it keeps no graph alive); `params`, `initial_params`, `num_steps` and `write_back` also work after it.
    """

    module: nn.Module
    optimizer: torch.optim.Optimizer
    fmodel: nn.Module
    diffopt: _TorchExactOptimizer
    first_order: bool
    initial_params: list[Tensor]
    num_steps: int = 0
    _params: list[Tensor] = field(default_factory=list, repr=False)
    _written: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        self._params = list(self.initial_params)

    @property
    def params(self) -> list[Tensor]:
        """Current fast weights, in `module.parameters()` order (still valid after the block)."""
        return list(self._params)

    def step(
        self,
        loss: Tensor,
        *,
        grad_callback: Callable[[list], list] | None = None,
        retain_graph: bool | None = None,
    ) -> list[Tensor]:
        """One differentiable optimizer step on `loss` (a function of `self.fmodel`); returns the new fast weights.

        grad_callback: maps the list of gradients (module.parameters() order, None where unused)
        before the update, e.g. for clipping. retain_graph: defaults to `not first_order`.
        """
        if self._written:
            raise UnrollError("unroll: step() after write_back(); open a new unroll")
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise UnrollError("unroll: step() needs a scalar loss tensor")
        if not loss.requires_grad:
            raise UnrollError("unroll: step() loss does not depend on the fast weights (no grad_fn)")
        new = self.diffopt.step(loss, self._params, grad_callback=grad_callback, retain_graph=retain_graph)
        self._params = list(new)
        self.num_steps += 1
        if hasattr(self.optimizer.step, "_wrapped_by_lr_sched"):
            self.optimizer._opt_called = True  # an LR scheduler counts this as a real optimizer step
        return new

    @torch.no_grad()
    def write_back(self) -> None:
        """Copy the final fast weights (detached, in place) and optimizer state into the real module/optimizer.

        Afterwards the module and optimizer are exactly as if `optimizer.step()` had made the
        `num_steps` steps. Call it after the last backward through the unroll.
        """
        if self._written:
            raise UnrollError("unroll: write_back() called twice")
        self._written = True
        for p, fast in zip(self.initial_params, self._params, strict=True):
            if fast is not p:
                p.copy_(fast)
        opt = self.optimizer
        for gi, group in enumerate(opt.param_groups):
            for pi, p in enumerate(group["params"]):
                state = self.diffopt.state[gi].get(pi)
                if state:
                    opt.state[p] = self.diffopt._export_state(state, opt.state.get(p, {}), p, group)


@contextmanager
def unroll(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    first_order: bool = False,
    math_sdpa: bool = True,
) -> Iterator[Unroll]:
    """Unroll optimizer steps of `module` differentiably; see the module docstring.

    module: any nn.Module (every method works on the yielded `u.fmodel`).
    optimizer: torch.optim.SGD, Adam or AdamW over (a subset of) the module's parameters; others
        raise UnrollError. Params not in the optimizer, or with requires_grad=False, stay fixed.
    first_order: inner gradients without create_graph (no second-order terms).
    math_sdpa: run the whole block under the math SDPA kernel (needed for double backward
        through attention); the fused kernels are restored on exit.
    """
    if not isinstance(module, nn.Module):
        raise UnrollError(f"unroll: expected an nn.Module, got {type(module).__name__}")
    check_optimizer(optimizer, module)
    initial = list(module.parameters())
    with ExitStack() as stack:
        if math_sdpa:
            stack.enter_context(math_attention())
        stack.enter_context(uncompiled(module))  # compiled blocks: no double backward, and blind to fmodel
        fmodel = stack.enter_context(_functional(module))
        diff_cls = {torch.optim.SGD: DifferentiableSGD, torch.optim.Adam: DifferentiableAdam}.get(
            type(optimizer), DifferentiableAdamW
        )
        diffopt = diff_cls(optimizer, initial, fmodel=fmodel, track_higher_grads=not first_order)
        yield Unroll(module, optimizer, fmodel, diffopt, first_order, initial)
