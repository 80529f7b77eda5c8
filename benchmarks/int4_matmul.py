"""One MoE layer of stacked expert weights ([L, E, D, F], as the scanned model holds them), int8
against int4, through XLA's grouped evaluation, in one process and in alternation so that the
ratios share the machine's state:

- "int8": the release's format (one scale block);
- "int4 halves": int4 in groups of 32 as `qeinsum` runs it: x's even and odd inputs times the
  low and high nibbles, two int8 matmuls over the packed bytes (grok.quant.qeinsum);
- "int4 interleaved": the same weights with each expert's nibbles interleaved back into int8
  rows before the int8 matmul: what qeinsum did before the halves (patched in for the run).

    python benchmarks/int4_matmul.py [--dims 1024,4096] [--experts 8] [--tokens 1,8,512]
                                     [--repeats 7]

Prints the median milliseconds per evaluation and its ratio to int8 (int4's weights and scales
are 0.56x int8's bytes). Exits 1 if the two int4 evaluations disagree beyond float32 rounding.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from grok import quant
from grok.kernels.plan import resolve_plan
from grok.model import moe as moe_module


def _weights(rng, layers, experts, d, f, bits):
    def one(shape):
        w = rng.standard_normal(shape).astype(np.float32) / np.sqrt(shape[-2])
        q = quant.quantize(w) if bits == 8 else quant.quantize_int4(w, 32)
        return jax.tree.map(jnp.asarray, q)
    return one((layers, experts, d, f)), one((layers, experts, d, f)), one((layers, experts, f, d))


def _interleaved(spec, x, w, plan, out_dtype=jnp.float32):
    """qeinsum with an int4 weight first unpacked to int8 rows (its nibbles interleaved)."""
    if isinstance(w, quant.QuantizedWeight):
        w = quant.as_int8(w, jnp)
    return quant.qeinsum(spec, x, w, plan, out_dtype)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dims", default="1024,4096", help="D (model width), F (expert width)")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--tokens", default="1,8,512", help="tokens per call, comma-separated")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    try:
        d, f = (int(v) for v in args.dims.split(","))
        token_counts = [int(t) for t in args.tokens.split(",")]
    except ValueError:
        ap.error(f"--dims takes D,F and --tokens counts, got {args.dims!r} and {args.tokens!r}")
    if min(d, f, *token_counts) < 1 or d % 64 or f % 64 or args.experts < 2 or args.repeats < 1:
        ap.error("--dims must be positive multiples of 64 (groups of 32, packed pairs), "
                 "--tokens positive, --experts >= 2 and --repeats >= 1")
    plan, layer = resolve_plan("grouped"), jnp.int32(1)
    rng = np.random.default_rng(0)
    weights = {8: _weights(rng, 2, args.experts, d, f, 8), 4: _weights(rng, 2, args.experts, d, f, 4)}
    layer_fn = lambda x, g, e, w: moe_module.moe(x, g, e, *w, plan, layer=layer)
    halves, interleaved = jax.jit(layer_fn), jax.jit(lambda *a: layer_fn(*a))
    evaluations = {"int8": (halves, 8), "int4 halves": (halves, 4),
                   "int4 interleaved": (interleaved, 4)}
    print(f"# int4_matmul: one MoE layer D={d} F={f} E={args.experts} top-2 on "
          f"{jax.devices()[0].device_kind} (jax {jax.__version__})")
    print("| tokens | evaluation | median ms | vs int8 |\n|---|---|---|---|")
    failed = False
    for tokens in token_counts:
        x = jnp.asarray(rng.standard_normal((tokens, d)), jnp.bfloat16)
        probs = jax.nn.softmax(jnp.asarray(rng.standard_normal((tokens, args.experts))), -1)
        gates, experts = jax.lax.top_k(probs.astype(jnp.float32), 2)
        outs = {}
        for name, (fn, bits) in evaluations.items():   # compile: the old unpacking patched into
            real = moe_module.qeinsum                  # the MoE while "interleaved" is traced
            moe_module.qeinsum = _interleaved if fn is interleaved else real   # (jit keeps it)
            try:
                outs[name] = np.asarray(fn(x, gates, experts, weights[bits]))
            finally:
                moe_module.qeinsum = real
        times = {name: [] for name in evaluations}
        for _ in range(args.repeats):
            for name, (fn, bits) in evaluations.items():
                start = time.perf_counter()
                fn(x, gates, experts, weights[bits]).block_until_ready()
                times[name].append(time.perf_counter() - start)
        # the same products summed in another order: float32 rounding of the F-term sums
        scale = np.abs(outs["int4 halves"]).max()
        if not np.allclose(outs["int4 halves"], outs["int4 interleaved"], rtol=0,
                           atol=(d + f) * 2.0 ** -23 * scale):
            print(f"{tokens} tokens: int4 halves and interleaved differ", file=sys.stderr)
            failed = True
        base = statistics.median(times["int8"])
        for name, t in times.items():
            ms = statistics.median(t)
            print(f"| {tokens} | {name} | {ms * 1e3:.2f} | {ms / base:.2f} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
