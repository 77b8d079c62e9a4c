#!/usr/bin/env bash
# The GPU figures in one JSON file (about 8 minutes on one GPU); --smoke: tiny sizes on the CPU.
#   bash benchmarks/gpu.sh --out docs/bench-gpu.json
#   bash benchmarks/gpu.sh --smoke --out /tmp/smoke.json
# Options: see `python benchmarks/gpu.py --help`.
set -euo pipefail
exec python "$(dirname "$0")/gpu.py" "$@"
