#!/usr/bin/env bash
# Issue 12's study, as `maskkit ablate` runs it (examples/studies/issue12-<data>.toml): the --masker-reg grid
# chosen on the validation split, every arm on the test split (linear probe and 10-epoch fine-tune, 3 seeds),
# the equal-wall-time row (calibrated in the study directory) and, on MNIST-5k, the 4,000-step rows.
# Resumable: rerun to continue. `--dry-run` prints every command. 2 processes x 1 thread (2 cores).
set -euo pipefail
cd "$(dirname "$0")/../.."
data="${1:-mnist5k}"
maskkit ablate "examples/studies/issue12-${data}.toml" --out "runs/ablate/issue12-${data}" --jobs 2 --threads 1
maskkit ablate report "runs/ablate/issue12-${data}"
