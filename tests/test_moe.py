"""Selected-experts MoE evaluations against the all-experts ("dense") reference."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grok.kernels.measured import Toolchain
from grok.kernels.plan import ExecutionPlan, block_rows_for, resolve_plan
from grok.model.moe import grouped, moe, num_blocks, route_blocks
from grok.quant import QuantizedWeight8bit, dequantize, quantize, is_quantized

from conftest import tiny_config
from precision import (BF16_EPS, assert_within, flat_route_bound, gamma, gelu_tanh,
                       greedy_gap, moe_route_bound, to_bf16, top2_gaps, trusted_steps)


def _weights(rng, experts, d, f, blocks, quantized=True):
    def one(shape, s):
        w = rng.standard_normal(shape).astype(np.float32) / np.sqrt(shape[-2])
        if not quantized:
            return jnp.asarray(w)
        q = quantize(w, s)
        return QuantizedWeight8bit(jnp.asarray(q.weight), jnp.asarray(q.scales))
    return one((experts, d, f), 1), one((experts, d, f), 1), one((experts, f, d), blocks)


def _f64(w):
    """A weight as the MoE multiplies it (float64): int8 dequantised exactly, or a float weight
    rounded to bfloat16 (x's dtype)."""
    return dequantize(w, np.float64) if is_quantized(w) else to_bf16(w)


def _bound(x, gates, chosen, w1, wv, w2):
    """precision.moe_route_bound for these arguments: two MoE evaluations differ only by float32
    order, and by the hidden layer's bfloat16 rounding where a rounding point is that close."""
    blocks = w2.scales.shape[-2] if is_quantized(w2) else 1
    return moe_route_bound(np.asarray(x, np.float64), gates, chosen, _f64(w1), _f64(wv),
                           _f64(w2), blocks)


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
    ref = np.asarray(moe(x, gates, chosen, w1, wv, w2, resolve_plan("dense")))
    out = np.asarray(jax.jit(lambda *a: moe(*a, resolve_plan(impl)))(x, gates, chosen, w1, wv, w2))
    assert_within(out, ref, _bound(x, gates, chosen, w1, wv, w2),
                  f"moe {impl} vs dense ({experts}, {k}, {n})")


def test_planted_bug_wrong_expert_is_caught():
    """The same bound fails a result computed with a wrong expert (each token's second choice
    replaced by the next expert: an off-by-one in the routing)."""
    rng = np.random.default_rng(8 * 100 + 2 * 10 + 3)
    w1, wv, w2 = _weights(rng, 8, 32, 48, 4)
    x = jnp.asarray(rng.standard_normal((3, 32)), jnp.bfloat16)
    gates, chosen = _routing(rng, 3, 8, 2)
    wrong = chosen.at[:, 1].set((chosen[:, 1] + 1) % 8)
    wrong = jnp.where(wrong[:, 1:] == chosen[:, :1], (wrong + 1) % 8, wrong).at[:, 0].set(
        chosen[:, 0])
    ref = np.asarray(moe(x, gates, chosen, w1, wv, w2, resolve_plan("dense")))
    bug = np.asarray(moe(x, gates, wrong, w1, wv, w2, resolve_plan("grouped")))
    with pytest.raises(AssertionError):
        assert_within(bug, ref, _bound(x, gates, chosen, w1, wv, w2),
                      "moe planted bug: wrong expert")


@pytest.mark.parametrize("impl", ["gather", "grouped"])
def test_accelerator_int8_path_equals_dense(monkeypatch, impl):
    """The GPU/TPU path of the selected-experts matmuls (int8 converted inside the dot, scales per
    row block after it) run on CPU: the same numbers as dense."""
    import grok.quant

    def widened(*_):
        raise AssertionError("the CPU path (weights widened before the dot) ran")
    monkeypatch.setattr(grok.quant, "_dequantize_f32", widened)
    accelerator = ExecutionPlan(moe=impl, scale_after_dot=True)   # as on a GPU or TPU
    rng = np.random.default_rng(11)
    w1, wv, w2 = _weights(rng, 4, 32, 48, 4)
    x = jnp.asarray(rng.standard_normal((3, 32)), jnp.bfloat16)
    gates, chosen = _routing(rng, 3, 4, 2)
    ref = np.asarray(moe(x, gates, chosen, w1, wv, w2,
                         ExecutionPlan(moe="dense", scale_after_dot=True)))
    out = np.asarray(jax.jit(lambda *a: moe(*a, accelerator))(x, gates, chosen, w1, wv, w2))
    # scales applied per row block after the dot: one more rounding per block, in the bound
    assert_within(out, ref, _bound(x, gates, chosen, w1, wv, w2),
                  f"moe {impl} accelerator int8 path vs dense")


def _grad_w1_bound(x, gates, chosen, w1, wv, w2):
    """Bound on the gap between two evaluations of d sum(moe(...)^2) / d w1 (float weights).
    The one bfloat16 rounding on the backward path is the hidden layer's cotangent (<= 2u if it
    flips), and the forward's flips move the output, and so that cotangent, by <= 2u more:
    4u sum_n |x_n| |dL/da_n| (a = x w1), plus float32 order (gamma_N) on the same terms."""
    x, gates, chosen = np.asarray(x, np.float64), np.asarray(gates), np.asarray(chosen)
    w1, wv, w2 = _f64(w1), _f64(wv), _f64(w2)
    c = np.sqrt(2 / np.pi)
    a, b = np.einsum("nd,nkdf->nkf", x, w1[chosen]), np.einsum("nd,nkdf->nkf", x, wv[chosen])
    hidden = to_bf16(gelu_tanh(a) * b)
    out = np.einsum("nk,nkf,nkfd->nd", gates, hidden, w2[chosen])
    cot_h = np.einsum("nk,nd,nkfd->nkf", gates, 2 * out, w2[chosen])
    t = np.tanh(c * (a + 0.044715 * a ** 3))
    slope = 0.5 * (1 + t) + 0.5 * a * (1 - t ** 2) * c * (1 + 3 * 0.044715 * a ** 2)
    cot_a = np.abs(cot_h * b * slope)                                        # [N, k, F]
    bound = np.zeros(w1.shape)
    np.add.at(bound, chosen, np.einsum("nd,nkf->nkdf", np.abs(x), cot_a))
    return (4 * BF16_EPS + 2 * gamma(x.shape[0] * chosen.shape[1])) * bound


def test_float_weights_grouped_and_gradients():
    """Float (training) weights take the same paths; gradients flow through the grouped scan."""
    rng = np.random.default_rng(7)
    w1, wv, w2 = _weights(rng, 4, 16, 24, 2, quantized=False)
    x = jnp.asarray(rng.standard_normal((5, 16)), jnp.bfloat16)
    gates, chosen = _routing(rng, 5, 4, 2)
    ref = moe(x, gates, chosen, w1, wv, w2, resolve_plan("dense"))
    bound = _bound(x, gates, chosen, w1, wv, w2)          # float weights: rounded to bfloat16
    for impl in ("gather", "grouped", "pallas"):
        assert_within(moe(x, gates, chosen, w1, wv, w2, resolve_plan(impl)), ref, bound,
                      f"moe {impl} float weights vs dense")
    loss = lambda impl: lambda w: jnp.sum(moe(x, gates, chosen, w, wv, w2, resolve_plan(impl)) ** 2)
    assert_within(jax.grad(loss("grouped"))(w1), jax.grad(loss("dense"))(w1),
                  _grad_w1_bound(x, gates, chosen, w1, wv, w2), "moe grad w1 grouped vs dense")


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


def test_auto_takes_the_kernels_only_on_a_gpu_with_int8_weights():
    rng = np.random.default_rng(0)
    ws = _weights(rng, 4, 64, 128, 4)   # tiles the compiled kernel takes (>= 16 each way)
    floats = [jnp.asarray(dequantize(w)) for w in ws]
    assert resolve_plan("auto", backend="cpu").moe_path(2, *ws) == "grouped"
    assert resolve_plan("auto", backend="tpu").moe_path(2, *ws) == "grouped"
    # on an NVIDIA GPU, the measured winner: our kernels, with or without tokamax installed
    # (tests/test_tokamax.py checks grok.kernels.measured.decide itself)
    for tokamax in (False, True):
        h100 = Toolchain("gpu", "NVIDIA H100 80GB HBM3", "0.12.0.1", tokamax, triton=True)
        assert resolve_plan("auto", backend="gpu", toolchain=h100).moe_path(2, *ws) == "pallas"
        assert resolve_plan("auto", backend="gpu", toolchain=h100).moe_path(2, *floats) \
            == "grouped"
    assert resolve_plan("pallas", backend="cpu").moe_path(2, *floats) == "grouped"


@pytest.mark.parametrize("impl", ["grouped", "pallas"])
def test_model_fast_path_matches_dense(impl):
    """Whole-model logits and greedy tokens with the grouped evaluation (and the Pallas kernels,
    interpreted: the MoE, and the decode steps' projections read from the layer stack) equal
    dense."""
    import grok
    from grok.leaves import random_flat
    config = tiny_config(num_layers=2)
    flat = random_flat(config, seed=3)
    dense = grok.from_flat(flat, config, moe_impl="dense")
    fast = grok.from_flat(flat, config, moe_impl=impl)
    tokens = [[5, 9, 3, 17, 22, 8, 1, 30, 12, 40, 7]]
    ref = dense.logits(tokens)
    bound = flat_route_bound(flat, config)            # two correct evaluations of the model
    assert_within(fast.logits(tokens), ref, bound, f"model {impl} vs dense logits")
    # greedy tokens equal up to a step whose top-2 gap the bound could close
    want = dense.generate([[5, 9, 3]], max_new_tokens=3)[0]
    seq = ([5, 9, 3] + want + tokens[0])[:len(tokens[0])]   # causal: the tail changes nothing
    gaps = top2_gaps(dense.logits([seq])[0, 2:2 + len(want)])   # (same shape: no new compile)
    steps = trusted_steps(gaps, min_gap=greedy_gap(bound))
    assert fast.generate([[5, 9, 3]], max_new_tokens=3)[0][:steps] == want[:steps]
    assert steps >= 2, (gaps, greedy_gap(bound))


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
    run = jax.jit(lambda x, g, c, w1, wv, w2, layer: moe(x, g, c, w1, wv, w2,
                                                        resolve_plan(impl), layer=layer))
    for layer in (2, 1):
        alone = np.asarray(moe(x, gates, chosen, *layers[layer], resolve_plan(impl)))
        stacked = np.asarray(run(x, gates, chosen, *stack, jnp.int32(layer)))
        # bit for bit: the same ops on the same values in the same order; only the indexing moved
        np.testing.assert_array_equal(stacked, alone)


@pytest.mark.parametrize("block_rows", [1, 4, 64])
def test_any_block_size_gives_the_same_result(block_rows):
    """The block size (tuning) changes only the layout: one row per block, several blocks per
    expert, or one block holding every row."""
    rng = np.random.default_rng(block_rows)
    w1, wv, w2 = _weights(rng, 4, 32, 48, 4)
    x = jnp.asarray(rng.standard_normal((20, 32)), jnp.bfloat16)
    gates, chosen = _routing(rng, 20, 4, 2)
    ref = np.asarray(moe(x, gates, chosen, w1, wv, w2, resolve_plan("grouped")))
    out = np.asarray(grouped(x, gates, chosen, w1, wv, w2, block_rows, resolve_plan("grouped")))
    # blocks of other sizes may take other dot kernels (float32 order): the MoE route bound
    assert_within(out, ref, _bound(x, gates, chosen, w1, wv, w2),
                  f"moe grouped block_rows={block_rows}")
