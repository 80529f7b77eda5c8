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
from grok.engine import ModelRunner
from grok.kernels import moe as kmoe
from grok.model import KVCache
from grok.params import abstract_params
from grok.moe import moe
from grok.quant import QuantizedWeight8bit, dequantize, quantize


def _q(rng, shape, blocks):
    q = quantize(rng.standard_normal(shape).astype(np.float32) / np.sqrt(shape[-2]), blocks)
    return QuantizedWeight8bit(jnp.asarray(q.weight), jnp.asarray(q.scales))


@pytest.mark.parametrize("splits", [1, 2, 8])
def test_block_matmul_interpret_equals_numpy(splits):
    """Each block times its expert's dequantised weight; In split into parts adds up the same."""
    rng = np.random.default_rng(0)
    w = _q(rng, (4, 64, 48), 4)
    x = jnp.asarray(rng.standard_normal((3, 8, 64)), jnp.bfloat16)
    ids, rows = jnp.array([2, 0, 3]), jnp.array([3, 0, 8])
    y = kmoe.block_matmul(x, ids, rows, w.weight, w.scales, bn=16, bk=8, splits=splits,
                          interpret=True)
    ref = np.einsum("gmi,gio->gmo", np.asarray(x, np.float32), dequantize(w)[[2, 0, 3]])
    ref[1] = 0.0                                         # an empty block is skipped: zeros
    np.testing.assert_allclose(np.asarray(y), ref, atol=1e-4)


def test_pallas_moe_equals_xla():
    rng = np.random.default_rng(1)
    e, k, n, d, f = 4, 2, 5, 32, 48
    w1, wv, w2 = _q(rng, (e, d, f), 1), _q(rng, (e, d, f), 1), _q(rng, (e, f, d), 4)
    x = jnp.asarray(rng.standard_normal((n, d)), jnp.bfloat16)
    gates, chosen = jax.lax.top_k(jax.nn.softmax(jnp.asarray(rng.standard_normal((n, e)))), k)
    ref = np.asarray(moe(x, gates, chosen, w1, wv, w2, impl="grouped"))
    out = np.asarray(moe(x, gates, chosen, w1, wv, w2, impl="pallas"))  # interpreter on CPU
    np.testing.assert_allclose(out, ref, atol=1e-5 * max(1.0, np.abs(ref).max()))


def test_splits_fill_the_chip_and_divide_the_steps():
    # decoding through w2 (2 blocks, 6144 outputs / 128): 96 programs -> 4 splits, 384 programs
    assert kmoe.splits_for(2, 32768, 6144, 128, 256) == 4
    assert kmoe.splits_for(2, 6144, 32768, 128, 256) == 1      # w1: 512 programs already
    assert kmoe.splits_for(1, 512, 128, 128, 256) == 2         # capped by the 2 steps of In
    with pytest.raises(ValueError, match="splits=3"):
        w = _q(np.random.default_rng(0), (2, 64, 16), 1)
        kmoe.block_matmul(jnp.zeros((1, 8, 64), jnp.bfloat16), jnp.array([0]), jnp.array([1]),
                          w.weight, w.scales, bn=16, bk=16, splits=3, interpret=True)


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
    with _lowering_for_h100():
        text = jax.jit(fn).trace(x, ids, ids, w, s).lower(lowering_platforms=("cuda",)).as_text()
    assert "triton" in text and "grok_moe_block_matmul" in text


@pytest.mark.parametrize("batch,tokens", [(1, 1), (8, 1), (32, 1), (1, 512)])
def test_grok1_width_model_lowers_for_cuda_reading_experts_in_place(monkeypatch, batch, tokens):
    """The whole step at Grok-1 width (4 layers), as a GPU runs it (auto -> the Pallas kernel),
    lowers for CUDA on this CPU-only machine, and the three expert matmuls of the scanned layer
    take the whole layer-stacked weight [L*E, In, Out]: no layer's experts are sliced (copied)
    out of the stack. Also catches GPU-only code paths that CPU tests never trace."""
    pytest.importorskip("jax._src.lib.triton")
    monkeypatch.setattr("grok.quant.on_gpu", lambda: True)
    monkeypatch.setattr("grok.quant.on_cpu", lambda: False)
    config = GROK1.replace(num_layers=4, sequence_len=1024)
    runner = ModelRunner(abstract_params(config, True), config, moe_impl="auto")
    ints = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
    kv = jax.ShapeDtypeStruct((4, batch, config.num_kv_heads, 1024, config.key_size),
                              jnp.bfloat16)
    cache = KVCache(kv, kv, jax.ShapeDtypeStruct((batch, 1024), bool))
    with _lowering_for_h100():
        if tokens == 1:
            traced = runner._decode.trace(runner.params, cache, ints(batch), ints(batch), 1024)
        else:
            traced = runner._prefill.trace(runner.params, cache, ints(batch, tokens),
                                           ints(batch), ints(batch))
        text = traced.lower(lowering_platforms=("cuda",)).as_text()
    calls = re.findall(r"call @block_matmul\w*\(.*tensor<32x(?:6144x32768|32768x6144)xi8>", text)
    assert len(calls) == 3, "w1, wv and w2 each run the kernel on the whole stack"
    assert "__gpu$xla.gpu.triton" in text
    assert not re.search(r"sizes = \[1, 8, (6144, 32768|32768, 6144)\]", text), \
        "a layer's experts sliced out of the stack"
    # Decoding, the attention projections read their layer in place too; a prefill's are
    # compute-bound XLA GEMMs on the layer's slice.
    projections = re.findall(r"call @block_matmul\w*\(.*tensor<4x6144x(?:6144|1024)xi8>", text)
    sliced = re.findall(r"sizes = \[1, 6144, (?:6144|1024)\]", text)
    assert (len(projections), len(sliced)) == ((4, 0) if tokens == 1 else (0, 4))
