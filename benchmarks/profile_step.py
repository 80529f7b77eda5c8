"""Where a step's device time goes: a profiler trace of decode / prefill steps, summed per kernel.

    python benchmarks/profile_step.py [--grok1-slice 8 | --preset mid] [--batches 1,32]
                                      [--moe-impl auto] [--prefill-len 512] [--calls 5]
                                      [--unroll 1] [--json FILE]

Builds the random-weight model of `grok.tools.bench`, runs each step a few times under
`jax.profiler.trace` (Perfetto JSON), and prints per step: wall time per call, the device's busy
time per call (the sum of its kernels) and the top kernels by total time. Busy time well under
wall time means launch gaps; one kernel class far over its bytes means a slow kernel. On a CPU
(no device process in the trace) XLA's runtime threads are summed instead; a quick check of the
script: `--preset tiny --prefill-len 16 --batches 1 --calls 1`.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from grok.tools.bench import PRESETS, grok1_slice, machine, random_params, runner_for
from grok.serving.engine import bucket
from grok.model import KVCache
from grok.kernels.plan import MOE_IMPLS


def kernel_times(trace_dir: str) -> dict[tuple[str, str], list[float]]:
    """Durations (us) of the device's events in a Perfetto trace, by (thread, name). Device events
    are those of processes named like a device (GPU/TPU): its threads are streams, XLA modules and
    XLA ops, each a view of the same time. On CPU (no device process): XLA's runtime threads
    (not the Python tracer's thread)."""
    files = glob.glob(os.path.join(trace_dir, "**", "*.json.gz"), recursive=True)
    if not files:
        return {}
    with gzip.open(max(files, key=os.path.getmtime), "rt") as fh:
        trace = json.load(fh)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    meta = [e for e in events if e.get("ph") == "M"]
    processes = {e["pid"]: e.get("args", {}).get("name", "") for e in meta
                 if e.get("name") == "process_name"}
    threads = {(e["pid"], e.get("tid")): e.get("args", {}).get("name", "") for e in meta
               if e.get("name") == "thread_name"}
    device = {pid for pid, name in processes.items() if any(k in name for k in ("GPU", "TPU"))}
    out: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and (e.get("pid") in device or not device):
            thread = threads.get((e["pid"], e.get("tid")), str(e.get("tid")))
            if device or thread != "python":
                out[(thread, e["name"])].append(float(e.get("dur", 0.0)))
    return out


def profile(name: str, fn, calls: int) -> dict:
    jax.block_until_ready(fn())
    jax.block_until_ready(fn())
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(calls):
                out = fn()
            jax.block_until_ready(out)
        wall = (time.perf_counter() - start) / calls
        times = kernel_times(tmp)
    by_thread: dict[str, list] = collections.defaultdict(list)
    for (thread, kernel), durations in times.items():
        by_thread[thread].append((sum(durations) / calls, len(durations) / calls, kernel))
    print(f"\n## {name}: wall {wall * 1e3:.2f} ms per call (traced)", flush=True)
    result = dict(step=name, wall_ms=wall * 1e3, threads=[])
    ranked = sorted(by_thread.items(), key=lambda kv: -sum(t for t, _, _ in kv[1]))
    for thread, rows in ranked[:4]:
        rows.sort(reverse=True)
        busy = sum(t for t, _, _ in rows)
        print(f"\n### thread {thread!r}: busy {busy / 1e3:.2f} ms per call, "
              f"{sum(n for _, n, _ in rows):.0f} events per call\n")
        print("| us per call | events per call | name |\n|---|---|---|")
        for t, n, k in rows[:18]:
            print(f"| {t:.1f} | {n:.0f} | {k[:100]} |")
        result["threads"].append(dict(thread=thread, busy_ms=busy / 1e3, top=[
            dict(us=t, count=n, name=k) for t, n, k in rows[:60]]))
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--grok1-slice", type=int, metavar="LAYERS")
    ap.add_argument("--preset", default="mid", choices=sorted(PRESETS))
    ap.add_argument("--moe-impl", default="auto", choices=MOE_IMPLS)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--prefill-len", type=int, default=512)
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--unroll", type=int, default=1, help="layers per loop step (0: all)")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        ap.error(f"--batches takes comma-separated batch sizes, got {args.batches!r}")
    if min(*batches, args.prefill_len, args.calls) < 1 or args.unroll < 0:
        ap.error("--batches, --prefill-len and --calls must be >= 1, --unroll >= 0")
    if args.grok1_slice is not None and args.grok1_slice < 1:
        ap.error(f"--grok1-slice takes a layer count >= 1, got {args.grok1_slice}")
    config = grok1_slice(args.grok1_slice) if args.grok1_slice else PRESETS[args.preset]
    max_len = bucket(args.prefill_len + 1, 8192)
    config = config.replace(sequence_len=max_len)
    print(f"# profile {config.num_layers} layers, D={config.emb_size}: {machine()}", flush=True)
    params = random_params(config)
    runner = runner_for(params, config, args.moe_impl, args.unroll or True)
    results = []
    tokens = jnp.asarray(np.arange(args.prefill_len) % (config.vocab_size - 3) + 3,
                         jnp.int32)[None]
    state = {"cache": runner.new_cache(1, max_len)}

    def prefill():
        logits, state["cache"] = runner.prefill(runner.params, state["cache"], tokens,
                                                 jnp.asarray([0]),
                                                 jnp.asarray([args.prefill_len]))
        return logits
    results.append(profile(f"prefill {args.prefill_len}", prefill, args.calls))
    for batch in batches:
        cache = runner.new_cache(batch, max_len)
        state["cache"] = KVCache(cache.k, cache.v, jnp.ones_like(cache.valid))
        toks = jnp.asarray(np.arange(batch) % (config.vocab_size - 3) + 3, jnp.int32)
        positions = jnp.full((batch,), args.prefill_len, jnp.int32)
        attend = bucket(args.prefill_len + 1, max_len)

        def decode():
            logits, state["cache"] = runner.decode(runner.params, state["cache"], toks,
                                                    positions, attend)
            return logits
        results.append(profile(f"decode batch {batch}", decode, args.calls))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(machine=machine(), steps=results), fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
