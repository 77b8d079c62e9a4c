#!/usr/bin/env bash
# Issue 15's comparison: every zoo policy against random masking on MNIST-5k (the issue-12 study's settings:
# pilot model, batch 64, 1632 steps, linear probe and 10-epoch fine-tune on the test split, seeds 0 1 2).
# Random masking is the issue-12 study's `random-rerun` rows (the same runs). Resumable: rerun to continue.
set -euo pipefail
cd "$(dirname "$0")/../.."
python examples/study/run_study.py --steps 1632 --finetune --arms random-rerun simmim simmim-r0.75 colornoise adamae-r0.95 adamae
# uniform needs an even grid: MNIST resized to 32x32 (8x8 patches), beside random masking on the same
python examples/study/run_study.py --steps 1632 --finetune --arms random-i32 uniform-i32
python examples/study/summarize.py
