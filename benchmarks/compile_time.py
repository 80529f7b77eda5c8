"""Time to lower and compile Grok-1's prefill and decode steps from abstract weights (no memory).

    python benchmarks/compile_time.py [--layers 1 64] [--prefill 512] [--unrolled]
                                      [--preset grok1|tiny|mid]

Lowers and compiles the engine's own jitted steps at batch 1 (grok.serving.engine.ModelRunner's prefill
of `--prefill` tokens into a fresh row of a cache of as many slots, and its decode of one token
attending over the whole cache) with the weights and the KV cache as shapes only: the params from
grok.leaves.abstract_params, the cache from grok.model.init_cache (traced, never allocated), so
the timed programs are exactly what a real run compiles. `--preset tiny` (or mid: the presets of
grok.tools.bench) sizes the model small, as a quick check of the script itself; the default is Grok-1.
`--unrolled` also times the unrolled layout (a tuple of per-layer trees: the program grows with
depth).

Prints a markdown table: layers, layout, step, lower seconds, compile seconds.
"""
from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp

from grok.tools.bench import PRESETS
from grok.config import GROK1, GrokConfig
from grok.serving.engine import ModelRunner
from grok.model import init_cache
from grok.leaves import EMBED_MODULE, abstract_params
from grok.kernels.plan import resolve_plan

CONFIGS: dict[str, GrokConfig] = {"grok1": GROK1, **PRESETS}


def abstract_runner(config: GrokConfig, scan: bool) -> tuple[ModelRunner, dict]:
    """The engine's ModelRunner over abstract params (ShapeDtypeStructs), and those params with
    the embedding in the dtype the runner computes with (as ModelRunner converts real ones)."""
    params = abstract_params(config, scan=scan)
    table = params["embed"][EMBED_MODULE]["embeddings"]
    params["embed"][EMBED_MODULE]["embeddings"] = jax.ShapeDtypeStruct(table.shape,
                                                                       resolve_plan().embedding_dtype)
    return ModelRunner(params, config), params


def lower_and_compile(config: GrokConfig, scan: bool, step: str, prefill: int
                      ) -> tuple[float, float]:
    """(lower seconds, compile seconds) of the runner's `step` ("prefill" or "decode")."""
    runner, params = abstract_runner(config, scan)
    cache_len = prefill
    cache = jax.eval_shape(lambda: init_cache(config, 1, cache_len, scan))
    ints = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
    start = time.perf_counter()
    if step == "prefill":
        lowered = runner.prefill.lower(params, cache, ints(1, prefill), ints(1), ints(1))
    else:
        lowered = runner.decode.lower(params, cache, ints(1), ints(1), cache_len)
    lowered_at = time.perf_counter()
    lowered.compile()
    return lowered_at - start, time.perf_counter() - lowered_at


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, nargs="+", default=[1, 64])
    p.add_argument("--prefill", type=int, default=512, help="prompt tokens of the prefill step")
    p.add_argument("--unrolled", action="store_true", help="also time the unrolled layout")
    p.add_argument("--preset", choices=sorted(CONFIGS), default="grok1",
                   help="model width (tiny, mid: grok.tools.bench's presets; a quick check)")
    args = p.parse_args(argv)
    if min(args.layers) < 1 or args.prefill < 1:
        p.error("--layers and --prefill must be >= 1")
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; {args.preset} width")
    print("| layers | layout | step | lower (s) | compile (s) |\n|---|---|---|---|---|", flush=True)
    layouts = [True, False] if args.unrolled else [True]
    for layers in args.layers:
        config = CONFIGS[args.preset].replace(num_layers=layers)
        for scan in layouts:
            for step in ("prefill", "decode"):
                low, comp = lower_and_compile(config, scan, step, args.prefill)
                name = f"prefill {args.prefill}" if step == "prefill" else "decode"
                print(f"| {layers} | {'scan' if scan else 'unrolled'} | {name} | {low:.3f} | "
                      f"{comp:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
