"""What a run's masks hide: the share of ink patches hidden, on 500 test images, under the run's own policy.

    python examples/study/mask_stats.py runs/study/random-eqtime-s0 runs/study/learned-darts-topk@1632-s0

An ink patch has at least one pixel above the background (the image's darkest value). Random masking
hides 75% of every kind of patch; a masker that hides the background leaves the strokes visible and
makes reconstruction easy. For learned maskers also: the spread of the logits within an image
against the Gumbel noise's (pi / sqrt(6) = 1.28), which says how far Gumbel selection is from random.
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from maskkit import run as run_layer
from maskkit.mae import policy_context


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--images", type=int, default=500)
    args = parser.parse_args()
    for run_dir in args.runs:
        run = run_layer.load_run(run_dir, "cpu")
        index = run.splits["test"][: args.images]
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            images = run.batcher.images(index)  # [B, C, H, W]
            patches = run.mae.patchify(images)  # [B, N, P]
            ink = patches.amax(-1) > images.amin() + 1e-6  # [B, N]
            tokens = run.mae.patch_tokens(images)  # [B, N, D]
            plan = run.policy(tokens, **policy_context(run.mae, images, generator=generator))
            hidden = plan.mask.bool()  # [B, N]
            row = {
                "run": run_dir,
                "ink_share_of_patches": round(float(ink.float().mean()), 3),
                "ink_hidden": round(float((hidden & ink).sum() / ink.sum()), 3),
                "background_hidden": round(float((hidden & ~ink).sum() / (~ink).sum()), 3),
            }
            if hasattr(run.policy, "logits"):
                logits = run.policy.logits(tokens)  # [B, N]
                row["logit_std_within_image"] = round(float(logits.std(dim=1).mean()), 3)
                row["gumbel_std"] = round(math.pi / math.sqrt(6), 3)
                row["logit_ink_minus_background"] = round(float(logits[ink].mean() - logits[~ink].mean()), 2)
        print(json.dumps(row))


if __name__ == "__main__":
    main()
