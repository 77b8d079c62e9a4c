"""What the `maskkit` commands print: the policy cards, the run's description, the progress bars, the
summary, evaluation and bench tables."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
from rich.text import Text

from maskkit.data.splits import test_split_name


def cli_value(value: Any) -> str:
    """A default as the command line spells it: none, true/false, or the value."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def policy_tables(cards: list[Any], auto_options: tuple[str, ...], common_ratio: str) -> tuple[Table, Table, str]:
    """`maskkit policies`: the cards (paper, what each learns from, idea), every option's flag, default and
    allowed values, and a line on --mask-ratio and the options that come from the model."""
    table = Table(title="masking policies", show_lines=True)
    table.add_column("policy", style="bold", overflow="fold")
    table.add_column("paper", overflow="fold")
    table.add_column("learns from", overflow="fold")
    table.add_column("idea", overflow="fold")
    for card in cards:
        table.add_row(card.name, Text(card.paper), card.learns, Text(card.idea))
    options = Table(title="policy options: --<policy>-<option> VALUE, or --policy-opt option=VALUE")
    options.add_column("option", overflow="fold")
    options.add_column("default", overflow="fold")
    options.add_column("allowed values", overflow="fold")
    for card in cards:
        shown = [o for o in card.options if o.name not in auto_options]
        for i, opt in enumerate(shown):
            flag = f"--{card.name.replace('_', '-')}-{opt.name.replace('_', '-')}"
            # Text cells: allowed values such as "[0, 1]" are not rich markup
            options.add_row(flag, Text(cli_value(opt.default)), Text(opt.allowed), end_section=i == len(shown) - 1)
    ratio = {c.name: o for c in cards for o in c.options if o.name == "ratio"}
    own = ", ".join(f"{name} {o.default}" for name, o in ratio.items())
    only = "".join(f"; {name} takes {o.allowed}" for name, o in ratio.items() if o.allowed != common_ratio)
    note = (f"--mask-ratio sets the policy's ratio (default: the policy's own: {own}; in {common_ratio}{only}); "
            f"{', '.join(auto_options[1:])} come from the model.")  # fmt: skip
    return table, options, note


def describe(console: Console, record: Any, out: Path, nodes: int = 1) -> None:
    """The run in four lines: data, model, policy, training (`nodes`: torchrun's --nnodes)."""
    ds, m, p, t = record.resolved.data, record.model, record.resolved.policy, record.resolved.train
    opts = ", ".join(f"{k}={v}" for k, v in p.options.items())
    samples, frames = ("images", "") if ds.num_frames is None else ("clips", f"{ds.num_frames}x")  # C x [T x] H x W
    folder = ""  # an image folder: how it was read, and its classes
    if ds.layout:
        folder = f"layout: {ds.layout}, " + (f"{ds.num_classes} classes, " if ds.labeled else "")
    console.print(
        f"[bold]maskkit pretrain[/bold] -> {out}\n"
        f"  data   {ds.name}: {ds.num_images} {samples} {ds.in_chans}x{frames}{ds.image_size[0]}x{ds.image_size[1]}, "
        f"{folder}splits {splits_text(ds)}, augment {ds.augment}\n"
        f"  model  {m['name']}: patch {m['patch_size']} ({m['num_patches']} {'tokens' if frames else 'patches'}), "
        f"width {m['embed_dim']}\n"
        f"  policy {p.name}{' (' + opts + ')' if opts else ''}, mask ratio {t.resolved.mask_ratio}"
        + (f", hypergrad {t.mlo.hypergrad}" if p.learnable else "")
        + ("" if t.train.decoder_ratio is None else f", decoder ratio {t.train.decoder_ratio} ({t.train.decoder_rule})")
        + f"\n  train  {train_line(record, nodes)} on {record.device}",
        highlight=False,
    )


def splits_text(ds: Any) -> str:
    """'train 1257 / val 180 / test 360', or in the official layout 'pretrain 48 (the train folder) / train 42 /
    val 6 / test 12 (the val folder)' (`ds`: the record's `DatasetRecord`)."""
    sizes = ds.splits
    text = f"train {sizes['train']} / val {sizes['val']} / test {sizes['test']}"
    if "pretrain" not in sizes:
        return text
    return f"pretrain {sizes['pretrain']} (the train folder) / {text} ({test_split_name(ds.split_rule)})"


def train_line(record: Any, nodes: int = 1) -> str:
    """The banner's length and batch: steps and epochs, the effective (global) batch and its parts (per
    process, accumulated, processes and nodes), the peak lr."""
    t, ds = record.resolved.train, record.resolved.data
    size, accum, world = t.train.batch_size, t.train.accum_iter, t.world_size
    effective = size * accum * world
    split = ds.splits.get("pretrain", ds.splits["train"])  # what the MAE pretrains on
    epochs = t.steps / max(split // min(effective, split), 1)  # as Trainer.epoch counts them
    where = f"{world} processes" + (f" on {nodes} nodes" if nodes > 1 else "")
    parts = [str(size) + (" per process" if world > 1 else "")] \
        + ([f"{accum} accumulated"] if accum > 1 else []) + ([where] if world > 1 else [])
    batch = f"{'global batch ' if world > 1 else ''}{effective} ({' x '.join(parts)})" if len(parts) > 1 \
        else str(effective)
    blr = record.asked.train.blr
    lr = f"lr {t.resolved.lr:.4g}" + (f" (blr {blr:.4g} x {effective} / 256)" if blr is not None else "")
    floor = f", min lr {t.train.min_lr:.4g}" if t.train.min_lr else ""
    return (f"{t.steps} steps ({epochs:.4g} epoch{'' if epochs == 1 else 's'}) of {batch}, "
            f"warm-up {t.resolved.warmup_steps} steps, "
            f"{lr}{floor},")


#: what the pretrain bar shows in its loss and throughput fields before the first step has finished
NO_STEP_YET = {"loss": "-", "ips": "-", "wait": "-", "mem": ""}


def pretrain_progress(on: Console, total: int, completed: int, *, disable: bool = False) -> tuple[Progress, Any]:
    """The pretrain progress bar (step, loss, images/s, data wait, peak CUDA memory, time spent and left) and its task.

    Its fields are text: "-" until the first step of this call has finished (never "loss nan"); the
    memory field stays empty off CUDA.
    """
    columns = [
        TextColumn("[bold]pretrain"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[ips]} img/s"),
        TextColumn("data wait {task.fields[wait]}"),
        TextColumn("{task.fields[mem]}"),
        TimeElapsedColumn(),
        TextColumn("left"),
        TimeRemainingColumn(),
    ]
    bar = Progress(*columns, console=on, disable=disable, transient=False)
    return bar, bar.add_task("pretrain", total=total, completed=completed, **NO_STEP_YET)


def step_fields(
    loss: float, images_per_s: float, data_wait: float | None = None, peak_mem_mb: float | None = None, **_: Any
) -> dict[str, str]:
    """The bar's fields after a step: its loss and the library's throughput so far (`Trainer.perf.totals()`:
    images/s, the fraction of the time spent waiting for batches, peak CUDA memory in MiB)."""
    return {"loss": f"{loss:.4f}", "ips": f"{images_per_s:.0f}",
            "wait": "-" if data_wait is None else f"{100 * data_wait:.0f}%",
            "mem": "" if peak_mem_mb is None else f"peak {peak_mem_mb:.0f} MiB"}  # fmt: skip


def evaluate_progress(on: Console, protocol: str, *, disable: bool = False) -> Progress:
    """`maskkit evaluate`'s bar: steps done of the total, time spent and left."""
    columns = [TextColumn(f"[bold]evaluate {protocol}"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
               TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn()]  # fmt: skip
    return Progress(*columns, console=on, disable=disable, transient=False)


def summary_table(summary: dict[str, Any], out: Path) -> Table:
    """The table `maskkit pretrain` ends with: steps, time, throughput and the last metrics line."""
    table = Table(title=f"pretraining summary ({out})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("steps", str(summary["steps"]))
    table.add_row("time", f"{summary['seconds']:.1f} s")
    table.add_row("throughput", f"{summary['images_per_second']:.0f} img/s")
    for key, value in summary["final"].items():
        if key != "step":
            table.add_row(f"last log: {key}", f"{value:.4g}" if isinstance(value, float) else str(value))
    return table


def evaluation_table(run_dir: Path, result: dict[str, Any], init: str, split: str) -> Table:
    """`maskkit evaluate`'s table: protocol, init, top-1 on the scored and the train split, image counts."""
    table = Table(title=f"evaluation of {run_dir}")
    for col in ("protocol", "init", f"{split} top-1", "train top-1", f"train / {split} images"):
        table.add_column(col, justify="left" if col in ("protocol", "init") else "right")
    table.add_row(
        result["protocol"], init, f"{100 * result['top1']:.2f}%", f"{100 * result['train_top1']:.2f}%",
        f"{result['num_train']} / {result['num_test']}",
    )  # fmt: skip
    return table


def bench_table(rows: list[dict[str, Any]], title: str) -> Table:
    """`maskkit bench`'s rows: seconds, peak memory (and RSS), baseline and ratio."""
    table = Table(title=title)
    has_rss = any(row.get("rss_mb") is not None for row in rows)
    for col in ("name", "seconds", "peak_mem_mb", *(["rss_mb"] if has_rss else []), "baseline", "ratio"):
        table.add_column(col, justify="left" if col in ("name", "baseline") else "right")
    for row in rows:
        cells = [row["name"], f"{row['seconds']:.3e}", _fmt(row.get("peak_mem_mb"))]
        cells += [_fmt(row.get("rss_mb"))] if has_rss else []
        table.add_row(*cells, str(row.get("baseline") or "-"), _fmt(row.get("ratio")))
    return table


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.3g}"
