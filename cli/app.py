"""The `maskkit` command: policies, pretrain, evaluate, visualize, bench (Typer + rich).

Parsing and printing only: the work is done by maskkit.training, maskkit.evaluate,
maskkit.visualize and the benchmarks. Every expected failure (bad option, bad data, bad
checkpoint) ends the command with exit code 1 and ONE line on stderr, no traceback; set
MASKKIT_DEBUG=1 to see the traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from maskkit.evaluate import (
    FINETUNE_BATCH_SIZE,
    FINETUNE_EPOCHS,
    FINETUNE_LR,
    LINEAR_BASE_LR,
    LINEAR_BATCH_SIZE,
    LINEAR_EPOCHS,
    MIN_DEFAULT_STEPS,
)

app = typer.Typer(
    name="maskkit",
    help="Pretrain Masked Autoencoders with random, attention-guided or learned masking; evaluate; picture the masks.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True, soft_wrap=True)


class Protocol(str, Enum):
    linear = "linear"
    finetune = "finetune"


class Hypergrad(str, Enum):
    darts = "darts"
    unroll = "unroll"


class Init(str, Enum):
    pretrained = "pretrained"
    random = "random"


class Level2(str, Enum):
    head = "head"
    ridge = "ridge"


class ScoreSplit(str, Enum):
    test = "test"
    val = "val"


class Amp(str, Enum):
    none = "none"
    bf16 = "bf16"


class MaskNoise(str, Enum):
    rank = "rank"
    sample = "sample"


class Augment(str, Enum):
    auto = "auto"
    none = "none"
    crop_flip = "crop-flip"


class CommandError(ValueError):
    """An expected failure, reported as one line."""


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """Turn expected exceptions into 'Error: ...' on stderr and exit code 1."""
    try:
        yield
    except typer.Exit:
        raise
    except (ValueError, TypeError, OSError, FloatingPointError, KeyError, ImportError) as err:
        if os.environ.get("MASKKIT_DEBUG"):
            raise
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if isinstance(err, KeyError):
            text = f"missing entry {text}"
        if _DIST is not None and _DIST.enabled and not _DIST.is_main:  # quiet rank: still name its failure
            Console(stderr=True, soft_wrap=True).print(f"Error (rank {_DIST.rank}): {text}", markup=False, highlight=False)
        else:
            err_console.print(f"Error: {text}", markup=False, highlight=False)
        raise typer.Exit(code=1) from None


# ---- policies ---------------------------------------------------------------------------------


@app.command("policies")
def policies_command() -> None:
    """List the registered masking policies (third-party ones included): paper, idea, what they learn from, options."""
    from rich.text import Text

    from maskkit.registry import list_policies, load_plugins, policy_card

    with one_line_errors():
        load_plugins()
    cards = [policy_card(name) for name in list_policies()]
    table = Table(title="masking policies", show_lines=True)
    table.add_column("policy", style="bold", overflow="fold")
    table.add_column("paper", overflow="fold")
    table.add_column("learns from", overflow="fold")
    table.add_column("idea", overflow="fold")
    for card in cards:
        table.add_row(card.name, Text(card.paper), card.learns, Text(card.idea))
    console.print(table)
    options = Table(title="policy options: --<policy>-<option> VALUE, or --policy-opt option=VALUE")
    options.add_column("option", overflow="fold")
    options.add_column("default", overflow="fold")
    options.add_column("allowed values", overflow="fold")
    for card in cards:
        shown = [o for o in card.options if o.name not in AUTO_POLICY_OPTIONS]
        for i, opt in enumerate(shown):
            flag = f"--{card.name.replace('_', '-')}-{opt.name.replace('_', '-')}"
            # Text cells: allowed values such as "[0, 1]" are not rich markup
            options.add_row(flag, Text(_cli_value(opt.default)), Text(opt.allowed), end_section=i == len(shown) - 1)
    console.print(options)
    console.print(
        f"--mask-ratio sets every policy's ratio; {', '.join(AUTO_POLICY_OPTIONS[1:])} come from the model.",
        highlight=False,
    )


def _cli_value(value: Any) -> str:
    """A default as the command line spells it: none, true/false, or the value."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


#: policy constructor arguments the CLI fills itself (from --mask-ratio and the model).
AUTO_POLICY_OPTIONS = ("ratio", "embed_dim", "num_patches")


def _convert(value: str, annotation: str, what: str) -> Any:
    """Parse an option value by its annotation ('int', 'float', 'bool', 'str', 'X | None')."""
    parts = [p.strip() for p in annotation.split("|")] if annotation else []
    if "None" in parts and value.lower() in ("none", "null"):
        return None
    base = next((p for p in parts if p != "None"), "")
    try:
        if base == "int":
            return int(value)
        if base == "float":
            return float(value)
        if base == "bool":
            lowered = value.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if base == "str":
            return value
    except ValueError:
        raise CommandError(f"{what} expects {base}, got {value!r}") from None
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def parse_policy_options(policy: str, extra: list[str], pairs: list[str]) -> dict[str, Any]:
    """Policy options from `--<policy>-<option> VALUE` extras and `--policy-opt option=VALUE` pairs."""
    from maskkit.registry import list_policies, policy_options

    known = {o.name: o for o in policy_options(policy) if o.name not in AUTO_POLICY_OPTIONS}
    choices = ", ".join(f"--{policy}-{k.replace('_', '-')}" for k in known) or "none"
    options: dict[str, Any] = {}

    def put(key: str, value: str | None, spelled: str) -> None:
        if key in AUTO_POLICY_OPTIONS:
            hint = "--mask-ratio" if key == "ratio" else "the model"
            raise CommandError(f"policy option {key!r} is set from {hint}, not from {spelled}")
        if key not in known:
            raise CommandError(f"policy {policy!r} has no option {key!r} ({spelled}); its options: {choices}")
        annotation = known[key].annotation
        if value is None:
            if "bool" not in annotation:
                raise CommandError(f"option {spelled} needs a value")
            value = "true"
        options[key] = _convert(value, annotation, spelled)

    prefix = policy.replace("_", "-") + "-"
    i = 0
    while i < len(extra):
        token = extra[i]
        if not token.startswith("--"):
            raise CommandError(f"unexpected argument {token!r}")
        name, eq, value = token[2:].partition("=")
        if not name.startswith(prefix):
            other = next((p for p in list_policies() if name.startswith(p.replace("_", "-") + "-")), None)
            if other is not None:
                raise CommandError(f"option --{name} is for policy {other!r}, but --policy is {policy!r}")
            raise CommandError(f"no such option: --{name}")
        key = name[len(prefix) :].replace("-", "_")
        if not eq:
            if i + 1 < len(extra) and not extra[i + 1].startswith("--"):
                value = extra[i + 1]
                i += 1
            else:
                value = None  # a bare boolean flag
        put(key, value if (eq or value is not None) else None, f"--{name}")
        i += 1
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq:
            raise CommandError(f"--policy-opt expects option=value, got {pair!r}")
        put(key.strip().replace("-", "_"), value, f"--policy-opt {pair}")
    return options


# ---- pretrain ---------------------------------------------------------------------------------

DEFAULT_STEPS = 600

#: pretrain options of the learned masker's MLO training, refused with any other policy.
LEARNED_ONLY = ("hypergrad", "masker_every", "unroll_steps", "head_optimizer", "head_lr", "masker_optimizer",
                "masker_lr", "masker_start", "level2", "freeze_masker", "masker_reg")  # fmt: skip

#: options that may be combined with --resume (everything else comes from the run's config.json).
RESUME_OPTIONS = ("resume", "steps", "device", "progress")

#: set by pretrain under torchrun: this process's place in the group (maskkit.distributed.DistContext)
_DIST: Any = None


@app.command(
    "pretrain",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def pretrain_command(
    ctx: typer.Context,
    model: str = typer.Option("micro", help="MAE size preset (see maskkit.adapters.timm.list_presets())."),
    dataset: str = typer.Option(
        "digits", help="digits | mnist | fashion-mnist | cifar10 | cifar100 | imagefolder:PATH | npz:PATH."
    ),
    data_dir: Optional[Path] = typer.Option(None, help="Where torchvision datasets live."),
    download: bool = typer.Option(False, "--download", help="Download a torchvision dataset into --data-dir."),
    img_size: Optional[int] = typer.Option(None, help="Resize images to this side (default: as stored)."),
    steps: Optional[int] = typer.Option(None, help=f"Training iterations (default {DEFAULT_STEPS})."),
    epochs: Optional[float] = typer.Option(None, help="Training length in epochs of the train split (instead of --steps)."),
    batch_size: int = typer.Option(128, help="Images per iteration."),
    lr: float = typer.Option(1.5e-3, help="MAE learning rate (peak of warm-up + cosine)."),
    weight_decay: float = typer.Option(0.05, help="MAE weight decay (none on biases, norms, embeddings, tokens)."),
    warmup_steps: Optional[int] = typer.Option(None, help="Linear warm-up iterations (default 5% of the steps)."),
    optimizer: str = typer.Option("adamw", help="MAE optimizer: adamw | adam | sgd | lamb | lars | ... (torch-optimizer); the learned policy's hypergradient needs adamw, adam or sgd."),
    mask_ratio: float = typer.Option(0.75, help="Fraction of patches hidden, in (0, 1)."),
    patch_size: Optional[int] = typer.Option(None, help="Patch side (default: the preset's, if it fits the images)."),
    norm_pix_loss: bool = typer.Option(False, "--norm-pix-loss", help="Normalise each target patch (MAE)."),
    augment: Augment = typer.Option(Augment.auto, help="auto: MAE crop + flip for images of side >= 32, else none."),
    seed: int = typer.Option(0, help="Seed of splits, initialisation, batches, masks."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N."),
    out: Optional[Path] = typer.Option(None, help="Run directory to create (default runs/<date-time>)."),
    resume: Optional[Path] = typer.Option(None, help="Continue the run in this directory from its last checkpoint."),
    policy: str = typer.Option("learned", help="Masking policy (maskkit policies lists them)."),
    policy_opt: list[str] = typer.Option([], "--policy-opt", help="Policy option as option=value (repeatable)."),
    hypergrad: Hypergrad = typer.Option(Hypergrad.darts, help="Learned masker's hypergradient: darts | unroll."),
    masker_every: int = typer.Option(2, help="Head and masker step after every this many MAE steps."),
    unroll_steps: int = typer.Option(1, help="MAE steps unrolled by --hypergrad unroll."),
    head_optimizer: str = typer.Option("adamw", help="Optimizer of the classification head (learned policy)."),
    head_lr: float = typer.Option(1e-2, help="Learning rate of the classification head (level 2 of the learned masker)."),
    masker_optimizer: str = typer.Option("adamw", help="Optimizer of the learned masker."),
    masker_lr: float = typer.Option(1e-3, help="Learning rate of the learned masker."),
    level2: Level2 = typer.Option(
        Level2.head, help="Learned masker's level 2: head (a trained linear head, the paper) or ridge (a ridge probe refit on every labeled batch)."
    ),
    masker_start: int = typer.Option(
        0, help="Masker warm-up: MAE steps before the masker's first update (the head trains meanwhile)."
    ),
    freeze_masker: bool = typer.Option(
        False, "--freeze-masker", help="Control run: keep the learned masker at its initialisation (no MLO)."
    ),
    masker_reg: float = typer.Option(
        0.0, help="Anti-collapse: weight of KL(masker probabilities || mask ratio) in the masker's objective (0: off)."
    ),
    log_every: int = typer.Option(10, help="Write a metrics.jsonl line every this many steps."),
    ckpt_every: int = typer.Option(100, help="Checkpoint every this many steps (and at the end)."),
    keep_checkpoints: int = typer.Option(2, "--keep-checkpoints", "--keep-last", help="How many checkpoints to keep (the newest)."),
    skip_nonfinite: bool = typer.Option(
        False, "--skip-nonfinite", help="Skip a batch with a non-finite loss or hypergradient (counted in metrics.jsonl) instead of stopping."
    ),
    amp: Amp = typer.Option(Amp.none, help="bf16: autocast the MAE forward of the real pretrain steps to bfloat16 (hypergradients stay float32)."),
    mask_noise: MaskNoise = typer.Option(
        MaskNoise.rank, help="rank: each process draws its own masks; sample: random-policy masks keyed by step and sample (same for any process count)."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
) -> None:
    """MAE pretraining with any masking policy; `learned` trains the masker by multi-level optimisation.

    Policy options pass through as --<policy>-<option> VALUE (e.g. --attention-mode hint).
    With no options: the learned masker on the bundled 8x8 digits, a few CPU minutes.
    """
    with _distributed(device), one_line_errors():
        if resume is not None:
            _resume(ctx, resume, steps, device, progress)
            return
        _pretrain_new(ctx, locals())


@contextlib.contextmanager
def _distributed(device: str) -> Iterator[None]:
    """Under torchrun: join the process group (gloo on CPU, nccl on CUDA); rank 0 alone prints and writes."""
    global _DIST
    from maskkit.distributed import SINGLE, cleanup, init_from_env, launched_by_torchrun

    if not launched_by_torchrun():
        _DIST = SINGLE
        yield
        return
    from maskkit.cli import runs

    with one_line_errors():
        _DIST = init_from_env(runs.resolve_device(device).type)
    quiet = console.quiet, err_console.quiet
    if not _DIST.is_main:
        console.quiet = err_console.quiet = True
    try:
        yield
    finally:
        console.quiet, err_console.quiet = quiet
        cleanup(_DIST)
        _DIST = SINGLE


def _device(name: str) -> Any:
    """The device of this process: under torchrun on CUDA, cuda:LOCAL_RANK."""
    from maskkit.cli import runs

    dev = runs.resolve_device(name)
    if _DIST is not None and _DIST.enabled and dev.type == "cuda":
        import torch

        dev = torch.device("cuda", _DIST.local_rank)
    return dev


def _given_on_command_line(ctx: typer.Context, name: str) -> bool:
    """Whether option `name` was typed (not defaulted); by name, as typer ships its own copy of click."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "COMMANDLINE"


def _pretrain_new(ctx: typer.Context, args: dict[str, Any]) -> None:
    import torch

    from maskkit import __version__
    from maskkit.adapters.timm import get_preset
    from maskkit.cli import runs
    from maskkit.data import DEFAULT_FRACTIONS, Batcher, load_dataset
    from maskkit.plan import check_ratio
    from maskkit.registry import create_policy, get_policy_class
    from maskkit.training import Pretrainer, TrainConfig

    torch.manual_seed(args["seed"])  # whatever initialises from the global RNG (policies, head) is seeded
    # -- validate everything before touching the disk
    check_ratio(args["mask_ratio"])
    get_preset(args["model"])
    policy_class = get_policy_class(args["policy"])
    options = parse_policy_options(args["policy"], list(ctx.args), args["policy_opt"])
    if not getattr(policy_class, "learnable", False):
        given = [n for n in LEARNED_ONLY if _given_on_command_line(ctx, n)]
        if given:
            flags = ", ".join("--" + n.replace("_", "-") for n in given)
            raise CommandError(f"{flags} only apply to a learnable policy (e.g. --policy learned), not {args['policy']!r}")
    if args["steps"] is not None and args["epochs"] is not None:
        raise CommandError("give --steps or --epochs, not both")
    for name in ("batch_size", "log_every", "ckpt_every", "keep_checkpoints", "masker_every", "unroll_steps"):
        if args[name] < 1:
            raise CommandError(f"--{name.replace('_', '-')} must be a positive integer, got {args[name]}")
    if args["level2"] == Level2.ridge and args["hypergrad"] != Hypergrad.darts:
        raise CommandError("--level2 ridge needs --hypergrad darts")
    if args["masker_start"] < 0:
        raise CommandError(f"--masker-start must be a non-negative integer, got {args['masker_start']}")
    if not args["masker_reg"] >= 0:
        raise CommandError(f"--masker-reg must be a non-negative number, got {args['masker_reg']}")
    from maskkit.distributed import barrier, broadcast_object

    dist = _DIST
    dev = _device(args["device"])
    out = args["out"] or broadcast_object(
        _fresh_run_dir(Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")) if dist.is_main else None, dist
    )  # one directory for all ranks: rank 0's
    if any((out / name).exists() for name in (runs.CONFIG, runs.METRICS, runs.MODEL, runs.CHECKPOINTS)):
        raise CommandError(f"{out} already holds a run; continue it with --resume {out} or choose another --out")
    if out.exists() and not out.is_dir():
        raise CommandError(f"cannot write to output directory {out}: it is a file")

    data = load_dataset(args["dataset"], args["data_dir"], download=args["download"], img_size=args["img_size"])
    if runs.needs_labels(args["policy"]) and data.labels is None:
        raise CommandError(
            f"policy {args['policy']!r} learns from labels, but dataset {args['dataset']!r} has none "
            "(use --policy random or attention)"
        )
    if runs.needs_labels(args["policy"]) and not args["freeze_masker"]:
        from maskkit.data import DataError, check_classes

        try:
            check_classes(data, f"policy {args['policy']!r}")
        except DataError as err:
            raise CommandError(f"{err} (use --policy random or attention)") from None
    section, splits = runs.dataset_section(
        args["dataset"], args["data_dir"], args["img_size"], data, args["seed"], args["augment"].value,
        dict(DEFAULT_FRACTIONS),
    )  # fmt: skip
    patch = runs.choose_patch_size(args["model"], data.image_size, args["patch_size"])
    check_ratio(args["mask_ratio"], (data.image_size[0] // patch) * (data.image_size[1] // patch))
    model_section = {
        "preset": args["model"],
        "img_size": data.image_size[0] if data.image_size[0] == data.image_size[1] else list(data.image_size),
        "patch_size": patch,
        "in_chans": data.in_chans,
        "norm_pix_loss": args["norm_pix_loss"],
        "init_seed": args["seed"],
        "overrides": {},
    }
    mae = runs.build_mae(model_section).to(dev)
    model_section.update(num_patches=mae.num_patches, embed_dim=mae.embed_dim)
    pol = create_policy(
        args["policy"], **runs.policy_kwargs(args["policy"], options, args["mask_ratio"], mae)
    ).to(dev)

    batches_per_epoch = max(len(splits["train"]) // min(args["batch_size"], len(splits["train"])), 1)
    if args["epochs"] is not None:
        if args["epochs"] <= 0:
            raise CommandError(f"--epochs must be positive, got {args['epochs']}")
        total = max(round(args["epochs"] * batches_per_epoch), 1)
    else:
        total = DEFAULT_STEPS if args["steps"] is None else args["steps"]
    if total < 1:
        raise CommandError(f"--steps must be a positive integer, got {total}")
    warmup = args["warmup_steps"] if args["warmup_steps"] is not None else total // 20
    train_cfg = TrainConfig(
        steps=total, batch_size=args["batch_size"], lr=args["lr"], weight_decay=args["weight_decay"],
        optimizer=args["optimizer"], warmup_steps=warmup, mask_ratio=args["mask_ratio"], seed=args["seed"],
        log_every=args["log_every"], ckpt_every=args["ckpt_every"], keep_checkpoints=args["keep_checkpoints"],
        hypergrad=args["hypergrad"].value, masker_every=args["masker_every"], unroll_steps=args["unroll_steps"],
        head_optimizer=args["head_optimizer"], head_lr=args["head_lr"],
        masker_optimizer=args["masker_optimizer"], masker_lr=args["masker_lr"], masker_start=args["masker_start"],
        level2=args["level2"].value, freeze_masker=args["freeze_masker"], masker_reg=args["masker_reg"],
        skip_nonfinite=args["skip_nonfinite"], amp=args["amp"].value, mask_noise=args["mask_noise"].value,
        world_size=dist.world_size,
    )  # fmt: skip
    batcher = Batcher(data, section["mean"], section["std"], dev, section["augment"])
    trainer = Pretrainer(mae, pol, batcher, splits, train_cfg, dev, dist)  # builds optimizers and engine: may fail

    spec = runs.RunSpec(
        dataset=section,
        model=model_section,
        policy={"name": args["policy"], "options": options, "learnable": bool(getattr(pol, "learnable", False))},
        train=asdict(train_cfg),
        device=str(dev),
        versions={"maskkit": __version__, "torch": torch.__version__},
        command=list(sys.argv),
    )
    # -- now write (rank 0 only, after every rank has checked the directory)
    barrier(dist)
    if dist.is_main:
        runs.check_writable(out)
        from maskkit.checkpoint import atomic_write_text

        atomic_write_text(out / runs.CONFIG, spec.to_json())
    _describe(spec, out)
    _train(trainer, out, spec, args["progress"])


def _fresh_run_dir(base: Path) -> Path:
    """`base`, or base-2, base-3, ... if it is taken (two runs started in the same second)."""
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def _describe(spec: Any, out: Path) -> None:
    ds, m, p = spec.dataset, spec.model, spec.policy
    opts = ", ".join(f"{k}={v}" for k, v in p["options"].items())
    folder = ""  # an image folder: how it was read, and its classes
    if ds.get("layout"):
        folder = f"layout: {ds['layout']}, " + (f"{ds['num_classes']} classes, " if ds.get("labeled") else "")
    console.print(
        f"[bold]maskkit pretrain[/bold] -> {out}\n"
        f"  data   {ds['name']}: {ds['num_images']} images {ds['in_chans']}x{ds['image_size'][0]}x{ds['image_size'][1]}, "
        f"{folder}splits train {ds['splits']['train']} / val {ds['splits']['val']} / test {ds['splits']['test']}, "
        f"augment {ds['augment']}\n"
        f"  model  {m['preset']}: patch {m['patch_size']} ({m['num_patches']} patches), width {m['embed_dim']}\n"
        f"  policy {p['name']}{' (' + opts + ')' if opts else ''}, mask ratio {spec.train['mask_ratio']}"
        + (f", hypergrad {spec.train['hypergrad']}" if p.get("learnable") else "")
        + f"\n  train  {spec.train['steps']} steps of {spec.train['batch_size']} on {spec.device}",
        highlight=False,
    )


#: what the pretrain bar shows in its loss and throughput fields before the first step has finished
NO_STEP_YET = {"loss": "-", "ips": "-"}


def pretrain_progress(on: Console, total: int, completed: int, *, disable: bool = False) -> tuple[Progress, Any]:
    """The pretrain progress bar (step, loss, images/s, time spent and left) and its task.

    Its fields are text: "-" until the first step of this call has finished (never "loss nan").
    """
    columns = [
        TextColumn("[bold]pretrain"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[ips]} img/s"),
        TimeElapsedColumn(),
        TextColumn("left"),
        TimeRemainingColumn(),
    ]
    bar = Progress(*columns, console=on, disable=disable, transient=False)
    return bar, bar.add_task("pretrain", total=total, completed=completed, **NO_STEP_YET)


def step_fields(loss: float, images_per_second: float) -> dict[str, str]:
    """The bar's fields after a step: the step's loss and the throughput so far."""
    return {"loss": f"{loss:.4f}", "ips": f"{images_per_second:.0f}"}


def _resume_command(run_dir: Path) -> str:
    """How to continue the run: under torchrun, with the same number of processes."""
    if _DIST is not None and _DIST.enabled:
        return f"torchrun --nproc_per_node {_DIST.world_size} -m maskkit.cli pretrain --resume {run_dir}"
    return f"maskkit pretrain --resume {run_dir}"


def _train(trainer: Any, out: Path, spec: Any, show_progress: bool) -> None:
    """Train with SIGTERM/SIGINT turned into a clean stop (checkpoint, one line, exit 143/130)."""
    from maskkit.training import StopSignals

    with StopSignals() as stop:  # also over the final writes: a late signal lets the run finish them
        _train_and_save(trainer, out, show_progress, stop)


def _train_and_save(trainer: Any, out: Path, show_progress: bool, stop: Any) -> None:
    from maskkit.checkpoint import save_checkpoint
    from maskkit.cli import runs
    from maskkit.training import TrainingStopped, train

    cfg = trainer.config
    start_step = trainer.step_count
    state = {"t0": time.perf_counter(), "images": 0}
    main = _DIST is None or _DIST.is_main
    bar, task = pretrain_progress(console, cfg.steps, start_step, disable=not (show_progress and main))
    with bar:

        def on_step(step: int, metrics: dict[str, float]) -> None:
            state["images"] += trainer.streams["train"].batch_size
            rate = state["images"] / max(time.perf_counter() - state["t0"], 1e-9)
            bar.update(task, completed=step, **step_fields(metrics["loss"], rate))

        try:
            records = train(trainer, out, on_step=on_step, stop=stop)
        except FloatingPointError as err:
            raise CommandError(f"{err}; the last good checkpoint is kept in {out / runs.CHECKPOINTS}") from None
        except TrainingStopped as stopped:  # a scheduler's SIGTERM or a Ctrl-C: checkpointed, ready to resume
            err_console.print(
                f"Stopped by {stopped.signal_name} at step {stopped.step}, checkpoint {stopped.checkpoint.name} "
                f"written; continue with: {_resume_command(out)}", markup=False, highlight=False,
            )  # fmt: skip
            raise typer.Exit(code=stopped.exit_code) from None
        except KeyboardInterrupt:  # a second Ctrl-C while waiting for the step to end
            err_console.print(
                f"Interrupted at step {trainer.step_count} (no checkpoint at this step); continue with: "
                f"{_resume_command(out)}", markup=False, highlight=False,
            )  # fmt: skip
            raise typer.Exit(code=130) from None
    seconds = time.perf_counter() - state["t0"]
    final = {
        "mae": trainer.mae.state_dict(),
        "policy": trainer.policy.state_dict(),
        "head": None if trainer.head is None else trainer.head.state_dict(),
        "step": trainer.step_count,
    }
    if final["head"] is None:
        del final["head"]
    if not main:
        return  # rank 0 writes the final weights and the summary
    save_checkpoint(out / runs.MODEL, final)
    last = records[-1] if records else {}
    summary = {
        "steps": trainer.step_count,
        "steps_this_call": trainer.step_count - start_step,
        "seconds": round(seconds, 3),
        "images_per_second": round(state["images"] / max(seconds, 1e-9), 1),
        "final": last,
        "model": str(out / runs.MODEL),
    }
    from maskkit.checkpoint import atomic_write_text

    atomic_write_text(out / runs.SUMMARY, json.dumps(summary, indent=2, sort_keys=True) + "\n")
    table = Table(title=f"pretraining summary ({out})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("steps", str(trainer.step_count))
    table.add_row("time", f"{seconds:.1f} s")
    table.add_row("throughput", f"{summary['images_per_second']:.0f} img/s")
    for key, value in last.items():
        if key not in ("step",):
            table.add_row(f"last log: {key}", f"{value:.4g}" if isinstance(value, float) else str(value))
    console.print(table)
    console.print(f"next: maskkit evaluate {out}  |  maskkit visualize {out} -o {out / 'masks.png'}", highlight=False)


def _resume(ctx: typer.Context, run_dir: Path, steps: int | None, device: str, show_progress: bool) -> None:
    import torch

    from maskkit.checkpoint import CheckpointError, list_checkpoints, load_latest
    from maskkit.cli import runs
    from maskkit.training import MetricsLog, Pretrainer, TrainConfig

    given = [
        name for name in ctx.params
        if name not in RESUME_OPTIONS and getattr(ctx.get_parameter_source(name), "name", "") == "COMMANDLINE"
    ]  # fmt: skip
    if given or ctx.args:
        extra = [f"--{n.replace('_', '-')}" for n in given] + [a for a in ctx.args if a.startswith("--")]
        raise CommandError(f"--resume takes its settings from the run's config.json; drop {', '.join(extra)}")
    spec = runs.RunSpec.read(run_dir)
    dev = _device(device) if device != "auto" else _device(spec.device)
    dist = _DIST
    path, state = None, None  # no checkpoint yet: the run starts over from step 0
    if list_checkpoints(run_dir / runs.CHECKPOINTS):
        try:
            path, state, skipped = load_latest(run_dir / runs.CHECKPOINTS)
        except CheckpointError as err:
            raise CommandError(f"cannot resume {run_dir}: {err}") from None
        for problem in skipped:
            err_console.print(f"Warning: skipped {problem}", markup=False, highlight=False)
    start = 0 if state is None else int(state["step"])
    torch.manual_seed(spec.train["seed"])  # as a new run seeds itself: starting over repeats it exactly
    run = runs.build_run(spec, dev)
    cfg = TrainConfig(**spec.train)
    if steps is not None:
        if steps <= start:
            raise CommandError(f"--steps {steps} does not go beyond the checkpoint's step {start}")
        cfg.steps = steps
    elif start >= cfg.steps:
        raise CommandError(f"run {run_dir} is complete ({start} of {cfg.steps} steps); extend it with --steps N")
    if cfg.world_size != dist.world_size:
        raise CommandError(
            f"run {run_dir} was trained by {cfg.world_size} process(es); resume it with the same number "
            f"(torchrun --nproc_per_node {cfg.world_size}), not {dist.world_size}"
        )
    trainer = Pretrainer(run.mae, run.policy, run.batcher, run.splits, cfg, dev, dist)
    if state is not None:
        trainer.load_state_dict(state)
    from maskkit.distributed import barrier

    barrier(dist)  # every rank has read the checkpoint before rank 0 changes the directory
    if dist.is_main:
        runs.check_writable(run_dir)
        if steps is not None and steps != spec.train["steps"]:
            spec.train["steps"] = steps
            from maskkit.checkpoint import atomic_write_text

            atomic_write_text(run_dir / runs.CONFIG, spec.to_json())
        MetricsLog(run_dir / runs.METRICS).truncate_after(trainer.step_count)
    if path is None:
        err_console.print(
            f"Warning: {run_dir} has no checkpoint (it was stopped before its first); starting over from step 0",
            markup=False, highlight=False,
        )  # fmt: skip
    source = "the start" if path is None else path.name
    console.print(f"[bold]maskkit pretrain --resume[/bold] {run_dir}: from {source} (step {trainer.step_count})")
    _train(trainer, run_dir, spec, show_progress)


# ---- evaluate ---------------------------------------------------------------------------------


@app.command("evaluate")
def evaluate_command(
    run_dir: Path = typer.Argument(..., help="A run directory written by maskkit pretrain."),
    protocol: Protocol = typer.Option(Protocol.linear, help="linear (frozen encoder, BN + linear, LARS) or finetune."),
    epochs: Optional[int] = typer.Option(
        None, help=f"Epochs (default: linear {LINEAR_EPOCHS}, finetune {FINETUNE_EPOCHS}, raised on small data "
        f"so that there are at least {MIN_DEFAULT_STEPS} steps)."
    ),
    batch_size: Optional[int] = typer.Option(
        None, help=f"Batch size (default: linear {LINEAR_BATCH_SIZE}, finetune {FINETUNE_BATCH_SIZE}; at most "
        "the train split)."
    ),
    lr: Optional[float] = typer.Option(
        None, help=f"Learning rate (default: linear LARS {LINEAR_BASE_LR} x batch/256, finetune AdamW {FINETUNE_LR})."
    ),
    init: Init = typer.Option(Init.pretrained, help="pretrained weights, or random: the run's untrained initialisation."),
    seed: int = typer.Option(0, help="Seed of the probe / fine-tuning."),
    split: ScoreSplit = typer.Option(
        ScoreSplit.test, help="test (held out), or val to choose settings without the test split."
    ),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
) -> None:
    """Top-1 accuracy of the run's encoder on its test split (never seen in pretraining); writes eval.json.

    With --split val it scores on the validation split instead, under the key <protocol>@val.
    """
    with one_line_errors():
        from maskkit.cli import runs
        from maskkit.evaluate import evaluate_encoder

        spec = runs.RunSpec.read(run_dir)
        if not spec.dataset.get("labeled", True):
            raise CommandError(f"dataset {spec.dataset['name']!r} has no labels to evaluate with")
        for name, value in (("epochs", epochs), ("batch-size", batch_size)):
            if value is not None and value < 1:
                raise CommandError(f"--{name} must be a positive integer, got {value}")
        run = runs.build_run(spec, runs.resolve_device(device))
        source = {"source": "random initialisation", "step": 0}
        if init == Init.pretrained:
            source = runs.load_weights(run, run_dir)
        runs.check_writable(run_dir)
        columns = [TextColumn(f"[bold]evaluate {protocol.value}"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
                   TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn()]  # fmt: skip
        with Progress(*columns, console=console, disable=not progress, transient=False) as bar:
            task = bar.add_task("evaluate", total=None)

            def on_step(step: int, total: int) -> None:
                bar.update(task, completed=step, total=total)

            result = evaluate_encoder(
                run.mae, run.batcher, run.splits, protocol.value, epochs=epochs, batch_size=batch_size, lr=lr,
                seed=seed, score_split=split.value, on_step=on_step,
            )  # fmt: skip
        key = protocol.value if init == Init.pretrained else f"{protocol.value}-random"
        if split == ScoreSplit.val:
            key += "@val"
        record = {**asdict(result), "init": init.value, "weights": source["source"], "step": source["step"],
                  "seed": seed}  # fmt: skip
        runs.merge_json(run_dir / runs.EVAL, key, record)
        table = Table(title=f"evaluation of {run_dir}")
        table.add_column("protocol")
        table.add_column("init")
        table.add_column(f"{split.value} top-1", justify="right")
        table.add_column("train top-1", justify="right")
        table.add_column(f"train / {split.value} images", justify="right")
        table.add_row(
            result.protocol, init.value, f"{100 * result.top1:.2f}%", f"{100 * result.train_top1:.2f}%",
            f"{result.num_train} / {result.num_test}",
        )  # fmt: skip
        console.print(table)
        console.print(f"wrote {run_dir / runs.EVAL} [{key}]", highlight=False)


# ---- visualize --------------------------------------------------------------------------------


@app.command("visualize")
def visualize_command(
    run_dir: Optional[Path] = typer.Argument(
        None, help="A run directory written by maskkit pretrain (optional with --policies)."
    ),
    output: Path = typer.Option(Path("masks.png"), "-o", "--output", help="PNG file to write."),
    policies: Optional[str] = typer.Option(
        None, "--policies", help="Gallery: 'all' or comma-separated policy names; one column of masks per policy."
    ),
    mask_ratio: Optional[float] = typer.Option(
        None, help="Mask ratio (default: the run's; 0.75 for a gallery without RUN_DIR)."
    ),
    dataset: Optional[str] = typer.Option(None, help="Gallery without RUN_DIR: data set (default digits)."),
    data_dir: Optional[str] = typer.Option(None, help="Gallery without RUN_DIR: folder of torchvision data sets."),
    model: Optional[str] = typer.Option(None, help="Gallery without RUN_DIR: untrained MAE preset (default micro)."),
    num_images: int = typer.Option(8, help="Rows of the grid (test images)."),
    tile: int = typer.Option(96, help="Side of each picture in pixels (small images are upscaled)."),
    seed: int = typer.Option(0, help="Seed of the image choice, of random masks and of the gallery's untrained weights."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N."),
) -> None:
    """A PNG grid per test image: the image, its hidden patches, the masker's heat-map (learned), the reconstruction.

    With --policies: a gallery of policies instead, the image then one column per policy, every
    policy masking the same test images at the same ratio (on RUN_DIR's model and data if given,
    else on an untrained MAE).
    """
    with one_line_errors():
        from maskkit.cli import runs
        from maskkit.plan import check_ratio
        from maskkit.visualize import mask_grid, policy_gallery

        if num_images < 1 or tile < 8:
            raise CommandError("--num-images must be >= 1 and --tile >= 8")
        if output.suffix.lower() != ".png":
            raise CommandError(f"output {output} must end in .png")
        if run_dir is None and policies is None:
            raise CommandError("give RUN_DIR (a run's masks) or --policies all|NAME,... (a gallery of policies)")
        if run_dir is not None and (dataset, data_dir, model) != (None, None, None):
            raise CommandError("--dataset, --data-dir and --model are for a gallery without RUN_DIR")
        names = None if policies is None else _policy_names(policies)
        if mask_ratio is not None:
            check_ratio(mask_ratio)
        dev = runs.resolve_device(device)
        if run_dir is not None:
            spec = runs.RunSpec.read(run_dir)
            run = runs.build_run(spec, dev)
            runs.load_weights(run, run_dir)
            mae, batcher, pool = run.mae, run.batcher, run.splits["test"]
            ratio = spec.train["mask_ratio"] if mask_ratio is None else mask_ratio
        else:
            mae, batcher, pool = runs.untrained_setup(dataset or "digits", data_dir, model or "micro", seed, dev)
            ratio = 0.75 if mask_ratio is None else mask_ratio
        check_ratio(ratio, mae.num_patches)
        runs.check_writable(output.parent if str(output.parent) else Path("."))
        notes: dict[str, str] = {}
        if names is None:
            image = mask_grid(
                mae, run.policy, batcher, pool, ratio=ratio, num_images=num_images, tile=tile, seed=seed,
            )  # fmt: skip
        else:
            image, notes = policy_gallery(
                mae, batcher, pool, names, ratio=ratio, num_images=num_images, tile=tile, seed=seed
            )
        from io import BytesIO

        from maskkit.checkpoint import atomic_write_bytes

        buffer = BytesIO()
        image.save(buffer, format="PNG")
        atomic_write_bytes(output, buffer.getvalue())
        what = "" if names is None else f": {len(names) - len(notes)} of {len(names)} policies at ratio {ratio:g}"
        console.print(f"wrote {output} ({image.width}x{image.height}){what}", highlight=False)
        for name, note in notes.items():
            console.print(f"{name}: not drawn ({note})", highlight=False, markup=False)


def _policy_names(spec: str) -> list[str]:
    """'all' -> every registered policy; 'a,b' -> those names (checked, duplicates dropped, order kept)."""
    from maskkit.registry import get_policy_class, list_policies

    if spec.strip() == "all":
        return list_policies()
    names = list(dict.fromkeys(n.strip() for n in spec.split(",") if n.strip()))
    if not names:
        raise CommandError(f"--policies expects 'all' or comma-separated policy names, got {spec!r}")
    for name in names:
        get_policy_class(name)  # unknown names: one line naming the registered ones
    return names


# ---- bench ------------------------------------------------------------------------------------

#: bench size -> policy rows (batch, patches, width; the MAE whose attention the attention policy reads)
#: and MLO rows (MAE preset, batch); `trivial` is for tests (seconds, no RSS subprocesses).
BENCH_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"batch": 64, "num_patches": 64, "dim": 192, "mae": "tiny", "mlo_batch": 64, "repeats": 30},
    "vit-b": {"batch": 256, "num_patches": 196, "dim": 768, "mae": "vit-b", "mlo_batch": 64, "repeats": 20},
    "trivial": {"batch": 4, "num_patches": 16, "dim": 64, "mae": "micro", "mlo_batch": 4, "repeats": 2,
                "mlo_repeats": 2, "warmup": 1, "rss": False},
}


@app.command("bench")
def bench_command(
    preset: str = typer.Option("tiny", help="Size: tiny | vit-b | trivial (tests)."),
    device: str = typer.Option("cpu", help="cpu | cuda | cuda:N."),
    batch: Optional[int] = typer.Option(None, help="Batch size (default: tiny 64; vit-b 256 for policies, 64 for MLO)."),
    repeats: Optional[int] = typer.Option(None, help="Timed repeats (default: tiny 30 policy rounds, 7 MLO cycles)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the rows as JSON here."),
    skip_mlo: bool = typer.Option(False, "--skip-mlo", help="Only the policy-overhead rows."),
    rss: bool = typer.Option(True, "--rss/--no-rss", help="CPU: peak RSS of each MLO contender in a fresh process."),
) -> None:
    """Seconds per iteration and peak memory: masking policies vs MAE's random_masking, MLO vs a plain MAE step.

    attention_policy includes the unmasked no-grad encoder pass that reads the attention; every other
    policy that can be built from the sizes alone gets a <name>_policy row against random_policy; the
    JSON's `params` holds the learned masker's parameter counts (paper vs token arch) at ViT-B sizes.
    """
    with one_line_errors():
        import torch

        from maskkit.adapters.timm import create_mae
        from maskkit.bench import bench_policy_overhead, masker_parameter_counts
        from maskkit.cli import runs

        if preset not in BENCH_SIZES:
            raise CommandError(f"unknown bench preset {preset!r}; choose one of {', '.join(BENCH_SIZES)}")
        for name, value in (("batch", batch), ("repeats", repeats)):
            if value is not None and value < 1:
                raise CommandError(f"--{name} must be a positive integer, got {value}")
        dev = runs.resolve_device(device)
        if json_path is not None:
            runs.check_writable(json_path.parent if str(json_path.parent) else Path("."))
        size = BENCH_SIZES[preset]
        warmup = {"warmup": size["warmup"]} if "warmup" in size else {}
        encoder = create_mae(size["mae"], seed=0)
        rows = bench_policy_overhead(
            batch=batch or size["batch"], num_patches=size["num_patches"], dim=size["dim"], device=str(dev),
            repeats=repeats or size["repeats"], encoder=encoder, **warmup,
        )  # fmt: skip
        if not skip_mlo:
            from maskkit.mlo_bench import bench_mlo

            rows += bench_mlo(
                preset=size["mae"], device=str(dev), batch=batch or size["mlo_batch"], rss=rss and size.get("rss", True),
                repeats=repeats or size.get("mlo_repeats", 7), **warmup,
            )  # fmt: skip
        params = masker_parameter_counts()
        table = Table(title=f"maskkit bench ({preset}, {dev})")
        has_rss = any(row.get("rss_mb") is not None for row in rows)
        for col in ("name", "seconds", "peak_mem_mb", *(["rss_mb"] if has_rss else []), "baseline", "ratio"):
            table.add_column(col, justify="left" if col in ("name", "baseline") else "right")
        for row in rows:
            cells = [row["name"], f"{row['seconds']:.3e}", _fmt(row.get("peak_mem_mb"))]
            cells += [_fmt(row.get("rss_mb"))] if has_rss else []
            table.add_row(*cells, str(row.get("baseline") or "-"), _fmt(row.get("ratio")))
        console.print(table)
        for p in params:
            console.print(
                f"learned masker parameters at ViT-B, {p['num_patches']} patches ({p['size']}): "
                f"paper {p['paper']:,}, token {p['token']:,}", highlight=False,
            )  # fmt: skip
        if json_path is not None:
            from maskkit.checkpoint import atomic_write_text

            payload = {"device": str(dev), "torch": torch.__version__, "preset": preset,
                       "threads": torch.get_num_threads(), "rows": rows, "params": params}  # fmt: skip
            atomic_write_text(json_path, json.dumps(payload, indent=2) + "\n")
            console.print(f"wrote {json_path}", highlight=False)


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.3g}"


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
