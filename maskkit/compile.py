"""Optional `torch.compile` of an MAE's transformer blocks, kept out of the differentiable unroll.

Each block is compiled in place (`nn.Module.compile`), so parameter names, state dicts and
checkpoints are unchanged. The exact unroll (`maskkit.mlo.unroll`) runs every module eagerly inside
`uncompiled`: compiled graphs have no double backward, and a compiled block would read the
module's own parameters instead of the functional ones `higher` substitutes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

#: `--compile` values other than a backend name
NO_COMPILE = "none"


def compile_backends() -> list[str]:
    """The torch.compile backends this installation has (debug ones such as eager and aot_eager included)."""
    return sorted(torch.compiler.list_backends(exclude_tags=()))


def check_backend(backend: str) -> str:
    """`backend` if it is "none" or a torch.compile backend, else a one-line ValueError."""
    if backend != NO_COMPILE and backend not in compile_backends():
        raise ValueError(f"--compile must be none or a torch.compile backend ({', '.join(compile_backends())}), "
                         f"got {backend!r}")
    return backend


def transformer_blocks(mae: nn.Module) -> list[nn.Module]:
    """The MAE's encoder and decoder blocks, from its optional `transformer_blocks()` method."""
    blocks = getattr(mae, "transformer_blocks", None)
    if not callable(blocks):
        raise ValueError(f"--compile needs an MAE with transformer_blocks() (every maskkit adapter has it); "
                         f"{type(mae).__name__} has none")
    return list(blocks())


def compile_blocks(mae: nn.Module, backend: str = "inductor") -> int:
    """Compile every transformer block of `mae` in place with `backend`; returns how many ("none": 0)."""
    if check_backend(backend) == NO_COMPILE:
        return 0
    blocks = transformer_blocks(mae)
    for block in blocks:
        block.compile(backend=backend)
    return len(blocks)


def is_compiled(module: nn.Module) -> bool:
    """Whether any submodule of `module` runs a compiled forward."""
    return any(getattr(m, "_compiled_call_impl", None) is not None for m in module.modules())


@contextmanager
def uncompiled(module: nn.Module) -> Iterator[None]:
    """Run every submodule of `module` eagerly inside the block; their compiled forwards return on exit."""
    saved = [(m, m._compiled_call_impl) for m in module.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    for m, _ in saved:
        m._compiled_call_impl = None
    try:
        yield
    finally:
        for m, compiled in saved:
            m._compiled_call_impl = compiled
