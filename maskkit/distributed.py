"""Process-group helpers for data-parallel pretraining under `torchrun` (gloo on CPU, nccl on CUDA).

`init_from_env()` joins the group that torchrun describes in its environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and returns a `DistContext`; outside torchrun it returns
the single-process context and touches nothing. Gradients are averaged by a step pre-hook on
each optimizer (`average_gradients_on_step`), so any code that calls `optimizer.step()` (the
MAE, head and masker steps of the MLO engine included) becomes data parallel unchanged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: rank in 0..world_size-1, its local rank, the backend, and how the
    processes are laid out (`nodes` launchers of `local_world_size` processes each; torchrun's
    GROUP_WORLD_SIZE and LOCAL_WORLD_SIZE)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    nodes: int = 1
    local_world_size: int = 0  # 0: all of world_size on this node

    @property
    def per_node(self) -> int:
        """Processes on each node (torchrun's --nproc_per_node)."""
        return self.local_world_size or self.world_size

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files and prints."""
        return self.rank == 0


SINGLE = DistContext()


def launched_by_torchrun() -> bool:
    """Whether the environment describes a process group (torchrun sets WORLD_SIZE and RANK)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init_from_env(device_type: str = "cpu") -> DistContext:
    """Join torchrun's process group (gloo on CPU, nccl on CUDA); SINGLE when not under torchrun."""
    if not launched_by_torchrun():
        return SINGLE
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        nodes = int(os.environ.get("GROUP_WORLD_SIZE", max(world // max(per_node, 1), 1)))
    except ValueError:
        raise ValueError("RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE and GROUP_WORLD_SIZE must be integers "
                         "(as torchrun sets them)") from None
    if world == 1:
        return DistContext(0, 1, local, None)
    backend = "nccl" if device_type == "cuda" else "gloo"
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
    return DistContext(rank, world, local, backend, nodes=nodes, local_world_size=per_node)


def cleanup(ctx: DistContext) -> None:
    """Leave the process group (no-op for a single process)."""
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def all_reduce_mean_(tensors: list[Tensor], ctx: DistContext) -> None:
    """Average `tensors` across ranks in place (one flat all-reduce per dtype)."""
    if not ctx.enabled or not tensors:
        return
    by_dtype: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault((t.dtype, t.device), []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(ctx.world_size)
        offset = 0
        for t in group:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def any_flag(flag: bool, ctx: DistContext) -> bool:
    """True on every rank if `flag` is True on any rank (e.g. a non-finite loss somewhere)."""
    if not ctx.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=_collective_device(ctx))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def max_int(value: int, ctx: DistContext) -> int:
    """The largest of every rank's `value`, on every rank (e.g. the signal some rank received)."""
    if not ctx.enabled:
        return value
    t = torch.tensor([int(value)], dtype=torch.int64, device=_collective_device(ctx))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def mean_floats(values: dict[str, float], ctx: DistContext) -> dict[str, float]:
    """Average a dict of floats with the same keys on every rank (e.g. per-step metrics)."""
    if not ctx.enabled or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=_collective_device(ctx))
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return {k: float(v) / ctx.world_size for k, v in zip(keys, t.tolist(), strict=False)}


def broadcast_module_(module: nn.Module, ctx: DistContext, src: int = 0) -> None:
    """Copy rank `src`'s parameters and buffers into every rank's `module`."""
    if not ctx.enabled:
        return
    for t in list(module.parameters()) + list(module.buffers()):
        with torch.no_grad():
            dist.broadcast(t.data, src=src)


def broadcast_object(obj: Any, ctx: DistContext, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank (picklable values produced by this program, never file contents)."""
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not ctx.enabled:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def differentiable_mean(ctx: DistContext) -> Any:
    """A gradient map for unrolled steps: the mean across ranks, differentiable (second order).

    Returns a function list[Tensor | None] -> list[Tensor | None] (None entries kept; every rank
    must have the same None pattern), or None for a single process.
    """
    if not ctx.enabled:
        return None
    from torch.distributed.nn.functional import all_reduce

    def mean(grads: list[Tensor | None]) -> list[Tensor | None]:
        present = [g for g in grads if g is not None]
        if not present:
            return grads
        flat = all_reduce(torch.cat([g.reshape(-1) for g in present]), op=dist.ReduceOp.SUM) / ctx.world_size
        out, offset = [], 0
        for g in grads:
            if g is None:
                out.append(None)
            else:
                out.append(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
        return out

    return mean


def average_gradients_on_step(optimizer: torch.optim.Optimizer, ctx: DistContext) -> Any:
    """Register a step pre-hook that averages the .grad of `optimizer`'s parameters across ranks.

    Every rank must step the same optimizer at the same time with the same parameters holding a
    gradient (true for the same model and code on every rank). Returns the hook handle (None
    for a single process).
    """
    if not ctx.enabled:
        return None

    def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
        all_reduce_mean_(grads, ctx)

    return optimizer.register_step_pre_hook(hook)


def _collective_device(ctx: DistContext) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if ctx.backend == "nccl" else torch.device("cpu")
