"""The `maskkit` command: policies, list, pretrain, evaluate, visualize, bench, ablate (Typer + rich).

Parsing and printing only: the work is done by maskkit.run (runs: create, resume, train,
evaluate, pictures), the registries (maskkit.policies, maskkit.adapters, maskkit.data,
maskkit.mlo; `maskkit list`), maskkit.bench and maskkit.ablate (cli/ablate.py). `pretrain`'s options are made from
`maskkit.run.RunConfig`'s fields (cli/options.py); what is printed is drawn in cli/printing.py;
one-line errors, torchrun and the pretraining bar with its clean stops live in cli/runner.py;
`pretrain`'s SLURM options (a run submitted as a job through maskkit.slurm) in cli/slurm.py.
Every expected failure (bad option, bad data, bad checkpoint) ends the command with exit code 1
and ONE line on stderr, no traceback; set MASKKIT_DEBUG=1 to see the traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import warnings
from enum import Enum
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console

from maskkit.evaluate import (
    FINETUNE_BATCH_SIZE,
    FINETUNE_EPOCHS,
    FINETUNE_LR,
    LINEAR_BASE_LR,
    LINEAR_BATCH_SIZE,
    LINEAR_EPOCHS,
    MIN_DEFAULT_STEPS,
    MIN_FINETUNE_STEPS,
)
from maskkit.policies import AUTO_POLICY_OPTIONS, COMMON_ALLOWED

from . import runner
from . import slurm as slurm_cli
from .ablate import ablate_app
from .listing import list_command
from .options import CheckedGroup, config_command, config_from_values, given_on_command_line, option_extras
from .printing import (  # noqa: F401 - pretrain_progress, step_fields: the bar's parts, importable from here
    bench_table,
    describe,
    evaluate_progress,
    evaluation_table,
    policy_tables,
    pretrain_progress,
    step_fields,
    summary_table,
)
from .runner import CommandError

app = typer.Typer(
    cls=CheckedGroup,
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


class Init(str, Enum):
    pretrained = "pretrained"
    random = "random"


class ScoreSplit(str, Enum):
    test = "test"
    val = "val"


def one_line_errors() -> contextlib.AbstractContextManager[None]:
    """Expected exceptions become 'Error: ...' on stderr and exit code 1 (cli/runner.py)."""
    return runner.one_line_errors(err_console)


def _say(text: str, *, err: bool = False) -> None:
    runner.say(err_console if err else console, text)


# ---- policies ---------------------------------------------------------------------------------


app.command("list")(list_command)
app.add_typer(ablate_app, name="ablate")


@app.command("policies")
def policies_command() -> None:
    """List the registered masking policies (third-party ones included): paper, idea, what they learn from, options."""
    from maskkit.policies import list_policies, load_plugins, policy_card

    with one_line_errors():
        load_plugins()
    cards = [policy_card(name) for name in list_policies()]
    table, options, note = policy_tables(cards, AUTO_POLICY_OPTIONS, COMMON_ALLOWED["ratio"])
    console.print(table)
    console.print(options)
    console.print(note, highlight=False)


# ---- pretrain ---------------------------------------------------------------------------------

#: options that may be combined with --resume (everything else comes from the run's config.json), the
#: SLURM options (cli/slurm.py) too
RESUME_OPTIONS = ("resume", "steps", "device", "progress", "trust_unverified", "trust_data_change", *slurm_cli.OPTIONS)


def _refuse_beside_resume(ctx: typer.Context) -> None:
    given = [n for n in ctx.params if n not in RESUME_OPTIONS and given_on_command_line(ctx, n)]
    if given or ctx.args:
        extra = [f"--{n.replace('_', '-')}" for n in given] + [a for a in ctx.args if a.startswith("--")]
        raise CommandError(f"--resume takes its settings from the run's config.json; drop {', '.join(extra)}")


def _new_config(ctx: typer.Context, values: dict[str, Any]) -> Any:
    """The RunConfig of a new run, from the parsed options and the policy's / hypergradient's extras."""
    for name in ("trust_unverified", "trust_data_change"):
        if values[name]:
            raise CommandError(f"--{name.replace('_', '-')} only applies with --resume")
    from maskkit.adapters.models import parse_model_options
    from maskkit.mlo import HYPERGRADS
    from maskkit.policies import coerce_policy_options

    extras = option_extras(values["policy"], values["hypergrad"], list(ctx.args), values["policy_opt"],
                           values["hypergrad_opt"])  # fmt: skip
    options = coerce_policy_options(values["policy"], *extras["policy"])  # named as typed, before any work
    method = HYPERGRADS.coerce(values["hypergrad"], *extras["hypergrad"]) if values["hypergrad"] in HYPERGRADS else {}
    return config_from_values(values, options, parse_model_options(values["model_opt"]), method)


def _submit_to_slurm(ctx: typer.Context, values: dict[str, Any], given: list[str]) -> None:
    """The SLURM options were given: check everything that can be checked here, then submit (cli/slurm.py)."""
    from maskkit import slurm

    with one_line_errors():
        chosen = slurm_cli.settings(values, given)
        if values["resume"] is not None:
            _refuse_beside_resume(ctx)
            job = slurm.resume_job(values["resume"], chosen, steps=values["steps"], device=values["device"],
                                   trust_unverified=values["trust_unverified"],
                                   trust_data_change=values["trust_data_change"])  # fmt: skip
        else:
            job = slurm.new_job(_new_config(ctx, values), values["out"])
        slurm_cli.submit(job, chosen, values["dry_run"], console)


def pretrain_command(ctx: typer.Context, **values: Any) -> None:
    """MAE pretraining with any masking policy; `learned` trains the masker by multi-level optimisation.

    Policy options pass through as --<policy>-<option> VALUE (e.g. --attention-mode hint).
    With no options: random masking (MAE) on the bundled 8x8 digits, a few CPU minutes.
    Any SLURM option (--slurm-partition, --nodes, --gpus-per-node, --slurm-time, ...) submits the run
    as a SLURM job instead, one task per GPU, requeued on its time limit and resumed from its newest
    checkpoint (pip install "maskkit\\[slurm]").
    """
    from maskkit import run

    given = slurm_cli.requested(ctx)
    if given:
        _submit_to_slurm(ctx, values, given)
        return
    with runner.distributed(values["device"], console, err_console) as dist, one_line_errors():
        if values["resume"] is not None:
            _refuse_beside_resume(ctx)
            prepared = run.resume_run(values["resume"], steps=values["steps"], device=values["device"], dist=dist,
                                      trust_unverified=values["trust_unverified"],
                                      trust_data_change=values["trust_data_change"])  # fmt: skip
            for warning in prepared.warnings:
                _say(f"Warning: {warning}", err=True)
            console.print(f"[bold]maskkit pretrain --resume[/bold] {prepared.out}: from {prepared.source} "
                          f"(step {prepared.trainer.step_count})")  # fmt: skip
        else:
            config = _new_config(ctx, values)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", run.RunWarning)
                prepared = run.create_run(config, values["out"], dist=dist)
            for w in caught:  # a RunWarning is one line; any other warning goes on as it came
                if issubclass(w.category, run.RunWarning):
                    _say(f"Warning: {w.message}", err=True)
                else:
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            describe(console, prepared.record, prepared.out, prepared.trainer.dist.nodes)
        summary = runner.train_with_progress(prepared, console, err_console, values["progress"])
        if summary is not None:  # rank 0
            console.print(summary_table(summary, prepared.out))
            _say(f"next: maskkit evaluate {prepared.out}  |  maskkit visualize {prepared.out} -o "
                 f"{prepared.out / 'masks.png'}")


pretrain_command = config_command(pretrain_command, more=slurm_cli.OPTIONS)
app.command("pretrain", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(pretrain_command)


# ---- evaluate ---------------------------------------------------------------------------------


@app.command("evaluate")
def evaluate_command(
    run_dir: Path = typer.Argument(..., help="A run directory written by maskkit pretrain."),
    protocol: Protocol = typer.Option(Protocol.linear, help="linear (frozen encoder, BN + linear, LARS) or finetune."),
    epochs: Optional[int] = typer.Option(
        None, help=f"Epochs (default: linear {LINEAR_EPOCHS}, finetune {FINETUNE_EPOCHS}, raised on small data "
        f"so that there are at least {MIN_DEFAULT_STEPS} linear or {MIN_FINETUNE_STEPS} fine-tune steps)."
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
    trust_data_change: bool = typer.Option(
        False, "--trust-data-change",
        help="Score on the run's data even if it changed since the run was pretrained (eval.json's entry "
        "then records what changed)."),
) -> None:
    """Top-1 accuracy of the run's encoder on its test split (never seen in pretraining); writes eval.json.

    With --split val it scores on the validation split instead, under the key <protocol>@val.
    """
    with one_line_errors():
        from maskkit.run import EVAL, EvalConfig, run_evaluation

        config = EvalConfig(protocol.value, init.value, split.value, epochs, batch_size, lr, seed, device,
                            trust_data_change)  # fmt: skip
        config.check()  # the one check of the options, before anything is read
        with evaluate_progress(console, protocol.value, disable=not progress) as bar:
            task = bar.add_task("evaluate", total=None)
            key, result = run_evaluation(
                run_dir, config, on_step=lambda step, total: bar.update(task, completed=step, total=total),
                on_plan=lambda text: console.print(text, highlight=False),
            )  # fmt: skip
        table = evaluation_table(run_dir, result, init.value, split.value)
        console.print(table)
        _say(f"settings: {result['optimizer']} lr {result['lr']:g}, weight decay {result['weight_decay']:g}, "
             f"{result['epochs']} epochs, batch {result['batch_size']}, seed {result['seed']}, on {result['device']}")
        _say(f"wrote {run_dir / EVAL} [{key}]")


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
    model: Optional[str] = typer.Option(None, help="Gallery without RUN_DIR: untrained MAE (default micro; any --model)."),
    num_images: int = typer.Option(8, help="Rows of the grid (test images)."),
    tile: int = typer.Option(96, help="Side of each picture in pixels (small images are upscaled)."),
    seed: int = typer.Option(0, help="Seed of the image choice, of random masks and of the gallery's untrained weights."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N."),
    trust_data_change: bool = typer.Option(
        False, "--trust-data-change",
        help="With RUN_DIR: draw the run's data even if it changed since it was pretrained."),
    decoder_ratio: Optional[float] = typer.Option(
        None, help="Video run: draw the decoder's subset at this decoder mask ratio (default: the run's "
        "--decoder-ratio; none without one)."),
    decoder_rule: Optional[str] = typer.Option(
        None, help="Video run: the rule of that subset, runningcell | random | auto (default: the run's)."),
) -> None:
    """A PNG grid per test image: the image, its hidden patches, the masker's heat-map (learned), the reconstruction.

    With --policies: a gallery of policies instead, the image then one column per policy, every
    policy masking the same test images at the same ratio (on RUN_DIR's model and data if given,
    else on an untrained MAE). A video MAE's picture has one column per frame and, per clip, the rows
    clip, hidden tubes, decoder subset (when the run or --decoder-ratio names one) and reconstruction;
    its gallery one row per policy.
    """
    with one_line_errors():
        from maskkit.run import picture

        pic = picture(
            output, run_dir, policies=policies, mask_ratio=mask_ratio, dataset=dataset, data_dir=data_dir,
            model=model, num_images=num_images, tile=tile, seed=seed, device=device,
            trust_data_change=trust_data_change, decoder_ratio=decoder_ratio, decoder_rule=decoder_rule,
        )  # fmt: skip
        total = len(pic.policies)
        drawn = f": {total - len(pic.not_drawn)} of {total} policies at ratio {pic.ratio:g}" if total else ""
        _say(f"wrote {output} ({pic.image.width}x{pic.image.height}){drawn}")
        for name, note in pic.not_drawn.items():
            _say(f"{name}: not drawn ({note})")


# ---- bench ------------------------------------------------------------------------------------


@app.command("bench")
def bench_command(
    preset: str = typer.Option("tiny", help="Size: tiny | small | vit-b | trivial (tests)."),
    device: str = typer.Option("cpu", help="cpu | cuda | cuda:N."),
    batch: Optional[int] = typer.Option(None, help="Batch size (default: tiny 64; vit-b 256 for policies, 64 for MLO)."),
    repeats: Optional[int] = typer.Option(None, help="Timed repeats (default: tiny 30 policy rounds, 7 MLO cycles)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the rows as JSON here."),
    skip_mlo: bool = typer.Option(False, "--skip-mlo", help="Only the policy-overhead rows."),
    plans: bool = typer.Option(
        False, "--plans",
        help="Only the checks' rows: the random and a weighted policy's plan at B=256, N=196 with "
        "MaskPlan.validate on and off, a plugin source's samples read with and without their check, interleaved, "
        "and the hypergradient check."),
    rss: bool = typer.Option(True, "--rss/--no-rss", help="CPU: peak RSS of each MLO contender in a fresh process."),
    compile_backend: str = typer.Option(
        "none", "--compile", help="A torch.compile backend (inductor, ...): every MLO row again with the MAE's blocks "
        "compiled (<name>@<backend>), interleaved with the eager ones."),
    grid: Optional[str] = typer.Option(
        None, "--grid", help="Only the policy rows, on a space-time token grid T'xH'xW' (VideoMAE's 8x14x14 = 1568 "
        "tokens, clips 16x224x224 in 2x16x16 tubelets) at ratio 0.9; the policies that refuse it listed with why."),
) -> None:
    """Seconds per iteration and peak memory: masking policies vs MAE's random_masking, MLO vs a plain MAE step.

    attention_policy includes the unmasked no-grad encoder pass that reads the attention; every other
    policy that can be built from the sizes alone gets a <name>_policy row against random_policy; the
    JSON's `params` holds the learned masker's parameter counts (paper vs token arch) at ViT-B sizes.
    random_plan_checked / random_plan_unchecked time the random policy's plan at B=256, N=196 with the plan
    check on and off (MASKKIT_CHECK_PLANS), weighted_plan_* a plan with weights (uniform, secondary 0.5);
    source_read_checked / source_read_unchecked a plugin source's 256 samples read with and without their
    check, masker_grads_check the hypergradient's check; --plans runs those rows alone. --grid 8x14x14: every
    policy's cost per step on VideoMAE's space-time grid instead (N=1568, ratio 0.9).
    """
    with one_line_errors():
        from maskkit.bench import input_check_line, plan_check_line, run_bench
        from maskkit.checkpoint import atomic_write_text
        from maskkit.run import check_writable, resolve_device

        dev = resolve_device(device)
        if json_path is not None:
            check_writable(json_path.parent if str(json_path.parent) else Path("."))
        payload = run_bench(preset, str(dev), batch=batch, repeats=repeats, skip_mlo=skip_mlo, rss=rss,
                            compile=compile_backend, plans_only=plans, grid=grid)  # fmt: skip
        rows = payload["rows"]
        if grid is not None:
            from maskkit.video_bench import refusal_lines

            console.print(bench_table(rows, f"maskkit bench ({preset}, {dev}): grid {payload['grid']}, "
                                            f"N={payload['num_patches']}, ratio {payload['mask_ratio']:g}, B={payload['batch']}"))
            for line in refusal_lines(payload):
                _say(line)
        else:
            console.print(bench_table(rows, f"maskkit bench ({preset}, {dev})"))
            _say(plan_check_line(rows))
            _say(input_check_line(rows))
        model = payload.get("cost_model")
        if model is not None and not skip_mlo:
            _say(f"cost model ({model['num_patches']} patches, unmasked/masked pass {model['unmasked_over_masked']:.2f}): "
                 + ", ".join(f"{k} {model[k]:.2f}x" for k in ("mlo_darts", "mlo_darts_direct", "mlo_unroll_k1")))
        for p in payload["params"]:
            _say(f"learned masker parameters at ViT-B, {p['num_patches']} patches ({p['size']}): "
                 f"paper {p['paper']:,}, token {p['token']:,}")  # fmt: skip
        if json_path is not None:
            atomic_write_text(json_path, json.dumps(payload, indent=2) + "\n")
            _say(f"wrote {json_path}")


def main() -> None:
    """Console-script entry point.

    Under torchrun the process ends with `os._exit` once the command has returned (files written,
    process group left): a gloo worker thread may still be releasing the tensors of a finished
    collective, and at interpreter shutdown such a thread, waiting for the GIL, is torn down, which
    aborts the process (std::terminate, SIGABRT) after a run that succeeded.
    """
    from maskkit.distributed import launched_by_torchrun

    if not launched_by_torchrun():
        app()
        return
    try:
        app()
        code = 0
    except SystemExit as done:  # typer's standalone mode ends every command this way
        code = done.code if isinstance(done.code, int) else 0 if done.code is None else 1
        if isinstance(done.code, str):
            print(done.code, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
