"""The `unroll` hypergradient: exact reverse mode through the cycle's last K pretrain steps and the head step.

The last `steps` (K) pretrain steps of a masker cycle and the head step run differentiably
through `maskkit.mlo.unroll` (higher), then dL3/dT = autograd.grad(L3, T); the unrolled weights
are written back, so the unrolled steps are the real steps (`UnrollWindow`). While the window
is open (from the cycle's K-th last step to its masker step) the engine cannot be checkpointed.
Gradient clipping is differentiated exactly. Not differentiated: the masker reads the MAE's
patch tokens detached, so for K >= 2 the higher-order path T -> W_k -> tokens -> masker input
-> p is left out.

`higher` is imported only when a window opens or an optimizer is checked, not with this module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from maskkit.mae import MAEOutput, mae_forward
from maskkit.mlo.base import Batch, Hypergradient, register_hypergrad
from maskkit.mlo.steps import FinetuneStep, PretrainStep, as_batch, masker_plan, trainable, zeros_for_none
from maskkit.registry import Card

if TYPE_CHECKING:
    from maskkit.mlo.config import MLOConfig
    from maskkit.mlo.engine import MLOEngine

_FUSED_AND_MATH = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                   SDPBackend.MATH]


@register_hypergrad("unroll", card=Card(
    idea="exact reverse-mode hypergradient through K differentiable pretrain steps and the head step (higher)",
    paper="Maclaurin et al., ICML 2015; Franceschi et al., ICML 2017; Guo et al., TMLR 2025 (MLO-MAE)",
    allowed={"steps": "int >= 1, <= masker_every", "first_order": "true | false"},
))  # fmt: skip
class UnrollHypergradient(Hypergradient):
    """unroll: the validation loss differentiated through the cycle's last `steps` pretrain steps.

    Args:
        steps: K, pretrain steps unrolled (<= masker_every: each is unrolled at most once). Default 1.
        first_order: unroll without second-order terms. Default False.
    """

    config_fields = {"steps": "unroll_steps", "first_order": "first_order"}

    def __init__(self, steps: int = 1, first_order: bool = False) -> None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"{self.label('steps')} must be a positive integer, got {steps!r}")
        if not isinstance(first_order, bool):
            raise ValueError(f"{self.label('first_order')} must be True or False, got {first_order!r}")
        self.steps, self.first_order = steps, first_order
        self._window: UnrollWindow | None = None

    def check_config(self, config: MLOConfig) -> None:
        if self.steps > config.masker_every:
            raise ValueError(
                f"{self.label('steps')} ({self.steps}) must not exceed masker_every ({config.masker_every}): "
                "each pretrain step is unrolled at most once"
            )

    def check_optimizers(self, mae_optimizer: torch.optim.Optimizer, head_optimizer: torch.optim.Optimizer) -> None:
        from maskkit.mlo.unroll import check_optimizer

        for opt in (mae_optimizer, head_optimizer):
            check_optimizer(opt)  # UnrollError (a ValueError) naming the optimizer

    def in_window(self, engine: MLOEngine, step: int) -> bool:
        """Whether iteration `step` is one of the K last of a cycle that ends with a masker update."""
        every = engine.config.masker_every
        return step % every >= every - self.steps and engine.masker_learning(step)

    def pretrain(self, engine: MLOEngine, images: Tensor, *, learning: bool,
                 progress: float | None) -> PretrainStep:
        """Inside the window a differentiable step (opening the window at its first), else the real one."""
        if not self.in_window(engine, engine.step_count):
            return engine.pretrain(images, keep_params=False, progress=progress)
        if self._window is None:
            self._window = UnrollWindow(engine.mae, engine.masker, engine.mae_optimizer, first_order=self.first_order,
                                        grad_sync=engine.grad_sync)
        cfg = engine.config
        out = self._window.pretrain_step(images, ratio=cfg.ratio, generator=engine.generator, grad_clip=cfg.grad_clip,
                                         progress=progress)
        return PretrainStep(images=images, plan=out.plan, loss=out.loss.detach(), params_before=None,
                            per_patch=out.per_patch.detach())

    def masker_grads(self, engine: MLOEngine, step: PretrainStep, train_batch: Batch,
                     val_batch: Batch) -> tuple[list[Tensor], FinetuneStep]:
        if self._window is None:
            raise RuntimeError("unroll: no window is open at this masker step")
        window, self._window = self._window, None
        return window.finish(engine.head, engine.head_optimizer, train_batch, val_batch,
                             head_grad_clip=engine.config.head_grad_clip)

    def window_steps(self) -> int:
        return self.steps

    def can_checkpoint(self, engine: MLOEngine) -> bool:
        """At cycle boundaries only: no window is open there, whatever K and the masker warm-up."""
        return engine.step_count % engine.config.masker_every == 0

    def window_open(self) -> bool:
        """Whether a window is open (between its first pretrain step and the masker step)."""
        return self._window is not None

    def reset(self) -> None:
        if self._window is not None:
            window, self._window = self._window, None
            window.close()


GradMap = Any  # Callable[[list[Tensor | None]], list[Tensor | None]]


def _then(first: GradMap | None, second: GradMap | None) -> GradMap | None:
    """The composition second(first(grads)) of two optional gradient maps."""
    if first is None or second is None:
        return first or second
    return lambda grads: second(first(grads))


def _clipper(max_norm: float):
    """clip_grad_norm_ as a differentiable map of the gradient list (None entries kept)."""

    def clip(grads: list[Tensor | None]) -> list[Tensor | None]:
        present = [g for g in grads if g is not None]
        if not present:
            return grads
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in present]))
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        return [None if g is None else g * coef for g in grads]

    return clip


class UnrollWindow:
    """Exact hypergradient: K differentiable pretrain steps, then the head step, then dL3/dT.

    window = UnrollWindow(mae, masker, mae_optimizer)
    window.pretrain_step(images)        # K times (each a real step once written back)
    grads, result = window.finish(head, head_optimizer, train_batch, val_batch)
    """

    def __init__(self, mae: nn.Module, masker: nn.Module, mae_optimizer: torch.optim.Optimizer, *,
                 first_order: bool = False, grad_sync: GradMap | None = None) -> None:
        """grad_sync: a differentiable map applied to every unrolled step's gradients after
        clipping, before the update (e.g. the mean across data-parallel ranks, as the real steps'
        optimizer pre-hooks do)."""
        from maskkit.mlo.unroll import unroll

        self.mae, self.masker, self.first_order, self.grad_sync = mae, masker, first_order, grad_sync
        self._ctx = unroll(mae, mae_optimizer, first_order=first_order)
        self.u = self._ctx.__enter__()
        self.steps = 0
        self._open = True

    def pretrain_step(self, images: Tensor, *, ratio: float | None = None,
                      generator: torch.Generator | None = None, grad_clip: float | None = None,
                      progress: float | None = None) -> MAEOutput:
        """One differentiable step of the fast MAE weights; the loss keeps its graph to the masker.

        grad_clip: clip the total gradient norm as `clip_grad_norm_` does (differentiably).
        progress: how far training has come, in [0, 1], for the masker's schedules.
        """
        self._check_open()
        tokens, plan = masker_plan(self.u.fmodel, self.masker, images, ratio=ratio, generator=generator,
                                   progress=progress)
        out = mae_forward(self.u.fmodel, images, plan, tokens=tokens)
        self.u.step(out.loss, grad_callback=_then(None if grad_clip is None else _clipper(grad_clip), self.grad_sync))
        self.steps += 1
        return out

    def finish(self, head: nn.Module, head_optimizer: torch.optim.Optimizer, train_batch: Any,
               val_batch: Any, *, head_grad_clip: float | None = None) -> tuple[list[Tensor], FinetuneStep]:
        """Unrolled head step and validation loss; returns dL3/dT and writes both levels back."""
        from maskkit.mlo.unroll import unroll

        self._check_open()
        x_tr, y_tr = as_batch(train_batch, "train_batch")
        x_va, y_va = as_batch(val_batch, "val_batch")
        n_tr = x_tr.shape[0]
        masker_params = trainable(self.masker)
        try:
            # the features' graph is differentiated only once (L3 -> W'), so the fused attention
            # kernels may run here; only the unrolled steps' gradients need the math kernel
            with sdpa_kernel(_FUSED_AND_MATH):
                feats = self.u.fmodel.features(torch.cat([x_tr, x_va]))  # [B_tr + B_va, D] at W'
            with unroll(head, head_optimizer, first_order=self.first_order, math_sdpa=False) as uh:
                head_loss = F.cross_entropy(uh.fmodel(feats[:n_tr]), y_tr)
                uh.step(head_loss, grad_callback=_then(
                    None if head_grad_clip is None else _clipper(head_grad_clip), self.grad_sync))
                logits_va = uh.fmodel(feats[n_tr:])  # at C'
                val_loss = F.cross_entropy(logits_va, y_va)
                grads = zeros_for_none(
                    torch.autograd.grad(val_loss, masker_params, allow_unused=True), masker_params
                )
                uh.write_back()
            self.u.write_back()
        finally:
            self.close()
        result = FinetuneStep(
            head_loss=head_loss.detach(),
            val_loss=val_loss.detach(),
            val_acc=(logits_va.argmax(-1) == y_va).float().mean().detach(),
            vector=None,
        )
        return grads, result

    def close(self) -> None:
        """Leave the unroll context (without writing back if `finish` was not reached)."""
        if self._open:
            self._open = False
            self._ctx.__exit__(None, None, None)

    def _check_open(self) -> None:
        if not self._open:
            raise RuntimeError("this UnrollWindow is finished; open a new one")

