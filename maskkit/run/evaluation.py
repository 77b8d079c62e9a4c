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
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from maskkit.checkpoint import CheckpointError, load_checkpoint, load_latest
from maskkit.data.splits import test_split_name
from maskkit.locking import run_in_progress
from maskkit.settings import flag

from .builder import Run, build_run, resolve_device
from .config import RunError
from .record import CHECKPOINTS, EVAL, MODEL, RunRecord, check_writable, merge_json

__all__ = [
    "RunInProgressWarning", "evaluate_run", "load_encoder", "load_masker", "load_run", "load_weights", "weights_from_checkpoint",
]  # fmt: skip

PROTOCOLS = ("linear", "finetune")
INITS = ("pretrained", "random")
SCORE_SPLITS = ("test", "val")


class RunInProgressWarning(UserWarning):
    """Weights were read from a run that a process is still training (the CLI prints it as one line)."""


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

    The key is `<protocol>` (`-random` for the untrained encoder) with `@val` when scored on val. Data
    that changed since pretraining is refused (RunError naming what changed) unless `trust_data_change`;
    the entry then records what changed (`"data_changed"`).
    """
    from maskkit.evaluate import evaluate_encoder

    run_dir = Path(run_dir)
    record = RunRecord.read(run_dir)
    if protocol not in PROTOCOLS or init not in INITS or split not in SCORE_SPLITS:
        raise RunError(f"unknown evaluation {protocol!r}/{init!r}/{split!r}: protocol linear|finetune, "
                       "init pretrained|random, split test|val")  # fmt: skip
    if not record.dataset.get("labeled", True):
        raise RunError(f"dataset {record.dataset['name']!r} has no labels to evaluate with")
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if value is not None and value < 1:
            raise RunError(f"{flag(name)} must be a positive integer, got {value}")
    run = build_run(record, resolve_device(device), run_dir=run_dir, trust_data_change=trust_data_change)
    source = {"source": "random initialisation", "step": 0}
    if init == "pretrained":
        source = load_weights(run, run_dir)
    check_writable(run_dir)
    result = evaluate_encoder(
        run.mae, run.batcher, run.splits, protocol, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
        score_split=split, on_step=on_step, on_plan=on_plan,
    )  # fmt: skip
    key = (protocol if init == "pretrained" else f"{protocol}-random") + ("@val" if split == "val" else "")
    scored_on = test_split_name(record.dataset.get("split_rule")) if split == "test" else "the val split"
    entry = {**asdict(result), "init": init, "weights": source["source"], "step": source["step"], "seed": seed,
             "scored_on": scored_on}  # fmt: skip
    if source.get("in_progress"):
        entry["in_progress"] = True  # a mid-run score: a later one of the final weights replaces it
    if run.data_changed is not None:
        entry["data_changed"] = run.data_changed  # scored on data other than the run's, as asked
    merge_json(run_dir / EVAL, key, entry)
    return key, entry
