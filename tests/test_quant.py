"""int8 matmuls: no dequantised copy of a stacked expert weight; live-length attention."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grok.tools.bench import dequantized_buffers
from grok.model.moe import moe
from grok.kernels.plan import ExecutionPlan, KERNEL_ROWS, resolve_plan
from grok.quant import (MAX_BLOCKS_AFTER_DOT, QuantizedWeight8bit, dequantize, linears, qeinsum,
                        quantize)

from conftest import tiny_config
from precision import BF16_EPS, F32_EPS, assert_within, flat_route_bound, gamma, to_bf16


def _exact(x, w, routes=1):
    """x @ w in float64 (w: int8 dequantised exactly, or a float array) and the bound on a float32
    evaluation: int8 x bf16 products exact, In sums plus a scaling and an add per row block, in
    any order: gamma_n |x| @ |w|, n = In + 2 S (routes=2: two float32 evaluations)."""
    xf = np.asarray(x, np.float64)
    quantized = isinstance(w, QuantizedWeight8bit)
    wf = dequantize(w, np.float64) if quantized else np.asarray(w, np.float64)
    n = wf.shape[-2] + (2 * w.scales.shape[-2] if quantized else 0)
    spec = "...i,io->...o" if wf.ndim == 2 else ("ni,eio->neo" if xf.ndim == 2 else
                                                  "nei,eio->neo")
    return np.einsum(spec, xf, wf), routes * gamma(n) * np.einsum(spec, np.abs(xf), np.abs(wf))


CPU = ExecutionPlan()                                  # weights dequantised in f32 first
ACCELERATOR = ExecutionPlan(scale_after_dot=True)      # int8 in the dot, scales after it
KERNEL = ExecutionPlan(moe="pallas", projections=True)  # decode projections: kernel, interpreted


def qlinear(x, w, out_dtype=jnp.float32, plan=CPU):
    return qeinsum("...i,io->...o", x, w, plan, out_dtype)


def _q(rng, shape, blocks):
    q = quantize(rng.standard_normal(shape).astype(np.float32), blocks)
    return QuantizedWeight8bit(jnp.asarray(q.weight), jnp.asarray(q.scales))


def test_qlinear_quantized_and_float():
    rng = np.random.default_rng(0)
    w = _q(rng, (64, 24), 8)
    x = jnp.asarray(rng.standard_normal((3, 64)), jnp.bfloat16)
    assert_within(qlinear(x, w, jnp.float32), *_exact(x, w), "qlinear int8 vs float64")
    wf = jnp.asarray(dequantize(w))        # a float weight is rounded to x's dtype (bfloat16)
    assert_within(qlinear(x, wf, jnp.float32), *_exact(x, to_bf16(wf)),
                  "qlinear float weight vs float64")


def test_planted_bug_scales_of_the_wrong_row_block_are_caught():
    """The same check fails a product whose row blocks are scaled with the next block's scales."""
    rng = np.random.default_rng(0)
    w = _q(rng, (64, 24), 8)
    x = jnp.asarray(rng.standard_normal((3, 64)), jnp.bfloat16)
    bug = QuantizedWeight8bit(w.weight, jnp.roll(w.scales, 1, axis=0))
    with pytest.raises(AssertionError):
        assert_within(qlinear(x, bug, jnp.float32), *_exact(x, w), "qlinear planted bug")


def test_selected_experts_write_no_dequantised_stack():
    """The grouped path converts one expert slice at a time: the compiled module (CPU) holds no
    float buffer of the stacked [E, D, F] weight. (On CPU the dense path does: XLA's CPU dots take
    no int8 operand, so every convert feeding a dot is written out; benchmarks/gpu.sh checks that
    no path writes one on GPU, where converts fuse into the dot.)"""
    rng = np.random.default_rng(1)
    e, d, f, n = 8, 256, 512, 4
    w1, wv, w2 = _q(rng, (e, d, f), 1), _q(rng, (e, d, f), 1), _q(rng, (e, f, d), 8)
    x = jnp.zeros((n, d), jnp.bfloat16)
    gates, chosen = jax.lax.top_k(jax.nn.softmax(jnp.asarray(rng.standard_normal((n, e)))), 2)

    def compiled(impl):
        fn = jax.jit(lambda *a: moe(*a, resolve_plan(impl)))
        return fn.lower(x, gates, chosen, w1, wv, w2).compile()

    grouped = compiled("grouped")
    assert dequantized_buffers(grouped.as_text(), (e, d, f)) == []
    assert dequantized_buffers(grouped.as_text(), (e, f, d)) == []
    temp = grouped.memory_analysis().temp_size_in_bytes
    assert temp < e * d * f * 4          # less scratch than one stack dequantised to f32
    if jax.default_backend() == "cpu":   # the check itself sees the dense path's copies
        assert dequantized_buffers(compiled("dense").as_text(), (e, d, f))


def test_attend_len_shorter_than_cache_is_identical():
    """Decode attention over the first attend_len slots equals attention over the whole cache."""
    from grok.model import forward, init_cache
    from grok.leaves import random_flat
    from grok.api import device_params
    config = tiny_config(num_layers=1)
    flat = random_flat(config, seed=2)
    params = device_params(flat, config)
    cache = init_cache(config, 2, 64)
    tokens = jnp.asarray([[5, 9, 3, 17, 22, 8], [7, 4, 11, 0, 0, 0]], jnp.int32)
    _, cache = forward(params, tokens, cache, jnp.zeros((2,), jnp.int32), config=config)
    step = jnp.asarray([[13], [21]], jnp.int32)
    start = jnp.asarray([6, 3], jnp.int32)
    full, full_cache = forward(params, step, cache, start, config=config)
    live, live_cache = forward(params, step, cache, start, config=config, attend_len=16)
    # masked slots weigh exactly 0, but sums over 16 or 64 slots may take other float32 orders:
    # two evaluations of the model (precision.logits_route_bound)
    assert_within(live, full, flat_route_bound(flat, config), "attend_len 16 vs whole cache")
    # the new keys come from the new tokens' own embeddings (one layer): the same ops, bit for bit
    np.testing.assert_array_equal(np.asarray(live_cache.k), np.asarray(full_cache.k))


def test_quantize_error_is_at_most_half_a_scale_step():
    rng = np.random.default_rng(1)
    for shape, blocks in (((64, 24), 1), ((64, 24), 8), ((3, 48, 16), 4), ((2, 32, 8), 2)):
        w = (rng.standard_normal(shape) * rng.uniform(0.01, 10, shape[-1])).astype(np.float32)
        q = quantize(w, blocks)
        assert q.weight.dtype == np.int8 and q.scales.dtype == jnp.bfloat16
        assert q.scales.shape == (*shape[:-2], blocks, shape[-1])
        assert np.abs(q.weight).max() <= 127
        _check_half_step(w, q, blocks)
        # each block's largest weight: |w| / scale >= 127 / (1 + u) (the bfloat16 scale may round
        # up by u) = 126.5, which rounds to 127: the whole int8 range
        top = np.abs(q.weight).reshape(*shape[:-2], blocks, -1, shape[-1]).max(axis=-2).min()
        assert top >= np.rint(127 / (1 + BF16_EPS)) == 127


def _check_half_step(w, q, blocks):
    """|w - dequantize(q)| <= scale / 2, plus w / scale's float32 rounding (which may tip rint)
    and the float32 result's: 2 F32_EPS |w|."""
    step = np.repeat(np.asarray(q.scales, np.float64), w.shape[-2] // blocks, axis=-2)
    err = np.abs(w.astype(np.float64) - dequantize(q))
    assert (err <= step / 2 + 2 * F32_EPS * np.abs(w)).all(), (err / step).max()


def test_planted_bug_truncating_quantizer_is_caught():
    """The same check fails int8 values truncated toward zero instead of rounded."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 24)).astype(np.float32)
    q = quantize(w, 8)
    exact = np.repeat(np.asarray(q.scales, np.float32), 8, axis=0)
    bug = QuantizedWeight8bit(np.trunc(w / exact).astype(np.int8), q.scales)
    with pytest.raises(AssertionError):
        _check_half_step(w, bug, 8)


def test_quantize_zero_blocks_and_bad_block_counts():
    w = np.zeros((8, 4), np.float32)
    w[:4, 1] = 1.0
    q = quantize(w, 2)
    assert (np.asarray(q.scales, np.float32) > 0).all()
    assert (dequantize(q)[:, [0, 2, 3]] == 0).all() and (dequantize(q)[4:] == 0).all()
    # 127 times the bfloat16 scale of 1/127: within the scale's rounding, u
    np.testing.assert_allclose(dequantize(q)[:4, 1], 1.0, rtol=BF16_EPS)
    with pytest.raises(ValueError, match="3 scale blocks do not divide the 8 input rows"):
        quantize(w, 3)
    with pytest.raises(ValueError, match="matrix"):
        quantize(np.zeros(5, np.float32))


@pytest.mark.parametrize("blocks", [1, 4, 8])
def test_scale_after_the_dot_path_matches_dequantised_weights(blocks):
    """The accelerator path (row blocks scaled after the int8 dot) is exercised here on CPU too."""
    rng = np.random.default_rng(blocks)
    x = jnp.asarray(rng.standard_normal((5, 64)), jnp.bfloat16)
    w = _q(rng, (64, 24), blocks)
    # row blocks scaled after the int8 dot: one scaling and add per block, in the bound
    run = jax.jit(lambda spec, x, w: qeinsum(spec, x, w, ACCELERATOR), static_argnums=0)
    assert_within(run("...i,io->...o", x, w), *_exact(x, w), f"linear scale-after-dot S={blocks}")
    we = _q(rng, (3, 64, 24), blocks)
    got = run("ni,eio->neo", x, we)
    assert_within(got, *_exact(x, we), f"experts scale-after-dot S={blocks}")
    xe = jnp.asarray(rng.standard_normal((5, 3, 64)), jnp.bfloat16)
    got = run("nei,eio->neo", xe, we)
    assert_within(got, *_exact(xe, we), f"experts [N, E, In] scale-after-dot S={blocks}")


@pytest.mark.parametrize("blocks,after", [(8, True), (16, False)])
def test_many_row_blocks_are_dequantised_inside_the_dot(blocks, after):
    """Past MAX_BLOCKS_AFTER_DOT row blocks (int4's groups) the per-block products would be a
    float32 [..., S, Out], S times the output: the weight is dequantised inside the dot instead,
    and the product is the same within the float32 bound."""
    assert (blocks <= MAX_BLOCKS_AFTER_DOT) == after
    rng = np.random.default_rng(blocks)
    x = jnp.asarray(rng.standard_normal((5, 128)), jnp.bfloat16)
    w = _q(rng, (128, 24), blocks)
    run = lambda x, w: qeinsum("...i,io->...o", x, w, ACCELERATOR)
    outputs = [e.outvars[0].aval.size for e in jax.make_jaxpr(run)(x, w).jaxpr.eqns
               if e.primitive.name == "dot_general"]
    assert max(outputs) == (blocks if after else 1) * 5 * 24, outputs   # [S, Out, rows] or not
    assert_within(jax.jit(run)(x, w), *_exact(x, w), f"linear S={blocks}")


@pytest.mark.parametrize("rows,blocks", [(1, 1), (5, 4), (3, 8)])
def test_layer_slice_through_the_kernel_equals_the_slice(monkeypatch, rows, blocks):
    """A LayerSlice (a layer of a stacked weight, as the scanned model passes it) gives the same
    product through the Pallas kernel (interpreted here) as qlinear on the sliced layer; "auto"
    off the GPU, and too many rows, take XLA instead."""
    import grok.kernels.moe_mlp as kmoe
    from grok.quant import LayerSlice
    rng = np.random.default_rng(rows * 10 + blocks)
    stack = _q(rng, (3, 64, 48), blocks)
    x = jnp.asarray(rng.standard_normal((rows, 64)), jnp.bfloat16)
    for layer in (0, 2):
        ref = np.asarray(qlinear(x, QuantizedWeight8bit(stack.weight[layer], stack.scales[layer]),
                                 jnp.float32))
        sliced = LayerSlice(stack, jnp.int32(layer))
        out = np.asarray(linears(x, [sliced], KERNEL, jnp.float32)[0])
        # kernel and XLA: two float32 orders of the same sums
        _, bound = _exact(x, QuantizedWeight8bit(stack.weight[layer], stack.scales[layer]), 2)
        assert_within(out, ref, bound, f"LayerSlice kernel vs qlinear S={blocks}")
    calls = []
    real = kmoe.block_matmul
    monkeypatch.setattr(kmoe, "block_matmul", lambda *a, **k: calls.append(1) or real(*a, **k))
    linears(x, [sliced], KERNEL)
    linears(x, [sliced], resolve_plan("auto", backend="cpu"))     # "auto" off a GPU: XLA
    linears(jnp.zeros((KERNEL_ROWS + 1, 64), jnp.bfloat16), [sliced], KERNEL)   # too many rows
    assert calls == [1]


def test_linears_share_one_launch_and_equal_the_reference(monkeypatch):
    """Several LayerSlices of one layer (the attention's q, k, v) through one kernel launch give
    what the reference (qeinsum) gives for each; without the kernel, each goes through it."""
    import grok.kernels.moe_mlp as kmoe
    from grok.quant import LayerSlice
    rng = np.random.default_rng(7)
    stacks = [_q(rng, (3, 64, 48), 1), _q(rng, (3, 64, 16), 4)]
    x = jnp.asarray(rng.standard_normal((2, 1, 64)), jnp.bfloat16)
    ws = [LayerSlice(st, jnp.int32(1)) for st in stacks]
    calls = []
    real = kmoe.multi_block_matmul
    monkeypatch.setattr(kmoe, "multi_block_matmul",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    fused = linears(x, ws, KERNEL, jnp.float32)
    plain = linears(x, ws, CPU, jnp.float32)
    assert calls == [1]
    for got, want, st in zip(fused, plain, stacks):
        ref, bound = _exact(x, QuantizedWeight8bit(st.weight[1], st.scales[1]))
        assert got.shape == want.shape == ref.shape
        assert_within(got, want, 2 * bound, "linears one launch vs reference")
        assert_within(want, ref, bound, "linears vs float64")
