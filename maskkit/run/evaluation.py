"""A finished (or checkpointed) run: its weights loaded into the built run, and its encoder scored.

`load_run` rebuilds a run with its trained MAE and masker; `load_encoder` / `load_masker` give
those modules alone; `evaluate_run` scores the encoder with a linear probe or fine-tuning
(`maskkit.evaluate`) and records the result in the run's eval.json.

A run still in progress (its directory's lock held by `maskkit pretrain`) is read as it stands: its
newest good checkpoint (or the model.pt of the run it extends). `load_weights` then says so with a
`RunInProgressWarning` naming the step read, and its result and eval.json's entry carry `"in_progress": true`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from maskkit.checkpoint import CheckpointError, load_checkpoint, load_latest
from maskkit.data.splits import test_split_name
from maskkit.evaluate import check_settings
from maskkit.locking import run_in_progress
from maskkit.options import shown_path
from maskkit.settings import flag

from .builder import Run, build_run, resolve_device
from .config import RunError, _one_line
from .record import CHECKPOINTS, EVAL, MODEL, RunRecord, check_writable, merge_json

__all__ = [
    "EvalConfig", "RunInProgressWarning", "evaluate_run", "run_evaluation", "load_encoder", "load_masker", "load_run", "load_weights", "weights_from_checkpoint",
]  # fmt: skip

PROTOCOLS = ("linear", "finetune")
INITS = ("pretrained", "random")
SCORE_SPLITS = ("test", "val")


class RunInProgressWarning(UserWarning):
    """Weights were read from a run that a process is still training (the CLI prints it as one line)."""


class RunWeightsWarning(UserWarning):
    """Weights were read from a checkpoint because the run has no model.pt (the CLI prints it as one line)."""


def weights_from_checkpoint(state: dict[str, Any]) -> dict[str, Any]:
    """{"mae", "policy", "head", "step"} out of a training checkpoint (plain or MLO engine)."""
    if "engine" in state:
        eng = state["engine"]
        return {"mae": eng["mae"], "policy": eng["masker"], "head": eng["head"], "step": state["step"]}
    return {"mae": state["mae"], "policy": state["policy"], "head": None, "step": state["step"]}


def load_weights(run: Run, run_dir: str | Path) -> dict[str, Any]:
    """Load the run's final weights (model.pt) or else its newest good checkpoint into run.mae/policy.

    Returns {"source": path, "step": int, "head": state or None}, with "in_progress": True (and a
    `RunInProgressWarning`) when a process held the run's lock while they were read.
    """
    run_dir = Path(run_dir)
    holder = run_in_progress(run_dir)  # before and after the read: either means a mid-run state
    final = run_dir / MODEL
    if final.is_file():
        state = load_checkpoint(final, map_location=run.device)
        source = final
    else:
        try:
            source, ckpt, _ = load_latest(run_dir / CHECKPOINTS, map_location=run.device)
        except CheckpointError as err:
            raise RunError(f"run {run_dir} has no usable weights: {err}") from None
        state = weights_from_checkpoint(ckpt)
    try:
        run.mae.load_state_dict(state["mae"])
        run.policy.load_state_dict(state["policy"])
    except (KeyError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0]
        raise RunError(f"weights in {source} do not fit the run's model: {first}") from None
    loaded = {"source": str(source), "step": int(state.get("step", 0)), "head": state.get("head")}
    holder = holder or run_in_progress(run_dir)
    if holder is not None:
        loaded["in_progress"] = True
        warnings.warn(RunInProgressWarning(
            f"{run_dir} is still in progress ({holder}): reading its step {loaded['step']} ({Path(source).name}), "
            f"not its final weights"
        ), stacklevel=2)  # fmt: skip
    elif source != final:  # stopped, killed or its final write failed: say which weights stand in for model.pt
        warnings.warn(RunWeightsWarning(
            f"{shown_path(run_dir)} has no {MODEL}: reading its checkpoint of step {loaded['step']} "
            f"({Path(source).name}); maskkit pretrain --resume {shown_path(run_dir)} finishes the run"
        ), stacklevel=2)  # fmt: skip
    return loaded


def load_run(
    run_dir: str | Path, device: str | torch.device = "auto", *, weights: bool = True,
    trust_data_change: bool = False,
) -> Run:
    """A finished (or checkpointed) run rebuilt with its trained encoder and masker (`weights=False`:
    untrained). Its data must be what it was pretrained on (the record's fingerprint), unless
    `trust_data_change`.
    """
    record = RunRecord.read(run_dir)
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    run = build_run(record, dev, run_dir=run_dir, trust_data_change=trust_data_change)
    if weights:
        load_weights(run, run_dir)
    return run


def load_encoder(
    run_dir: str | Path, device: str | torch.device = "auto", *, trust_data_change: bool = False
) -> nn.Module:
    """The run's trained MAE (its adapter's MAE-protocol module; `.features(images)` gives [B, D])."""
    return load_run(run_dir, device, trust_data_change=trust_data_change).mae


def load_masker(
    run_dir: str | Path, device: str | torch.device = "auto", *, trust_data_change: bool = False
) -> nn.Module:
    """The run's trained masking policy (e.g. the learned masker), ready for `use_policy` or a MaskPlan."""
    return load_run(run_dir, device, trust_data_change=trust_data_change).policy


@dataclass(frozen=True)
class EvalConfig:
    """Everything `maskkit evaluate` is asked to do; `check` is the one place its options are validated.

    None means the protocol's default (`maskkit.evaluate`); what it resolved to is in the result. eval.json
    keeps both: the entry's settings as they ran, and under "asked" this, as given.
    """

    protocol: str = "linear"
    init: str = "pretrained"
    split: str = "test"
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    seed: int = 0
    device: str = "auto"
    trust_data_change: bool = False

    def check(self) -> None:
        """One-line RunError naming the first bad option; nothing is read or written."""
        for name, value, known in (("protocol", self.protocol, PROTOCOLS), ("init", self.init, INITS),
                                   ("split", self.split, SCORE_SPLITS)):  # fmt: skip
            if value not in known:
                raise RunError(f"{flag(name)} must be one of {', '.join(known)}, got {value!r}")
        _one_line(lambda: check_settings(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, seed=self.seed))
        if not isinstance(self.device, str) or not self.device:
            raise RunError(f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")

    @property
    def key(self) -> str:
        """The entry's key in eval.json: `<protocol>`, `-random` for the untrained encoder, `@val` on val."""
        return (self.protocol if self.init == "pretrained" else f"{self.protocol}-random") + (
            "@val" if self.split == "val" else "")


def evaluate_run(
    run_dir: str | Path,
    protocol: str = "linear",
    *,
    init: str = "pretrained",
    split: str = "test",
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    seed: int = 0,
    device: str = "auto",
    on_step: Callable[[int, int], None] | None = None,
    on_plan: Callable[[str], None] | None = None,
    trust_data_change: bool = False,
) -> tuple[str, dict[str, Any]]:
    """Score the run's encoder (linear probe or fine-tune) and record it in eval.json; returns (key, record).

    The options are an `EvalConfig`, checked before anything is read. The key is `<protocol>` (`-random`
    for the untrained encoder) with `@val` when scored on val. The entry holds the scores and every
    setting the evaluation ran with (`EvalResult`'s, plus init, split, device, weights and step), and the
    options as given ("asked"). Data that changed since pretraining is refused (RunError naming what
    changed) unless `trust_data_change`; the entry then records what changed (`"data_changed"`).
    """
    config = EvalConfig(protocol, init, split, epochs, batch_size, lr, seed, device, trust_data_change)
    config.check()
    return run_evaluation(run_dir, config, on_step=on_step, on_plan=on_plan)


def run_evaluation(
    run_dir: str | Path,
    config: EvalConfig,
    *,
    on_step: Callable[[int, int], None] | None = None,
    on_plan: Callable[[str], None] | None = None,
) -> tuple[str, dict[str, Any]]:
    """`evaluate_run` of a checked `EvalConfig`."""
    from maskkit.evaluate import evaluate_encoder

    run_dir = Path(run_dir)
    record = RunRecord.read(run_dir)
    data = record.resolved.data
    if not data.labeled:
        raise RunError(f"dataset {data.name!r} has no labels to evaluate with")
    dev = resolve_device(config.device)
    run = build_run(record, dev, run_dir=run_dir, trust_data_change=config.trust_data_change)
    source = {"source": "random initialisation", "step": 0}
    if config.init == "pretrained":
        source = load_weights(run, run_dir)
    check_writable(run_dir)
    result = evaluate_encoder(
        run.mae, run.batcher, run.splits, config.protocol, epochs=config.epochs, batch_size=config.batch_size,
        lr=config.lr, seed=config.seed, score_split=config.split, on_step=on_step, on_plan=on_plan,
    )  # fmt: skip
    scored_on = test_split_name(data.split_rule) if config.split == "test" else "the val split"
    entry = {**asdict(result), "init": config.init, "split": config.split, "scored_on": scored_on,
             "device": str(dev), "weights": source["source"], "step": source["step"],
             "asked": asdict(config)}  # fmt: skip
    if source.get("in_progress"):
        entry["in_progress"] = True  # a mid-run score: a later one of the final weights replaces it
    if run.data_changed is not None:
        entry["data_changed"] = run.data_changed  # scored on data other than the run's, as asked
    merge_json(run_dir / EVAL, config.key, entry)
    return config.key, entry
