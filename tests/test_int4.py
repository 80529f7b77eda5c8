"""int4 weights (grok.quant.INT4): packing, quantisation, qeinsum against a float64 oracle, the
execution plan's routing of int4 to XLA, the leaf table, sharding rules and the memory plan."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grok.checkpoint.__main__ import main as checkpoint_main
from grok.checkpoint.convert import target_config
from grok.config import GROK1, GrokConfig
from grok.errors import ConfigError
from grok.kernels.plan import ExecutionPlan
from grok.leaves import abstract_params, checkpoint_entries, random_flat
from grok.model.moe import moe
from grok.parallel import memory, rules
from grok.quant import (INT4, LayerSlice, QuantizedWeight, dequantize, group_size_for,
                        pack_int4, qeinsum, quantize, quantize_int4, unpack_int4)
from precision import gamma, gelu_tanh, to_bf16

TINY4 = GrokConfig(vocab_size=64, sequence_len=16, emb_size=32, key_size=8, num_q_heads=4,
                   num_kv_heads=2, num_layers=2, widening_factor=2.625, num_experts=4,
                   num_selected_experts=2, scale_blocks=2, weight_bits=4, group_size=16)
CPU, BLOCKED = ExecutionPlan("cpu"), ExecutionPlan("cpu", scale_after_dot=True)


def test_pack_unpack_round_trip_every_value():
    rng = np.random.default_rng(0)
    q = rng.integers(-8, 8, (3, 10, 7)).astype(np.int8)
    q[0, :2, :] = np.arange(-8, 8).reshape(2, 8)[:, :7]      # all 16 nibbles appear
    packed = pack_int4(q)
    assert packed.dtype == np.uint8 and packed.shape == (3, 5, 7)
    # row 2r in the low nibble, row 2r + 1 in the high one
    assert packed[1, 2, 3] == (q[1, 4, 3] & 0xF) | ((q[1, 5, 3] & 0xF) << 4)
    np.testing.assert_array_equal(unpack_int4(packed), q)
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda p: unpack_int4(p, jnp))(packed)), q)
    with pytest.raises(ValueError, match="even"):
        pack_int4(np.zeros((3, 2), np.int8))


def test_group_size_is_the_largest_divisor_not_above_the_request():
    assert [group_size_for(176, g) for g in (32, 64, 128)] == [22, 44, 88]   # the demo's F
    assert group_size_for(6144, 64) == 64 and group_size_for(32768, 128) == 128
    assert group_size_for(7, 4) == 1 and group_size_for(8, 100) == 8


def test_quantize_int4_error_within_half_a_step():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((2, 48, 5)).astype(np.float32)
    q = quantize_int4(w, 12)
    assert q.fmt is INT4 and q.shape == (2, 48, 5) and q.scales.shape == (2, 4, 5)
    assert q.group_size == 12
    values = unpack_int4(q.weight)
    assert values.min() >= -7 and values.max() <= 7
    # each value is rounded to the nearest step of its group's (bfloat16) scale; the largest
    # is clipped at 7 steps, off by at most the scale's bfloat16 rounding (2^-8 relative) * 7
    step = np.repeat(q.scales.astype(np.float64), 12, axis=-2)
    assert (np.abs(dequantize(q, np.float64) - w) <= step * (0.5 + 7 * 2.0 ** -8)).all()


def _bf16_values(rng, shape):
    return to_bf16(rng.standard_normal(shape)).astype(np.float32)   # what the model feeds


@pytest.mark.parametrize("plan", [CPU, BLOCKED], ids=["dequantise-first", "scale-after-dot"])
# groups of 16 (even: the two-nibble-halves path) and of 11 (44 rows: odd, interleaved unpack)
@pytest.mark.parametrize("spec,x_shape,w_shape", [
    ("...i,io->...o", (2, 3, 32), (32, 12)),
    ("ni,eio->neo", (5, 44), (3, 44, 8)),
    ("nki,nkio->nko", (4, 2, 32), (4, 2, 32, 6)),
])
def test_qeinsum_int4_matches_float64_oracle(plan, spec, x_shape, w_shape):
    rng = np.random.default_rng(2)
    x = _bf16_values(rng, x_shape)
    q = quantize_int4(rng.standard_normal(w_shape).astype(np.float32),
                      group_size_for(w_shape[-2], 16))
    got = np.asarray(jax.jit(lambda a, w: qeinsum(spec, a, w, plan))(x, q))
    w64 = dequantize(q, np.float64)
    want = np.einsum(spec, x.astype(np.float64), w64)
    # int4 x bf16 scale is exact in float32, x is bf16-exact: the only error is float32
    # summation, gamma_n |x| |w| with n = In plus a scaling and an add per scale block
    n = w_shape[-2] + 2 * q.scale_blocks
    bound = gamma(n) * np.einsum(spec, np.abs(x).astype(np.float64), np.abs(w64))
    assert (np.abs(got - want) <= bound + 1e-30).all()


def test_layer_slice_of_an_int4_stack_is_that_layer():
    rng = np.random.default_rng(3)
    stack = quantize_int4(rng.standard_normal((3, 32, 8)).astype(np.float32), 8)
    stack = jax.tree.map(jnp.asarray, stack)
    x = jnp.asarray(_bf16_values(rng, (2, 32)))
    sliced = LayerSlice(stack, jnp.int32(1))
    assert sliced.shape == (32, 8)
    run = jax.jit(lambda a, w: qeinsum("...i,io->...o", a, w, CPU))
    np.testing.assert_array_equal(np.asarray(run(x, sliced)), np.asarray(run(x, stack[1])))


def test_the_plan_routes_int4_to_xla():
    rng = np.random.default_rng(4)
    w4 = quantize_int4(rng.standard_normal((4, 32, 16)).astype(np.float32), 16)
    w8 = quantize(rng.standard_normal((4, 32, 16)).astype(np.float32))
    gpu = ExecutionPlan("gpu", moe="auto", projections=True)
    assert gpu.moe_path(8, w4, w4, w4) == "grouped"
    assert ExecutionPlan("gpu", moe="pallas").moe_path(8, w4, w4, w4) == "grouped"
    assert ExecutionPlan("gpu", moe="pallas").moe_path(8, w8, w8, w8) == "pallas"
    stack = QuantizedWeight(w4.weight[None], w4.scales[None], INT4)
    assert gpu.linear_kernel(jnp.zeros((1, 32)), [LayerSlice(stack, 0)], jnp.float32) is None


def test_moe_evaluations_agree_on_int4_weights():
    rng = np.random.default_rng(5)
    e, d, f, n = 4, 32, 44, 6
    w1, wv = (quantize_int4(rng.standard_normal((e, d, f)).astype(np.float32) / 6, 16)
              for _ in range(2))
    w2 = quantize_int4(rng.standard_normal((e, f, d)).astype(np.float32) / 7, 22)
    w1, wv, w2 = (jax.tree.map(jnp.asarray, w) for w in (w1, wv, w2))
    x = jnp.asarray(_bf16_values(rng, (n, d))).astype(jnp.bfloat16)
    experts = jnp.asarray(rng.permuted(np.tile(np.arange(e), (n, 1)), axis=1)[:, :2])
    gates = jnp.asarray(rng.uniform(0.1, 0.5, (n, 2)).astype(np.float32))
    run = lambda impl: jax.jit(lambda *a: moe(*a, ExecutionPlan("cpu", impl)))
    outs = {impl: np.asarray(run(impl)(x, gates, experts, w1, wv, w2))
            for impl in ("dense", "grouped")}
    # The same math in another summation order: float32 sums differ by ~n 2^-24, but the hidden
    # layer's bfloat16 rounding can then differ by one step (2^-8 relative) where a value lies
    # near a rounding point; carried through w2 and the gates that is <= 2^-8 sum_k g |h| |w2|
    # per output (the float32 terms are 2^-16 smaller; a factor 2 covers them).
    w1d, wvd, w2d = (dequantize(w, np.float64) for w in (w1, wv, w2))
    x64 = np.asarray(x, np.float64)
    bound = np.zeros((n, d))
    for t in range(n):
        for k in range(2):
            ex = int(experts[t, k])
            h = gelu_tanh(x64[t] @ w1d[ex]) * (x64[t] @ wvd[ex])
            bound[t] += float(gates[t, k]) * 2.0 ** -8 * (np.abs(h) @ np.abs(w2d[ex]))
    assert (np.abs(outs["grouped"] - outs["dense"]) <= 2 * bound).all()


def test_leaf_table_and_abstract_params_of_an_int4_config():
    entries = {e.name.split("decoder_layer_0/")[-1]: e for e in checkpoint_entries(TINY4)
               if "decoder_layer_0/" in e.name}
    f = TINY4.ffn_size   # 56: group 16 -> 14 (largest divisor of 56 not above 16)
    linear_1 = entries["moe/linear_1/w"]
    assert linear_1.fmt is INT4 and linear_1.group_size == 14
    assert linear_1.weight_shape == (4, f // 2, 32) and linear_1.scales_shape == (4, f // 14, 32)
    assert entries["router/w"].fmt is None
    tree = abstract_params(TINY4)
    w = tree["layers"]["decoder_layer/moe/linear_1"]["w"]
    assert w.shape == (2, 4, f, 32) and w.weight.dtype == np.uint8 and w.fmt is INT4
    flat = random_flat(TINY4)
    assert flat[linear_1.name].fmt is INT4 and flat[linear_1.name].weight.shape == (4, 28, 32)


def test_config_bounds_on_the_weight_format():
    with pytest.raises(ConfigError, match="weight_bits"):
        TINY4.replace(weight_bits=3)
    with pytest.raises(ConfigError, match="group_size"):
        TINY4.replace(group_size=0)
    with pytest.raises(ConfigError, match="group_size must be 0"):
        TINY4.replace(weight_bits=8)
    assert "weight_bits" not in GROK1.to_dict()          # int8 configs are written as before
    assert GrokConfig.from_dict(TINY4.to_dict()) == TINY4


def test_sharding_splits_packed_rows_only_where_they_divide():
    """A row-parallel int4 weight: F=56 splits 8 ways by 7 rows, but its 28 packed rows do not."""
    entry = next(e for e in checkpoint_entries(TINY4) if e.name.endswith("0/moe/linear_1/w"))
    weight, scales = rules.leaf_specs(entry, {"data": 1, "model": 8}, TINY4)
    assert weight == (None, None, None) and scales[1] is None
    weight, _ = rules.leaf_specs(entry, {"data": 1, "model": 2}, TINY4)
    assert weight == (None, "model", None)
    # the shardings tree has the params' structure (each QuantizedWeight node carries its format)
    params = abstract_params(TINY4)
    shardings = rules.params_shardings(params, rules.make_mesh((1, 1)), TINY4)
    assert jax.tree.structure(shardings) == jax.tree.structure(params)


def test_memory_plan_int4_grok1_fits_the_issue_goals():
    """Grok-1 in int4 (the default group of 32: 4.5 bits a weight): 2 x 141 GB and 4 x 80 GB,
    each with a cache of 8 sequences of 8192 tokens, on the tensor layout."""
    int4 = target_config(GROK1, 4)
    for devices, gb in ((2, 141), (4, 80)):
        best = min(memory.plan(int4, devices, gb, batch=8, length=8192), key=lambda e: e.total)
        assert best.fits, best.describe()
        assert memory.max_batch(int4, best.mesh, gb, length=8192) >= 8
    weights8 = memory.estimate_memory(GROK1, (1, 8)).weights
    weights4 = memory.estimate_memory(int4, (1, 8)).weights
    assert 0.5 < weights4 / weights8 < 0.57     # half the bytes, plus a bf16 scale per 32
    assert not any(e.fits for e in memory.plan(GROK1, 2, 141, batch=8, length=8192))


def test_plan_command_with_bits_4(capsys):
    assert checkpoint_main(["plan", "--devices", "4", "--memory", "80", "--bits", "4",
                            "--batch", "8"]) == 0
    out = capsys.readouterr().out
    assert "fits on mesh(es)" in out and "KV cache room: up to" in out
    assert checkpoint_main(["plan", "--devices", "2", "--memory", "141", "--batch", "8"]) == 1


def test_fidelity_benchmark_perplexity_is_exp_mean_nll():
    """benchmarks/int4_fidelity.py's perplexity (its full run takes a minute: BENCHMARKS.md):
    uniform logits over V tokens give exactly V; a model sure of every next token gives 1."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "int4_fidelity.py"
    spec = importlib.util.spec_from_file_location("int4_fidelity", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = np.array([[1, 5, 2, 7], [3, 3, 0, 6]])

    class Uniform:
        def logits(self, token_lists):
            return np.zeros((len(token_lists), len(token_lists[0]), 8), np.float32)

    class Sure:
        def logits(self, token_lists):
            out = np.full((len(token_lists), len(token_lists[0]), 8), -1e4, np.float32)
            for b, tokens in enumerate(token_lists):
                out[b, np.arange(len(tokens) - 1), tokens[1:]] = 0.0
            return out

    assert bench.perplexity(Uniform(), rows) == pytest.approx(8.0, rel=1e-12)
    assert bench.perplexity(Sure(), rows) == pytest.approx(1.0, rel=1e-12)
