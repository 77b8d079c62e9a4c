"""darts_fd "central" against "forward": the masker hypergradient's error against the exact unroll, and its time.

On the `micro` MAE (8x8 images, 16 patches, width 64, depth 4) with the learned masker (token arch),
AdamW at every level as `maskkit pretrain` builds them, a labeled and a validation batch: for each seed
the same state is copied three times and the masker's hypergradient taken by the exact unroll (K = 1,
reverse mode through the real AdamW step and the head step), by darts central and by darts forward, at
finite-difference radii r. Float64 by default, so the error is the method's, not float32 rounding;
`--dtype float32` shows what a real run sees. The time is each method's hypergradient call alone,
interleaved and repeated (a load on the machine slows all three alike).

    python examples/study/darts_fd.py                       # writes examples/study/darts_fd.json
    python examples/study/darts_fd.py --seeds 0 1 2 --radii 0.1 0.01 0.001 --dtype float32
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from maskkit import create_policy
from maskkit.adapters.timm import create_mae
from maskkit.mlo import UnrollWindow, darts_masker_grad, finetune_step, optimizer_params, pretrain_step
from maskkit.optim import create_optimizer

OUT = Path(__file__).with_name("darts_fd.json")


def make_state(seed: int, dtype: torch.dtype) -> dict:
    """MAE, masker, head, AdamW optimizers (moments warmed up by two steps) and batches."""
    torch.manual_seed(seed)
    mae = create_mae("micro", seed=seed).to(dtype)
    masker = create_policy("learned", embed_dim=mae.embed_dim, num_patches=mae.num_patches, ratio=0.75).to(dtype)
    with torch.no_grad():  # a masker away from its near-constant init, as after some training
        for p in masker.parameters():
            p.add_(0.05 * torch.randn_like(p))
    head = torch.nn.Linear(mae.embed_dim, 10).to(dtype)
    mae_opt = create_optimizer("adamw", mae, lr=1.5e-3, weight_decay=0.05)
    head_opt = create_optimizer("adamw", head, lr=1e-2, weight_decay=0.01, betas=(0.9, 0.999))
    gen = torch.Generator().manual_seed(seed + 100)

    def batch(n: int) -> torch.Tensor:
        return torch.randn(n, 1, 8, 8, generator=gen).to(dtype)

    labeled = (batch(32), torch.randint(0, 10, (32,), generator=gen))
    val = (batch(32), torch.randint(0, 10, (32,), generator=gen))
    for _ in range(2):
        pretrain_step(mae, masker, mae_opt, batch(32))
        finetune_step(mae, head, head_opt, labeled, val, paths=None)
    return {"mae": mae, "masker": masker, "head": head, "mae_opt": mae_opt, "head_opt": head_opt,
            "images": batch(32), "train": labeled, "val": val}  # fmt: skip


def unroll_grad(state: dict) -> torch.Tensor:
    q = copy.deepcopy(state)
    window = UnrollWindow(q["mae"], q["masker"], q["mae_opt"])
    window.pretrain_step(q["images"])
    grads, _ = window.finish(q["head"], q["head_opt"], q["train"], q["val"])
    return torch.cat([g.reshape(-1) for g in grads])


def _darts_inputs(state: dict) -> tuple[dict, object, object]:
    """A copy of `state` after darts' real pretrain step and head step (with the darts vector)."""
    q = copy.deepcopy(state)
    step = pretrain_step(q["mae"], q["masker"], q["mae_opt"], q["images"], keep_params=True)
    ft = finetune_step(q["mae"], q["head"], q["head_opt"], q["train"], q["val"],
                          mae_params=optimizer_params(q["mae_opt"]), paths="both")  # fmt: skip
    return q, step, ft


def darts_grad(state: dict, fd: str, r: float) -> torch.Tensor:
    q, step, ft = _darts_inputs(state)
    grads = darts_masker_grad(q["mae"], q["masker"], step, ft.vector, q["mae_opt"], r=r, fd=fd)
    return torch.cat([g.reshape(-1) for g in grads])


def fd_only_seconds(state: dict, fd: str, r: float) -> float:
    """Seconds of the finite-difference term alone (pretrain and head steps excluded)."""
    q, step, ft = _darts_inputs(state)
    t0 = time.perf_counter()
    darts_masker_grad(q["mae"], q["masker"], step, ft.vector, q["mae_opt"], r=r, fd=fd)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--radii", type=float, nargs="+", default=[0.1, 0.01, 0.001])
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    parser.add_argument("--repeats", type=int, default=15, help="timed calls of each fd (interleaved)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    rows = []
    for seed in args.seeds:
        state = make_state(seed, dtype)
        exact = unroll_grad(state)
        for r in args.radii:
            for fd in ("central", "forward"):
                g = darts_grad(state, fd, r)
                rows.append({"seed": seed, "r": r, "fd": fd,
                             "rel_err": ((g - exact).norm() / exact.norm()).item(),
                             "cosine": F.cosine_similarity(g, exact, dim=0).item()})  # fmt: skip
    state = make_state(args.seeds[0], torch.float32)
    times: dict[str, list[float]] = {"central": [], "forward": []}
    for _ in range(args.repeats):
        for fd in times:
            times[fd].append(fd_only_seconds(state, fd, 0.01))
    summary = {}
    for r in args.radii:
        for fd in ("central", "forward"):
            sel = [row for row in rows if row["r"] == r and row["fd"] == fd]
            summary[f"{fd}@r={r}"] = {
                "rel_err_mean": statistics.fmean(row["rel_err"] for row in sel),
                "rel_err_max": max(row["rel_err"] for row in sel),
                "cosine_min": min(row["cosine"] for row in sel),
            }
    seconds = {fd: statistics.median(v) for fd, v in times.items()}
    payload = {"dtype": args.dtype, "torch": torch.__version__, "threads": torch.get_num_threads(),
               "rows": rows, "summary": summary, "fd_seconds_median_float32": seconds}  # fmt: skip
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    for key, value in summary.items():
        print(f"{key:>18}: rel. error mean {value['rel_err_mean']:.2e}, max {value['rel_err_max']:.2e}, "
              f"cosine min {value['cosine_min']:.6f}")  # fmt: skip
    print(f"finite-difference term alone (float32, median of {args.repeats}): central {seconds['central'] * 1e3:.1f} ms, "
          f"forward {seconds['forward'] * 1e3:.1f} ms")  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
