"""Make a ColorMAE noise bank for the `colornoise` policy's `bank` option.

    python -m maskkit.noise_bank --color green --grid 14 --count 1024 --out bank.pt

Saves {"color", "grid", "seed", "sigma_fine", "sigma_coarse", "patterns" [count, grid, grid]} with
torch.save (written atomically); `create_policy("colornoise", bank="bank.pt")` reads it. Bad input
ends with exit code 1 and one line on stderr starting "Error: ".
"""

from __future__ import annotations

import argparse
import io
import sys
from typing import NoReturn

import torch

from maskkit.checkpoint import atomic_write_bytes
from maskkit.policies.colornoise import COLORS, DEFAULT_SIGMA_COARSE, DEFAULT_SIGMA_FINE, make_noise_bank

PROG = "python -m maskkit.noise_bank"


class _Parser(argparse.ArgumentParser):
    """argparse with maskkit's one-line errors (exit code 1) instead of usage + exit code 2."""

    def error(self, message: str) -> NoReturn:
        print(f"Error: {message}", file=sys.stderr)
        raise SystemExit(1)


def build_parser() -> argparse.ArgumentParser:
    """The command's options."""
    parser = _Parser(prog=PROG, description="Make a ColorMAE noise bank for the colornoise policy.")
    parser.add_argument("--color", default="green", choices=COLORS, help="noise colour (default green)")
    parser.add_argument("--grid", type=int, default=14, help="pattern side in patches, >= the MAE's grid side")
    parser.add_argument("--count", type=int, default=1024, help="number of patterns")
    parser.add_argument("--seed", type=int, default=0, help="seed of the white noise")
    parser.add_argument("--sigma-fine", type=float, default=DEFAULT_SIGMA_FINE, help="weak blur std, in patches")
    parser.add_argument("--sigma-coarse", type=float, default=DEFAULT_SIGMA_COARSE, help="strong blur std, in patches")
    parser.add_argument("--out", required=True, help="output .pt file")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Make and save the bank; returns the exit code (0, or 1 after one 'Error: ...' line on stderr)."""
    args = build_parser().parse_args(argv)
    try:
        patterns = make_noise_bank(
            args.color, args.grid, args.count, args.seed, args.sigma_fine, args.sigma_coarse
        )  # [count, grid, grid]
        buffer = io.BytesIO()
        torch.save(
            {
                "color": args.color,
                "grid": args.grid,
                "seed": args.seed,
                "sigma_fine": args.sigma_fine,
                "sigma_coarse": args.sigma_coarse,
                "patterns": patterns,
            },
            buffer,
        )
        atomic_write_bytes(args.out, buffer.getvalue())
    except ValueError as err:
        print(f"Error: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        print(f"Error: cannot write noise bank {args.out}: {err.strerror or err}", file=sys.stderr)
        return 1
    print(f"saved {args.count} {args.color} noise patterns of {args.grid}x{args.grid} to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
