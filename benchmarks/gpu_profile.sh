#!/usr/bin/env bash
# Diagnostics for one GPU run (about 2 minutes): where a Grok-1-width slice's decode and prefill
# steps spend device time (profiler trace, per kernel). The kernels' prefill tiles are swept by
# gpu.sh.
# Results (profile.md, profile.json) go to $OUT (or ./bench-out); the exit status is the profile's.
#   usage: bash benchmarks/gpu_profile.sh [SLICE_LAYERS (default 8)]    (wheels: see gpu.sh)
# SMOKE=1 profiles the tiny preset instead (seconds on a CPU): a check of the script itself.
set -uo pipefail
cd "$(dirname "$0")/.."
LAYERS="${1:-8}"
OUT="${OUT:-bench-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
if [ "${SMOKE:-0}" = 1 ]; then
  PROFILE=(--preset tiny --prefill-len 16 --calls 1 --batches 1)
else
  PROFILE=(--grok1-slice "$LAYERS" --batches 1,32)
fi
source benchmarks/gpu_env.sh
timeout 200 "$PY" benchmarks/profile_step.py "${PROFILE[@]}" --json "$OUT/profile.json" 2>&1 \
  | tee "$OUT/profile.md"
