"""Selected-experts MoE evaluations against the all-experts ("dense") reference."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grok.moe import block_rows_for, moe, num_blocks, resolve_impl, route_blocks
from grok.quant import QuantizedWeight8bit, quantize

from conftest import tiny_config


def _weights(rng, experts, d, f, blocks, quantized=True):
    def one(shape, s):
        w = rng.standard_normal(shape).astype(np.float32) / np.sqrt(shape[-2])
        if not quantized:
            return jnp.asarray(w)
        q = quantize(w, s)
        return QuantizedWeight8bit(jnp.asarray(q.weight), jnp.asarray(q.scales))
    return one((experts, d, f), 1), one((experts, d, f), 1), one((experts, f, d), blocks)


def _routing(rng, n, experts, k):
    probs = jax.nn.softmax(jnp.asarray(rng.standard_normal((n, experts)), jnp.float32))
    return jax.lax.top_k(probs, k)


@pytest.mark.parametrize("experts,k,n", [(4, 2, 1), (8, 2, 3), (4, 2, 40), (3, 1, 40),
                                         (4, 4, 1), (4, 4, 9)])
@pytest.mark.parametrize("impl", ["gather", "grouped"])
def test_fast_paths_equal_dense(experts, k, n, impl):
    rng = np.random.default_rng(experts * 100 + k * 10 + n)
    d, f, blocks = 32, 48, 4
    w1, wv, w2 = _weights(rng, experts, d, f, blocks)
    x = jnp.asarray(rng.standard_normal((n, d)), jnp.bfloat16)
    gates, chosen = _routing(rng, n, experts, k)
    ref = np.asarray(moe(x, gates, chosen, w1, wv, w2, impl="dense"))
    out = np.asarray(jax.jit(lambda *a: moe(*a, impl=impl))(x, gates, chosen, w1, wv, w2))
    np.testing.assert_allclose(out, ref, atol=2e-5 * max(1.0, np.abs(ref).max()), rtol=0)


@pytest.mark.parametrize("impl", ["gather", "grouped"])
def test_accelerator_int8_path_equals_dense(monkeypatch, impl):
    """The GPU/TPU path of the selected-experts matmuls (int8 converted inside the dot, scales per
    row block after it) run on CPU: the same numbers as dense."""
    import grok.moe
    import grok.quant
    monkeypatch.setattr(grok.quant, "on_cpu", lambda: False)

    def widened(*_):
        raise AssertionError("the CPU path (weights widened before the dot) ran")
    monkeypatch.setattr(grok.moe, "_dequantize_f32", widened)
    monkeypatch.setattr(grok.quant, "_dequantize_f32", widened)
    rng = np.random.default_rng(11)
    w1, wv, w2 = _weights(rng, 4, 32, 48, 4)
    x = jnp.asarray(rng.standard_normal((3, 32)), jnp.bfloat16)
    gates, chosen = _routing(rng, 3, 4, 2)
    ref = np.asarray(moe(x, gates, chosen, w1, wv, w2, impl="dense"))
    out = np.asarray(jax.jit(lambda *a: moe(*a, impl=impl))(x, gates, chosen, w1, wv, w2))
    np.testing.assert_allclose(out, ref, atol=2e-5 * max(1.0, np.abs(ref).max()), rtol=0)


def test_float_weights_grouped_and_gradients():
    """Float (training) weights take the same paths; gradients flow through the grouped scan."""
    rng = np.random.default_rng(7)
    w1, wv, w2 = _weights(rng, 4, 16, 24, 2, quantized=False)
    x = jnp.asarray(rng.standard_normal((5, 16)), jnp.bfloat16)
    gates, chosen = _routing(rng, 5, 4, 2)
    ref = moe(x, gates, chosen, w1, wv, w2, impl="dense")
    for impl in ("gather", "grouped", "pallas"):
        np.testing.assert_allclose(moe(x, gates, chosen, w1, wv, w2, impl=impl), ref, atol=1e-5)
    loss = lambda impl: lambda w: jnp.sum(moe(x, gates, chosen, w, wv, w2, impl=impl) ** 2)
    np.testing.assert_allclose(jax.grad(loss("grouped"))(w1), jax.grad(loss("dense"))(w1),
                               atol=1e-4)


def test_route_blocks_drops_nothing():
    rng = np.random.default_rng(0)
    for n, experts, k, bm in [(1, 8, 2, 8), (8, 8, 2, 16), (50, 4, 2, 8), (9, 3, 3, 4)]:
        chosen = jnp.asarray(np.stack([rng.permutation(experts)[:k] for _ in range(n)]))
        slot, block_expert, block_rows = route_blocks(chosen, experts, bm)
        slot, block_expert, block_rows = map(np.asarray, (slot, block_expert, block_rows))
        assert len(block_expert) == num_blocks(n * k, experts, bm)
        assert len(set(slot.tolist())) == n * k                      # every row its own slot
        assert (block_expert[slot // bm] == np.asarray(chosen).reshape(-1)).all()
        assert (slot % bm < block_rows[slot // bm]).all()            # inside the valid rows
        assert block_rows.sum() == n * k
        # The layout a stable sort by expert gives: blocks in expert order, rows in arrival order.
        flat = np.asarray(chosen).reshape(-1)
        starts = np.concatenate([[0], np.cumsum(-(-np.bincount(flat, minlength=experts) // bm))])
        order = np.argsort(flat, kind="stable")
        expected = np.empty_like(slot)
        for e in range(experts):
            mine = order[flat[order] == e]
            expected[mine] = starts[e] * bm + np.arange(len(mine))
        np.testing.assert_array_equal(slot, expected)


def test_batch1_reads_only_the_chosen_experts():
    """Decoding one token with top-2 lays out exactly two blocks, one per chosen expert."""
    bm = block_rows_for(2, 8, "pallas")
    assert num_blocks(2, 8, bm) == 2
    _, block_expert, block_rows = route_blocks(jnp.array([[5, 2]]), 8, bm)
    assert sorted(np.asarray(block_expert).tolist()) == [2, 5]
    assert np.asarray(block_rows).tolist() == [1, 1]


def test_auto_on_cpu_is_grouped():
    assert jax.default_backend() != "cpu" or resolve_impl("auto", 2, 8) == "grouped"


@pytest.mark.parametrize("impl", ["grouped", "pallas"])
def test_model_fast_path_matches_dense(impl):
    """Whole-model logits and greedy tokens with the grouped evaluation (and the Pallas kernels,
    interpreted: the MoE, and the decode steps' projections read from the layer stack) equal
    dense."""
    import grok
    from grok.params import random_flat
    config = tiny_config(num_layers=2)
    flat = random_flat(config, seed=3)
    dense = grok.from_flat(flat, config, moe_impl="dense")
    fast = grok.from_flat(flat, config, moe_impl=impl)
    tokens = [[5, 9, 3, 17, 22, 8, 1, 30, 12, 40, 7]]
    ref = dense.logits(tokens)
    np.testing.assert_allclose(fast.logits(tokens), ref, atol=1e-4 * np.abs(ref).max())
    assert fast.generate([[5, 9, 3]], max_new_tokens=3) == \
        dense.generate([[5, 9, 3]], max_new_tokens=3)


@pytest.mark.parametrize("impl", ["dense", "gather", "grouped", "pallas"])
def test_layer_of_a_stack_equals_that_layer_alone(impl):
    """Weights stacked over layers [L, E, In, Out] with a (traced) layer index give exactly what
    that layer's own [E, In, Out] weights give (the scanned model's in-place path)."""
    rng = np.random.default_rng(5)
    layers = [_weights(rng, 4, 32, 48, 4) for _ in range(3)]
    stack = [QuantizedWeight8bit(jnp.stack([ws[i].weight for ws in layers]),
                                 jnp.stack([ws[i].scales for ws in layers])) for i in range(3)]
    x = jnp.asarray(rng.standard_normal((5, 32)), jnp.bfloat16)
    gates, chosen = _routing(rng, 5, 4, 2)
    run = jax.jit(lambda x, g, c, w1, wv, w2, layer: moe(x, g, c, w1, wv, w2, impl=impl,
                                                        layer=layer))
    for layer in (2, 1):
        alone = np.asarray(moe(x, gates, chosen, *layers[layer], impl=impl))
        stacked = np.asarray(run(x, gates, chosen, *stack, jnp.int32(layer)))
        np.testing.assert_array_equal(stacked, alone)


@pytest.mark.parametrize("block_rows", [1, 4, 64])
def test_any_block_size_gives_the_same_result(block_rows):
    """`block_rows` (tuning) changes only the layout: one row per block, several blocks per
    expert, or one block holding every row."""
    rng = np.random.default_rng(block_rows)
    w1, wv, w2 = _weights(rng, 4, 32, 48, 4)
    x = jnp.asarray(rng.standard_normal((20, 32)), jnp.bfloat16)
    gates, chosen = _routing(rng, 20, 4, 2)
    ref = np.asarray(moe(x, gates, chosen, w1, wv, w2, impl="grouped"))
    out = np.asarray(moe(x, gates, chosen, w1, wv, w2, impl="grouped", block_rows=block_rows))
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())
    with pytest.raises(ValueError, match="block_rows must be at least 1"):
        moe(x, gates, chosen, w1, wv, w2, impl="grouped", block_rows=-1)
