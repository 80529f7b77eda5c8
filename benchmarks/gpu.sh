#!/usr/bin/env bash
# One prepared GPU run (under 9 minutes): the MoE evaluations of one Grok-1-width layer against
# "dense" and the roofline (with the compiled programs checked for dequantised weights) and a
# kernel tile sweep; then a Grok-1-width slice of LAYERS layers: prefill 512 and decode at batch
# 1, 8 and 32 per evaluation, their logits against dense, peak device memory; then, if time is
# left, the engine on the mid preset.
#
# The GPU machine has no network and a Python with JAX+CUDA but no dm-haiku: before carrying the
# repository there, fetch the wheels here with
#     pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux2014_x86_64 -d benchmarks/wheels dm-haiku==0.0.17 jmp==0.0.4
# (benchmarks/wheels/ is gitignored; carry it with the run). Results go to $OUT (or ./bench-out).
#   usage: bash benchmarks/gpu.sh [SLICE_LAYERS (default 8)] [BUDGET_SECONDS (default 530)]
set -uo pipefail
cd "$(dirname "$0")/.."
LAYERS="${1:-8}"
BUDGET="${2:-530}"
OUT="${OUT:-bench-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
START=$SECONDS
log() { echo "== $* ($((SECONDS - START)) s)" | tee -a "$OUT/summary.md"; }
# Seconds for a section: its cap, or what is left of the budget (less a margin), if smaller.
left() { local l=$((BUDGET - (SECONDS - START) - 10)); echo $(( l < 1 ? 1 : (l < $1 ? l : $1) )); }

source benchmarks/gpu_env.sh

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm \
    --format=csv,noheader || true
  "$PY" -c "import jax, haiku; print('jax', jax.__version__, 'haiku', haiku.__version__, jax.devices())"
} 2>&1 | tee -a "$OUT/summary.md"

log "1. one Grok-1-width MoE layer: each evaluation vs dense and the roofline; kernel tile sweep"
timeout "$(left 150)" "$PY" benchmarks/moe_layer.py --json "$OUT/moe_layer.json" \
  2>&1 | tee -a "$OUT/full.log" | grep -v '^{' | tee -a "$OUT/summary.md"
log "1. exit status ${PIPESTATUS[0]}"

log "2. Grok-1-width slice of $LAYERS layers: prefill 512, decode at batch 1/8/32 (auto, dense)"
timeout "$(left 240)" "$PY" -m grok.bench --grok1-slice "$LAYERS" --moe-impl auto,dense \
  --json "$OUT/grok1_slice.json" 2>&1 | tee -a "$OUT/full.log" | tee -a "$OUT/summary.md"
rc=${PIPESTATUS[0]}
log "2. exit status $rc (1: an evaluation failed and was reported; others: the process died)"
if [ "$rc" -gt 1 ]; then IMPLS=dense,grouped; else IMPLS=grouped; fi
log "2b. the same slice, moe_impl $IMPLS (a separate process)"
timeout "$(left 150)" "$PY" -m grok.bench --grok1-slice "$LAYERS" --moe-impl "$IMPLS" \
  --json "$OUT/grok1_slice_b.json" 2>&1 | tee -a "$OUT/full.log" | tee -a "$OUT/summary.md"

if [ "$(left 120)" -gt 60 ]; then
  log "3. engine on the mid preset, dense vs auto"
  timeout "$(left 120)" "$PY" -m grok.bench --preset mid --moe-impl auto,dense --steps \
    --json "$OUT/mid.json" 2>&1 | tee -a "$OUT/full.log" | tail -30 | tee -a "$OUT/summary.md"
fi
log "done; results in $OUT"
