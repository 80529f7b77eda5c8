# Sourced by the GPU scripts: dm-haiku/jmp from benchmarks/wheels where the Python lacks them,
# the repository on PYTHONPATH, unbuffered output, no preallocation (peak memory is reported).
if ! "$PY" -c "import haiku" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/grok-site \
    benchmarks/wheels/*.whl >>"$OUT/full.log" 2>&1 \
    || { echo "cannot install benchmarks/wheels (see $OUT/full.log)"; exit 1; }
  export PYTHONPATH="/tmp/grok-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false
# tokamax (the "tokamax" evaluations) from benchmarks/wheels/tokamax where the Python lacks it
# (bash benchmarks/gpu_wheels.sh fetches them);
# without them the benchmark skips those evaluations with a printed line.
if ! "$PY" -c "import tokamax" 2>/dev/null && ls benchmarks/wheels/tokamax/*.whl >/dev/null 2>&1
then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/grok-site-tokamax \
    benchmarks/wheels/tokamax/*.whl >>"$OUT/full.log" 2>&1 \
    && export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}/tmp/grok-site-tokamax" \
    || echo "cannot install benchmarks/wheels/tokamax (see $OUT/full.log): tokamax skipped"
fi
# tokamax >= 0.0.17 imports xprof (100 MB, too big to carry) at import, for its own benchmarking
# helper only, which grok never calls: a stub module stands in where xprof is missing.
if ! "$PY" -c "import xprof" 2>/dev/null; then
  mkdir -p /tmp/grok-stub/xprof/cli
  touch /tmp/grok-stub/xprof/__init__.py /tmp/grok-stub/xprof/cli/__init__.py
  echo "get_kernel_stats_tool = None  # stub: see benchmarks/gpu_env.sh" \
    > /tmp/grok-stub/xprof/cli/tools.py
  export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}/tmp/grok-stub"
fi
