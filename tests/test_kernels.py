"""The Pallas grouped int8 matmul: interpreter results equal XLA; it lowers for Triton."""
from __future__ import annotations

import contextlib
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grok.config import GROK1
from grok.serving.engine import ModelRunner
from grok.kernels import pallas_int8 as kmoe
from grok.kernels.plan import ExecutionPlan, resolve_plan
from grok.model import KVCache
from grok.leaves import abstract_params, checkpoint_entries
from grok.model.moe import moe
from grok.quant import QuantizedWeight8bit, dequantize, quantize

from precision import (assert_within, bf16_spread, dot_bound, gated_hidden, moe_route_bound,
                       to_bf16)


def _q(rng, shape, blocks):
    q = quantize(rng.standard_normal(shape).astype(np.float32) / np.sqrt(shape[-2]), blocks)
    return QuantizedWeight8bit(jnp.asarray(q.weight), jnp.asarray(q.scales))


@pytest.mark.parametrize("splits,swap_ab", [(1, False), (2, False), (8, False), (2, True)])
def test_block_matmul_interpret_equals_numpy(splits, swap_ab):
    """Each block times its expert's dequantised weight; In split into parts adds up the same;
    the transposed evaluation (swap_ab) gives the same product."""
    rng = np.random.default_rng(0)
    w = _q(rng, (4, 64, 48), 4)
    x = jnp.asarray(rng.standard_normal((3, 8, 64)), jnp.bfloat16)
    ids, rows = jnp.array([2, 0, 3]), jnp.array([3, 0, 8])
    y = kmoe.sweep_launch(x, ids, rows, ((w.weight, w.scales),), gated=False, bn=16, bk=8,
                          splits=splits, interpret=True, swap_ab=swap_ab)
    ref, bound = _exact_block_matmul(x, w, [2, 0, 3], splits)
    ref[1] = 0.0                                         # an empty block is skipped: zeros
    assert_within(y, ref, bound, f"block_matmul splits={splits} swap_ab={swap_ab}")


def _exact_block_matmul(x, w, ids, splits=1):
    """Each block times its expert's dequantised weight in float64, and the bound on a float32
    evaluation: products exact (bf16 x int8), In sums, a scaling and an add per scale block
    and the splits' sum, in any order: gamma_n |x| @ |w|, n = In + 2 S + splits."""
    xf, wf = np.asarray(x, np.float64), dequantize(w, np.float64)[ids]
    n = w.weight.shape[-2] + 2 * w.scales.shape[-2] + splits
    return (np.einsum("gmi,gio->gmo", xf, wf),
            dot_bound(np.abs(xf), np.abs(wf), n))


def test_planted_bug_scales_of_the_wrong_row_block_are_caught():
    """The same check fails when each row block is scaled with the next block's scales."""
    rng = np.random.default_rng(0)
    w = _q(rng, (4, 64, 48), 4)
    x = jnp.asarray(rng.standard_normal((3, 8, 64)), jnp.bfloat16)
    ids, rows = jnp.array([2, 0, 3]), jnp.array([3, 8, 8])
    y = kmoe.block_matmul(x, ids, rows, w.weight, jnp.roll(w.scales, 1, axis=-2), bn=16, bk=8,
                          interpret=True)
    ref, bound = _exact_block_matmul(x, w, [2, 0, 3])
    with pytest.raises(AssertionError):
        assert_within(y, ref, bound, "block_matmul planted bug: scales of the wrong row block")


@pytest.mark.parametrize("blocks,swap_ab", [(1, False), (4, False), (4, True)])
def test_gated_block_matmul_equals_numpy(blocks, swap_ab):
    """gelu(x w1) * (x wv) per block in one kernel, rounded once to x's dtype."""
    rng = np.random.default_rng(2)
    w1, wv = _q(rng, (4, 64, 48), blocks), _q(rng, (4, 64, 48), blocks)
    x = jnp.asarray(rng.standard_normal((3, 8, 64)), jnp.bfloat16)
    ids, rows = jnp.array([1, 3, 0]), jnp.array([8, 2, 0])
    y = kmoe.sweep_launch(x, ids, rows, ((w1.weight, w1.scales), (wv.weight, wv.scales)),
                          gated=True, bn=16, bk=8, interpret=True, swap_ab=swap_ab)
    assert y.dtype == jnp.bfloat16
    xf = np.asarray(x, np.float64)
    ref, err = zip(*(gated_hidden(xf[g], dequantize(w1, np.float64)[e],
                                  dequantize(wv, np.float64)[e], blocks)
                     for g, e in enumerate([1, 3, 0])))
    ref, err = np.stack(ref), np.stack(err)
    ref[2] = err[2] = 0.0
    # the exact value rounded to bfloat16, but where a rounding point lies within the float32
    # error of the hidden layer, which may round either way (precision.bf16_spread)
    assert_within(y, to_bf16(ref), bf16_spread(ref, err),
                  f"gated_block_matmul blocks={blocks} swap_ab={swap_ab}")
    with pytest.raises(ValueError, match="splits=1"):
        kmoe.gated_block_matmul(x, ids, rows, w1.weight, w1.scales, wv.weight, wv.scales,
                                bn=16, bk=8, splits=2, interpret=True)


@pytest.mark.parametrize("splits", [None, 1, 2])
def test_multi_block_matmul_equals_one_launch_per_weight(splits):
    """Weights of different widths and scale blocks side by side in one launch: each output is
    what block_matmul gives for its weight alone."""
    rng = np.random.default_rng(3)
    ws = [_q(rng, (3, 64, 48), 1), _q(rng, (3, 64, 16), 4), _q(rng, (3, 64, 32), 2)]
    x = jnp.asarray(rng.standard_normal((2, 8, 64)), jnp.bfloat16)
    ids, rows = jnp.array([2, 0]), jnp.array([5, 0])
    outs = kmoe.multi_block_matmul(x, ids, rows, tuple((w.weight, w.scales) for w in ws),
                                   bn=16, bk=8, splits=splits, interpret=True)
    assert [o.shape for o in outs] == [(2, 8, 48), (2, 8, 16), (2, 8, 32)]
    for out, w in zip(outs, ws):
        one = kmoe.block_matmul(x, ids, rows, w.weight, w.scales, bn=16, bk=8, interpret=True)
        # tiles and splits may differ with the launch: two float32 orders of the same sums
        _, bound = _exact_block_matmul(x, w, [2, 0], splits or 8)
        assert_within(out, one, 2 * bound, f"multi_block_matmul splits={splits}")
        assert np.abs(np.asarray(out)[0]).max() > 0 and not np.asarray(out)[1].any()


def test_chunks_stay_within_a_scale_block():
    assert kmoe.chunking(48, 48) == (1, 48)      # one scale block: one chunk, scaled once
    assert kmoe.chunking(64, 32) == (2, 32)      # w2 decoding: 4 splits of 64 steps, blocks of 32
    assert kmoe.chunking(8, 32) == (1, 8)        # a split inside one block
    assert kmoe.chunking(6, 4) == (3, 2)         # splits not aligned to blocks: chunks of gcd


def test_pallas_moe_equals_xla():
    rng = np.random.default_rng(1)
    e, k, n, d, f = 4, 2, 5, 32, 48
    w1, wv, w2 = _q(rng, (e, d, f), 1), _q(rng, (e, d, f), 1), _q(rng, (e, f, d), 4)
    x = jnp.asarray(rng.standard_normal((n, d)), jnp.bfloat16)
    gates, chosen = jax.lax.top_k(jax.nn.softmax(jnp.asarray(rng.standard_normal((n, e)))), k)
    ref = np.asarray(moe(x, gates, chosen, w1, wv, w2, resolve_plan("grouped")))
    out = np.asarray(moe(x, gates, chosen, w1, wv, w2, resolve_plan("pallas")))  # interpreter on CPU
    deq = [dequantize(w, np.float64) for w in (w1, wv, w2)]
    # float32 order differs; the hidden layer's bfloat16 rounding only where a rounding point
    # is within that difference (precision.moe_route_bound)
    assert_within(out, ref, moe_route_bound(np.asarray(x, np.float64), gates, chosen, *deq, 4),
                  "pallas moe vs grouped")


def test_splits_fill_the_chip_and_divide_the_steps():
    # decoding through w2 (2 blocks, 6144 outputs / 128): 96 programs -> 4 splits, 384 programs
    assert kmoe.splits_for(2, 32768, 6144, 128, 256) == 4
    assert kmoe.splits_for(2, 6144, 32768, 128, 256) == 1      # w1: 512 programs already
    assert kmoe.splits_for(1, 512, 128, 128, 256) == 2         # capped by the 2 steps of In
    with pytest.raises(ValueError, match="splits=3"):
        w = _q(np.random.default_rng(0), (2, 64, 16), 1)
        kmoe.block_matmul(jnp.zeros((1, 8, 64), jnp.bfloat16), jnp.array([0]), jnp.array([1]),
                          w.weight, w.scales, bn=16, bk=16, splits=3, interpret=True)


def test_pipeline_defaults():
    assert kmoe.pipeline_defaults(16) == (4, 4)           # decoding: deep weight stream
    assert kmoe.pipeline_defaults(64) == (3, 4)
    assert kmoe.pipeline_defaults(64, 2) == (3, 8)        # gated: two accumulators
    assert kmoe.pipeline_defaults(128) == (3, 8)


def test_tiles_fit_shared_memory():
    assert kmoe.fit_shared(16, 128, 256, 3) == 256       # decode: 120 KB
    assert kmoe.fit_shared(128, 128, 256, 3) == 128      # prefill: 288 KB -> 144 KB
    assert kmoe.fit_shared(128, 128, 256, 3) * (128 * 2 + 128) * 3 <= kmoe.SHARED_BYTES


def test_kernel_applies():
    assert kmoe.kernel_applies(6144, 32768, 1, 16) and kmoe.kernel_applies(32768, 6144, 8, 16)
    assert not kmoe.kernel_applies(32, 48, 4, 16)        # tiles under Triton's 16
    assert kmoe.kernel_applies(32, 48, 4, 8, interpret=True)
    two_layers = 2 * 8 * 6144 * 32768                    # 3.2 GB: 32-bit offsets would wrap
    assert not kmoe.kernel_applies(6144, 32768, 1, 16, weight_bytes=two_layers)
    assert kmoe.kernel_applies(6144, 32768, 1, 16, weight_bytes=4 * two_layers)


@contextlib.contextmanager
def _lowering_for_h100():
    """jax >= 0.11's Triton lowering asks for the target GPU: name one (an abstract device)."""
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                                         platform="gpu")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), (jax.sharding.AxisType.Auto,),
                                     abstract_device=device)
    with jax.sharding.use_abstract_mesh(mesh):
        yield


def test_lowers_for_triton():
    """The kernel lowers to a Triton call for CUDA (no GPU needed to lower); without naming
    Triton, JAX would pick its Mosaic GPU backend, which this kernel is not written for."""
    pytest.importorskip("jax._src.lib.triton")
    x = jax.ShapeDtypeStruct((2, 16, 256), jnp.bfloat16)
    ids = jax.ShapeDtypeStruct((2,), jnp.int32)
    w = jax.ShapeDtypeStruct((8, 256, 128), jnp.int8)
    s = jax.ShapeDtypeStruct((8, 8, 128), jnp.bfloat16)
    fn = functools.partial(kmoe.block_matmul.__wrapped__, interpret=False)
    gated = lambda x, ids, rows, w, s, w2, s2: kmoe.sweep_launch.__wrapped__(
        x, ids, rows, ((w, s), (w2, s2)), gated=True, interpret=False, swap_ab=True)
    with _lowering_for_h100():
        text = jax.jit(fn).trace(x, ids, ids, w, s).lower(lowering_platforms=("cuda",)).as_text()
        gated_text = jax.jit(gated).trace(x, ids, ids, w, s, w, s).lower(
            lowering_platforms=("cuda",)).as_text()
    assert "triton" in text and "grok_moe_block_matmul" in text
    assert "triton" in gated_text and "grok_moe_gated_matmul" in gated_text


@pytest.mark.parametrize("batch,tokens", [(1, 1), (8, 1), (32, 1), (1, 512)])
def test_grok1_width_model_lowers_for_cuda_reading_experts_in_place(batch, tokens):
    """The whole step at Grok-1 width (4 layers), as a GPU runs it (auto -> the Pallas kernel),
    lowers for CUDA on this CPU-only machine, and the expert matmuls of the scanned layer (gated w1/wv, then w2)
    take the whole layer-stacked weight [L*E, In, Out]: no layer's experts are sliced (copied)
    out of the stack. Also catches GPU-only code paths that CPU tests never trace."""
    pytest.importorskip("jax._src.lib.triton")
    config = GROK1.replace(num_layers=4, sequence_len=1024)
    params = abstract_params(config, True)
    runner = ModelRunner(params, config, plan=resolve_plan("auto", params=params, backend="gpu"))
    ints = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
    kv = jax.ShapeDtypeStruct((4, batch, config.num_kv_heads, 1024, config.key_size),
                              jnp.bfloat16)
    cache = KVCache(kv, kv, jax.ShapeDtypeStruct((batch, 1024), bool))
    with _lowering_for_h100():
        if tokens == 1:
            traced = runner.decode.trace(runner.params, cache, ints(batch), ints(batch), 1024)
        else:
            traced = runner.prefill.trace(runner.params, cache, ints(batch, tokens),
                                           ints(batch), ints(batch))
        text = traced.lower(lowering_platforms=("cuda",)).as_text()
    stack = r"tensor<32x(?:6144x32768|32768x6144)xi8>"
    gated = re.findall(rf"call @gated_block_matmul\w*\(.*{stack}.*{stack}", text)
    calls = re.findall(rf"call @block_matmul\w*\(.*{stack}", text)
    assert (len(gated), len(calls)) == (1, 1), \
        "w1 and wv in the gated kernel, w2 in the plain one, each on the whole stack"
    assert "__gpu$xla.gpu.triton" in text
    # Routing builds its blocks without a sort or a search loop (small kernels and, for a loop,
    # a host round trip per iteration, in every layer): the layer scan is the only loop.
    assert "stablehlo.sort" not in text and text.count("stablehlo.while") == 1
    assert not re.search(r"sizes = \[1, 8, (6144, 32768|32768, 6144)\]", text), \
        "a layer's experts sliced out of the stack"
    # Decoding, the attention projections read their layer in place too; a prefill's are
    # compute-bound XLA GEMMs on the layer's slice.
    # query, key and value in one launch, the output projection in another.
    qkv = re.findall(r"call @multi_block_matmul\w*\(.*tensor<4x6144x6144xi8>.*"
                     r"tensor<4x6144x1024xi8>.*tensor<4x6144x1024xi8>", text)
    out = re.findall(r"call @block_matmul\w*\(.*tensor<4x6144x6144xi8>", text)
    sliced = re.findall(r"sizes = \[1, 6144, (?:6144|1024)\]", text)
    assert (len(qkv), len(out), len(sliced)) == ((1, 1, 0) if tokens == 1 else (0, 0, 4))


@pytest.mark.parametrize("layout,local", [("tensor", ["16x6144x4096", "16x4096x6144"]),
                                          ("expert", ["2x6144x32768", "2x32768x6144"])])
def test_mesh_kernels_lower_for_cuda_on_each_devices_shard(layout, local):
    """On an 8-way model axis (an abstract mesh of H100s: no devices needed) the MoE kernels
    lower to Triton calls inside shard_map on each device's shard of the layer stacks."""
    pytest.importorskip("jax._src.lib.triton")
    from grok.parallel import rules as sh
    from grok.parallel.mesh_kernels import kernel_plan
    config = GROK1.replace(num_layers=2)
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                                         platform="gpu")
    mesh = jax.sharding.AbstractMesh((1, 8), ("data", "model"),
                                     (jax.sharding.AxisType.Auto,) * 2, abstract_device=device)
    params = abstract_params(config, True)
    layers = params["layers"]
    ws = []
    sizes = {"data": 1, "model": 8}
    entries = {e.tree_path: e for e in checkpoint_entries(config) if e.layer == 0}
    for name in ("linear", "linear_v", "linear_1"):
        w = layers[f"decoder_layer/moe/{name}"]["w"]
        specs = sh.leaf_specs(entries[f"layers/decoder_layer/moe/{name}/w"], sizes, config,
                              layout, stacked=True)
        parts = [jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=jax.sharding.NamedSharding(
                     mesh, jax.sharding.PartitionSpec(*spec)))
                 for leaf, spec in zip((w.weight, w.scales), specs)]
        ws.append(QuantizedWeight8bit(*parts))
        layers[f"decoder_layer/moe/{name}"]["w"] = ws[-1]
    mesh_kernel = kernel_plan(params, mesh)
    assert mesh_kernel is not None and mesh_kernel.layout == layout
    plan = ExecutionPlan(backend="gpu", moe="auto", mesh_kernel=mesh_kernel)
    xb = jax.ShapeDtypeStruct((2, 16, 6144), jnp.bfloat16)
    ids = jax.ShapeDtypeStruct((2,), jnp.int32)
    fn = jax.jit(lambda xb, ids, rows, w1, wv, w2, layer: plan.expert_kernels(
        xb, ids, rows, w1, wv, w2, layer))
    with jax.sharding.use_abstract_mesh(mesh):
        text = fn.trace(xb, ids, ids, *ws, jax.ShapeDtypeStruct((), jnp.int32)).lower(
            lowering_platforms=("cuda",)).as_text()
    assert len(re.findall(r"__gpu\$xla\.gpu\.triton", text)) == 2
    for shape in local:
        assert f"tensor<{shape}xi8>" in text, shape
