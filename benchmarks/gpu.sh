#!/usr/bin/env bash
# One prepared GPU run (at most ~10 minutes): checks the fast MoE paths against moe_impl="dense",
# checks that no int8 matmul writes a dequantised weight, and times the engine and a
# Grok-1-width slice against the roofline.
#
# The GPU machine has no network and a Python with JAX+CUDA but no dm-haiku: before carrying the
# repository there, fetch the wheels here with
#     pip download dm-haiku jmp --no-deps -d benchmarks/wheels
# (benchmarks/wheels/ is gitignored; carry it with the run). Results go to $OUT (or ./bench-out).
#   usage: bash benchmarks/gpu.sh [SLICE_LAYERS (default 8)]
set -uo pipefail
cd "$(dirname "$0")/.."
LAYERS="${1:-8}"
OUT="${OUT:-bench-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
log() { echo "== $*" | tee -a "$OUT/summary.md"; }

if ! "$PY" -c "import haiku" 2>/dev/null; then
  "$PY" -m pip install --no-index --no-deps benchmarks/wheels/*.whl >"$OUT/pip.log" 2>&1 \
    || { echo "cannot install benchmarks/wheels (see $OUT/pip.log)"; exit 1; }
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$PY" -c "import jax; print('jax', jax.__version__, jax.devices())"; } | tee "$OUT/machine.txt"

log "1. kernel and fast paths against dense (tests on the GPU backend)"
timeout 150 "$PY" -m pytest -q -x tests/test_moe.py tests/test_kernels.py tests/test_quant.py \
  2>&1 | tail -15 | tee -a "$OUT/summary.md"

log "2. no dequantised [E, D, F] buffer outside fusions, per evaluation, at Grok-1 width"
timeout 120 "$PY" - <<'PYEOF' 2>&1 | tee -a "$OUT/summary.md"
import jax, jax.numpy as jnp
from grok.bench import dequantized_buffers
from grok.moe import moe
from grok.quant import QuantizedWeight8bit as Q
e, d, f = 8, 6144, 32768
def w(shape, s):
    return Q(jax.ShapeDtypeStruct(shape, jnp.int8),
             jax.ShapeDtypeStruct((*shape[:-2], s, shape[-1]), jnp.bfloat16))
w1, wv, w2 = w((e, d, f), 1), w((e, d, f), 1), w((e, f, d), 8)
for n in (1, 8, 512):
    x = jax.ShapeDtypeStruct((n, d), jnp.bfloat16)
    g = jax.ShapeDtypeStruct((n, 2), jnp.float32)
    c = jax.ShapeDtypeStruct((n, 2), jnp.int32)
    for impl in ("dense", "grouped", "pallas"):
        try:
            comp = jax.jit(lambda *a: moe(*a, impl=impl)).lower(x, g, c, w1, wv, w2).compile()
            bad = dequantized_buffers(comp.as_text(), (e, d, f)) + \
                dequantized_buffers(comp.as_text(), (d, f))
            mem = comp.memory_analysis()
            temp = getattr(mem, "temp_size_in_bytes", -1) / 1e9
            print(f"tokens {n:4d} {impl:8s} dequantised buffers: {len(bad)}  temp {temp:.2f} GB"
                  + (f"  e.g. {bad[0][:120]}" if bad else ""))
        except Exception as err:
            print(f"tokens {n:4d} {impl:8s} FAILED: {type(err).__name__}: {str(err)[:200]}")
PYEOF

log "3. engine throughput, mid preset, dense vs auto"
timeout 150 "$PY" -m grok.bench --preset mid --moe-impl dense,auto --steps --check \
  --json "$OUT/mid.json" 2>&1 | tee -a "$OUT/summary.md"

log "4. Grok-1-width slice of $LAYERS layers: prefill 512, decode at batch 1/8/32 (auto, gather, dense)"
timeout 240 "$PY" -m grok.bench --grok1-slice "$LAYERS" --moe-impl auto,grouped,dense \
  --json "$OUT/grok1_slice.json" 2>&1 | tee -a "$OUT/summary.md"
log "done; results in $OUT"
