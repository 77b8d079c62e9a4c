"""Multi-level optimisation of the learned masker (MLO-MAE): the engine and its hypergradient methods.

- `engine`: `MLOEngine` (the three levels, one call per iteration), `default_optimizers`, `prior_kl`
- `config`: `MLOConfig` (schedule, level 2, the method and its options), `LEVEL2S`, `AMP_MODES`
- `base`: the `Hypergradient` protocol, the `HYPERGRADS` registry, `register_hypergrad`
- `darts`, `unrolled`: the built-in methods `darts` (finite differences) and `unroll` (exact)
- `steps`: the levels' real steps (`pretrain_step`, `finetune_step`, `ridge_step`); `derivative`: D = dU/dg
  (`update_derivative`); with `darts_masker_grad` the parts a new method is built from
- `unroll`, `diffopt`: the differentiable unroll of optimizer steps on `higher` (imported only when used)
"""

from maskkit.mlo.base import HYPERGRADS, Hypergradient, register_hypergrad
from maskkit.mlo.config import AMP_MODES, LEVEL2S, MLOConfig
from maskkit.mlo.darts import DARTS_FDS, DARTS_SCALES, DartsHypergradient, darts_masker_grad
from maskkit.mlo.derivative import optimizer_params, update_derivative
from maskkit.mlo.engine import (
    DIAGNOSTIC_KEYS,
    MASKER_STEP_KEYS,
    PRESETS,
    STEP_KEYS,
    MLOEngine,
    default_optimizers,
    prior_kl,
)
from maskkit.mlo.steps import (
    DARTS_PATHS,
    FinetuneStep,
    PretrainStep,
    finetune_step,
    pretrain_step,
    ridge_step,
    trainable,
)
from maskkit.mlo.unrolled import UnrollHypergradient, UnrollWindow

__all__ = [
    "AMP_MODES",
    "DARTS_FDS",
    "DARTS_PATHS",
    "DARTS_SCALES",
    "DIAGNOSTIC_KEYS",
    "HYPERGRADS",
    "LEVEL2S",
    "MASKER_STEP_KEYS",
    "PRESETS",
    "STEP_KEYS",
    "DartsHypergradient",
    "FinetuneStep",
    "Hypergradient",
    "MLOConfig",
    "MLOEngine",
    "PretrainStep",
    "UnrollHypergradient",
    "UnrollWindow",
    "darts_masker_grad",
    "default_optimizers",
    "finetune_step",
    "optimizer_params",
    "pretrain_step",
    "prior_kl",
    "register_hypergrad",
    "ridge_step",
    "trainable",
    "update_derivative",
]
