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
- Importing this module registers the classes below with `higher.optim.register_optim` for
  torch.optim.SGD, Adam and AdamW (higher 0.2.1 has no AdamW and treats
  Adam(decoupled_weight_decay=True) as coupled L2).
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import higher
import higher.optim
import higher.patch
import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from maskkit.compile import uncompiled

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


class UnrollError(ValueError):
    """An optimizer, setting or call order that the differentiable unroll cannot honour."""


@contextmanager
def math_attention() -> Iterator[None]:
    """Run scaled_dot_product_attention with the math kernel, which has a double backward.

    The fused CPU/CUDA kernels (flash, memory-efficient) have no derivative of their backward,
    so any backward through a `create_graph` inner step must also run inside this context.
    """
    with sdpa_kernel(SDPBackend.MATH):
        yield


# ---------------------------------------------------------------------------------------------
# Which optimizers and settings are supported
# ---------------------------------------------------------------------------------------------

_SGD_KEYS = {"lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize"}
_ADAM_KEYS = {"lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "decoupled_weight_decay"}


def _scalar(name: str, value: Any, group_idx: int) -> float:
    """A hyperparameter as a Python float; tensors that need grad are refused."""
    if isinstance(value, Tensor):
        if value.requires_grad:
            raise UnrollError(
                f"unroll: param group {group_idx} has a tensor '{name}' that requires grad; not supported"
            )
        if value.numel() != 1:
            raise UnrollError(
                f"unroll: param group {group_idx} '{name}' must be a scalar, got shape {tuple(value.shape)}"
            )
        return float(value.item())
    return value


def check_optimizer(optimizer: torch.optim.Optimizer, module: nn.Module | None = None) -> str:
    """Return 'sgd', 'adam' or 'adamw' if `unroll` can differentiate `optimizer`, else raise UnrollError.

    Adam(decoupled_weight_decay=True) counts as 'adamw' (it is AdamW in torch >= 2.5). Accepted
    as is: foreach, fused, capturable, differentiable (they change how torch computes the same
    update) and maximize. Refused: other classes (subclasses too), tensor hyperparameters that
    require grad, complex or sparse params, AMP grad_scale/found_inf. With `module`, also checks
    that every optimized parameter belongs to it.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise UnrollError(f"unroll: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
    cls = type(optimizer)
    name = f"{cls.__module__}.{cls.__qualname__}"
    if cls is torch.optim.SGD:
        kind, keys = "sgd", _SGD_KEYS
    elif cls in (torch.optim.Adam, torch.optim.AdamW):
        kind, keys = "adam", _ADAM_KEYS
    else:
        raise UnrollError(
            f"unroll: optimizer {name} is not supported (differentiable unroll supports "
            "torch.optim.SGD, torch.optim.Adam and torch.optim.AdamW)"
        )
    for gi, group in enumerate(optimizer.param_groups):
        for key in keys:
            if key in group:
                value = group[key]
                for v in value if isinstance(value, (tuple, list)) else (value,):
                    _scalar(key, v, gi)
        for p in group["params"]:
            if p.is_complex():
                raise UnrollError(f"unroll: {name} param group {gi} holds a complex parameter; not supported")
            if p.is_sparse:
                raise UnrollError(f"unroll: {name} param group {gi} holds a sparse parameter; not supported")
    if (
        getattr(optimizer, "grad_scale", None) is not None
        or getattr(optimizer, "found_inf", None) is not None
    ):
        raise UnrollError(f"unroll: {name} carries AMP grad_scale/found_inf; unscale before unrolling")
    if module is not None:
        own = {id(p) for p in module.parameters()}
        for gi, group in enumerate(optimizer.param_groups):
            if any(id(p) not in own for p in group["params"]):
                raise UnrollError(
                    f"unroll: {name} param group {gi} holds a parameter that is not in the module"
                )
    if kind == "adam" and any(g.get("decoupled_weight_decay", False) for g in optimizer.param_groups):
        kind = (
            "adamw" if all(g.get("decoupled_weight_decay", False) for g in optimizer.param_groups) else "adam"
        )
    return kind


# ---------------------------------------------------------------------------------------------
# Differentiable optimizers (higher.optim.DifferentiableOptimizer subclasses)
# ---------------------------------------------------------------------------------------------


def _sqrt(v: Tensor) -> Tensor:
    """sqrt with a zero (not NaN) gradient where v == 0 (parameters whose gradient was always 0)."""
    if not v.requires_grad:
        return v.sqrt()
    zero = v == 0
    return torch.where(zero, 0.0, torch.where(zero, 1.0, v).sqrt())


class _TorchExactOptimizer(higher.optim.DifferentiableOptimizer):
    """Shared set-up: no copies of params or state, live hyperparameters, first-order option.

    Differs from higher's base class in three ways: param groups and state are referenced, not
    deep-copied (the update is out of place, so the real optimizer's tensors are never touched);
    hyperparameters are read from the real optimizer's groups at every step (schedulers work);
    `track_higher_grads=False` means first order (constant inner gradients, graph kept through
    the update) rather than higher's "detach everything".
    """

    def __init__(
        self,
        other: torch.optim.Optimizer,
        reference_params: Sequence[Tensor],
        fmodel: higher.patch._MonkeyPatchBase | None = None,
        device: torch.device | None = None,
        override: dict | None = None,
        grad_callback: Callable[[list], list] | None = None,
        track_higher_grads: bool = True,
        **kwargs: Any,
    ) -> None:
        if override is not None:
            raise UnrollError(
                "unroll: optimizer 'override' is not supported; set values in optimizer.param_groups"
            )
        if device is not None:
            raise UnrollError(
                "unroll: 'device' casting is not supported; move the module and optimizer first"
            )
        check_optimizer(other)
        position = {id(p): i for i, p in enumerate(reference_params)}
        self._source = other
        self.param_groups = [{"params": [None] * len(g["params"])} for g in other.param_groups]
        self._group_to_param_list: list[list[int]] = []
        self.state: list[dict[int, dict[str, Any]]] = []
        for gi, group in enumerate(other.param_groups):
            mapping, states = [], {}
            for pi, p in enumerate(group["params"]):
                if id(p) not in position:
                    raise UnrollError(f"unroll: param group {gi} holds a parameter that is not in the module")
                mapping.append(position[id(p)])
                if other.state.get(p):
                    states[pi] = self._import_state(other.state[p])
            self._group_to_param_list.append(mapping)
            self.state.append(states)
        self._fmodel = fmodel
        self._grad_callback = grad_callback
        self._track_higher_grads = track_higher_grads

    # -- state conversion (references, never copies) --
    def _import_state(self, state: dict[str, Any]) -> dict[str, Any]:
        out = dict(state)
        if "step" in out:
            out["step"] = float(out["step"])
        return out

    def _export_state(
        self, state: dict[str, Any], old: dict[str, Any], param: Tensor, group: dict
    ) -> dict[str, Any]:
        out = {k: (v.detach() if isinstance(v, Tensor) else v) for k, v in state.items()}
        if "step" in out:
            ref = old.get("step")
            if isinstance(ref, Tensor):
                dtype, device = ref.dtype, ref.device
            elif group.get("capturable") or group.get("fused"):
                dtype = torch.float32 if group.get("fused") else _scalar_dtype()
                device = param.device
            else:
                dtype, device = _scalar_dtype(), torch.device("cpu")
            out["step"] = torch.tensor(out["step"], dtype=dtype, device=device)
        return out

    def hyper(self, group_idx: int) -> dict[str, Any]:
        """Current hyperparameters of a group, read from the real optimizer, as Python scalars."""
        group = self._source.param_groups[group_idx]
        out = {}
        for k, v in group.items():
            if k == "params":
                continue
            if isinstance(v, (tuple, list)):
                out[k] = type(v)(_scalar(k, x, group_idx) for x in v)
            else:
                out[k] = _scalar(k, v, group_idx)
        return out

    def step(
        self,
        loss: Tensor,
        params: Sequence[Tensor] | None = None,
        override: dict | None = None,
        grad_callback: Callable[[list], list] | None = None,
        retain_graph: bool | None = None,
        **kwargs: Any,
    ) -> list[Tensor]:
        """One differentiable step on `loss`; returns (and installs in fmodel) the new fast weights."""
        if override is not None:
            raise UnrollError("unroll: optimizer 'override' is not supported")
        if params is None:
            if self._fmodel is None or self._fmodel.fast_params is None:
                raise UnrollError("unroll: step needs params when no functional model is attached")
            params = self._fmodel.fast_params
        params = list(params)
        # Gradients only for optimized params that require grad (frozen or foreign ones stay fixed).
        wanted = sorted({i for m in self._group_to_param_list for i in m if params[i].requires_grad})
        create_graph = self._track_higher_grads
        grads: list[Tensor | None] = [None] * len(params)
        if wanted:
            got = torch.autograd.grad(
                loss,
                [params[i] for i in wanted],
                create_graph=create_graph,
                retain_graph=create_graph if retain_graph is None else retain_graph,
                allow_unused=True,
            )
            for i, g in zip(wanted, got, strict=True):
                grads[i] = g
        callback = grad_callback if grad_callback is not None else self._grad_callback
        if callback is not None:
            grads = list(callback(grads))
        grouped = []
        for group, mapping in zip(self.param_groups, self._group_to_param_list, strict=True):
            group["params"] = [params[i] for i in mapping]
            grouped.append([grads[i] for i in mapping])
        self._update(grouped)
        new_params = params[:]
        for group, mapping in zip(self.param_groups, self._group_to_param_list, strict=True):
            for p, i in zip(group["params"], mapping, strict=True):
                new_params[i] = p
        if self._fmodel is not None:
            self._fmodel.update_params(new_params)
            self._fmodel._refill_params_box(None)  # higher keeps a stale box for direct submodule calls
        return new_params


def _scalar_dtype() -> torch.dtype:
    """torch.optim's dtype for a non-fused `step` tensor."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class DifferentiableSGD(_TorchExactOptimizer):
    """torch.optim.SGD (momentum, dampening, nesterov, weight decay, maximize), out of place."""

    def _update(self, grouped_grads: list[list[Tensor | None]], **kwargs: Any) -> None:
        for gi, (group, grads) in enumerate(zip(self.param_groups, grouped_grads, strict=True)):
            h = self.hyper(gi)
            lr, wd, momentum = h["lr"], h["weight_decay"], h["momentum"]
            for pi, (p, g) in enumerate(zip(group["params"], grads, strict=True)):
                if g is None:  # torch skips params whose .grad is None
                    continue
                if h.get("maximize", False):
                    g = -g
                if wd != 0:
                    g = torch.add(g, p, alpha=wd)
                if momentum != 0:
                    state = self.state[gi].setdefault(pi, {})
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = g
                    else:
                        buf = torch.add(buf * momentum, g, alpha=1 - h["dampening"])
                    state["momentum_buffer"] = buf
                    g = torch.add(g, buf, alpha=momentum) if h["nesterov"] else buf
                group["params"][pi] = torch.add(p, g, alpha=-lr)


class DifferentiableAdam(_TorchExactOptimizer):
    """torch.optim.Adam, including amsgrad, maximize and decoupled_weight_decay (= AdamW), out of place."""

    _decoupled: bool | None = None  # None: follow each group's 'decoupled_weight_decay'

    def _update(self, grouped_grads: list[list[Tensor | None]], **kwargs: Any) -> None:
        for gi, (group, grads) in enumerate(zip(self.param_groups, grouped_grads, strict=True)):
            h = self.hyper(gi)
            lr, wd, eps, amsgrad = h["lr"], h["weight_decay"], h["eps"], h["amsgrad"]
            beta1, beta2 = h["betas"]
            decoupled = h.get("decoupled_weight_decay", False) if self._decoupled is None else self._decoupled
            for pi, (p, g) in enumerate(zip(group["params"], grads, strict=True)):
                if g is None:
                    continue
                state = self.state[gi].setdefault(pi, {})
                if not state:
                    state["step"] = 0.0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    if amsgrad:
                        state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if h.get("maximize", False):
                    g = -g
                step = state["step"] = state["step"] + 1.0
                if wd != 0:
                    if decoupled:
                        p = p * (1 - lr * wd)
                    else:
                        g = torch.add(g, p, alpha=wd)
                exp_avg = state["exp_avg"] = torch.lerp(state["exp_avg"], g, 1 - beta1)
                exp_avg_sq = state["exp_avg_sq"] = torch.addcmul(
                    state["exp_avg_sq"] * beta2, g, g, value=1 - beta2
                )
                bias_correction1 = 1 - beta1**step
                bias_correction2 = 1 - beta2**step
                step_size = lr / bias_correction1
                if amsgrad:
                    exp_avg_sq = state["max_exp_avg_sq"] = torch.maximum(state["max_exp_avg_sq"], exp_avg_sq)
                denom = _sqrt(exp_avg_sq) / bias_correction2**0.5 + eps
                group["params"][pi] = torch.addcdiv(p, exp_avg, denom, value=-step_size)


class DifferentiableAdamW(DifferentiableAdam):
    """torch.optim.AdamW: p <- p * (1 - lr * wd), then the Adam update (decoupled weight decay)."""

    _decoupled = True


# Make higher.get_diff_optim / innerloop_ctx use these too: higher 0.2.1 has no AdamW, and its
# Adam ignores decoupled_weight_decay (coupled L2) and places eps before bias correction.
higher.optim.register_optim(torch.optim.SGD, DifferentiableSGD)
higher.optim.register_optim(torch.optim.Adam, DifferentiableAdam)
higher.optim.register_optim(torch.optim.AdamW, DifferentiableAdamW)


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
