#!/usr/bin/env bash
# Fetch, on a machine with PyPI, the wheels benchmarks/gpu.sh installs on the offline GPU machine
# (benchmarks/gpu_env.sh): what its image lacks of dm-haiku and of tokamax + qwix, at the
# versions pip resolves today for Python 3.12 (what a GPU user's `pip install -e ".[kernels]"`
# gets). The image's own CUDA jax stays: jax 0.12's jaxlib and CUDA plugin wheels are 230 MB,
# beyond what the device tool carries (64 MiB), so the GPU run measures the image's jax with
# today's tokamax and qwix, and gpu.sh prints every version it ran.
#   usage: bash benchmarks/gpu_wheels.sh        (then carry benchmarks/wheels with the run)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
# Beyond the image (its package list: the device tool's KINDS.md): haiku's two, and what
# `import tokamax` loads that the image lacks (tokamax also imports xprof, 100 MB, for its own
# benchmarking helper only: gpu_env.sh stands a stub in for it, see there).
HAIKU=(dm-haiku jmp)
TOKAMAX=(tokamax qwix pydantic pydantic-core annotated-types typing-inspection einshape
         immutabledict)
PLATFORM=(--only-binary=:all: --python-version 3.12 --implementation cp
          --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
report=$(mktemp)
trap 'rm -f "$report"' EXIT
"$PY" -m pip install --quiet --dry-run --ignore-installed --report "$report" "${PLATFORM[@]}" \
  --target "$(mktemp -d)" dm-haiku tokamax qwix
pins() {   # NAME...: NAME==VERSION as resolved
  "$PY" - "$report" "$@" <<'PY'
import json, re, sys
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
resolved = {norm(i["metadata"]["name"]): i["metadata"]["version"]
            for i in json.load(open(sys.argv[1]))["install"]}
print(" ".join(f"{n}=={resolved[norm(n)]}" for n in sys.argv[2:]))
PY
}
rm -rf benchmarks/wheels
# shellcheck disable=SC2046
"$PY" -m pip download --quiet --no-deps "${PLATFORM[@]}" -d benchmarks/wheels $(pins "${HAIKU[@]}")
# shellcheck disable=SC2046
"$PY" -m pip download --quiet --no-deps "${PLATFORM[@]}" -d benchmarks/wheels/tokamax \
  $(pins "${TOKAMAX[@]}")
ls benchmarks/wheels benchmarks/wheels/tokamax
du -sh benchmarks/wheels
