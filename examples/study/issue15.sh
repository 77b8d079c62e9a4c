#!/usr/bin/env bash
# Issue 15's comparison: every zoo policy against random masking on MNIST-5k, as `maskkit ablate` runs it
# (examples/studies/issue15-zoo.toml: the issue-12 settings, 1632 steps, seeds 0 1 2, linear probe and a
# 10-epoch fine-tune). Resumable: rerun to continue. `--dry-run` prints every command.
set -euo pipefail
cd "$(dirname "$0")/../.."
maskkit ablate examples/studies/issue15-zoo.toml --out runs/ablate/issue15-zoo --jobs 2 --threads 1
maskkit ablate report runs/ablate/issue15-zoo
