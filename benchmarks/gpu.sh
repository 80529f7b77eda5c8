#!/usr/bin/env bash
# One prepared GPU run (under 9 minutes): the MoE evaluations of one Grok-1-width layer against
# "dense" and the roofline (with the compiled programs checked for dequantised weights) and
# kernel tile sweeps at decode and prefill shapes; then a Grok-1-width slice of LAYERS layers:
# prefill 512 and decode at batch 1, 8 and 32 per evaluation, their logits against dense, peak
# device memory; the same slice with its layer loop unrolled; then, if time is left, the XLA
# grouped evaluation, a per-kernel profile of the slice's steps and the engine on the mid preset.
# At most 8 files land in $OUT (what the device tool brings back).
#
# The GPU machine has no network and a Python with JAX+CUDA but no dm-haiku: before carrying the
# repository there, fetch the wheels here with
#     pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux2014_x86_64 -d benchmarks/wheels dm-haiku==0.0.17 jmp==0.0.4
# (benchmarks/wheels/ is gitignored; carry it with the run). Results go to $OUT (or ./bench-out).
#   usage: bash benchmarks/gpu.sh [SLICE_LAYERS (default 8)] [BUDGET_SECONDS (default 530)]
# SMOKE=1 runs the sections on tiny shapes (about a minute on a CPU): a check of the script
# itself (all but the engine run, which the tests cover; tests/test_bench.py runs it).
set -uo pipefail
cd "$(dirname "$0")/.."
LAYERS="${1:-8}"
BUDGET="${2:-530}"
OUT="${OUT:-bench-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
if [ "${SMOKE:-0}" = 1 ]; then
  SLICE=(--preset tiny --steps --no-engine --prefill-len 16 --batches 1 --repeats 1)
  LAYER=(--dims 64,128 --layers 2 --tokens 1 --repeats 1 --max-configs 1)
  PROFILE=(--preset tiny --prefill-len 16 --calls 1 --batches 1)
else
  SLICE=(--grok1-slice "$LAYERS")
  LAYER=()
  PROFILE=(--grok1-slice "$LAYERS" --batches 1,32)
fi
START=$SECONDS
log() { echo "== $* ($((SECONDS - START)) s)" | tee -a "$OUT/summary.md"; }
# Seconds for a section: its cap, or what is left of the budget (less a margin), if smaller.
left() { local l=$((BUDGET - (SECONDS - START) - 10)); echo $(( l < 1 ? 1 : (l < $1 ? l : $1) )); }

source benchmarks/gpu_env.sh

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm \
    --format=csv,noheader || true
  "$PY" -c "import jax, haiku; print('jax', jax.__version__, 'haiku', haiku.__version__, jax.devices())"
} 2>&1 | tee -a "$OUT/summary.md"

log "1. one Grok-1-width MoE layer: each evaluation vs dense and the roofline; kernel tile sweeps"
timeout "$(left 200)" "$PY" benchmarks/moe_layer.py ${LAYER[@]+"${LAYER[@]}"} --prefill-sweep \
  --json "$OUT/moe_layer.json" \
  2>&1 | tee -a "$OUT/full.log" | grep -v '^{' | tee -a "$OUT/summary.md"
log "1. exit status ${PIPESTATUS[0]}"

log "2. Grok-1-width slice of $LAYERS layers: prefill 512, decode at batch 1/8/32 (auto, dense)"
timeout "$(left 240)" "$PY" -m grok.tools.bench "${SLICE[@]}" --moe-impl auto,dense \
  --json "$OUT/grok1_slice.json" 2>&1 | tee -a "$OUT/full.log" | tee -a "$OUT/summary.md"
rc=${PIPESTATUS[0]}
log "2. exit status $rc (1: an evaluation failed and was reported; others: the process died)"
log "2b. the same slice, auto, with the layer loop unrolled (a separate process)"
timeout "$(left 150)" "$PY" -m grok.tools.bench "${SLICE[@]}" --moe-impl auto --unroll 0 \
  --json "$OUT/grok1_slice_unrolled.json" 2>&1 | tee -a "$OUT/full.log" | tee -a "$OUT/summary.md"
log "2b. exit status ${PIPESTATUS[0]}"

if [ "$rc" -gt 1 ]; then IMPLS=dense,grouped; else IMPLS=grouped; fi
if [ "$(left 150)" -gt 100 ]; then
  log "2c. the same slice, moe_impl $IMPLS (a separate process)"
  timeout "$(left 150)" "$PY" -m grok.tools.bench "${SLICE[@]}" --moe-impl "$IMPLS" \
    --json "$OUT/grok1_slice_b.json" 2>&1 | tee -a "$OUT/full.log" | tee -a "$OUT/summary.md"
fi

if [ "$(left 200)" -gt 90 ]; then
  log "3. where the slice's steps spend device time (profiler trace, per kernel)"
  timeout "$(left 200)" "$PY" benchmarks/profile_step.py "${PROFILE[@]}" > "$OUT/profile.md" 2>&1
  log "3. exit status $?"
fi
if [ "$(left 120)" -gt 60 ] && [ "${SMOKE:-0}" != 1 ]; then   # (the tests run the engine)
  log "4. engine on the mid preset, dense vs auto"
  timeout "$(left 120)" "$PY" -m grok.tools.bench --preset mid --moe-impl auto,dense --steps \
    --json "$OUT/mid.json" 2>&1 | tee -a "$OUT/full.log" | tail -30 | tee -a "$OUT/summary.md"
fi
log "done; results in $OUT"
