#!/usr/bin/env bash
# One prepared GPU run (under 9 minutes): the MoE evaluations of one Grok-1-width layer against
# "dense" and the roofline (with the compiled programs checked for dequantised weights) and
# kernel tile sweeps at decode and prefill shapes; then a Grok-1-width slice of LAYERS layers:
# prefill 512 and decode at batch 1, 8 and 32 per evaluation, their logits against dense, peak
# device memory, with the copy and matmul rates of the same run: int8 weights through our Triton
# kernels ("pallas"), tokamax's ragged dot ("tokamax": Mosaic GPU), XLA grouped and dense; int4
# weights through tokamax, XLA grouped and dense; the int8 slice with its layer loop unrolled;
# then, if time is left, a per-kernel profile of the slice's steps and the engine on the mid
# preset. At most 8 files land in $OUT (what the device tool brings back).
#
# The GPU machine has no network and a Python with a CUDA JAX (0.11.2 on the lent machines) but
# no dm-haiku, tokamax or qwix: before carrying the repository there, run
#     bash benchmarks/gpu_wheels.sh
# here: it fetches the versions pip resolves today for Python 3.12 (what a GPU user's install
# gets) into benchmarks/wheels (gitignored, about 6 MB; carry it with the run), and
# benchmarks/gpu_env.sh installs them with --no-deps where the Python lacks them. jax 0.12's own
# CUDA wheels (230 MB) are beyond what the device tool carries: the run measures the machine's
# JAX, and prints every version it ran. Without the tokamax wheels its evaluations are skipped
# with a printed line. Results go to $OUT (or ./bench-out); the last step writes
# $OUT/measured.json, entries of "auto"'s table (grok/kernels/measured.json): merge them here
# with `python benchmarks/measured_entries.py --merge OUT/measured.json`.
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
  INT8=auto,dense   # (our kernels interpreted on a CPU are slow: "auto" is XLA there)
  INT4=tokamax      # (the run's length: tests/test_tokamax.py checks it against dense on CPU)
  LAYER=(--dims 64,128 --layers 2 --tokens 1 --repeats 1 --max-configs 1)
  PROFILE=(--preset tiny --prefill-len 16 --calls 1 --batches 1)
  ENTRIES=(--include-cpu)   # (a CPU's numbers are no measurement: only the script is checked)
else
  SLICE=(--grok1-slice "$LAYERS")
  INT8=pallas,tokamax,grouped,dense   # named: every candidate of "auto", side by side
  INT4=tokamax,grouped,dense  # (our Triton kernels take int8 only: int4 "pallas" is XLA grouped)
  LAYER=()
  PROFILE=(--grok1-slice "$LAYERS" --batches 1,32)
  ENTRIES=()
fi
START=$SECONDS
log() { echo "== $* ($((SECONDS - START)) s)" | tee -a "$OUT/summary.md"; }
# Seconds for a section: its cap, or what is left of the budget (less a margin), if smaller.
left() { local l=$((BUDGET - (SECONDS - START) - 10)); echo $(( l < 1 ? 1 : (l < $1 ? l : $1) )); }

source benchmarks/gpu_env.sh

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm \
    --format=csv,noheader || true
  "$PY" -c "import importlib.metadata as md, jax
have = lambda n: bool(list(md.distributions(name=n)))
print(', '.join(f'{n} {md.version(n)}' for n in ('jax', 'jaxlib', 'dm-haiku', 'tokamax', 'qwix')
                if have(n)), jax.devices())"
  # Whether this backend packs jnp.int4 two per byte (tokamax/qwix take int4 in that type): if
  # not, int4 weights stay packed as uint8 and are converted per step (grok.kernels.tokamax_moe).
  "$PY" -c "import jax.numpy as jnp; n = 1 << 24
a = jnp.zeros((n,), jnp.int4).block_until_ready()
print('jnp.int4 bytes per value on device:', a.addressable_data(0).on_device_size_in_bytes() / n)"
} 2>&1 | tee -a "$OUT/summary.md"

log "1. one Grok-1-width MoE layer: each evaluation vs dense and the roofline; kernel tile sweeps"
timeout "$(left 200)" "$PY" benchmarks/moe_layer.py ${LAYER[@]+"${LAYER[@]}"} --prefill-sweep \
  --json "$OUT/moe_layer.json" \
  2>&1 | tee -a "$OUT/full.log" | grep -v '^{' | tee -a "$OUT/summary.md"
log "1. exit status ${PIPESTATUS[0]}"

log "2. Grok-1-width slice of $LAYERS layers, int8: prefill 512, decode at batch 1/8/32 ($INT8)"
timeout "$(left 300)" "$PY" -m grok.tools.bench "${SLICE[@]}" --moe-impl "$INT8" \
  --json "$OUT/grok1_slice.json" 2>&1 | tee -a "$OUT/full.log" | tee -a "$OUT/summary.md"
rc=${PIPESTATUS[0]}
log "2. exit status $rc (1: an evaluation failed and was reported; others: the process died)"
log "2d. the same slice, int4 weights (groups of 32 rows), $INT4 (a separate process)"
timeout "$(left 180)" "$PY" -m grok.tools.bench "${SLICE[@]}" --bits 4 --moe-impl "$INT4" \
  --json "$OUT/grok1_slice_int4.json" 2>&1 | tee -a "$OUT/full.log" | tee -a "$OUT/summary.md"
log "2d. exit status ${PIPESTATUS[0]}"
log "2b. the same slice, auto, with the layer loop unrolled (a separate process)"
timeout "$(left 150)" "$PY" -m grok.tools.bench "${SLICE[@]}" --moe-impl auto --unroll 0 \
  2>&1 | tee -a "$OUT/full.log" | tee -a "$OUT/summary.md"   # (no JSON: at most 8 files)
log "2b. exit status ${PIPESTATUS[0]}"

if [ "$rc" -gt 1 ] && [ "$(left 150)" -gt 100 ]; then   # section 2's process died: the XLA ones
  IMPLS=dense,grouped
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
    2>&1 | tee -a "$OUT/full.log" | tail -30 | tee -a "$OUT/summary.md"   # (no JSON: 8 files)
fi
log "5. the slices' step times as entries of \"auto\"'s measured table ($OUT/measured.json)"
"$PY" benchmarks/measured_entries.py "$OUT"/grok1_slice*.json --out "$OUT/measured.json" \
  ${ENTRIES[@]+"${ENTRIES[@]}"} 2>&1 | tee -a "$OUT/summary.md"
log "5. exit status ${PIPESTATUS[0]}"
log "done; results in $OUT"
