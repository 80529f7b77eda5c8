"""int8 matmuls: no dequantised copy of a stacked expert weight; live-length attention."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grok.bench import dequantized_buffers
from grok.moe import moe
from grok.quant import QuantizedWeight8bit, dequantize, expert_qlinear, qlinear, quantize

from conftest import tiny_config


def _q(rng, shape, blocks):
    q = quantize(rng.standard_normal(shape).astype(np.float32), blocks)
    return QuantizedWeight8bit(jnp.asarray(q.weight), jnp.asarray(q.scales))


def test_qlinear_quantized_and_float():
    rng = np.random.default_rng(0)
    w = _q(rng, (64, 24), 8)
    x = jnp.asarray(rng.standard_normal((3, 64)), jnp.bfloat16)
    ref = np.asarray(x, np.float32) @ dequantize(w)
    np.testing.assert_allclose(qlinear(x, w, jnp.float32), ref, rtol=1e-5, atol=1e-4)
    wf = jnp.asarray(dequantize(w))        # a float weight is rounded to x's dtype (bfloat16)
    ref_bf16 = np.asarray(x, np.float32) @ np.asarray(wf.astype(jnp.bfloat16), np.float32)
    np.testing.assert_allclose(qlinear(x, wf, jnp.float32), ref_bf16, rtol=1e-5, atol=1e-4)


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
        fn = jax.jit(lambda *a: moe(*a, impl=impl))
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
    from grok.params import random_flat
    from grok.api import device_params
    config = tiny_config(num_layers=1)
    params = device_params(random_flat(config, seed=2), config)
    cache = init_cache(config, 2, 64)
    tokens = jnp.asarray([[5, 9, 3, 17, 22, 8], [7, 4, 11, 0, 0, 0]], jnp.int32)
    _, cache = forward(params, tokens, cache, jnp.zeros((2,), jnp.int32), config=config)
    step = jnp.asarray([[13], [21]], jnp.int32)
    start = jnp.asarray([6, 3], jnp.int32)
    full, full_cache = forward(params, step, cache, start, config=config)
    live, live_cache = forward(params, step, cache, start, config=config, attend_len=16)
    np.testing.assert_array_equal(np.asarray(live), np.asarray(full))
    np.testing.assert_array_equal(np.asarray(live_cache.k), np.asarray(full_cache.k))


def test_quantize_error_is_at_most_half_a_scale_step():
    rng = np.random.default_rng(1)
    for shape, blocks in (((64, 24), 1), ((64, 24), 8), ((3, 48, 16), 4), ((2, 32, 8), 2)):
        w = (rng.standard_normal(shape) * rng.uniform(0.01, 10, shape[-1])).astype(np.float32)
        q = quantize(w, blocks)
        assert q.weight.dtype == np.int8 and q.scales.dtype == jnp.bfloat16
        assert q.scales.shape == (*shape[:-2], blocks, shape[-1])
        assert np.abs(q.weight).max() <= 127
        step = np.repeat(np.asarray(q.scales, np.float32), shape[-2] // blocks, axis=-2)
        assert (np.abs(w - dequantize(q)) <= step / 2 + 1e-7).all()
        # each block's largest weight uses (nearly) the whole int8 range
        assert np.abs(q.weight).reshape(*shape[:-2], blocks, -1, shape[-1]).max(axis=-2).min() >= 126


def test_quantize_zero_blocks_and_bad_block_counts():
    w = np.zeros((8, 4), np.float32)
    w[:4, 1] = 1.0
    q = quantize(w, 2)
    assert (np.asarray(q.scales, np.float32) > 0).all()
    assert (dequantize(q)[:, [0, 2, 3]] == 0).all() and (dequantize(q)[4:] == 0).all()
    np.testing.assert_allclose(dequantize(q)[:4, 1], 1.0, rtol=4e-3)
    with pytest.raises(ValueError, match="3 scale blocks do not divide the 8 input rows"):
        quantize(w, 3)
    with pytest.raises(ValueError, match="matrix"):
        quantize(np.zeros(5, np.float32))


@pytest.mark.parametrize("blocks", [1, 4, 8])
def test_scale_after_the_dot_path_matches_dequantised_weights(monkeypatch, blocks):
    """The accelerator path (row blocks scaled after the int8 dot) is exercised here on CPU too."""
    import grok.quant
    monkeypatch.setattr(grok.quant, "on_cpu", lambda: False)
    rng = np.random.default_rng(blocks)
    x = jnp.asarray(rng.standard_normal((5, 64)), jnp.bfloat16)
    xf = np.asarray(x, np.float64)
    w = _q(rng, (64, 24), blocks)
    np.testing.assert_allclose(jax.jit(qlinear, static_argnums=2)(x, w, jnp.float32),
                               xf @ dequantize(w, np.float64), rtol=1e-4, atol=1e-3)
    we = _q(rng, (3, 64, 24), blocks)
    want = np.einsum("ni,eio->neo", xf, dequantize(we, np.float64))
    got = jax.jit(expert_qlinear, static_argnums=2)(x, we, jnp.float32)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
    xe = jnp.asarray(rng.standard_normal((5, 3, 64)), jnp.bfloat16)
    want = np.einsum("nei,eio->neo", np.asarray(xe, np.float64), dequantize(we, np.float64))
    got = jax.jit(expert_qlinear, static_argnums=2)(xe, we, jnp.float32)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("rows,blocks", [(1, 1), (5, 4), (3, 8)])
def test_layer_slice_through_the_kernel_equals_the_slice(monkeypatch, rows, blocks):
    """A LayerSlice (a layer of a stacked weight, as the scanned model passes it) gives the same
    product through the Pallas kernel (interpreted here) as qlinear on the sliced layer; "auto"
    off the GPU, and too many rows, take XLA instead."""
    import grok.kernels.moe as kmoe
    from grok.quant import KERNEL_ROWS, LayerSlice
    rng = np.random.default_rng(rows * 10 + blocks)
    stack = _q(rng, (3, 64, 48), blocks)
    x = jnp.asarray(rng.standard_normal((rows, 64)), jnp.bfloat16)
    for layer in (0, 2):
        ref = np.asarray(qlinear(x, QuantizedWeight8bit(stack.weight[layer], stack.scales[layer]),
                                 jnp.float32))
        sliced = LayerSlice(stack, jnp.int32(layer))
        out = np.asarray(qlinear(x, sliced, jnp.float32, kernel="always"))
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    calls = []
    real = kmoe.block_matmul
    monkeypatch.setattr(kmoe, "block_matmul", lambda *a, **k: calls.append(1) or real(*a, **k))
    qlinear(x, sliced, kernel="always")
    qlinear(x, sliced, kernel="auto")                     # CPU: XLA
    qlinear(jnp.zeros((KERNEL_ROWS + 1, 64), jnp.bfloat16), sliced, kernel="always")
    assert calls == [1]


def test_qlinears_share_one_launch_and_equal_qlinear(monkeypatch):
    """Several LayerSlices of one layer (the attention's q, k, v) through one kernel launch give
    what qlinear gives for each; without the kernel, each goes through qlinear."""
    import grok.kernels.moe as kmoe
    from grok.quant import LayerSlice, qlinears
    rng = np.random.default_rng(7)
    stacks = [_q(rng, (3, 64, 48), 1), _q(rng, (3, 64, 16), 4)]
    x = jnp.asarray(rng.standard_normal((2, 1, 64)), jnp.bfloat16)
    ws = [LayerSlice(st, jnp.int32(1)) for st in stacks]
    calls = []
    real = kmoe.multi_block_matmul
    monkeypatch.setattr(kmoe, "multi_block_matmul",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    fused = qlinears(x, ws, jnp.float32, kernel="always")
    plain = qlinears(x, ws, jnp.float32, kernel="off")
    assert calls == [1]
    for got, want, st in zip(fused, plain, stacks):
        ref = np.asarray(x, np.float64) @ dequantize(
            QuantizedWeight8bit(st.weight[1], st.scales[1]), np.float64)
        assert got.shape == want.shape == ref.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
        np.testing.assert_allclose(want, ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())
