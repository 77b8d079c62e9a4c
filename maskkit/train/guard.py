"""The non-finite guard: which level of a step went non-finite, the one-line error, and fault injection.

A non-finite loss, hypergradient, gradient or weight stops the run before anything is saved
(`NonFiniteError`), or with --skip-nonfinite the step is undone and counted. Tests poison batches
through `MASKKIT_INJECT_NAN` ("STREAM:STEP[,...]").
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

#: fault injection for tests: "STREAM:STEP[,STREAM:STEP...]" (STREAM train | labeled | val) fills the
#: batch that STREAM yields at training step STEP (1-based) with NaN pixels; "train:STEP/M" only the
#: M-th (1-based) micro-batch of that step under --accum-iter.
INJECT_NAN_ENV = "MASKKIT_INJECT_NAN"
STREAMS = ("train", "labeled", "val")
#: metric key -> the level it measures, in the order they are checked
LEVELS = (("loss", "pretrain loss"), ("head_loss", "head (finetune) loss"), ("val_loss", "validation loss"),
          ("masker_grad_norm", "masker hypergradient"))  # fmt: skip


class NonFiniteError(FloatingPointError):
    """A non-finite loss, hypergradient or weight: the run stops before anything is saved."""


def parse_inject_nan(text: str | None) -> dict[str, set[Any]]:
    """`MASKKIT_INJECT_NAN`'s value -> {stream: {step, or (step, micro-batch)}}; ValueError on a malformed entry."""
    faults: dict[str, set[Any]] = {}
    for item in (text or "").replace(" ", "").split(","):
        if not item:
            continue
        stream, _, when = item.partition(":")
        step, slash, micro = when.partition("/")
        numbers = [step, micro] if slash else [step]
        if stream not in STREAMS or not all(n.isdigit() and int(n) >= 1 for n in numbers) or (slash and stream != "train"):
            raise ValueError(f"{INJECT_NAN_ENV} entries are STREAM:STEP with STREAM in {STREAMS}, or train:STEP/M, "
                             f"got {item!r}")  # fmt: skip
        faults.setdefault(stream, set()).add((int(step), int(micro)) if slash else int(step))
    return faults


def nonfinite_metric(metrics: dict[str, float]) -> str | None:
    """The first level (LEVELS) whose metric is not finite, or None."""
    for key, level in LEVELS:
        if key in metrics and not math.isfinite(metrics[key]):
            return level
    return None


def nonfinite_weights(modules: dict[str, nn.Module | None]) -> str | None:
    """'<name> weights' of the first module with a non-finite parameter, or None."""
    for name, module in modules.items():
        params = [p.detach() for p in module.parameters()] if module is not None else []
        if params and not bool(torch.isfinite(torch.stack(torch._foreach_norm(params))).all()):
            return f"{name} weights"
    return None


def nonfinite_grads(optimizer: torch.optim.Optimizer) -> str | None:
    """'MAE gradient' if a gradient of `optimizer`'s parameters is not finite, else None."""
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if grads and not bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()):
        return "MAE gradient"
    return None


def nonfinite_error(level: str | None, metrics: dict[str, float], step: int, rank: int | None) -> NonFiniteError:
    """The error for `level` at (1-based) `step`; `rank` under torchrun (None: one process)."""
    value = {v: metrics.get(k) for k, v in LEVELS}.get(level or "")
    shown = f" ({value})" if value is not None else ""
    where = f" on rank {rank}" if rank is not None and level else ""
    return NonFiniteError(
        f"non-finite {level or 'number on another rank'}{shown}{where} at step {step}; "
        "nothing from this step was saved (--skip-nonfinite skips such batches instead)"
    )
