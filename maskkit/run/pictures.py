"""Pictures of masks: a run's masks (image, hidden patches, heat map, reconstruction) or a gallery of policies.

`picture` checks its options, builds what it draws through the one builder (a run's record, or,
for a gallery without a run, a new untrained run of `model` over `dataset`), lets
`maskkit.visualize` draw, and writes the PNG atomically. A picture of a run still in progress (its
lock held) says so (`RunInProgressWarning`, the step it read) and records it in the PNG's text chunk
`maskkit` ({"run", "weights", "step", "in_progress": true}). The PNG may not be written inside an image
folder of the data it pictures (it would become one of its images).
A video MAE's picture (`maskkit.visualize_clips`) has one column per frame and, per clip, the rows clip, hidden
tubes, the decoder's subset (the run's --decoder-ratio / --decoder-rule, or those given here) and reconstruction.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from io import BytesIO
from pathlib import Path
from typing import Any

from maskkit.checkpoint import atomic_write_bytes
from maskkit.options import shown_path
from maskkit.plan import check_ratio
from maskkit.policies import get_policy_class, list_policies
from maskkit.train.decoding import DecoderMasking

from .builder import Run, load_data, new_run, resolve_device
from .config import (
    DEFAULT_MASK_RATIO,
    DEFAULT_MODEL,
    DataConfig,
    ModelConfig,
    PolicyConfig,
    RunConfig,
    RunError,
    TrainSettings,
)
from .evaluation import load_run, load_weights
from .lifecycle import refuse_inside_data
from .record import check_writable

__all__ = [
    "Picture", "picture", "policy_names", "untrained_run",
]  # fmt: skip


@dataclass
class Picture:
    """What `picture` wrote: the image, the ratio, the gallery's policies and why any was not drawn."""

    image: Any  # PIL.Image
    ratio: float
    policies: list[str]
    not_drawn: dict[str, str]
    in_progress: bool = False  # drawn from a run still training (step: the one read)
    step: int | None = None


def policy_names(spec: str) -> list[str]:
    """'all' -> every registered policy; 'a,b' -> those names (checked, duplicates dropped, order kept)."""
    if spec.strip() == "all":
        return list_policies()
    names = list(dict.fromkeys(n.strip() for n in spec.split(",") if n.strip()))
    if not names:
        raise RunError(f"--policies expects 'all' or comma-separated policy names, got {spec!r}")
    for name in names:
        get_policy_class(name)  # unknown names: one line naming the registered ones
    return names


def untrained_run(dataset: str, data_dir: str | None, model: str, seed: int, ratio: float, device: Any) -> Run:
    """A new, untrained run of `model` over `dataset` (patch size as pretrain chooses it, weights and
    splits from `seed`, no augmentation) with random masking at `ratio`: the gallery's set-up."""
    config = RunConfig(
        data=DataConfig(dataset, data_dir, augment="none"), model=ModelConfig(name=model),
        policy=PolicyConfig("random", mask_ratio=ratio), train=TrainSettings(seed=seed),
    )  # fmt: skip
    return new_run(config, load_data(config.data), device)


def picture(
    output: Path,
    run_dir: str | Path | None = None,
    *,
    policies: str | None = None,
    mask_ratio: float | None = None,
    dataset: str | None = None,
    data_dir: str | None = None,
    model: str | None = None,
    num_images: int = 8,
    tile: int = 96,
    seed: int = 0,
    device: str = "auto",
    trust_data_change: bool = False,
    decoder_ratio: float | None = None,
    decoder_rule: str | None = None,
) -> Picture:
    """Write a PNG of a run's masks (image, hidden patches, heat map, reconstruction) or a policy gallery.

    With `policies` ('all' or 'a,b'): one column per policy on the same test images at one ratio,
    on `run_dir`'s model and data if given, else on an untrained `model` (default micro) over
    `dataset` (default digits). A run's data that changed since pretraining is refused (RunError naming
    what changed) unless `trust_data_change`. `decoder_ratio` / `decoder_rule`: the decoder's subset drawn in a
    run's picture (default: the run's own --decoder-ratio and --decoder-rule; none without one).
    """
    from maskkit.mae import is_video_mae
    from maskkit.visualize import mask_grid, policy_gallery
    from maskkit.visualize_clips import clip_gallery, clip_mask_grid

    output = Path(output)
    if num_images < 1:
        raise RunError(f"--num-images must be >= 1, got {num_images}")
    if tile < 8:
        raise RunError(f"--tile must be >= 8, got {tile}")
    if output.suffix.lower() != ".png":
        raise RunError(f"--output {shown_path(output)} must end in .png")
    if run_dir is None and policies is None:
        raise RunError("give RUN_DIR (a run's masks) or --policies all|NAME,... (a gallery of policies)")
    if run_dir is not None and (dataset, data_dir, model) != (None, None, None):
        raise RunError("--dataset, --data-dir and --model are for a gallery without RUN_DIR")
    if run_dir is None and trust_data_change:
        raise RunError("--trust-data-change only applies with RUN_DIR (a run's data)")
    if asked_decoder := (decoder_ratio is not None or decoder_rule is not None):
        if run_dir is None or policies is not None:
            raise RunError("--decoder-ratio and --decoder-rule draw a run's decoder subset: give RUN_DIR, not --policies")
    names = None if policies is None else policy_names(policies)
    if mask_ratio is not None:
        check_ratio(mask_ratio)
    dev = resolve_device(device)
    loaded: dict[str, Any] = {}
    if run_dir is not None:
        run = load_run(run_dir, dev, weights=False, trust_data_change=trust_data_change)
        refuse_inside_data(output, run.record.resolved.data.name, "--output")
        loaded = load_weights(run, run_dir)
        ratio = run.record.resolved.train.resolved.mask_ratio if mask_ratio is None else mask_ratio
    else:
        refuse_inside_data(output, dataset or "digits", "--output")
        ratio = DEFAULT_MASK_RATIO if mask_ratio is None else mask_ratio
        run = untrained_run(dataset or "digits", data_dir, model or DEFAULT_MODEL, seed, ratio, dev)
    mae, batcher, pool = run.mae, run.batcher, run.splits["test"]
    check_ratio(ratio, mae.num_patches)
    check_writable(output.parent if str(output.parent) else Path("."))
    notes: dict[str, str] = {}
    video = is_video_mae(mae)
    decoder = None
    if run_dir is not None:
        decoder = _decoder(run.record.resolved.train.train, decoder_ratio, decoder_rule) if asked_decoder else (
            DecoderMasking.from_settings(run.record.resolved.train.train))
    sizes = {"ratio": ratio, "num_images": num_images, "tile": tile, "seed": seed}
    if names is None and video:
        image = clip_mask_grid(mae, run.policy, batcher, pool, decoder=decoder, **sizes)
    elif names is None:
        if asked_decoder:
            raise RunError("--decoder-ratio and --decoder-rule: the decoder subset is drawn on a video MAE's clips only")
        image = mask_grid(mae, run.policy, batcher, pool, **sizes)
    else:
        image, notes = (clip_gallery if video else policy_gallery)(mae, batcher, pool, names, **sizes)
    buffer = BytesIO()
    image.save(buffer, format="PNG", **_in_progress_note(run_dir, loaded))
    atomic_write_bytes(output, buffer.getvalue())
    return Picture(image, ratio, names or [], notes, bool(loaded.get("in_progress")), loaded.get("step"))


def _decoder(train: TrainSettings, ratio: float | None, rule: str | None) -> DecoderMasking | None:
    """The decoder masking asked for here, the run's settings filling what is not given (checked as pretrain's
    --decoder-ratio / --decoder-rule, one line naming the option: a rule needs a ratio)."""
    settings = replace(train, decoder_ratio=train.decoder_ratio if ratio is None else ratio,
                       decoder_rule=train.decoder_rule if rule is None else rule)  # fmt: skip
    try:
        settings.check()
    except ValueError as err:
        raise RunError(str(err)) from None
    return DecoderMasking.from_settings(settings)


def _in_progress_note(run_dir: str | Path | None, loaded: dict[str, Any]) -> dict[str, Any]:
    """PNG save options: for a run still in progress, a text chunk saying which step was drawn."""
    if not loaded.get("in_progress"):
        return {}
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    note = {"run": str(run_dir), "weights": loaded["source"], "step": loaded["step"], "in_progress": True}
    info.add_text("maskkit", json.dumps(note, sort_keys=True))
    return {"pnginfo": info}
