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
# tokamax (the "tokamax" evaluations) from benchmarks/wheels/tokamax where the Python lacks it;
# without them the benchmark skips those evaluations with a printed line.
if ! "$PY" -c "import tokamax" 2>/dev/null && ls benchmarks/wheels/tokamax/*.whl >/dev/null 2>&1
then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/grok-site-tokamax \
    benchmarks/wheels/tokamax/*.whl >>"$OUT/full.log" 2>&1 \
    && export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}/tmp/grok-site-tokamax" \
    || echo "cannot install benchmarks/wheels/tokamax (see $OUT/full.log): tokamax skipped"
fi
