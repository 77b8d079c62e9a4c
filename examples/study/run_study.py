"""The masking studies on MNIST-5k and photos8: every row is a `maskkit` command; resumable.

    python examples/study/run_study.py                  # run what is missing (2 workers, 1 thread each)
    python examples/study/run_study.py --dry-run        # print the commands only
    python examples/study/run_study.py --seeds 0 --workers 1
    python examples/study/run_study.py --steps 1632 --seeds 0 --split val --arms random gumbel-straight  # explore
    python examples/study/run_study.py --data photos8 --steps 1632 --arms random hpm --finetune      # natural photos

Issue 7's study: the default arms at 500 steps (and `--steps 1632`). Issue 12's study (guided
fractions, `hpm`, `--masker-reg`): the GUIDED arms at `--steps 1632` on `--data mnist5k` and
`--data photos8`; rows of photos8 are keyed `photos8:<arm>`.

Each job pretrains one arm for one seed (`maskkit pretrain ... --out runs/study/<arm>-s<seed>`),
then runs `maskkit evaluate` (linear probe; `--finetune` adds a short fine-tune) and appends one
JSON line to examples/study/results.jsonl. A job whose line is there is skipped; a run directory left
half-way by an interruption is continued with `maskkit pretrain --resume`. Jobs are ordered seed
by seed (every arm of seed 0 first), so a partial table stays balanced. Floors per seed: the same
linear probe on an untrained encoder (`maskkit evaluate --init random`) and on raw pixels
(examples/study/raw_pixel_probe.py). `random-eqtime` is the random arm trained for as many steps as fit in the
wall time of `learned-darts-topk` (EQTIME_STEPS, from a measurement on an idle machine). Summarise with examples/study/summarize.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "examples" / "study" / "results.jsonl"
RUNS = ROOT / "runs" / "study"
SHARED_DATA = (ROOT / ".." / "shared" / "data").resolve()
#: data set -> (the `--dataset` value, the prefix of its result keys and run directories)
DATASETS = {
    "mnist5k": ("npz:" + str(SHARED_DATA / "mnist5k.npz"), ""),
    "photos8": ("npz:" + str(SHARED_DATA / "photos8.npz"), "photos8:"),
}

STEPS = 500  # pretraining iterations of every arm (see docs/results.md for how this was chosen)
BATCH = 64
COMMON = [
    "--model",
    "pilot",
    "--batch-size",
    str(BATCH),
    "--device",
    "cpu",
    "--no-progress",
    "--log-every",
    "10",
    "--ckpt-every",
    "100",
]

#: arm -> policy options (everything else is COMMON)
ARMS: dict[str, list[str]] = {
    "random": ["--policy", "random"],
    "attention-high": ["--policy", "attention", "--attention-mode", "high"],
    "attention-hint": ["--policy", "attention", "--attention-mode", "hint"],
    "learned-darts-topk": ["--policy", "learned", "--hypergrad", "darts", "--learned-selection", "topk"],
    "learned-darts-gumbel": ["--policy", "learned", "--hypergrad", "darts", "--learned-selection", "gumbel"],
    "learned-unroll-k1": [
        "--policy",
        "learned",
        "--hypergrad",
        "unroll",
        "--unroll-steps",
        "1",
        "--learned-selection",
        "topk",
    ],
    "frozen-masker": ["--policy", "learned", "--freeze-masker", "--learned-selection", "topk"],
    "frozen-masker-gumbel": ["--policy", "learned", "--freeze-masker", "--learned-selection", "gumbel"],
}
#: the exploration (issue 7: what makes learned masks pay), chosen on the validation split
#: (`--split val`); each is MLO darts with one change from `learned-darts-gumbel` / `-topk`.
MAIN_ARMS = [*ARMS]
GUMBEL = ARMS["learned-darts-gumbel"]
EXPLORE: dict[str, list[str]] = {
    "gumbel-normalized": [*GUMBEL, "--learned-weighting", "normalized"],
    "gumbel-straight": [*GUMBEL, "--learned-weighting", "straight"],
    "topk-straight": [*ARMS["learned-darts-topk"], "--learned-weighting", "straight"],
    "gumbel-warmup400": [*GUMBEL, "--masker-start", "400"],
    "gumbel-masker-lr1e-4": [*GUMBEL, "--masker-lr", "1e-4"],
    "gumbel-ratio0.6": [*GUMBEL, "--mask-ratio", "0.6"],
    "gumbel-ridge": [*GUMBEL, "--level2", "ridge"],
    "random-ratio0.6": [*ARMS["random"], "--mask-ratio", "0.6"],
}
ARMS.update(EXPLORE)
#: issue 12: the devices against collapse (guided fraction 0.5 ramped over the run, label-free hpm,
#: the anti-collapse penalty), each arm at 1632 steps on both data sets.
GUIDED_05 = ["--learned-guided-fraction", "0.5", "--learned-guided-ramp", "1"]
GUIDED: dict[str, list[str]] = {
    "random-rerun": ["--policy", "random"],  # random masking re-made beside the new arms (same machine, packages)
    "hpm": ["--policy", "hpm"],  # its defaults: guided 0.5, ramp 1
    "hpm-g1": ["--policy", "hpm", "--hpm-guided-fraction", "1.0"],
    "attention-high-g05": ["--policy", "attention", "--attention-mode", "high", "--attention-guided-fraction", "0.5",
                           "--attention-guided-ramp", "1"],
    "mlo-gumbel-g05": [*GUMBEL, *GUIDED_05],
    "mlo-gumbel-g05-reg0.1": [*GUMBEL, *GUIDED_05, "--masker-reg", "0.1"],
    "mlo-gumbel-g05-reg1": [*GUMBEL, *GUIDED_05, "--masker-reg", "1.0"],
    "frozen-gumbel-g05": ["--policy", "learned", "--freeze-masker", "--learned-selection", "gumbel", *GUIDED_05],
}
ARMS.update(GUIDED)
#: issue 15: the policy zoo against random masking (MNIST-5k, 1632 steps), each at its paper's default
#: ratio and at 0.75. Paper defaults: SimMIM 0.6; ColorMAE 0.75; AdaMAE 0.95 (video); UM-MAE 0.75 only.
#: `uniform` needs an even grid, and MNIST's 28x28 at the pilot's patch 4 is 7x7: its row resizes the
#: digits to 32x32 (8x8 patches, no augmentation, as at 28) and is paired with random masking on the same.
ZOO: dict[str, list[str]] = {
    "simmim": ["--policy", "simmim", "--mask-ratio", "0.6"],  # its paper's ratio (its default too, given for the record)
    "simmim-r0.75": ["--policy", "simmim", "--mask-ratio", "0.75"],
    "colornoise": ["--policy", "colornoise"],  # green noise, ratio 0.75 (the paper's default and 0.75 at once)
    "adamae-r0.95": ["--policy", "adamae", "--mask-ratio", "0.95"],
    "adamae": ["--policy", "adamae"],  # ratio 0.75
    "random-i32": ["--img-size", "32", "--augment", "none", "--policy", "random"],
    "uniform-i32": ["--img-size", "32", "--augment", "none", "--policy", "uniform"],
}
ARMS.update(ZOO)
#: `random-eqtime`: random masking for the wall time of STEPS steps of `learned-darts-topk`. Measured
#: per-step cost on this machine (pilot preset, batch 64, 1 thread, idle machine, 40 steps each):
#: random 3.99 s, darts top-k 13.02 s, a ratio of 3.26; a fixed count keeps the row independent of
#: the machine's load while the study runs (the table also reports the measured wall times).
EQTIME_STEPS = round(STEPS * 13.02 / 3.99)
#: issue 12's equal wall time: per data set, the learned arm that beat random by the most at 1632
#: steps (test split); random masking gets the steps that fit in that arm's wall time (`--equal-time-of`)
EQTIME_OF = {"mnist5k": "mlo-gumbel-g05-reg0.1", "photos8": "mlo-gumbel-g05"}
STEP_COSTS = ROOT / "examples" / "study" / "step_costs.json"


def eqtime_steps(data: str, arm: str, steps: int) -> int:
    """Steps of random masking in the idle-core wall time of `steps` steps of `arm` (examples/study/step_costs.json)."""
    costs = json.loads(STEP_COSTS.read_text())
    return round(steps * costs[f"{data}/{arm}"]["ratio_to_random"])


#: fine-tuning epochs (batch 128, AdamW lr 1e-3): 10 epochs of the 3,500 train images = 280 steps;
#: the default (50 epochs, >= 1,000 steps) costs about 10 CPU minutes per run, too much for 20 runs.
FINETUNE_EPOCHS = 10
LOCK = threading.Lock()


def record(entry: dict) -> None:
    with LOCK:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with open(RESULTS, "a") as f:
            f.write(json.dumps(entry, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())


def result(key: str) -> dict | None:
    """The last line recorded for `key` (a later line, e.g. with a fine-tune added, wins)."""
    if not RESULTS.is_file():
        return None
    found = None
    for line in RESULTS.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if entry.get("key") == key:
            found = entry
    return found


def sh(cmd: list[str], dry: bool) -> None:
    print("$ " + " ".join(cmd), flush=True)
    if dry:
        return
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    done = subprocess.run(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-500:]}")


def pretrain(arm: str, seed: int, steps: int, dry: bool, name: str | None = None, data: str = "mnist5k") -> Path:
    dataset, prefix = DATASETS[data]
    out = RUNS / f"{prefix.replace(':', '-')}{name or arm}-s{seed}"
    if (out / "summary.json").is_file() and (out / "model.pt").is_file():
        return out
    if (out / "checkpoints").is_dir() and any((out / "checkpoints").glob("*.pt")):
        sh(["maskkit", "pretrain", "--resume", str(out), "--no-progress"], dry)
        return out
    if out.exists() and not dry:
        shutil.rmtree(out)  # interrupted before its first checkpoint
    policy = ARMS["random" if arm == "random-eqtime" else arm]
    sh(
        [
            "maskkit",
            "pretrain",
            "--dataset",
            dataset,
            *COMMON,
            "--steps",
            str(steps),
            "--seed",
            str(seed),
            *policy,
            "--out",
            str(out),
        ],
        dry,
    )
    return out


def evaluate(out: Path, protocol: str, init: str, dry: bool, split: str = "test") -> dict:
    extra = ["--epochs", str(FINETUNE_EPOCHS)] if protocol == "finetune" else []
    sh(["maskkit", "evaluate", str(out), "--protocol", protocol, "--init", init, "--device", "cpu",
        "--split", split, *extra], dry)  # fmt: skip
    if dry:
        return {}
    key = (protocol if init == "pretrained" else f"{protocol}-random") + ("@val" if split == "val" else "")
    return json.loads((out / "eval.json").read_text())[key]


def metric(protocol: str, args: argparse.Namespace) -> str:
    """Name of a score in results.jsonl: the protocol, with "_val" when scored on the validation split."""
    return protocol if args.split == "test" else f"{protocol}_val"


def mask_stats(out: Path) -> dict:
    """The shares of ink and of background patches the run's final policy hides, on 500 test images."""
    cmd = [sys.executable, str(ROOT / "examples" / "study" / "mask_stats.py"), str(out)]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    row = json.loads(done.stdout.strip().splitlines()[-1])
    return {k: row[k] for k in ("ink_hidden", "background_hidden", "logit_std_within_image") if k in row}


#: the collapse diagnostics a row keeps from the run's last metrics line
DIAGNOSTICS = ("mask_iou", "mask_pos_entropy", "logit_spread", "hpm_rank_corr", "masker_prior_kl")


def arm_label(arm: str, steps: int) -> str:
    """An arm's name in results and run directories: `<arm>@<steps>` at another budget than STEPS."""
    if arm == "random" and steps == EQTIME_STEPS:
        return "random-eqtime"  # random at 1632 steps is the equal-time row of issue 7: the same runs
    return arm if steps == STEPS else f"{arm}@{steps}"


def job(arm: str, seed: int, args: argparse.Namespace) -> None:
    steps, data = args.steps, args.data
    prefix = DATASETS[data][1]
    label = arm_label(arm, steps)  # another budget: its own rows and run dirs
    floor = arm in ("untrained", "raw-pixels")
    if floor:
        label = arm  # a floor does not depend on the budget: it is measured on the random run's model
    key = f"{prefix}{label}/s{seed}" + ("@val" if args.split == "val" else "")
    previous = result(key)
    finetune = args.finetune and arm != "raw-pixels"  # the raw-pixel floor is a probe only
    if previous is not None and (not finetune or previous.get(metric("finetune", args)) is not None):
        return
    if args.split == "val" and arm in ("untrained", "raw-pixels", "random-eqtime"):
        raise ValueError(f"arm {arm} has no --split val row (use 'random' with --steps {EQTIME_STEPS})")
    if steps != STEPS and arm == "random-eqtime":
        raise ValueError(f"arm {arm} exists only at the study's budget of {STEPS} steps")
    if arm == "random-eqtime":
        steps = EQTIME_STEPS
    # the floors' model: the issue-7 random run at its budget, else issue 12's re-made random run
    random_label = arm_label("random" if steps == STEPS else "random-rerun", steps)
    if floor:  # on the random run's architecture and splits: wait for it
        while not args.dry_run and result(f"{prefix}{random_label}/s{seed}") is None:
            time.sleep(10)
    if previous is not None:  # finished earlier without a fine-tune: add it
        out = ROOT / previous["run"]
        init = "random" if arm == "untrained" else "pretrained"
        entry = {**previous, metric("finetune", args): evaluate(out, "finetune", init, args.dry_run, args.split).get("top1")}
        if not args.dry_run:
            record(entry)
            print(f"done {key} (fine-tune added): {entry}", flush=True)
        return
    if arm == "untrained":
        out = pretrain("random", seed, steps, args.dry_run, name=random_label, data=data)
        ev = evaluate(out, "linear", "random", args.dry_run)
        entry = {"linear": ev.get("top1")}
        if args.finetune:
            entry["finetune"] = evaluate(out, "finetune", "random", args.dry_run).get("top1")
    elif arm == "raw-pixels":
        out = pretrain("random", seed, steps, args.dry_run, name=random_label, data=data)
        cmd = [sys.executable, str(ROOT / "examples" / "study" / "raw_pixel_probe.py"), str(out)]
        sh(cmd, args.dry_run)
        entry = {} if args.dry_run else {"linear": json.loads((out / "raw_pixels.json").read_text())["top1"]}
    else:
        out = pretrain(arm, seed, steps, args.dry_run, name=label, data=data)
        entry = {metric("linear", args): evaluate(out, "linear", "pretrained", args.dry_run, args.split).get("top1")}
        if args.finetune:
            entry[metric("finetune", args)] = evaluate(out, "finetune", "pretrained", args.dry_run, args.split).get("top1")
        if not args.dry_run:
            summary = json.loads((out / "summary.json").read_text())
            last = summary.get("final", {})
            entry.update(
                pretrain_seconds=summary["seconds"],
                steps=summary["steps"],
                steps_timed=summary.get("steps_this_call", summary["steps"]),
                final_loss=last.get("loss"),
                mask_prob_mean=last.get("mask_prob_mean"),
                mask_prob_std=last.get("mask_prob_std"),
                val_acc=last.get("val_acc"),
                **{k: last[k] for k in DIAGNOSTICS if k in last},
            )
            if data == "mnist5k":  # what the final masks hide: ink or background (examples/study/mask_stats.py)
                entry.update(mask_stats(out))
    if not args.dry_run:
        record({"key": key, "arm": prefix + label, "seed": seed, "split": args.split,
                "run": str(out.relative_to(ROOT)), **entry})
        print(f"done {key}: {entry}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=[*MAIN_ARMS, "random-eqtime", "untrained", "raw-pixels"],
                        help=f"arms to run (default: the main ones); exploration arms: {', '.join(EXPLORE)}; "
                             f"issue 12's arms: {', '.join(GUIDED)}; issue 15's: {', '.join(ZOO)}")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=STEPS, help="another budget: rows <arm>@<steps>")
    parser.add_argument("--finetune", action="store_true", help="also a fine-tune evaluation (slow)")
    parser.add_argument("--split", choices=["test", "val"], default="test",
                        help="score on test (the tables) or val (choosing settings: rows <key>@val)")
    parser.add_argument("--data", choices=sorted(DATASETS), default="mnist5k",
                        help="mnist5k (../shared/data/mnist5k.npz) or photos8 (natural photos; rows photos8:<arm>)")
    parser.add_argument("--equal-time-of", metavar="ARM",
                        help="run for the steps of random masking that fit in the wall time of --steps steps of ARM "
                             f"(examples/study/step_costs.json; issue 12 uses {EQTIME_OF})")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    if args.equal_time_of:
        args.steps = eqtime_steps(args.data, args.equal_time_of, args.steps)
        print(f"equal wall time of {args.equal_time_of}: {args.steps} steps", flush=True)
    jobs = [(arm, seed) for seed in args.seeds for arm in args.arms]
    if args.dry_run:
        for arm, seed in jobs:
            job(arm, seed, args)
        return
    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        futures = {pool.submit(job, arm, seed, args): (arm, seed) for arm, seed in jobs}
        failed = []
        for fut, (arm, seed) in futures.items():
            try:
                fut.result()
            except Exception as err:  # noqa: BLE001 - report every failed job, keep the others
                print(f"FAILED {arm}/s{seed}: {err}", flush=True)
                failed.append(f"{arm}/s{seed}")
    if failed:
        raise SystemExit(f"{len(failed)} jobs failed (rerun to retry): {', '.join(failed)}")


if __name__ == "__main__":
    main()
