"""Benchmarks: engine throughput, step times against the roofline, and MoE evaluations compared.

    python -m grok.tools.bench --preset mid                      # engine tokens/s at batch 1, 8, 32
    python -m grok.tools.bench --preset mid --steps              # + step times and fraction of roofline
    python -m grok.tools.bench --grok1-slice 8                   # Grok-1 width, 8 layers (a big GPU)
    python -m grok.tools.bench --grok1-slice 8 --unroll 0        # the same, layer loop unrolled
    python -m grok.tools.bench --grok1-slice 8 --bits 4 --moe-impl tokamax,grouped,dense  # int4
    python -m grok.tools.bench --preset mid --moe-impl dense,auto --check
    python -m grok.tools.bench --preset tiny --batches 1 --prompt-len 8 --new-tokens 3 --steps \
        --prefill-len 16 --repeats 1                       # a quick check (seconds, any CPU)

Weights are random int8 (or, with `--bits 4`, int4 with per-group scales) generated on the
device by a hash of each element's index (nothing is read from disk, no float copy is made), so
a Grok-1-width slice builds in seconds. An evaluation whose package is missing (tokamax) is
skipped with a printed line. Step times are
medians over `--repeats` runs after a warm-up call (compile time excluded), each run blocked
until done; "back-to-back" times are the mean of 5 calls blocked once at the end (the host's
dispatch hidden behind the device's work), median of 3 (of 1 with `--repeats 1`). Engine
throughput needs `--new-tokens` >= 3: the first engine step prefills and decodes once, the later
ones are the decode steps timed. The roofline of a
decode step is the bytes it must read (every non-expert weight, the chosen experts' weights, the
bfloat16 embedding for the logits and the live KV cache) over the copy bandwidth measured in the
same run; of a prefill, its matmul FLOPs over the bf16 (CPU: f32) matmul rate measured in the
same run. Results print as markdown tables; `--json FILE` also writes them as JSON.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import platform
import re
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from grok.checkpoint.convert import DEFAULT_GROUP_SIZE
from grok.config import GROK1, GrokConfig
from grok.serving.engine import Engine, ModelRunner, Request, bucket
from grok.model import KVCache
from grok.kernels.measured import decide, tokamax_installed
from grok.kernels.plan import MOE_IMPLS, block_rows_for, resolve_plan, toolchain_here
from grok.leaves import Entry, checkpoint_entries, model_tree
from grok.quant import QuantizedWeight

PRESETS: dict[str, GrokConfig] = {
    "tiny": GrokConfig(vocab_size=256, emb_size=64, key_size=16, num_q_heads=4, num_kv_heads=2,
                       num_layers=2, widening_factor=2.0, num_experts=4, num_selected_experts=2,
                       sequence_len=256, scale_blocks=4),
    "mid": GrokConfig(vocab_size=32768, emb_size=1024, key_size=128, num_q_heads=8,
                      num_kv_heads=2, num_layers=4, widening_factor=8.0, num_experts=8,
                      num_selected_experts=2, sequence_len=1024),
}


def grok1_slice(layers: int) -> GrokConfig:
    return GROK1.replace(num_layers=layers)


# --- random int8 weights made on the device ------------------------------------------------------

def hash_uniform(shape: tuple[int, ...], seed: int) -> jax.Array:
    """uint32 hash of each element's flat index (elementwise: XLA fuses it into its consumer)."""
    idx = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        idx = idx + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride % 2**32)
        stride *= shape[axis]
    h = idx * jnp.uint32(0x9E3779B1) + jnp.uint32((seed * 0x85EBCA77 + 0x165667B1) % 2**32)
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x7FEB352D)
    h = h ^ (h >> 15)
    h = h * jnp.uint32(0x846CA68B)
    return h ^ (h >> 16)


def random_params(config: GrokConfig, seed: int = 0) -> dict[str, Any]:
    """The model's tree (layers stacked for the scan) with random quantised weights in the
    config's format, built on the default device from the leaf table: int8 uniform in
    [-127, 127] (int4: [-7, 7], packed two per byte) with fan-in scaled bfloat16 scales (weights
    of standard deviation about 1 / sqrt(fan-in)), unit norm scales, fan-in scaled uniform
    floats."""
    index = {e.name: e.index for e in checkpoint_entries(config)}

    def make(entry: Entry, stacked: bool) -> Any:
        shape = (config.num_layers, *entry.shape) if stacked else entry.shape
        leaf_seed = seed * 1000 + index[entry.name]
        if entry.quantized:
            stored = (*shape[:-2], *entry.weight_shape[-2:])
            int4 = entry.fmt.bits == 4

            def weight(shape=stored, s=leaf_seed):
                h = hash_uniform(shape, s)
                if not int4:
                    return ((h >> 24).astype(jnp.int32) % 255 - 127).astype(jnp.int8)
                nibble = lambda v: (v % 15 + 9) & 0xF      # [0, 14] -> [-7, 7] as a nibble
                return (nibble(h >> 8) | (nibble(h >> 20) << 4)).astype(jnp.uint8)
            # uniform on [-m, m] has standard deviation m / sqrt(3)
            spread = (7 if int4 else 127) / math.sqrt(3)
            scales = jnp.full((*shape[:-2], entry.scale_blocks, shape[-1]),
                              1.0 / (spread * math.sqrt(entry.fan_in)), jnp.bfloat16)
            return QuantizedWeight(jax.jit(weight)(), scales, entry.fmt)
        if entry.param == "scale":
            return jnp.ones(shape, jnp.float32)
        # embeddings (bfloat16 as the model holds them) and router weights (float32)
        dtype = jnp.bfloat16 if entry.param == "embeddings" else jnp.float32

        def uniform(shape=shape, s=leaf_seed, dtype=dtype):
            u = (hash_uniform(shape, s) >> 8).astype(jnp.float32) / 2.0**24 - 0.5
            return (u * (math.sqrt(12.0 / entry.fan_in))).astype(dtype)
        return jax.jit(uniform)()
    return model_tree(config, make, scan=True)


# --- timing helpers ------------------------------------------------------------------------------

def _block(x: Any) -> Any:
    return jax.block_until_ready(x)


def median_time(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall time of fn() (blocked) over `repeats` calls after one warm-up call."""
    _block(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _block(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def pipelined_time(fn, calls: int = 10, repeats: int = 5) -> float:
    """Median over `repeats` of the mean time of `calls` back-to-back calls, blocked once at the
    end: the host's dispatch overlaps the device's work, as in a decode loop."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            out = fn()
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / calls)
    return float(statistics.median(times))


def copy_bandwidth(nbytes: int, repeats: int = 5) -> float:
    """Bytes/s of an elementwise pass that reads and writes `nbytes` (counted twice)."""
    x = jnp.arange(nbytes // 4, dtype=jnp.float32)   # not zeros: memory may compress them
    fn = jax.jit(lambda a: a + 1.0)
    return 2 * x.nbytes / median_time(lambda: fn(x), repeats)


def matmul_rate(n: int, repeats: int = 5) -> float:
    """FLOP/s of an [n, n] x [n, n] matmul (bfloat16 with float32 accumulation; float32 on CPU,
    whose runtime lacks fast bf16 dots)."""
    dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    a, b = (jax.random.normal(jax.random.key(i), (n, n), dtype) for i in (1, 2))  # not constants:
    fn = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))  # they run fast
    return 2 * n ** 3 / median_time(lambda: fn(a, b), repeats)


# --- bytes and FLOPs of a step -------------------------------------------------------------------

def _nbytes(leaf: Any) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(leaf))


def expected_experts(config: GrokConfig, tokens: int) -> float:
    """Distinct experts a step touches per layer, expected under uniform random top-k routing."""
    e, k = config.num_experts, config.num_selected_experts
    return e * (1.0 - (1.0 - k / e) ** tokens)


def decode_bytes(params: dict[str, Any], config: GrokConfig, batch: int, attend: int) -> float:
    """Bytes a decode step must read: all non-expert weights, the chosen experts (expected
    count), the embedding (bfloat16, for the logits) and `attend` cache slots of K and V."""
    layers = params["layers"]
    expert = sum(_nbytes(layers[f"decoder_layer/moe/{name}"]) for name in
                 ("linear", "linear_v", "linear_1"))
    other = _nbytes(params) - expert
    used = expert * expected_experts(config, batch) / config.num_experts
    cache = 2 * config.num_layers * batch * attend * config.kv_size * 2
    return other + used + cache


def prefill_flops(config: GrokConfig, tokens: int) -> float:
    """Matmul FLOPs of a prefill of `tokens` (top-k experts, causal attention counted in full as it
    is computed, logits at one position)."""
    c = config
    d = c.emb_size
    per_token = 2 * (d * c.q_size * 2 + d * c.kv_size * 2
                     + c.num_selected_experts * 3 * d * c.ffn_size + d * c.num_experts)
    attention = 2 * 2 * tokens * tokens * c.q_size
    return c.num_layers * (tokens * per_token + attention) + 2 * c.vocab_size * d


# --- measurements --------------------------------------------------------------------------------

_RUNNERS: dict[tuple[int, str], ModelRunner] = {}


def runner_for(params, config, moe_impl: str, unroll: int | bool = 1) -> ModelRunner:
    """One ModelRunner (one set of compiled functions) per parameter tree, evaluation and
    layer-loop unrolling."""
    key = (id(params), moe_impl, unroll)
    if key not in _RUNNERS or _RUNNERS[key].params is not params:
        plan = resolve_plan(moe_impl, unroll=unroll)
        _RUNNERS[key] = ModelRunner(params, config, plan=plan)
    return _RUNNERS[key]

def step_times(params, config, moe_impl: str, batches: list[int], prefill_len: int,
               repeats: int, bandwidth: float, flops_rate: float,
               outputs: dict[str, np.ndarray] | None = None,
               unroll: int | bool = 1) -> list[dict[str, Any]]:
    """Median prefill and decode step times of the jitted model functions (no engine loop).
    Each step's first logits go to `outputs` (by phase), for comparing evaluations."""
    outputs = {} if outputs is None else outputs

    def first(name: str, logits: jax.Array) -> jax.Array:
        if name not in outputs:
            outputs[name] = np.asarray(logits, np.float32)
        return logits

    runner = runner_for(params, config, moe_impl, unroll)
    moe_w = [params["layers"][f"decoder_layer/moe/{n}"]["w"] for n in ("linear", "linear_v",
                                                                     "linear_1")]
    runs = lambda tokens: runner.plan.moe_path(tokens * config.num_selected_experts, *moe_w)
    rows = []
    max_len = bucket(prefill_len + 1, config.sequence_len)
    cache = runner.new_cache(1, max_len)
    tokens = jnp.asarray(np.arange(prefill_len) % (config.vocab_size - 3) + 3, jnp.int32)[None]
    state = {"cache": cache}

    def prefill():
        logits, state["cache"] = runner.prefill(runner.params, state["cache"], tokens,
                                                 jnp.asarray([0]), jnp.asarray([prefill_len]))
        return first(f"prefill {prefill_len}", logits)
    t = median_time(prefill, repeats)
    tp = pipelined_time(prefill, calls=5, repeats=min(3, repeats))
    flops = prefill_flops(config, prefill_len)
    rows.append(dict(phase=f"prefill {prefill_len}", moe_impl=moe_impl, batch=1,
                     impl=runs(prefill_len), ms=t * 1e3, pipelined_ms=tp * 1e3,
                     tokens_per_s=prefill_len / t,
                     roofline_ms=flops / flops_rate * 1e3, fraction=flops / flops_rate / t))
    del state["cache"]
    for batch in batches:
        cache = runner.new_cache(batch, max_len)
        cache = KVCache(cache.k, cache.v, jnp.ones_like(cache.valid))
        state = {"cache": cache}
        toks = jnp.asarray(np.arange(batch) % (config.vocab_size - 3) + 3, jnp.int32)
        positions = jnp.full((batch,), prefill_len, jnp.int32)
        attend = bucket(prefill_len + 1, max_len)

        def decode():
            logits, state["cache"] = runner.decode(runner.params, state["cache"], toks,
                                                    positions, attend)
            return first(f"decode batch {batch}", logits)
        t = median_time(decode, repeats)
        tp = pipelined_time(decode, calls=5, repeats=min(3, repeats))
        nbytes = decode_bytes(params, config, batch, attend)
        rows.append(dict(phase="decode", moe_impl=moe_impl, batch=batch,
                         impl=runs(batch), ms=t * 1e3, pipelined_ms=tp * 1e3,
                         tokens_per_s=batch / t, roofline_ms=nbytes / bandwidth * 1e3,
                         fraction=nbytes / bandwidth / t))
        del state["cache"]
    return rows


def engine_throughput(params, config, moe_impl: str, batch: int, prompt_len: int,
                      new_tokens: int) -> dict[str, Any]:
    """Prefill and decode tokens/s of the continuous-batching engine: `batch` prompts of
    `prompt_len` tokens, `new_tokens` each. Runs twice; the second run (compiled) is timed.
    The first step admits (prefills) every prompt and decodes once; prefill time is that step
    less the median later step."""
    runner = runner_for(params, config, moe_impl)
    rng = np.random.default_rng(batch)
    prompts = [list(rng.integers(3, config.vocab_size, prompt_len)) for _ in range(batch)]
    max_len = bucket(prompt_len + new_tokens, config.sequence_len)
    result: dict[str, Any] = {}
    for run in range(2):
        engine = Engine(runner, batch_size=batch, max_len=max_len)
        for p in prompts:
            engine.submit(Request(p, max_new_tokens=new_tokens))
        steps, produced = [], []
        while not engine.idle:
            start = time.perf_counter()
            events = engine.step()
            steps.append(time.perf_counter() - start)
            produced.append(len(events))
        if run == 0:
            continue
        decode_steps = steps[1:] or steps
        step = statistics.median(decode_steps)
        prefill = max(steps[0] - step, 1e-9)
        decoded = sum(produced[1:])
        result = dict(moe_impl=moe_impl, batch=batch, prompt_len=prompt_len,
                      prefill_tokens_per_s=batch * prompt_len / prefill,
                      decode_step_ms=step * 1e3,
                      decode_tokens_per_s=decoded / max(sum(steps[1:]), 1e-9))
    return result


def compare_outputs(outputs: dict[str, dict[str, np.ndarray]]) -> list[dict[str, Any]]:
    """Max |logits - dense logits| relative to max |dense logits|, per step and evaluation."""
    ref = outputs.get("dense", {})
    rows = []
    for impl, steps in outputs.items():
        for name, logits in steps.items():
            if impl != "dense" and name in ref:
                rows.append(dict(check=name, moe_impl=impl, rel_err=float(
                    np.abs(logits - ref[name]).max() / max(np.abs(ref[name]).max(), 1e-30))))
    return rows


def check_against_dense(params, config, impls: list[str], batches: list[int],
                        prompt_len: int) -> list[dict[str, Any]]:
    """Max |logits - dense logits| (relative to max |dense logits|) of each evaluation, for a
    prefill of `prompt_len` and a decode step at each batch size."""
    rows = []
    tokens = jnp.asarray(np.arange(prompt_len) % (config.vocab_size - 3) + 3, jnp.int32)[None]
    runners = {impl: runner_for(params, config, impl) for impl in ["dense", *impls]}
    for batch in [None, *batches]:
        outs = {}
        for impl, runner in runners.items():
            if batch is None:
                outs[impl] = np.asarray(runner.logits(np.asarray(tokens)))[:, -1]
            else:
                cache = runner.new_cache(batch, bucket(prompt_len + 1, config.sequence_len))
                cache = KVCache(cache.k, cache.v, jnp.ones_like(cache.valid))
                toks = jnp.asarray(np.arange(batch) * 7 % (config.vocab_size - 3) + 3, jnp.int32)
                logits, _ = runner.decode(runner.params, cache, toks,
                                           jnp.full((batch,), prompt_len, jnp.int32),
                                           bucket(prompt_len + 1, config.sequence_len))
                outs[impl] = np.asarray(logits)
        ref = outs["dense"]
        for impl in impls:
            err = float(np.abs(outs[impl] - ref).max() / max(np.abs(ref).max(), 1e-30))
            rows.append(dict(check=f"prefill {prompt_len}" if batch is None else
                             f"decode batch {batch}", moe_impl=impl, rel_err=err))
    return rows


# --- output --------------------------------------------------------------------------------------

def markdown(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """A markdown table of `rows` with (key, header, format) columns."""
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(format(row[k], f) if k in row else ""
                                       for k, _, f in columns) + " |")
    return "\n".join(lines)


def peak_memory(after: str, weights_gb: float, cache_gb: float) -> dict[str, Any] | None:
    """The device's peak bytes in use so far against weights + KV cache (None where the backend
    keeps no statistics, as on CPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" not in stats:
        return None
    peak = stats["peak_bytes_in_use"] / 1e9
    return dict(after=after, peak_gb=peak, weights_gb=weights_gb, cache_gb=cache_gb,
                overhead=peak / (weights_gb + cache_gb) - 1)


def machine() -> dict[str, Any]:
    """This run's JAX, device and host, the tokamax and qwix versions (None: not installed), and
    the MoE kernel "auto" takes per shape class here, with why (grok.kernels.measured)."""
    dev = jax.devices()[0]
    backend = jax.default_backend()
    choices = decide(toolchain_here(backend))
    return dict(jax=jax.__version__, backend=backend,
                device=getattr(dev, "device_kind", str(dev)), python=platform.python_version(),
                host=platform.machine(), cpus=__import__("os").cpu_count(),
                tokamax=package_version("tokamax"), qwix=package_version("qwix"),
                auto={c.shape: c.kernel for c in choices},
                auto_reasons={c.shape: c.reason for c in choices})


def package_version(name: str) -> str | None:
    """An installed distribution's version, or None."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def dequantized_buffers(hlo_text: str, shape: tuple[int, ...]) -> list[str]:
    """Instructions of a compiled module's unfused computations whose result is a float (f32,
    bf16, f16) array with as many elements as `shape` (any layout or reshaping of it): a
    dequantised weight written to memory. Instructions inside fusion computations stay in
    registers and are not counted."""
    size = int(np.prod(shape))
    pattern = re.compile(r"= (f32|bf16|f16)\[([\d,]+)\]")
    found, fused = [], False
    for line in hlo_text.splitlines():
        head = line.strip()
        if head.endswith("{") and "->" in head and (head.startswith(("%", "ENTRY"))):
            name = "ENTRY" if head.startswith("ENTRY") else head.split()[0].lstrip("%")
            fused = "fused" in name or "fusion" in name or name.startswith("wrapped")
            continue
        match = pattern.search(line)
        if not fused and match and int(np.prod([int(v) for v in match.group(2).split(",")])) \
                == size:
            found.append(head)
    return found


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m grok.tools.bench", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--grok1-slice", type=int, metavar="LAYERS",
                    help="Grok-1 width with LAYERS layers (step times and roofline only)")
    ap.add_argument("--moe-impl", default="auto",
                    help=f"comma-separated evaluations to compare, of {', '.join(MOE_IMPLS)}")
    ap.add_argument("--bits", type=int, choices=(8, 4), default=8,
                    help="random weights in int8 or int4 (per-group scales, --group-size)")
    ap.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE,
                    help="int4 rows per scale (the converter's default; per tensor the largest "
                    "divisor of its input width not above this)")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--prompt-len", type=int, default=64, help="engine prompts")
    ap.add_argument("--new-tokens", type=int, default=16, help="engine tokens per request")
    ap.add_argument("--prefill-len", type=int, default=512, help="prefill of the step timings")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--unroll", type=int, default=1, metavar="N",
                    help="layers per step of the layer loop in the step timings (0: all)")
    ap.add_argument("--steps", action="store_true", help="also time the steps (default for "
                    "--grok1-slice) against the roofline")
    ap.add_argument("--no-engine", action="store_true", help="skip the engine throughput")
    ap.add_argument("--check", action="store_true",
                    help="compare each evaluation's logits with moe_impl='dense' first")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = ap.parse_args(argv)

    impls = [s.strip() for s in args.moe_impl.split(",") if s.strip()]
    bad = [i for i in impls if i not in MOE_IMPLS]
    if bad:
        ap.error(f"unknown --moe-impl {bad[0]!r}; choose from {', '.join(MOE_IMPLS)}")
    if "tokamax" in impls and not tokamax_installed():
        print("moe_impl=tokamax skipped: the tokamax package is not installed "
              "(pip install 'grok[kernels]')", flush=True)
        impls = [i for i in impls if i != "tokamax"]
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        ap.error(f"--batches takes comma-separated batch sizes, got {args.batches!r}")
    if min(batches) < 1 or min(args.prompt_len, args.prefill_len, args.repeats) < 1:
        ap.error("--batches, --prompt-len, --prefill-len and --repeats must be >= 1")
    if args.new_tokens < 3 and not (args.no_engine or args.grok1_slice):
        ap.error(f"--new-tokens must be >= 3 (the engine's first step prefills and decodes once; "
                 f"the later ones are the decode steps timed), got {args.new_tokens}")
    if args.grok1_slice is not None and args.grok1_slice < 1:
        ap.error(f"--grok1-slice takes a layer count >= 1, got {args.grok1_slice}")
    if args.unroll < 0:
        ap.error(f"--unroll must be >= 0 (0: all layers), got {args.unroll}")
    if args.grok1_slice:
        config, name = grok1_slice(args.grok1_slice), f"grok1-slice-{args.grok1_slice}"
        config = config.replace(sequence_len=bucket(args.prefill_len + 1, GROK1.sequence_len))
    else:
        config, name = PRESETS[args.preset], args.preset
    if args.bits == 4:
        config = config.replace(weight_bits=4, group_size=args.group_size)
        name += f"-int4-g{args.group_size}"
    info = machine()
    print(f"# grok.tools.bench {name}: {info}", flush=True)
    start = time.perf_counter()
    params = random_params(config)
    _block(params)
    weight_gb = _nbytes(params) / 1e9
    print(f"random int{args.bits} weights: {weight_gb:.2f} GB in {time.perf_counter() - start:.1f} s; "
          f"block rows at batch 1: {block_rows_for(config.num_selected_experts, config.num_experts)}",
          flush=True)
    out: dict[str, Any] = dict(config=name, machine=info, weight_gb=weight_gb,
                               config_fields=config.to_dict())

    if args.check:
        others = [i for i in impls if i != "dense"] or ["auto"]
        rows = check_against_dense(params, config, others, batches, min(args.prefill_len, 64))
        print("\n" + markdown(rows, [("check", "check", "s"), ("moe_impl", "moe_impl", "s"),
                                     ("rel_err", "max rel. error vs dense", ".2e")]), flush=True)
        out["check"] = rows

    if not args.grok1_slice and not args.no_engine:
        rows = [engine_throughput(params, config, impl, b, args.prompt_len, args.new_tokens)
                for impl in impls for b in batches]
        print(f"\nEngine ({name}, prompts of {args.prompt_len}, {args.new_tokens} new tokens)\n")
        print(markdown(rows, [("moe_impl", "moe_impl", "s"), ("batch", "batch", "d"),
                              ("prefill_tokens_per_s", "prefill tok/s", ".1f"),
                              ("decode_step_ms", "decode step ms", ".2f"),
                              ("decode_tokens_per_s", "decode tok/s", ".1f")]), flush=True)
        out["engine"] = rows

    if args.grok1_slice or args.steps:
        on_cpu = jax.default_backend() == "cpu"
        bandwidth = copy_bandwidth(1 << (28 if on_cpu else 31))
        rate = matmul_rate(1024 if on_cpu else 8192)
        print(f"\nmeasured: copy {bandwidth / 1e9:.1f} GB/s, matmul {rate / 1e12:.2f} TFLOP/s",
              flush=True)
        rows, outputs, failed, memory = [], {}, [], []
        max_len = bucket(args.prefill_len + 1, config.sequence_len)
        cache_gb = 2 * config.num_layers * max(batches) * max_len * config.kv_size * 2 / 1e9
        for impl in impls:
            try:   # one failing evaluation (a kernel that does not build here) spares the rest
                rows += step_times(params, config, impl, batches, args.prefill_len, args.repeats,
                                   bandwidth, rate, outputs.setdefault(impl, {}),
                                   unroll=args.unroll or True)
                memory.append(peak_memory(impl, weight_gb, cache_gb))
            except Exception as err:  # noqa: BLE001 - reported, and the exit status says so
                first_line = (str(err).strip().splitlines() or [""])[0][:300]
                print(f"moe_impl={impl} FAILED: {type(err).__name__}: {first_line}", flush=True)
                failed.append(impl)
        loop = "unrolled" if args.unroll == 0 else f"{args.unroll} per loop step"
        print(f"\nSteps ({name}, {weight_gb:.1f} GB of weights, decode after "
              f"{args.prefill_len} tokens, layers {loop})\n")
        print(markdown(rows, [("phase", "phase", "s"), ("moe_impl", "moe_impl", "s"),
                              ("impl", "runs", "s"), ("batch", "batch", "d"),
                              ("ms", "median ms", ".2f"),
                              ("pipelined_ms", "back-to-back ms", ".2f"),
                              ("tokens_per_s", "tok/s", ".1f"),
                              ("roofline_ms", "roofline ms", ".2f"),
                              ("fraction", "of roofline", ".2f")]), flush=True)
        memory = [m for m in memory if m]
        if memory:
            print("\nPeak device memory (cumulative: the first evaluation's is its own)\n")
            print(markdown(memory, [("after", "after moe_impl", "s"), ("peak_gb", "peak GB", ".2f"),
                                    ("weights_gb", "weights GB", ".2f"),
                                    ("cache_gb", "largest KV cache GB", ".3f"),
                                    ("overhead", "over weights + cache", ".1%")]), flush=True)
        out.update(steps=rows, unroll=args.unroll, copy_gb_s=bandwidth / 1e9,
                   matmul_tflop_s=rate / 1e12,
                   failed=failed, memory=memory)
        same = compare_outputs(outputs)
        if same:
            print("\nThe timed steps' logits against moe_impl='dense'\n")
            print(markdown(same, [("check", "step", "s"), ("moe_impl", "moe_impl", "s"),
                                  ("rel_err", "max rel. error vs dense", ".2e")]), flush=True)
            out["steps_check"] = same

    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 1 if out.get("failed") else 0


if __name__ == "__main__":
    sys.exit(main())

