"""Write an ImageNet-layout folder of JPEGs (DIR/train/<class>/*.jpg, DIR/val/<class>/*.jpg) for scale tests.

The pictures are seeded crops of scikit-learn's two bundled sample photographs (china.jpg and
flower.jpg, 427 x 640; no download), one class per crop region, saved at `--size` (or, with
`--mixed`, at sizes drawn from 0.6-1.6 x `--size` with aspect ratios 3:4 to 4:3, as ImageNet's are).

    python benchmarks/make_imagefolder.py /tmp/folder-1k --images 1000
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def make_imagefolder(
    out: str | Path, images: int, *, classes: int = 10, size: int = 224, val_fraction: float = 0.1,
    mixed: bool = False, seed: int = 0, quality: int = 90,
) -> Path:
    """`images` JPEGs under out/train and out/val (val_fraction of them), `classes` class folders each."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(p) for p in load_sample_images().images]  # 2 x [427, 640, 3]
    rng = np.random.default_rng(seed)
    out = Path(out)
    # each class: one photo and a centre around which its crops are taken
    centres = [(c % len(photos), rng.uniform(0.25, 0.75), rng.uniform(0.25, 0.75)) for c in range(classes)]
    n_val = int(round(images * val_fraction))
    for i in range(images):
        split = "val" if i < n_val else "train"
        c = i % classes
        photo, cx, cy = centres[c]
        pic = photos[photo]
        w, h = pic.size
        side = rng.uniform(0.3, 0.6) * min(w, h)
        x = np.clip(cx * w + rng.normal(0, 0.05 * w) - side / 2, 0, w - side)
        y = np.clip(cy * h + rng.normal(0, 0.05 * h) - side / 2, 0, h - side)
        if mixed:
            aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
            scale = rng.uniform(0.6, 1.6)
            target = (max(8, round(size * scale * aspect**0.5)), max(8, round(size * scale / aspect**0.5)))
        else:
            target = (size, size)
        crop = pic.resize(target, Image.BILINEAR, box=(x, y, x + side, y + side))
        folder = out / split / f"class{c:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        crop.save(folder / f"{i:07d}.jpg", quality=quality)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--mixed", action="store_true", help="images of different sizes and aspect ratios")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    make_imagefolder(args.out, args.images, classes=args.classes, size=args.size, val_fraction=args.val_fraction,
                     mixed=args.mixed, seed=args.seed)  # fmt: skip
    print(args.out)


if __name__ == "__main__":
    main()
