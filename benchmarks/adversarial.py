"""Adversarial harness: how the `maskkit` CLI and library behave on bad input, by outcome class.

Run: python benchmarks/adversarial.py --python PATH/TO/python --out results.json [-j 1] [-k SUBSTR]

Every case runs in a fresh temporary directory as a subprocess of the given interpreter (a CLI command
line `PYTHON -m maskkit.cli ...`, or a library snippet `PYTHON -c ...`), with a timeout and
OMP_NUM_THREADS=1, and is classified as one of: clean, data lost, silent wrong result, hang, traceback,
misleading message. A case declares its setup (files to create), its command, and what clean is:
  - `expect_error(names)`: exit != 0, no 'Traceback', exactly one error line and it names one of `names`
    (exit 0: silent wrong result; an error line not naming it, or several: misleading message);
  - `keep=[paths]`: those files' bytes must be unchanged (else: data lost), whatever the exit status;
  - a custom check for the cases whose clean outcome is either a refusal or a run that names what it did.
'Traceback' anywhere is a traceback; a timeout is a hang. The harness itself imports only the standard
library and numpy/PIL (for the fixtures), so it measures any tree of maskkit through its interpreter.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import textwrap
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

OUTCOMES = ("clean", "data lost", "silent wrong result", "hang", "traceback", "misleading message")
TIMEOUT = 60.0
TINY = ["--steps", "2", "--batch-size", "8", "--no-progress", "--device", "cpu", "--log-every", "1"]

#: plug-ins of every kind, broken on purpose (the module tests/test_plugin_checks.py loads), via MASKKIT_PLUGINS
PLUGIN = r'''
"""Broken plug-ins of every kind (a test module)."""

import dataclasses

import torch

from maskkit.data import Source, register_dataset
from maskkit.mlo import HYPERGRADS, register_hypergrad
from maskkit.policies import RandomPolicy, register_policy


@register_policy("negw")
class NegativeWeights(RandomPolicy):
    """Random masking whose loss weights are -1: the loss goes negative and 'improves' without bound."""

    def make_plan(self, tokens, ratio, **kwargs):
        plan = super().make_plan(tokens, ratio, **kwargs)
        return dataclasses.replace(plan, weights=-torch.ones_like(plan.mask))


@register_policy("zerow")
class ZeroWeights(RandomPolicy):
    """Random masking with zero loss weights: nothing is reconstructed."""

    def make_plan(self, tokens, ratio, **kwargs):
        plan = super().make_plan(tokens, ratio, **kwargs)
        return dataclasses.replace(plan, weights=torch.zeros_like(plan.mask))


@register_policy("halfratio")
class HalfRatio(RandomPolicy):
    """Always hides half the patches, whatever ratio it is asked for."""

    def make_plan(self, tokens, ratio, **kwargs):
        return super().make_plan(tokens, 0.5, **kwargs)


@register_policy("boom")
class Boom(RandomPolicy):
    """A policy whose own code fails."""

    def make_plan(self, tokens, ratio, **kwargs):
        raise RuntimeError("kaboom in the plug-in")


@register_dataset("bad", arg="value")
class Bad(Source):
    """40 grey 8x8 images of 2 classes, broken as ARG says."""

    def __init__(self, *, arg, data_dir=None, download=False, img_size=None):
        self.fault, self.name = arg, f"bad:{arg}"
        self.classes = ["a", "b"]
        labels = torch.arange(40) % 2
        if arg == "short-labels":
            labels = labels[:37]
        elif arg == "float-labels":
            labels = labels.float()
        elif arg == "out-of-range":
            labels = labels.clone()
            labels[7] = 2
        self.labels = labels

    def __len__(self):
        return 40

    @property
    def image_size(self):
        return (8, 8)

    @property
    def in_chans(self):
        return 3 if self.fault == "channels" else 1

    def read(self, i):
        if self.fault == "raise" and i % 4 == 1:
            raise RuntimeError("disk on fire")
        x = torch.full((1, 8, 8), (i % 2) * 0.5 + 0.25)
        if self.fault == "nan" and i % 4 == 1:
            x[0, 3, 3] = float("nan")
        return x


Darts = HYPERGRADS.get("darts")


@register_hypergrad("fewer")
class Fewer(Darts):
    """darts, but the last gradient is left out."""

    def masker_grads(self, engine, step, train_batch, val_batch):
        grads, ft = super().masker_grads(engine, step, train_batch, val_batch)
        return grads[:-1], ft


@register_hypergrad("flat")
class Flat(Darts):
    """darts, with the first gradient as a row."""

    def masker_grads(self, engine, step, train_batch, val_batch):
        grads, ft = super().masker_grads(engine, step, train_batch, val_batch)
        return [grads[0].reshape(1, -1), *grads[1:]], ft


@register_hypergrad("nonegrad")
class NoneGrad(Darts):
    """darts, with None for the first gradient."""

    def masker_grads(self, engine, step, train_batch, val_batch):
        grads, ft = super().masker_grads(engine, step, train_batch, val_batch)
        return [None, *grads[1:]], ft
'''


# ---- fixtures ------------------------------------------------------------------------------------------


def write_npz(path: Path, n: int = 48, side: int = 8, *, labels_short: bool = False, nan: bool = False,
              keys: tuple[str, str] = ("images", "labels")) -> None:  # fmt: skip
    """A tiny grey data set of two classes (deterministic), broken as asked."""
    import numpy as np

    rng = np.random.default_rng(0)
    labels = np.arange(n) % 2
    images = (rng.random((n, side, side)) * 0.5 + labels[:, None, None] * 0.5).astype("float32")
    if nan:
        images[5, 3, 3] = np.nan
    if labels_short:
        labels = labels[: n - 3]
    np.savez(path, **{keys[0]: images, keys[1]: labels})


def write_folder(root: Path, split: bool = True, per_class: int = 6, side: int = 8, ext: str = ".bmp") -> None:
    """An image folder: train/ and val/ of class folders a/ b/ (or class folders only), tiny RGB images."""
    from PIL import Image

    parts = ["train", "val"] if split else [""]
    for part in parts:
        for ci, cls in enumerate(["a", "b"]):
            d = root / part / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                colour = (40 + 150 * ci + i, 60 + i, 200 - 100 * ci)
                Image.new("RGB", (side, side), colour).save(d / f"{cls}{i}{ext}")


def digest(path: Path) -> str | None:
    if path.is_symlink() and not path.exists():
        return "dangling"
    if not path.exists():
        return None
    if path.is_dir():
        h = hashlib.sha256()
        for p in sorted(path.rglob("*")):
            if p.is_file():
                h.update(os.fsencode(p.relative_to(path)) + p.read_bytes())
        return h.hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


#: ablate report fixture (the format of tests/test_ablate_damaged.py)
STUDY = """
[study]
data = "digits"
seeds = [0, 1]
steps = 30
baseline = "random"
options = { model = "micro" }

[evaluations.linear]

[arms.random]
options = { policy = "random" }
[arms.hpm]
options = { policy = "hpm" }
select = { option = "mask-ratio", values = [0.6, 0.75], by = "linear", seeds = [0] }
[arms.random-time]
options = { policy = "random" }
equal_cost = { of = "hpm", basis = "wall time" }
[arms.random-flops]
options = { policy = "random" }
equal_cost = { of = "random", basis = "flops" }
"""
SELECTION = {"hpm": {"option": "--mask-ratio", "by": "linear", "chosen": "0.75", "split": "val",
                     "scores": {"0.6": {"0": 0.8}, "0.75": {"0": 0.85}}}}  # fmt: skip
CALIBRATION = {"steps": {"random-time": 20, "random-flops": 30},
               "basis": {"random-time": "wall time", "random-flops": "flops"},
               "costs": {"hpm": {"seconds_per_step": 0.3, "basis": "wall time"},
                         "random-time": {"seconds_per_step": 0.2, "basis": "wall time"},
                         "random (flops)": {"flops_ratio": 1.0, "basis": "flops"},
                         "random-flops (flops)": {"flops_ratio": 1.0, "basis": "flops"}}, "threads": 1}  # fmt: skip
RUNS = {"random-s0": 0.80, "hpm@mask-ratio=0.75-s0": 0.81, "hpm@mask-ratio=0.75-s1": 0.83, "random-time-s0": 0.82,
        "random-time-s1": 0.84, "random-flops-s0": 0.83, "random-flops-s1": 0.85}  # fmt: skip
ROW = {"arm": "random", "seed": 1, "scores": {"linear": 0.81}, "steps": 30, "seconds": 9.0, "final_loss": 0.5,
       "diagnostics": {"mask_iou": 0.6}}  # fmt: skip
SUMMARY = {"steps": 30, "steps_this_call": 30, "seconds": 10.0, "final": {"step": 30, "loss": 0.5, "mask_iou": 0.6}}


def write_study(d: Path) -> None:
    (d / "runs").mkdir(parents=True)
    (d / "study.toml").write_text(STUDY)
    (d / "selection.json").write_text(json.dumps(SELECTION))
    (d / "calibration.json").write_text(json.dumps(CALIBRATION))
    (d / "recorded.jsonl").write_text(json.dumps(ROW) + "\n")
    for name, top1 in RUNS.items():
        (d / "runs" / name).mkdir()
        (d / "runs" / name / "summary.json").write_text(json.dumps(SUMMARY))
        (d / "runs" / name / "eval.json").write_text(json.dumps({"linear": {"top1": top1, "step": 30}}))


def damaged_study(rel: str, data: bytes) -> Callable[[Path, "Env"], None]:
    def setup(tmp: Path, env: Env) -> None:
        write_study(tmp / "study")
        (tmp / "study" / rel).write_bytes(data)

    return setup


# ---- outcome checks ------------------------------------------------------------------------------------


@dataclass
class Result:
    rc: int | None
    out: str
    err: str
    seconds: float
    changed: list[str]  # kept paths whose bytes changed
    tmp: Path


def lines_of(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


def error_lines(r: Result) -> list[str]:
    """The lines that report an error (Typer's usage box counts as one: its 'Error' line)."""
    found = []
    for ln in lines_of(r.err) + lines_of(r.out):
        s = ln.strip("│ ").strip()
        if s.startswith(("Error", "error:", "Invalid value", "No such option")) or " Error " in ln[:12]:
            found.append(s)
    return found


def last_line(r: Result) -> str:
    ls = lines_of(r.err) or lines_of(r.out)
    return ls[-1].strip("│ ").strip()[:300] if ls else ""


def common(r: Result) -> tuple[str, str] | None:
    if r.rc is None:
        return "hang", f"no exit in {r.seconds:.0f} s (killed)"
    if "Traceback" in r.err or "Traceback" in r.out:
        return "traceback", last_line(r)
    if r.changed:
        return "data lost", f"changed: {', '.join(r.changed)}; rc {r.rc}; {last_line(r)}"
    return None


def expect_error(*names: str, one_line: bool = True) -> Callable[[Result], tuple[str, str]]:
    """Clean: exit != 0, one error line naming one of `names` (case-insensitive), no traceback."""

    def check(r: Result) -> tuple[str, str]:
        got = common(r)
        if got:
            return got
        if r.rc == 0:
            return "silent wrong result", f"exit 0; {last_line(r)}"
        errs = error_lines(r) or [last_line(r)]
        text = errs[-1]
        if not any(n.lower() in text.lower() for n in names):
            return "misleading message", text
        if one_line and len(errs) > 1:
            return "misleading message", f"{len(errs)} error lines: {' | '.join(errs)[:300]}"
        return "clean", text

    return check


def expect_ok(post: Callable[[Result], str | None] | None = None) -> Callable[[Result], tuple[str, str]]:
    """Clean: exit 0 and `post` (a silent-wrong-result check) finds nothing."""

    def check(r: Result) -> tuple[str, str]:
        got = common(r)
        if got:
            return got
        if r.rc != 0:
            return "misleading message", f"rc {r.rc}: {last_line(r)}"
        bad = post(r) if post else None
        if bad:
            return "silent wrong result", bad
        return "clean", last_line(r)

    return check


def ok_or_error(*names: str, ok_must_mention: tuple[str, ...] = ()) -> Callable[[Result], tuple[str, str]]:
    """Clean: a one-line refusal naming one of `names`, or exit 0 with output mentioning one of
    `ok_must_mention` (what it skipped or ignored), or exit 0 when that tuple is empty."""

    def check(r: Result) -> tuple[str, str]:
        got = common(r)
        if got:
            return got
        if r.rc == 0:
            if ok_must_mention and not any(m.lower() in (r.out + r.err).lower() for m in ok_must_mention):
                return "silent wrong result", f"exit 0, no word of {ok_must_mention}; {last_line(r)}"
            return "clean", f"exit 0; {last_line(r)}"
        return expect_error(*names)(r)

    return check


def lib_check(*names: str, ok: bool = False) -> Callable[[Result], tuple[str, str]]:
    """A library snippet prints 'RAISED <Type>: <msg>' or 'RETURNED <what>'. Clean: a one-line error whose
    message names one of `names` (torch/numpy internals such as IndexError/RuntimeError from deep inside
    count as tracebacks: a user would see one), or, with ok=True, a sound return."""

    def check(r: Result) -> tuple[str, str]:
        got = common(r)
        if got:
            return got
        text = "\n".join(lines_of(r.out))
        if "RAISED" in text:
            line = next(ln for ln in lines_of(r.out) if ln.startswith("RAISED"))
            etype = line.split()[1].rstrip(":")
            if line.rstrip().endswith("DEEP"):
                return "traceback", line[:300] + " (not raised by maskkit: an internal error)"
            if not any(n.lower() in line.lower() for n in names):
                return "misleading message", line[:300]
            if "\\n" in line or etype in ("IndexError", "KeyError", "AttributeError", "TypeError", "ZeroDivisionError"):
                return "traceback", line[:300]
            return "clean", line[:300]
        if "RETURNED" in text:
            line = next(ln for ln in lines_of(r.out) if ln.startswith("RETURNED"))
            if ok and "BAD" not in line:
                return "clean", line[:300]
            return "silent wrong result", line[:300]
        return "misleading message", f"rc {r.rc}: {last_line(r)}"

    return check


LIB_WRAP = """
import sys, traceback
def _run():
{body}
try:
    _r = _run()
    print("RETURNED", _r)
except Exception as e:
    tb = traceback.extract_tb(e.__traceback__)
    deep = not (tb and (tb[-1].line or "").strip().startswith("raise"))  # not maskkit's own raise
    print("RAISED", type(e).__name__ + ":", str(e).replace("\\n", "\\\\n")[:400], "DEEP" if deep else "")
"""


# ---- the cases -----------------------------------------------------------------------------------------


@dataclass
class Env:
    python: str
    base_run: Path  # a finished 2-step digits run, copied by the cases that need one


@dataclass
class Case:
    name: str
    kind: str  # the class: ablate, folders, records, messages, plugins, library
    argv: list | Callable[[Path], list]  # CLI args after `-m maskkit.cli`, or ["-c", code]
    check: Callable[[Result], tuple[str, str]]
    setup: Callable[[Path, Env], None] | None = None
    keep: list[str] = field(default_factory=list)  # paths (relative to the case dir) that must not change
    env: dict = field(default_factory=dict)
    timeout: float = TIMEOUT
    note: str = ""


def copy_run(dest: str = "run") -> Callable[[Path, Env], None]:
    def setup(tmp: Path, env: Env) -> None:
        shutil.copytree(env.base_run, tmp / dest, symlinks=True)

    return setup


def lib(pre: str, body: str = "") -> list:
    """A library snippet: `pre` (imports) then `body`, run inside LIB_WRAP's try (what it raised or returned)."""
    code = textwrap.dedent(pre).strip() + "\n" + textwrap.dedent(body).strip()
    return ["-c", LIB_WRAP.format(body=textwrap.indent(code, "    "))]


def chain(*steps: Callable[[Path, Env], None]) -> Callable[[Path, Env], None]:
    def setup(tmp: Path, env: Env) -> None:
        for s in steps:
            s(tmp, env)

    return setup


def plugins(tmp: Path, env: Env) -> None:
    (tmp / "broken_plugins.py").write_text(PLUGIN)


PLUG = {"MASKKIT_PLUGINS": "broken_plugins"}


def pretrain_setup(*args: str, env_extra: dict | None = None) -> Callable[[Path, Env], None]:
    """Setup step: a real tiny pretrain run in the case directory (its failure fails the setup)."""

    def setup(tmp: Path, env: Env) -> None:
        subprocess.run([env.python, "-m", "maskkit.cli", "pretrain", *TINY, *args], cwd=tmp, check=True,
                       capture_output=True, timeout=TIMEOUT, env={**base_env(), **(env_extra or {})})  # fmt: skip

    return setup


def fn(f: Callable[[Path], None]) -> Callable[[Path, Env], None]:
    return lambda tmp, env: f(tmp)


def same_size_replace(tmp: Path) -> None:
    """Every pixel of one image replaced, same byte size (BMP), written a few seconds later."""
    from PIL import Image

    p = tmp / "data" / "train" / "a" / "a0.bmp"
    size, st = p.stat().st_size, p.stat()
    Image.new("RGB", (8, 8), (255, 0, 255)).save(p)
    assert p.stat().st_size == size
    os.utime(p, (st.st_atime + 5, st.st_mtime + 5))


def lock_symlink(tmp: Path) -> None:
    (tmp / "victim.txt").write_text("precious\n" * 10)
    lock = tmp / "run" / ".lock"
    if lock.exists() or lock.is_symlink():
        lock.unlink()
    lock.symlink_to(tmp / "victim.txt")


def no_cwd_run(r: Result) -> str | None:
    leaked = [p.name for p in r.tmp.iterdir() if p.name in ("config.json", "model.pt", "metrics.jsonl")]
    return f"trained into the current folder: {leaked}" if leaked else None


def study_toml(text: str, name: str = "s.toml") -> Callable[[Path, Env], None]:
    return fn(lambda tmp: (tmp / name).write_text(textwrap.dedent(text)))


RUN_STUDY = """
[study]
data = "digits"
seeds = [0]
steps = 2
baseline = "random"
options = {{ model = "micro", batch-size = 8 }}

[evaluations.linear]
epochs = 1

[arms.random]
options = {{ policy = "random" }}
[arms.hpm]
options = {{ policy = "hpm" }}
select = {{ option = "mask-ratio", values = {values}, by = "linear", seeds = [0] }}
"""


def victim(tmp: Path) -> None:
    (tmp / "victim-s0").mkdir()
    (tmp / "victim-s0" / "marker.txt").write_text("do not delete\n")


def P(*args: str) -> list:
    return ["pretrain", *TINY, "--out", "run", *args]


def E(*args: str) -> list:
    return ["evaluate", "run", "--epochs", "1", "--no-progress", "--device", "cpu", *args]


def build_cases() -> list[Case]:
    c: list[Case] = []
    add = c.append

    # ---- messages: options of pretrain -----------------------------------------------------------------
    for name, args, names in [
        ("two-spellings-batch-size", ["--batch-size", "8", "--batch_size", "32"], ("--batch-size", "--batch_size")),
        ("two-spellings-accum-iter", ["--accum-iter", "1", "--accum_iter", "2"], ("--accum-iter", "--accum_iter")),
        ("steps-0", ["--steps", "0"], ("--steps",)),
        ("steps-negative", ["--steps", "-1"], ("--steps",)),
        ("batch-size-0", ["--batch-size", "0"], ("--batch-size",)),
        ("mask-ratio-1.5", ["--mask-ratio", "1.5"], ("--mask-ratio", "mask ratio")),
        ("mask-ratio-nan", ["--mask-ratio", "nan"], ("--mask-ratio", "mask ratio")),
        ("lr-nan", ["--lr", "nan"], ("--lr",)),
        ("lr-inf", ["--lr", "inf"], ("--lr",)),
        ("lr-negative", ["--lr", "-1"], ("--lr",)),
        ("weight-decay-nan", ["--weight-decay", "nan"], ("--weight-decay",)),
        ("img-size-0", ["--img-size", "0"], ("--img-size",)),
        ("patch-size-3", ["--patch-size", "3"], ("--patch-size", "patch")),
        ("model-unknown", ["--model", "nope"], ("nope", "--model")),
        ("policy-unknown", ["--policy", "nope"], ("nope", "--policy")),
        ("dataset-unknown", ["--dataset", "nope"], ("nope", "--dataset")),
        ("dataset-npz-missing", ["--dataset", "npz:missing.npz"], ("missing.npz",)),
        ("ckpt-every-0", ["--ckpt-every", "0"], ("--ckpt-every",)),
        ("log-every-0", ["--log-every", "0"], ("--log-every",)),
        ("keep-checkpoints-0", ["--keep-checkpoints", "0"], ("--keep-checkpoints", "--keep-last")),
        ("num-workers-negative", ["--num-workers", "-1"], ("--num-workers",)),
        ("warmup-steps-negative", ["--warmup-steps", "-1"], ("--warmup-steps",)),
        ("policy-opt-garbage", ["--policy-opt", "garbage"], ("garbage", "--policy-opt")),
        ("model-opt-garbage", ["--model-opt", "garbage"], ("garbage", "--model-opt")),
        ("other-policys-option", ["--attention-mode", "hint"], ("attention",)),
        ("device-meta", ["--device", "meta"], ("--device", "meta")),
        ("device-banana", ["--device", "banana"], ("--device", "banana")),
        ("device-cuda-absent", ["--device", "cuda:7"], ("--device", "cuda")),
        ("accum-iter-huge", ["--accum-iter", "1000000000"], ("--accum-iter", "accum")),
        ("masker-every-0", ["--policy", "learned", "--learned-hidden-dim", "8", "--masker-every", "0"], ("--masker-every",)),
    ]:  # fmt: skip
        add(Case(name, "messages", P(*args), expect_error(*names), timeout=45 if "huge" in name else TIMEOUT))
    add(Case("epochs-0", "messages", ["pretrain", "--epochs", "0", "--batch-size", "8", "--no-progress", "--device", "cpu",
                                      "--out", "run"], expect_error("--epochs")))  # fmt: skip
    add(Case("out-empty", "messages", ["pretrain", *TINY, "--out", ""],
             lambda r: expect_error("--out")(r) if r.rc != 0 or "Traceback" in r.err else
             ("silent wrong result", no_cwd_run(r) or "exit 0")))  # fmt: skip
    add(Case("out-is-a-file", "messages", P(), expect_error("run", "--out"),
             setup=fn(lambda t: (t / "run").write_text("mine\n")), keep=["run"]))  # fmt: skip
    add(Case("out-is-a-finished-run", "messages", P(), expect_error("run", "--out", "--resume"),
             setup=copy_run(), keep=["run/model.pt", "run/config.json"]))  # fmt: skip
    add(Case("resume-not-utf8-name", "messages", ["pretrain", "--no-progress", "--device", "cpu", "--resume", b"nope\xffdir"],
             expect_error("nope\\xff", "nope\\udcff", "nope?dir", "nope\ufffddir")))  # fmt: skip
    add(Case("resume-newline-name", "messages", ["pretrain", "--no-progress", "--device", "cpu", "--resume", "no\npe"],
             expect_error("no\\npe", "'no\\npe'")))  # fmt: skip
    add(Case("npz-not-utf8-name", "messages", P("--dataset", b"npz:bad\xff.npz"),
             expect_error("bad\\xff", "bad\\udcff", "bad?.npz", "bad\ufffd.npz")))  # fmt: skip

    # ---- data: npz and image folders -------------------------------------------------------------------
    add(Case("npz-control", "folders", P("--dataset", "npz:d.npz"), expect_ok(), setup=fn(lambda t: write_npz(t / "d.npz"))))
    add(Case("npz-wrong-keys", "folders", P("--dataset", "npz:d.npz"), expect_error("d.npz", "images", "key"),
             setup=fn(lambda t: write_npz(t / "d.npz", keys=("x", "y")))))  # fmt: skip
    add(Case("npz-labels-short", "folders", P("--dataset", "npz:d.npz"), expect_error("label"),
             setup=fn(lambda t: write_npz(t / "d.npz", labels_short=True))))  # fmt: skip
    add(Case("npz-nan-pixel", "folders", P("--dataset", "npz:d.npz"), expect_error("nan", "finite", "d.npz"),
             setup=fn(lambda t: write_npz(t / "d.npz", nan=True))))  # fmt: skip
    add(Case("npz-not-a-zip", "folders", P("--dataset", "npz:d.npz"), expect_error("d.npz"),
             setup=fn(lambda t: (t / "d.npz").write_bytes(b"PK\x03\x04garbage"))))  # fmt: skip
    F = P("--dataset", "imagefolder:data")
    add(Case("folder-control", "folders", F, expect_ok(), setup=fn(lambda t: write_folder(t / "data"))))
    add(Case("folder-docs-beside-train-val", "folders", F, ok_or_error("docs", ok_must_mention=("docs",)),
             setup=fn(lambda t: (write_folder(t / "data"), (t / "data" / "docs").mkdir()))))  # fmt: skip
    add(Case("folder-macosx-beside-train-val", "folders", F, ok_or_error("__MACOSX", ok_must_mention=("__MACOSX",)),
             setup=fn(lambda t: (write_folder(t / "data"), (t / "data" / "__MACOSX" / "train").mkdir(parents=True),
                                 (t / "data" / "__MACOSX" / "train" / "._a0.bmp").write_bytes(b"\0" * 10)))))  # fmt: skip
    add(Case("folder-fifo-in-class", "folders", F, ok_or_error("zz.bmp", "fifo", "special"), timeout=40,
             setup=fn(lambda t: (write_folder(t / "data"), os.mkfifo(t / "data" / "train" / "a" / "zz.bmp")))))  # fmt: skip
    add(Case("folder-empty", "folders", F, expect_error("data"), setup=fn(lambda t: (t / "data").mkdir())))
    add(Case("folder-missing", "folders", F, expect_error("data")))
    add(Case("folder-undecodable-image", "folders", F, expect_error("a1.bmp"),
             setup=fn(lambda t: (write_folder(t / "data"), (t / "data" / "train" / "a" / "a1.bmp").write_bytes(b"BMjunk")))))  # fmt: skip
    add(Case("folder-same-size-replaced-evaluate", "folders", E(), expect_error("changed", "fingerprint", "--trust-data-change"),
             setup=chain(fn(lambda t: write_folder(t / "data")), pretrain_setup("--dataset", "imagefolder:data", "--out", "run"),
                         fn(same_size_replace)),
             note="the replacement is written 5 s later (mtime moves); a replacement keeping mtime is not caught by size+mtime"))  # fmt: skip
    add(Case("folder-same-size-replaced-resume", "folders", ["pretrain", "--steps", "4", "--no-progress", "--device", "cpu", "--resume", "run"],
             expect_error("changed", "fingerprint", "--trust-data-change"),
             setup=chain(fn(lambda t: write_folder(t / "data")), pretrain_setup("--dataset", "imagefolder:data", "--out", "run"),
                         fn(same_size_replace))))  # fmt: skip

    # ---- records: evaluate and resume ------------------------------------------------------------------
    for name, args, names in [
        ("evaluate-lr-inf", ["--lr", "inf"], ("--lr",)),
        ("evaluate-lr-nan", ["--lr", "nan"], ("--lr",)),
        ("evaluate-lr-negative", ["--lr", "-1"], ("--lr",)),
        ("evaluate-epochs-0", ["--epochs", "0"], ("--epochs",)),
        ("evaluate-batch-size-0", ["--batch-size", "0"], ("--batch-size",)),
        ("evaluate-batch-size-negative", ["--batch-size", "-4"], ("--batch-size",)),
        ("evaluate-device-meta", ["--device", "meta"], ("--device", "meta")),
    ]:  # fmt: skip
        add(Case(name, "records", E(*args), expect_error(*names), setup=copy_run()))
    add(Case("evaluate-records-settings", "records", E("--lr", "0.5", "--seed", "3"),
             expect_ok(lambda r: None if _eval_has(r, "0.5", "3") else "eval.json does not record the lr and seed it used"),
             setup=copy_run()))  # fmt: skip
    add(Case("evaluate-config-json-damaged", "records", E(), expect_error("config.json"),
             setup=chain(copy_run(), fn(lambda t: (t / "run" / "config.json").write_text('{"policy": ')))))  # fmt: skip
    add(Case("evaluate-config-field-renamed", "records", E(), expect_error("config.json"),
             setup=chain(copy_run(), fn(_rename_config_field))))  # fmt: skip
    add(Case("evaluate-model-pt-missing", "records", E(), ok_or_error("model.pt", ok_must_mention=("model.pt", "checkpoint")),
             setup=chain(copy_run(), fn(lambda t: (t / "run" / "model.pt").unlink()))))  # fmt: skip
    add(Case("evaluate-not-a-run", "records", E(), expect_error("run"), setup=fn(lambda t: (t / "run").mkdir())))
    add(Case("resume-model-pt-missing", "records", ["pretrain", "--no-progress", "--device", "cpu", "--resume", "run"],
             ok_or_error("model.pt", ok_must_mention=("model.pt",)),
             setup=chain(copy_run(), fn(lambda t: (t / "run" / "model.pt").unlink())),
             note="the disk-full-on-model.pt class: a run without its final weights must not be called complete; "
                  "clean: refused naming model.pt, or rebuilt with a word naming it"))  # fmt: skip
    add(Case("resume-lock-symlink", "records", ["pretrain", "--steps", "4", "--no-progress", "--device", "cpu", "--resume", "run"],
             ok_or_error(".lock", "lock", "symlink"), setup=chain(copy_run(), fn(lock_symlink)), keep=["victim.txt"]))  # fmt: skip
    add(Case("out-lock-symlink-dangling", "records", P(),
             ok_or_error(".lock", "lock", "symlink", "run"),
             setup=fn(lambda t: ((t / "run").mkdir(), (t / "victim.txt").write_text("x" * 50),
                                 (t / "run" / ".lock").symlink_to(t / "victim.txt"))), keep=["victim.txt"]))  # fmt: skip

    # ---- plug-ins ----------------------------------------------------------------------------------------
    for name, args, names in [
        ("policy-negative-weights", ["--policy", "negw"], ("negw",)),
        ("policy-zero-weights", ["--policy", "zerow"], ("zerow",)),
        ("policy-wrong-ratio", ["--policy", "halfratio"], ("halfratio",)),
        ("policy-raises", ["--policy", "boom"], ("boom",)),
        ("source-short-labels", ["--dataset", "bad:short-labels"], ("bad:short-labels",)),
        ("source-float-labels", ["--dataset", "bad:float-labels"], ("bad:float-labels",)),
        ("source-out-of-range-labels", ["--dataset", "bad:out-of-range"], ("bad:out-of-range",)),
        ("source-nan-sample", ["--dataset", "bad:nan"], ("bad:nan",)),
        ("source-wrong-channels", ["--dataset", "bad:channels"], ("bad:channels",)),
        ("source-read-raises", ["--dataset", "bad:raise"], ("bad:raise", "dataset 'bad'")),
        ("hypergrad-fewer-grads", ["--policy", "learned", "--learned-hidden-dim", "8", "--hypergrad", "fewer", "--masker-every", "1"], ("fewer",)),
        ("hypergrad-wrong-shape", ["--policy", "learned", "--learned-hidden-dim", "8", "--hypergrad", "flat", "--masker-every", "1"], ("flat",)),
        ("hypergrad-none-grad", ["--policy", "learned", "--learned-hidden-dim", "8", "--hypergrad", "nonegrad", "--masker-every", "1"], ("nonegrad",)),
    ]:  # fmt: skip
        add(Case(name, "plugins", P(*args), expect_error(*names), setup=plugins, env=PLUG))
    add(Case("plugin-module-missing", "plugins", P(), expect_error("no_such_plugin"), env={"MASKKIT_PLUGINS": "no_such_plugin"}))
    add(Case("plugin-module-raises-on-import", "plugins", P(), expect_error("explodes"),
             setup=fn(lambda t: (t / "explodes.py").write_text("raise RuntimeError('import-time failure')\n")),
             env={"MASKKIT_PLUGINS": "explodes"}))  # fmt: skip

    # ---- ablate ------------------------------------------------------------------------------------------
    add(Case("report-control", "ablate", ["ablate", "report", "study", "--no-chart", "--no-gallery"], expect_ok(),
             setup=fn(lambda t: write_study(t / "study"))))  # fmt: skip
    R0 = "runs/random-s0"
    for name, rel, data, names in [
        ("report-summary-truncated", f"{R0}/summary.json", b'{"steps": 30, "sec', ("summary.json",)),
        ("report-summary-empty", f"{R0}/summary.json", b"", ("summary.json",)),
        ("report-summary-a-list", f"{R0}/summary.json", b"[]", ("summary.json",)),
        ("report-summary-steps-string", f"{R0}/summary.json", json.dumps({**SUMMARY, "steps": "thirty"}).encode(), ("summary.json",)),
        ("report-summary-not-utf8", f"{R0}/summary.json", b'{"steps": 30, "final": {"loss": "\xff"}}', ("summary.json",)),
        ("report-eval-top1-5", f"{R0}/eval.json", b'{"linear": {"top1": 5.0, "step": 30}}', ("eval.json",)),
        ("report-eval-a-list", f"{R0}/eval.json", b"[1]", ("eval.json",)),
        ("report-eval-top1-string", f"{R0}/eval.json", b'{"linear": {"top1": "high", "step": 30}}', ("eval.json",)),
        ("report-selection-truncated", "selection.json", b'{"hpm": {"opt', ("selection.json",)),
        ("report-selection-score-5", "selection.json",
         json.dumps({"hpm": {**SELECTION["hpm"], "scores": {"0.6": {"0": 5.0}, "0.75": {"0": 0.85}}}}).encode(), ("selection.json",)),
        ("report-selection-a-list", "selection.json", b"[]", ("selection.json",)),
        ("report-calibration-steps-string", "calibration.json",
         json.dumps({**CALIBRATION, "steps": {"random-time": "many", "random-flops": 30}}).encode(), ("calibration.json",)),
        ("report-calibration-a-list", "calibration.json", b"[]", ("calibration.json",)),
        ("report-recorded-a-list-line", "recorded.jsonl", b"\n[1, 2]\n", ("recorded.jsonl",)),
        ("report-recorded-truncated", "recorded.jsonl", b'{"arm": "random", "se', ("recorded.jsonl",)),
        ("report-recorded-unknown-seed", "recorded.jsonl", json.dumps({**ROW, "seed": 7}).encode() + b"\n", ("recorded.jsonl",)),
        ("report-study-toml-damaged", "study.toml", b"[study\nseeds = ", ("study.toml",)),
    ]:  # fmt: skip
        add(Case(name, "ablate", ["ablate", "report", "study", "--no-chart", "--no-gallery"], expect_error(*names),
                 setup=damaged_study(rel, data)))  # fmt: skip
    add(Case("ablate-study-missing", "ablate", ["ablate", "nope.toml", "--out", "D", "--dry-run"], expect_error("nope.toml")))
    add(Case("ablate-out-empty", "ablate", ["ablate", "s.toml", "--out", "", "--dry-run"], expect_error("--out"),
             setup=study_toml(RUN_STUDY.format(values="[0.6, 0.75]"))))  # fmt: skip
    add(Case("ablate-seeds-empty", "ablate", ["ablate", "s.toml", "--out", "D", "--dry-run"], expect_error("seeds"),
             setup=study_toml(RUN_STUDY.format(values="[0.6, 0.75]").replace("seeds = [0]\n", "seeds = []\n"))))  # fmt: skip
    add(Case("ablate-unknown-option", "ablate", ["ablate", "s.toml", "--out", "D", "--dry-run"], expect_error("no-such-flag"),
             setup=study_toml(RUN_STUDY.format(values="[0.6, 0.75]").replace('policy = "random"', 'policy = "random", no-such-flag = 1'))))  # fmt: skip
    add(Case("ablate-select-traversal-dry-run", "ablate", ["ablate", "s.toml", "--out", "D", "--dry-run"],
             expect_error("select", "values", "victim", "mask-ratio"), keep=["victim-s0/marker.txt"],
             setup=chain(study_toml(RUN_STUDY.format(values='["0.6", "x-s0/../../../victim"]')), fn(victim))))  # fmt: skip
    add(Case("ablate-select-traversal-run", "ablate", ["ablate", "s.toml", "--out", "D", "--no-progress"] ,
             expect_error("select", "values", "victim", "mask-ratio"), keep=["victim-s0/marker.txt"], timeout=90,
             setup=chain(study_toml(RUN_STUDY.format(values='["0.6", "x-s0/../../../victim"]')), fn(victim))))  # fmt: skip

    # ---- library API ---------------------------------------------------------------------------------------
    pol = "from maskkit.policies import create_policy\nimport torch\n"
    for policy in ("random", "block", "hpm", "simmim", "uniform"):
        add(Case(f"lib-{policy}-empty-batch", "library", lib(pol, f"""
            p = create_policy("{policy}")
            plan = p.make_plan(torch.zeros(0, 16, 8), 0.75)
            return ("BAD " if plan.mask.shape[0] != 0 else "") + f"empty plan {{tuple(plan.mask.shape)}}"
            """), lib_check("batch", "empty", ok=True)))  # fmt: skip
        add(Case(f"lib-{policy}-tokens-2d", "library", lib(pol, f"""
            p = create_policy("{policy}")
            plan = p.make_plan(torch.zeros(16, 8), 0.75)
            return "BAD plan of shape " + str(tuple(plan.mask.shape))
            """), lib_check("tokens", "shape", "[B, N")))  # fmt: skip
    add(Case("lib-random-ratio-1.5", "library", lib(pol, """
        plan = create_policy("random").make_plan(torch.zeros(2, 16, 8), 1.5)
        return "BAD " + str(plan.mask.sum().item())
        """), lib_check("ratio")))  # fmt: skip
    add(Case("lib-maskplan-mismatched-shapes", "library", lib("""
        import torch
        from maskkit.plan import MaskPlan
        plan = MaskPlan(ids_keep=torch.zeros(2, 4, dtype=torch.long), ids_restore=torch.arange(16).repeat(3, 1),
                        mask=torch.ones(3, 16))
        return "BAD accepted a plan of batch 2 vs 3"
        """), lib_check("shape", "batch", "ids_keep", "mask")))  # fmt: skip
    add(Case("lib-maskplan-from-scores-weights-mismatch", "library", lib("""
        import torch
        from maskkit.plan import MaskPlan
        plan = MaskPlan.from_scores(torch.rand(2, 16), 0.75, weights=torch.ones(2, 8))
        return "BAD accepted"
        """), lib_check("shape", "weights")))  # fmt: skip
    add(Case("lib-masked-loss-shape-mismatch", "library", lib("""
        import torch
        from maskkit.mae import masked_loss
        return "BAD " + str(masked_loss(torch.rand(2, 16), torch.ones(2, 1)).item())
        """), lib_check("shape", "mask")))  # fmt: skip
    mae = ("import torch\nfrom maskkit.adapters import create_mae\nfrom maskkit.policies import create_policy\n"
           "from maskkit.mae import mae_forward, mae_step_loss\n"
           "mae = create_mae('micro', img_size=8, patch_size=2, in_chans=1, seed=0)\n")  # fmt: skip
    add(Case("lib-mae-step-loss-empty-batch", "library", lib(mae, """
        loss = mae_step_loss(mae, create_policy("random"), torch.zeros(0, 1, 8, 8), ratio=0.75)
        loss = getattr(loss, "loss", loss)
        return ("BAD " if not torch.isfinite(torch.as_tensor(loss)).all() else "") + f"loss {loss}"
        """), lib_check("batch", "empty", ok=True)))  # fmt: skip
    add(Case("lib-mae-forward-wrong-channels", "library", lib(mae, """
        imgs = torch.rand(2, 3, 8, 8)
        plan = create_policy("random").make_plan(torch.zeros(2, 16, 8), 0.75)
        out = mae_forward(mae, imgs, plan)
        return "BAD forward accepted 3 channels"
        """), lib_check("channel", "shape", "images")))  # fmt: skip
    add(Case("lib-mae-forward-plan-batch-mismatch", "library", lib(mae, """
        imgs = torch.rand(2, 1, 8, 8)
        plan = create_policy("random").make_plan(torch.zeros(3, 16, 8), 0.75)
        out = mae_forward(mae, imgs, plan)
        return "BAD forward accepted a plan for 3 images on 2"
        """), lib_check("batch", "plan")))  # fmt: skip
    add(Case("lib-mae-forward-plan-patches-mismatch", "library", lib(mae, """
        imgs = torch.rand(2, 1, 8, 8)
        plan = create_policy("random").make_plan(torch.zeros(2, 64, 8), 0.75)
        out = mae_forward(mae, imgs, plan)
        return "BAD forward accepted a plan of 64 patches for 16"
        """), lib_check("patch", "plan")))  # fmt: skip
    add(Case("lib-mae-forward-wrong-image-size", "library", lib(mae, """
        imgs = torch.rand(2, 1, 12, 12)
        plan = create_policy("random").make_plan(torch.zeros(2, 16, 8), 0.75)
        out = mae_forward(mae, imgs, plan)
        return "BAD forward accepted 12x12 images on an 8x8 model"
        """), lib_check("size", "shape", "images")))  # fmt: skip
    return c


def _eval_has(r: Result, lr: str, seed: str) -> bool:
    p = r.tmp / "run" / "eval.json"
    if not p.exists():
        return False
    text = p.read_text()
    return lr in text and f'"seed": {seed}' in text


def _rename_config_field(tmp: Path) -> None:
    p = tmp / "run" / "config.json"
    cfg = json.loads(p.read_text())
    for key in ("policy", "model", "img_size"):
        if key in cfg:
            cfg[key + "_renamed"] = cfg.pop(key)
            break
    else:  # nested layout: rename in the first section that has one
        for section in cfg.values():
            if isinstance(section, dict):
                for key in ("policy", "model", "img_size"):
                    if key in section:
                        section[key + "_renamed"] = section.pop(key)
                        break
    p.write_text(json.dumps(cfg))


# ---- running -------------------------------------------------------------------------------------------


def base_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MASKKIT_", "PYTHON"))}
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "COLUMNS": "200",
                "NO_COLOR": "1", "TERM": "dumb"})  # fmt: skip
    return env


def run_case(case: Case, env: Env, root: Path) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="case-", dir=root))  # no case words in paths the output may show
    started = time.monotonic()
    try:
        if case.setup:
            case.setup(tmp, env)
    except Exception as e:  # a broken fixture is the harness's fault: reported apart, not classified
        return {"name": case.name, "kind": case.kind, "outcome": "setup failed", "detail": f"{type(e).__name__}: {e}"}
    before = {k: digest(tmp / k) for k in case.keep}
    argv = case.argv(tmp) if callable(case.argv) else case.argv
    cmd = [env.python, *argv] if argv[:1] == ["-c"] else [env.python, "-m", "maskkit.cli", *argv]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=tmp, env={**base_env(), **case.env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=case.timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        out, err = proc.communicate()
        rc = None
    seconds = time.monotonic() - t0
    changed = [k for k in case.keep if digest(tmp / k) != before[k]]
    res = Result(rc, out.decode("utf-8", "backslashreplace"), err.decode("utf-8", "backslashreplace"),
                 seconds, changed, tmp)  # fmt: skip
    outcome, detail = case.check(res)
    return {"name": case.name, "kind": case.kind, "outcome": outcome, "detail": detail, "rc": rc,
            "seconds": round(seconds, 1), "total_seconds": round(time.monotonic() - started, 1), "note": case.note,
            "command": " ".join(os.fsdecode(a) if isinstance(a, bytes) else a for a in argv)[:400] if argv[:1] != ["-c"] else "python -c <snippet>",
            "stderr_tail": res.err[-1500:], "stdout_tail": res.out[-600:]}  # fmt: skip


def _kill_group(pid: int) -> None:
    """A hung case: its whole process group (the child led a session of its own) is killed."""
    import signal

    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def make_base_run(env: Env, root: Path) -> None:
    subprocess.run([env.python, "-m", "maskkit.cli", "pretrain", *TINY, "--out", str(env.base_run)], cwd=root,
                   check=True, capture_output=True, timeout=300, env=base_env())  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--python", required=True, help="interpreter whose maskkit is measured")
    ap.add_argument("--out", required=True, help="per-case results (JSON)")
    ap.add_argument("-j", "--jobs", type=int, default=1)
    ap.add_argument("-k", default=None, help="only cases whose name contains one of these (comma-separated)")
    ap.add_argument("--keep-tmp", action="store_true")
    args = ap.parse_args()
    cases = [c for c in build_cases() if not args.k or any(k in c.name for k in args.k.split(","))]
    root = Path(tempfile.mkdtemp(prefix="maskkit-adv-"))
    env = Env(python=os.path.abspath(args.python), base_run=root / "base-run")
    probe = subprocess.run([env.python, "-c", "import maskkit; print(maskkit.__file__)"], cwd=root,
                           capture_output=True, text=True, env=base_env())  # fmt: skip
    print(f"maskkit: {probe.stdout.strip()}  cases: {len(cases)}", flush=True)
    make_base_run(env, root)
    results = []
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        for r in pool.map(lambda c: run_case(c, env, root), cases):
            print(f"{r['outcome']:20s} {r['name']:45s} {r.get('seconds', '')!s:>6} {r['detail'][:150]}", flush=True)
            results.append(r)
    counts = Counter(r["outcome"] for r in results)
    summary = {o: counts.get(o, 0) for o in (*OUTCOMES, "setup failed")}
    by_kind: dict = {}
    for r in results:
        by_kind.setdefault(r["kind"], Counter())[r["outcome"]] += 1
    Path(args.out).write_text(json.dumps({"maskkit": probe.stdout.strip(), "summary": summary,
                                          "by_kind": {k: dict(v) for k, v in by_kind.items()},
                                          "cases": results}, indent=1))  # fmt: skip
    print(json.dumps(summary))
    if not args.keep_tmp:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
