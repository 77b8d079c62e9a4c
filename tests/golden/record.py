"""Golden runs: `maskkit pretrain` outputs that every refactor must reproduce bit for bit.

Each case is a real `maskkit pretrain` process on one CPU thread (OMP_NUM_THREADS=1). Its
fixture, `tests/golden/<case>.json`, holds the run's metrics.jsonl verbatim and a SHA-256 of every
tensor in model.pt. The `resume` case SIGKILLs a run once its step-20 checkpoint exists, resumes
it with --resume and must equal the uninterrupted `random40` case.

The `photos8-*` cases (issue 30, item 8) train on 32-px grey photographs, where `--augment auto` is
crop-and-flip, one case for every registered policy (attention's hint mode and learned's unroll as well):
the 8-px digits cases never augment, so they could not see a change in the augmentation or in what a
policy receives after it. Their fixtures also hold the augmentation the run resolved.

    python tests/golden/record.py            # check every case against its fixture (what the test does)
    python tests/golden/record.py --write    # regenerate the fixtures (only when behaviour SHOULD change)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
COMMON = ["--no-progress", "--log-every", "5", "--ckpt-every", "10", "--seed", "3"]
CASES: dict[str, list[str]] = {
    "random": ["--policy", "random", "--steps", "30"],
    "attention": ["--policy", "attention", "--steps", "20"],
    "hpm": ["--policy", "hpm", "--steps", "30"],
    "adamae": ["--policy", "adamae", "--steps", "30"],
    "learned-darts": ["--policy", "learned", "--steps", "20", "--batch-size", "64"],
    "learned-unroll": ["--policy", "learned", "--hypergrad", "unroll", "--steps", "20", "--batch-size", "64"],
    "random40": ["--policy", "random", "--steps", "40", "--batch-size", "64"],
}
#: 32-px grey images (photos8: --augment auto is crop-and-flip), patch 4 (64 patches) and 10 steps to stay fast
PHOTOS = ["--dataset", "photos8", "--patch-size", "4", "--batch-size", "16", "--steps", "10"]
#: one crop-and-flip case per registered policy (`maskkit list policies`), and the modes the digits cases lack
CROP_FLIP: dict[str, list[str]] = {
    "photos8-random": ["--policy", "random"],
    "photos8-attention": ["--policy", "attention"],
    "photos8-attention-hint": ["--policy", "attention", "--attention-mode", "hint"],
    "photos8-hpm": ["--policy", "hpm"],
    "photos8-adamae": ["--policy", "adamae"],
    "photos8-block": ["--policy", "block"],
    "photos8-colornoise": ["--policy", "colornoise"],
    "photos8-simmim": ["--policy", "simmim"],
    "photos8-uniform": ["--policy", "uniform"],
    "photos8-learned-darts": ["--policy", "learned"],
    "photos8-learned-unroll": ["--policy", "learned", "--hypergrad", "unroll"],
}
CASES.update({name: [*PHOTOS, *args] for name, args in CROP_FLIP.items()})
#: clips (issue 31): movingdigits on the built-in video MAE, 4 frames of 16 px (tubelets 2 x 4 x 4: 2 x 4 x 4 tokens),
#: one case per policy made for clips, and tube masking with VideoMAE V2's running-cell decoder masking
CLIPS = ["--dataset", "movingdigits,count=64,side=16", "--num-frames", "4", "--model", "video:micro",
         "--batch-size", "8", "--steps", "6"]  # fmt: skip
VIDEO: dict[str, list[str]] = {
    "clips-tube": ["--policy", "tube"],
    "clips-frame": ["--policy", "frame"],
    "clips-motion": ["--policy", "motion"],
    "clips-tube-decoder": ["--policy", "tube", "--decoder-ratio", "0.5"],
}
CASES.update({name: [*CLIPS, *args] for name, args in VIDEO.items()})
#: the resume case: random40 killed after its step-20 checkpoint, then resumed
RESUME_OF = "random40"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
for _name in ("MASKKIT_INJECT_NAN", "MASKKIT_PLUGINS"):
    ENV.pop(_name, None)


def _command(out: Path, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "maskkit.cli", "pretrain", "--out", str(out), *COMMON, *args]


def digest(run: Path) -> dict:
    """metrics.jsonl verbatim and {part.key: sha256 of the tensor's bytes, dtype, shape} of model.pt."""
    import torch

    weights = torch.load(run / "model.pt", map_location="cpu", weights_only=True)
    tensors = {}
    for part in sorted(k for k in weights if isinstance(weights[k], dict)):
        for key, value in sorted(weights[part].items()):
            t = value.detach().contiguous().cpu()
            raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
            tensors[f"{part}.{key}"] = f"{hashlib.sha256(raw).hexdigest()} {t.dtype} {list(t.shape)}"
    return {"metrics": (run / "metrics.jsonl").read_text(encoding="utf-8"), "step": int(weights["step"]),
            "tensors": tensors}


def resolved_augment(run: Path) -> str:
    """The augmentation the run resolved (config.json's dataset section: 'none' or 'crop-flip')."""
    return json.loads((run / "config.json").read_text(encoding="utf-8"))["dataset"]["augment"]


def run_case(name: str, work: Path) -> dict:
    out = work / name
    proc = subprocess.run(_command(out, CASES[name]), env=ENV, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"golden case {name} failed: {proc.stderr.strip()[-2000:]}")
    result = digest(out)
    if name in CROP_FLIP:  # the digits cases' fixtures predate this key
        result["augment"] = resolved_augment(out)
    return result


def run_resume(work: Path) -> dict:
    out = work / "resume"
    proc = subprocess.Popen(_command(out, CASES[RESUME_OF]), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    marker = out / "checkpoints" / "checkpoint-0000020.pt.sha256"
    deadline = time.monotonic() + 300
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    if proc.poll() is not None:
        raise RuntimeError("golden resume case: the run ended before it could be killed")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = subprocess.run([sys.executable, "-m", "maskkit.cli", "pretrain", "--no-progress", "--resume", str(out)],
                             env=ENV, capture_output=True, text=True)
    if resumed.returncode != 0:
        raise RuntimeError(f"golden resume case failed: {resumed.stderr.strip()[-2000:]}")
    return digest(out)


def compute(names: list[str], work: Path) -> dict[str, dict]:
    results = {}
    for name in names:
        results[name] = run_resume(work) if name == "resume" else run_case(name, work)
    return results


def fixture(name: str) -> Path:
    return HERE / f"{name}.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="regenerate the fixtures")
    parser.add_argument("cases", nargs="*", default=[*CASES, "resume"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = compute(args.cases, Path(tmp))
    bad = 0
    for name, result in results.items():
        if args.write:
            fixture(name).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n", encoding="utf-8")
            print(f"wrote {fixture(name)}")
            continue
        expected = json.loads(fixture(name if name != "resume" else RESUME_OF).read_text(encoding="utf-8"))
        same = expected == result
        bad += not same
        print(f"{name}: {'identical' if same else 'DIFFERENT'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
