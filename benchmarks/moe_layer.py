"""One MoE layer at Grok-1 width, each evaluation against the roofline, plus a kernel tile sweep.

    python benchmarks/moe_layer.py [--dims 6144,32768] [--layers 4] [--tokens 1,8,32,512]
                                   [--repeats 5] [--prefill-sweep] [--max-configs N]
                                   [--no-layer] [--no-sweep] [--json FILE]

The expert weights are random int8 stacked over `--layers` layers, [L, E, D, F], and the layer in
the middle is evaluated with `moe(..., layer=l)`, as the scanned model does: the fast paths must
read the chosen experts out of the stack in place. For each of `--tokens` (1, 8, 32, 512) and each
evaluation this prints the median time, the bytes of the experts the routing chose over that time,
that time's fraction of the copy-bandwidth roofline, the error against "dense", and how many
dequantised weights (float arrays of an expert's or the stack's size) the compiled program writes
outside its fusions. Then the Pallas kernels alone (the gated w1+wv one and w2's) at decode shapes
(2 blocks of 16 rows) and, with --prefill-sweep, at prefill shapes, over a few tile choices. On CPU
the kernels run in the Pallas interpreter: use small --dims there (a quick check of the script:
`--dims 64,128 --layers 2 --tokens 1 --repeats 1 --max-configs 1`). Exits 1 when an evaluation
fails or is off dense by more than 2e-2.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from grok.tools.bench import (hash_uniform, copy_bandwidth, dequantized_buffers, machine, markdown,
                        matmul_rate, pipelined_time)
from grok.kernels.pallas_int8 import (fit_shared, pipeline_defaults, splits_for, sweep_launch,
                                      tiles)
from grok.kernels.measured import tokamax_installed
from grok.kernels.plan import block_rows_for, resolve_plan
from grok.model.moe import grouped, moe
from grok.quant import QuantizedWeight8bit

INTERPRET = resolve_plan().interpret   # the kernels compile on a GPU only

EXPERTS, TOP_K, SCALE_BLOCKS = 8, 2, 8


def stacked_weight(layers: int, rows: int, cols: int, blocks: int, seed: int):
    def make():
        h = hash_uniform((layers, EXPERTS, rows, cols), seed)
        return ((h >> 24).astype(jnp.int32) % 255 - 127).astype(jnp.int8)
    scales = jnp.full((layers, EXPERTS, blocks, cols), 1.0 / (73.3 * rows ** 0.5), jnp.bfloat16)
    return QuantizedWeight8bit(jax.jit(make)(), scales)


def layer_rows(args, weights, bandwidth) -> list[dict]:
    w1, wv, w2 = weights
    d, f = w1.shape[-2], w1.shape[-1]
    layer = jnp.int32(args.layers // 2)
    expert_bytes = 3 * d * f                           # int8 w1 + wv + w2 of one expert
    rng = np.random.default_rng(0)
    rows = []
    for n in args.tokens:
        x = jnp.asarray(rng.standard_normal((n, d)), jnp.bfloat16)
        probs = jax.nn.softmax(jnp.asarray(rng.standard_normal((n, EXPERTS)), jnp.float32))
        gates, chosen = jax.lax.top_k(probs, TOP_K)
        used = len(np.unique(np.asarray(chosen)))
        nbytes = used * expert_bytes
        impls = ["dense", "pallas", "grouped"] + (["gather"] if n <= 8 else [])
        if not INTERPRET and tokamax_installed():   # (on CPU: tests/test_tokamax.py)
            impls.append("tokamax")
        if n >= 256:   # prefill: expert blocks of other sizes (rows padded per expert vs speed)
            impls += [f"pallas/bm{bm}" for bm in (32, 128)]
        ref = None
        for name in impls:
            impl, _, bm = name.partition("/bm")
            plan = resolve_plan(impl)
            runs = plan.moe_path(n * TOP_K, *weights)
            if bm:   # a block size other than block_rows_for's (sweep)
                fn = jax.jit(lambda x, g, c, w1, wv, w2, l, plan=plan, bm=int(bm): grouped(
                    x, g, c, w1, wv, w2, bm, plan, l, kernels=runs == "pallas"))
            else:
                fn = jax.jit(lambda x, g, c, w1, wv, w2, l, plan=plan:
                             moe(x, g, c, w1, wv, w2, plan, layer=l))
            row = dict(tokens=n, impl=name, runs=runs, experts=used)
            try:
                start = time.perf_counter()
                compiled = fn.lower(x, gates, chosen, w1, wv, w2, layer).compile()
                row["compile_s"] = time.perf_counter() - start
                text = compiled.as_text() or ""
                row["dequantised"] = sum(len(dequantized_buffers(text, shape)) for shape in
                                         {(EXPERTS, d, f), (d, f), (args.layers * EXPERTS, d, f)})
                out = np.asarray(compiled(x, gates, chosen, w1, wv, w2, layer), np.float32)
                if impl == "dense":
                    ref = out
                row["rel_err"] = float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-30))
                t = pipelined_time(lambda: compiled(x, gates, chosen, w1, wv, w2, layer),
                                   repeats=args.repeats)
                row.update(ms=t * 1e3, gb_s=nbytes / t / 1e9,
                           fraction=nbytes / bandwidth / t)
            except Exception as err:  # noqa: BLE001 - reported in the table
                row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def _kernel_stacks(weights):
    """(name, [(weight [L*E, In, Out], scales [L*E, S, Out])]) of the gated pair (w1, wv) and of
    w2: the stacks the kernels index by layer * E + expert."""
    flat = lambda a: a.reshape(-1, *a.shape[-2:])
    pair = lambda w: (flat(w.weight), flat(w.scales))
    return [("w1+wv", [pair(weights[0]), pair(weights[1])]), ("w2", [pair(weights[2])])]


def _time_kernel(row: dict, x, ids, valid, pairs, calls: int, repeats: int,
                 **tiles_kw) -> float | None:
    """Back-to-back time of the kernel over `pairs` (one: block_matmul; two: gated_block_matmul)
    with `tiles_kw`, or None with the error in `row`."""
    interpret = INTERPRET
    gated = len(pairs) == 2
    operands = [a for pair in pairs for a in pair]
    try:   # weights as arguments, not jit constants
        fn = jax.jit(lambda x, *ws: sweep_launch(
            x, ids, valid, tuple(zip(ws[::2], ws[1::2])), gated=gated, interpret=interpret,
            **tiles_kw))
        return pipelined_time(lambda: fn(x, *operands), calls=calls, repeats=repeats)
    except Exception as err:  # noqa: BLE001 - reported in the table
        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
        return None


def sweep_rows(args, weights, bandwidth) -> list[dict]:
    """block_matmul alone at decode shapes: 2 blocks (the 2 chosen experts) of 16 rows."""
    interpret = INTERPRET
    rows = []
    rng = np.random.default_rng(1)
    for name, pairs in _kernel_stacks(weights):
        stack_w, stack_s = pairs[0]
        rows_in, cols = stack_w.shape[-2:]
        x = jnp.asarray(rng.standard_normal((2, 16, rows_in)), jnp.bfloat16)
        ids = jnp.array([EXPERTS + 1, EXPERTS + 6], jnp.int32)     # layer 1's experts 1 and 6
        valid = jnp.array([1, 1], jnp.int32)
        nbytes = 2 * rows_in * cols * len(pairs)

        def resolved(bn, bk, splits, stages, warps, swap):   # the tiles the kernel would run
            tn, tk = tiles(rows_in, cols, stack_s.shape[-2], bn, bk)
            tk = tk if interpret else fit_shared(16, tn, tk, stages, weights=len(pairs))
            if len(pairs) == 2:
                splits = 1                             # the gated kernel needs whole sums
            return tn, tk, splits or splits_for(2, rows_in, cols, tn, tk), stages, warps, swap
        default = resolved(128, 128, None, *pipeline_defaults(16, len(pairs)), False)
        seen = set()
        for config in args.configs:
            key = resolved(*config)
            tn, tk, s, stages, warps, swap = key
            if key in seen or (rows_in // tk) % s:
                continue
            seen.add(key)
            row = dict(weight=name, shape=f"{rows_in}x{cols}", bn=tn, bk=tk, splits=s,
                       stages=stages, warps=warps, swap_ab=swap, default=key == default)
            t = _time_kernel(row, x, ids, valid, pairs, 10, args.repeats, bn=tn, bk=tk,
                             splits=s, num_stages=stages, num_warps=warps, swap_ab=swap)
            if t is not None:
                row.update(us=t * 1e6, gb_s=nbytes / t / 1e9, fraction=nbytes / bandwidth / t)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def prefill_sweep_rows(args, weights, rate) -> list[dict]:
    """The kernels alone at prefill shapes: 512 tokens x top-2 = 8 full blocks of 128 rows (or
    16 of 64), one expert each; FLOP/s against the bf16 matmul rate."""
    interpret = INTERPRET
    rows = []
    rng = np.random.default_rng(2)
    for name, pairs in _kernel_stacks(weights):
        stack_w, stack_s = pairs[0]
        rows_in, cols = stack_w.shape[-2:]
        for bm, bn, bk, stages, warps, swap in args.prefill_configs:
            groups = 1024 // bm
            x = jnp.asarray(rng.standard_normal((groups, bm, rows_in)), jnp.bfloat16)
            ids = jnp.asarray(EXPERTS + np.arange(groups) % EXPERTS, jnp.int32)
            valid = jnp.full((groups,), bm, jnp.int32)
            tn, tk = tiles(rows_in, cols, stack_s.shape[-2], bn, bk)
            tk = tk if interpret else fit_shared(bm, tn, tk, stages, weights=len(pairs))
            flops = 2 * groups * bm * rows_in * cols * len(pairs)
            default = (bm, bn, bk, stages, warps, swap) == (
                block_rows_for(1024, EXPERTS, "pallas"), 128, 128,
                *pipeline_defaults(bm, len(pairs)), False)
            row = dict(weight=name, bm=bm, bn=tn, bk=tk, stages=stages, warps=warps,
                       swap_ab=swap, default=default)
            t = _time_kernel(row, x, ids, valid, pairs, 5, args.repeats, bn=tn, bk=tk, splits=1,
                             num_stages=stages, num_warps=warps, swap_ab=swap)
            if t is not None:
                row.update(us=t * 1e6, tflop_s=flops / t / 1e12, fraction=flops / rate / t)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


PREFILL_CONFIGS = [  # (bm, bn, bk, num_stages, num_warps, swap_ab): the defaults are the first
    # (w2) and the second (the gated w1+wv kernel: pipeline_defaults gives its two accumulators
    # 8 warps)
    (64, 128, 128, 3, 4, False), (64, 128, 128, 3, 8, False), (64, 64, 128, 3, 4, False),
    (64, 256, 64, 3, 8, False), (128, 128, 128, 3, 8, False), (128, 128, 64, 3, 8, False),
    (128, 256, 64, 3, 8, False), (64, 128, 128, 3, 4, True), (64, 128, 64, 3, 4, True),
    (128, 128, 64, 3, 8, True), (64, 256, 64, 3, 8, True), (32, 128, 128, 4, 4, False),
    (32, 256, 64, 3, 4, False),
]

CONFIGS = [  # (bn, bk, splits (None: splits_for), num_stages, num_warps, swap_ab)
    (128, 128, None, 4, 4, False), (128, 256, None, 4, 4, False), (64, 256, None, 4, 4, False),
    (256, 128, None, 4, 8, False), (128, 128, None, 3, 4, False), (128, 128, None, 4, 4, True),
    (64, 256, None, 4, 4, True),
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dims", default="6144,32768", help="model width D, expert width F")
    ap.add_argument("--layers", type=int, default=4, help="layers in the stack, >= 2 (4 at Grok-1 "
                    "width: 6.4 GB per weight, past the 32-bit offsets of a 2-layer stack)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--no-layer", action="store_true", help="skip the per-evaluation table")
    ap.add_argument("--prefill-sweep", action="store_true", help="also sweep prefill tiles")
    ap.add_argument("--max-configs", type=int, default=None, metavar="N",
                    help="only the first N tile choices of each sweep (a quick check)")
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--tokens", default="1,8,32,512",
                    help="token counts of the per-evaluation table")
    args = ap.parse_args(argv)
    try:
        d, f = (int(v) for v in args.dims.split(","))
        args.tokens = [int(v) for v in args.tokens.split(",")]
    except ValueError:
        ap.error(f"--dims takes D,F and --tokens a list of counts, got {args.dims!r}, "
                 f"{args.tokens!r}")
    if min(d, f, args.layers, args.repeats, *args.tokens) < 1 or args.layers < 2:
        ap.error("--dims, --tokens and --repeats must be positive, --layers at least 2")
    if args.max_configs is not None and args.max_configs < 1:
        ap.error("--max-configs must be >= 1")
    args.configs = CONFIGS[:args.max_configs]
    print(f"# MoE layer D={d} F={f}, {EXPERTS} experts, top-{TOP_K}, stack of {args.layers} "
          f"layers: {machine()}", flush=True)
    weights = (stacked_weight(args.layers, d, f, 1, 1), stacked_weight(args.layers, d, f, 1, 2),
               stacked_weight(args.layers, f, d, SCALE_BLOCKS, 3))
    on_cpu = jax.default_backend() == "cpu"
    bandwidth = copy_bandwidth(1 << (28 if on_cpu else 31))
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s", flush=True)
    layer = [] if args.no_layer else layer_rows(args, weights, bandwidth)
    print("\n" + markdown(layer, [("tokens", "tokens", "d"), ("impl", "moe_impl", "s"),
                                  ("runs", "runs", "s"), ("experts", "experts read", "d"),
                                  ("ms", "median ms", ".3f"), ("gb_s", "expert GB/s", ".0f"),
                                  ("fraction", "of roofline", ".2f"),
                                  ("rel_err", "rel. error vs dense", ".1e"),
                                  ("dequantised", "dequantised buffers", "d"),
                                  ("compile_s", "compile s", ".1f"), ("error", "error", "s")]),
          flush=True)
    sweep = [] if args.no_sweep else sweep_rows(args, weights, bandwidth)
    prefill = []
    if args.prefill_sweep:
        rate = matmul_rate(1024 if on_cpu else 8192)
        print(f"matmul rate {rate / 1e12:.0f} TFLOP/s", flush=True)
        args.prefill_configs = PREFILL_CONFIGS[:args.max_configs]
        prefill = prefill_sweep_rows(args, weights, rate)
        print("\n" + markdown(prefill, [("weight", "weight", "s"), ("bm", "bm", "d"),
                                        ("bn", "bn", "d"), ("bk", "bk", "d"),
                                        ("stages", "stages", "d"), ("warps", "warps", "d"),
                                        ("swap_ab", "swap_ab", ""), ("default", "default", ""),
                                        ("us", "median us", ".1f"),
                                        ("tflop_s", "TFLOP/s", ".0f"),
                                        ("fraction", "of matmul rate", ".2f"),
                                        ("error", "error", "s")]), flush=True)
    if sweep:
        print("\n" + markdown(sweep, [("weight", "weight", "s"), ("shape", "In x Out", "s"),
                                      ("bn", "bn", "d"), ("bk", "bk", "d"),
                                      ("splits", "splits", "d"), ("stages", "stages", "d"),
                                      ("warps", "warps", "d"), ("swap_ab", "swap_ab", ""),
                                      ("default", "default", ""),
                                      ("us", "median us", ".1f"), ("gb_s", "GB/s", ".0f"),
                                      ("fraction", "of roofline", ".2f"), ("error", "error", "s")]),
              flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(machine=machine(), copy_gb_s=bandwidth / 1e9, layer=layer,
                           sweep=sweep, prefill_sweep=prefill), fh, indent=1)
    failed = [r for r in layer if "error" in r or r.get("rel_err", 0) > 2e-2]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
