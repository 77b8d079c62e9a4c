#!/usr/bin/env bash
# Issue 24's acceptance, the direct half: seed 0 of issue 12's random-rerun, hpm and mlo-gumbel-g05-reg0.1
# (MNIST-5k, 1632 steps) by plain `maskkit pretrain` + `maskkit evaluate`, the same options as
# examples/studies/issue12-reproduce.toml gives them (`maskkit ablate ... --dry-run` prints those).
# Then compare: python examples/study/compare_reproduction.py runs/ablate/reproduce runs/direct
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
common=(--dataset mnist5k --model pilot --batch-size 64 --device cpu --log-every 10 --ckpt-every 100)
declare -A arms=(
  [random-rerun]="--policy random"
  [hpm]="--policy hpm"
  [mlo-gumbel-g05-reg0.1]="--policy learned --hypergrad darts --learned-selection gumbel --learned-guided-fraction 0.5 --learned-guided-ramp 1 --masker-reg 0.1"
)
for arm in random-rerun hpm mlo-gumbel-g05-reg0.1; do
  out="runs/direct/${arm}-s0"
  [ -f "$out/summary.json" ] || { rm -rf "$out"; maskkit pretrain "${common[@]}" ${arms[$arm]} --steps 1632 --seed 0 --out "$out" --no-progress; }
  grep -q '"linear"' "$out/eval.json" 2>/dev/null || maskkit evaluate "$out" --protocol linear --seed 0 --split test --no-progress
done
