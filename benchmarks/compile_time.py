"""Time to lower and compile Grok-1's prefill and decode steps from abstract weights (no memory).

    python benchmarks/compile_time.py [--layers 1 64] [--prefill 512] [--unrolled]

Prints a markdown table: layers, layout, step, lower seconds, compile seconds.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from grok.config import GROK1
from grok.model import KVCache, forward
from grok.params import abstract_params


def lower_and_compile(layers: int, scan: bool, tokens: int, cache_len: int) -> tuple[float, float]:
    config = GROK1.replace(num_layers=layers)
    params = abstract_params(config, scan=scan)
    kv_shape = (1, cache_len, config.num_kv_heads, config.key_size)
    if scan:
        kv = jax.ShapeDtypeStruct((layers, *kv_shape), jnp.bfloat16)
    else:
        kv = tuple(jax.ShapeDtypeStruct(kv_shape, jnp.bfloat16) for _ in range(layers))
    cache = KVCache(kv, kv, jax.ShapeDtypeStruct((1, cache_len), bool))
    ints = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
    step = jax.jit(lambda p, t, c, s, i: forward(p, t, c, s, config=config, logit_index=i,
                                                 attend_len=cache_len), donate_argnums=2)
    start = time.perf_counter()
    lowered = step.lower(params, ints(1, tokens), cache, ints(1), ints(1))
    lowered_at = time.perf_counter()
    lowered.compile()
    return lowered_at - start, time.perf_counter() - lowered_at


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, nargs="+", default=[1, 64])
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--unrolled", action="store_true", help="also time the unrolled layout")
    args = p.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}")
    print("| layers | layout | step | lower (s) | compile (s) |\n|---|---|---|---|---|")
    layouts = [True, False] if args.unrolled else [True]
    for layers in args.layers:
        for scan in layouts:
            for name, tokens in ((f"prefill {args.prefill}", args.prefill), ("decode", 1)):
                low, comp = lower_and_compile(layers, scan, tokens, args.prefill)
                print(f"| {layers} | {'scan' if scan else 'unrolled'} | {name} | {low:.2f} | "
                      f"{comp:.2f} |", flush=True)


if __name__ == "__main__":
    main()
