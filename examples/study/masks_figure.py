"""One PNG of several runs' masks side by side: `maskkit visualize` per run, pasted left to right.

    python examples/study/masks_figure.py -o docs/masks-random-vs-learned.png \\
        runs/study/random-eqtime-s0 runs/study/learned-darts-topk@1632-s0 runs/study/learned-darts-gumbel@1632-s0

Every run shows the same test images (`maskkit visualize` picks them by its --seed, default 0, from
the run's test split, and runs of one seed share their splits). A caption row names each run.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

CAPTION = 16  # pixels of the caption row above each run's grid
GAP = 8  # pixels between two runs' grids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--num-images", type=int, default=5)
    parser.add_argument("--tile", type=int, default=84)
    args = parser.parse_args()
    grids = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, run in enumerate(args.runs):
            png = Path(tmp) / f"{i}.png"
            subprocess.run(
                ["maskkit", "visualize", str(run), "-o", str(png), "--num-images", str(args.num_images),
                 "--tile", str(args.tile), "--device", "cpu"],
                check=True, stdout=subprocess.DEVNULL,
            )  # fmt: skip
            grids.append(Image.open(png).convert("RGB"))
    width = sum(g.width for g in grids) + GAP * (len(grids) - 1)
    height = CAPTION + max(g.height for g in grids)
    figure = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(figure)
    x = 0
    for run, grid in zip(args.runs, grids, strict=True):
        draw.text((x + 4, 2), run.name, fill="black")
        figure.paste(grid, (x, CAPTION))
        x += grid.width + GAP
    args.output.parent.mkdir(parents=True, exist_ok=True)
    figure.save(args.output)
    print(f"wrote {args.output} ({width}x{height})")


if __name__ == "__main__":
    main()
