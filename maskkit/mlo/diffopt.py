"""Differentiable re-implementations of torch.optim SGD, Adam and AdamW on `higher`, and what they support.

Each is a `higher.optim.DifferentiableOptimizer` whose update is torch.optim's single-tensor op
sequence, out of place, so given the same gradients the fast weights and state equal
`optimizer.step()`'s bit for bit; params and state are referenced, never copied, and the
hyperparameters are read from the real optimizer at every step (schedulers work).
`check_optimizer` says whether an optimizer can be unrolled (UnrollError otherwise).

Importing this module registers the classes with `higher.optim.register_optim` for
torch.optim.SGD, Adam and AdamW (higher 0.2.1 has no AdamW and treats
Adam(decoupled_weight_decay=True) as coupled L2).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import higher
import higher.optim
import higher.patch
import torch
from torch import Tensor, nn

__all__ = [
    "UnrollError",
    "check_optimizer",
    "DifferentiableSGD",
    "DifferentiableAdam",
    "DifferentiableAdamW",
]


class UnrollError(ValueError):
    """An optimizer, setting or call order that the differentiable unroll cannot honour."""


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
