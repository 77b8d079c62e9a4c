"""The run layer: one typed, versioned `RunConfig`, one builder, the run lifecycle, evaluation and pictures.

A run directory holds `config.json` (the `RunConfig` as asked for, and what it resolved to: the
data's statistics and splits, the model's sizes, the steps), `metrics.jsonl`,
`checkpoints/checkpoint-<step>.pt` (+ `.sha256`), `model.pt` (final weights), `summary.json`, and
later `eval.json` and pictures. This package owns that format; `maskkit pretrain`, `evaluate` and
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

from .builder import (
    MIN_AUTO_PATCHES,
    Run,
    build_mae,
    build_run,
    build_trainer,
    choose_patch_size,
    dataset_section,
    model_kind,
    model_section,
    model_spec,
    new_run,
    policy_kwargs,
    resolve,
    resolve_device,
)
from .config import (
    AUGMENT,
    DEFAULT_MASK_RATIO,
    DEFAULT_MODEL,
    FORMAT_VERSION,
    SECTIONS,
    DataConfig,
    ModelConfig,
    PolicyConfig,
    RunConfig,
    RunError,
    default_ratio,
)
from .evaluation import (
    evaluate_run,
    load_encoder,
    load_masker,
    load_run,
    load_weights,
    weights_from_checkpoint,
)
from .lifecycle import PreparedRun, create_run, resume_run, train_run
from .pictures import Picture, picture, policy_names, untrained_run
from .record import (
    CHECKPOINTS,
    CONFIG,
    EVAL,
    METRICS,
    MODEL,
    SUMMARY,
    RunRecord,
    check_writable,
    fresh_run_dir,
    merge_json,
)

__all__ = [
    "AUGMENT", "CHECKPOINTS", "CONFIG", "DEFAULT_MASK_RATIO", "DEFAULT_MODEL", "DEFAULT_STEPS", "EVAL",
    "FORMAT_VERSION", "METRICS", "MIN_AUTO_PATCHES", "MODEL", "SECTIONS", "SUMMARY",
    "DataConfig", "ModelConfig", "Picture", "PolicyConfig", "PreparedRun", "Run", "RunConfig", "RunError",
    "RunRecord", "TrainSettings",
    "build_mae", "build_run", "build_trainer", "check_writable", "choose_patch_size", "create_run",
    "dataset_section", "default_ratio", "evaluate_run", "fresh_run_dir", "load_encoder", "load_masker",
    "load_run", "load_weights", "merge_json", "model_kind", "model_section", "model_spec", "new_run",
    "picture", "policy_kwargs", "policy_names", "resolve", "resolve_device", "resume_run", "train_run",
    "untrained_run", "weights_from_checkpoint",
]  # fmt: skip
