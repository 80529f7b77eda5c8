#!/usr/bin/env bash
# Diagnostics for one GPU run (about 2 minutes): where a Grok-1-width slice's decode and prefill
# steps spend device time (profiler trace, per kernel). The kernels' prefill tiles are swept by
# gpu.sh.
#   usage: bash benchmarks/gpu_profile.sh [SLICE_LAYERS (default 8)]    (wheels: see gpu.sh)
set -uo pipefail
cd "$(dirname "$0")/.."
LAYERS="${1:-8}"
OUT="${OUT:-bench-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
source benchmarks/gpu_env.sh
timeout 200 "$PY" benchmarks/profile_step.py --grok1-slice "$LAYERS" --batches 1,32 \
  --json "$OUT/profile.json" 2>&1 | tee "$OUT/profile.md"
