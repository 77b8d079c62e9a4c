"""The run layer: one typed, versioned `RunConfig`, one builder, the run lifecycle, evaluation and pictures.

A run directory holds `config.json` (the `RunConfig` as asked for, and what it resolved to: the
data's statistics and splits, the model's sizes, the steps), `metrics.jsonl`, `perf.jsonl`
(throughput), `checkpoints/checkpoint-<step>.pt` (+ `.sha256`), `model.pt` (final weights),
`summary.json`, with `--log tensorboard` `tensorboard/`, and later `eval.json` and pictures. This package owns that format; `maskkit pretrain`, `evaluate` and
`visualize` only parse options into these calls and print what comes back.

    config = RunConfig(data=DataConfig("digits"), policy=PolicyConfig("random"), train=TrainSettings(steps=50))
    prepared = create_run(config, "runs/demo")      # validates everything, then writes config.json
    summary = train_run(prepared)                   # metrics, checkpoints, model.pt, summary.json
    prepared = resume_run("runs/demo", steps=100)   # continues from the newest checkpoint

One module per concern: `config` (the schema and its one check), `record` (config.json and the
run directory's file names), `builder` (config -> resolved record -> built run -> trainer),
`lifecycle` (create, resume, train), `evaluation` (weights, loaders, scores), `pictures`.
"""

from maskkit.train.config import DEFAULT_STEPS, TrainSettings

from . import builder as _builder
from . import config as _config
from . import evaluation as _evaluation
from . import lifecycle as _lifecycle
from . import pictures as _pictures
from . import record as _record
from .builder import *  # noqa: F403 - each module's __all__
from .config import *  # noqa: F403
from .evaluation import *  # noqa: F403
from .lifecycle import *  # noqa: F403
from .pictures import *  # noqa: F403
from .record import *  # noqa: F403

__all__ = ["DEFAULT_STEPS", "TrainSettings"] + [
    name for module in (_builder, _config, _evaluation, _lifecycle, _pictures, _record) for name in module.__all__
]
