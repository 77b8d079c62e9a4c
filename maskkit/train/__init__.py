"""Training: the `train` / `mlo` run sections, the steps behind `TrainStep`, and the loop that runs them.

    config.py    TrainSettings, MLOSettings (declared and checked once), Resolved, TrainConfig
    step.py      the TrainStep protocol; step_kind / make_step: the one place a run's step is chosen
    plain.py     PlainStep: the MAE step (+ a policy's own loss)
    mlo_step.py  MLOStep: one MLOEngine step; engine_config (the `mlo` section -> MLOConfig)
    trainer.py   Trainer (alias Pretrainer) and train(): streams, sharding, RNG, guard, checkpoints, log
    guard.py     non-finite numbers; signals.py: StopSignals; metrics.py: MetricsLog
    perf.py      PerfMeter: throughput (perf.jsonl, the progress bar); loggers.py: --log tensorboard
"""

from maskkit.train.choose import make_step, policy_learns, step_kind
from maskkit.train.config import (
    AMP_MODES,
    DEFAULT_STEPS,
    MASK_NOISE,
    MLOSettings,
    Resolved,
    TrainConfig,
    TrainSettings,
)
from maskkit.train.guard import INJECT_NAN_ENV, NonFiniteError, parse_inject_nan
from maskkit.train.loggers import LOGGERS, RunLogger, TensorBoardLogger, open_logger
from maskkit.train.metrics import MetricsLog
from maskkit.train.perf import PERF_KEYS, PerfMeter
from maskkit.train.signals import STOP_SIGNALS, StopSignals, TrainingStopped, signal_exit_code
from maskkit.train.step import LEARNS, StepParts, TrainStep
from maskkit.train.trainer import PERF_FILE, STATE_VERSION, Pretrainer, Trainer, train

__all__ = [
    "AMP_MODES", "DEFAULT_STEPS", "INJECT_NAN_ENV", "LEARNS", "LOGGERS", "MASK_NOISE", "PERF_FILE", "PERF_KEYS",
    "STATE_VERSION", "STOP_SIGNALS", "MLOSettings", "MetricsLog", "NonFiniteError", "PerfMeter", "Pretrainer",
    "Resolved", "RunLogger", "StepParts", "StopSignals", "TensorBoardLogger", "TrainConfig", "TrainSettings", "TrainStep", "Trainer", "TrainingStopped", "make_step", "parse_inject_nan",
    "open_logger", "policy_learns", "signal_exit_code", "step_kind", "train",
]  # fmt: skip
