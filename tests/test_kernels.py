"""The Pallas grouped int8 matmul: interpreter results equal XLA; it lowers for Triton."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grok.kernels import moe as kmoe
from grok.moe import moe
from grok.quant import QuantizedWeight8bit, dequantize, quantize


def _q(rng, shape, blocks):
    q = quantize(rng.standard_normal(shape).astype(np.float32) / np.sqrt(shape[-2]), blocks)
    return QuantizedWeight8bit(jnp.asarray(q.weight), jnp.asarray(q.scales))


def test_block_matmul_interpret_equals_numpy():
    rng = np.random.default_rng(0)
    w = _q(rng, (4, 64, 48), 4)
    x = jnp.asarray(rng.standard_normal((3, 8, 64)), jnp.bfloat16)
    ids, rows = jnp.array([2, 0, 3]), jnp.array([3, 0, 8])
    y = kmoe.block_matmul(x, ids, rows, w.weight, w.scales, bn=16, bk=8, interpret=True)
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


def test_kernel_applies():
    assert kmoe.kernel_applies(6144, 32768, 1, 16) and kmoe.kernel_applies(32768, 6144, 8, 16)
    assert not kmoe.kernel_applies(32, 48, 4, 16)        # tiles under Triton's 16
    assert kmoe.kernel_applies(32, 48, 4, 8, interpret=True)


def test_lowers_for_triton(monkeypatch):
    """The kernel lowers to a Triton call for CUDA (no GPU needed to lower)."""
    pytest.importorskip("jax._src.lib.triton")
    x = jax.ShapeDtypeStruct((2, 16, 256), jnp.bfloat16)
    ids = jax.ShapeDtypeStruct((2,), jnp.int32)
    w = jax.ShapeDtypeStruct((8, 256, 128), jnp.int8)
    s = jax.ShapeDtypeStruct((8, 8, 128), jnp.bfloat16)
    monkeypatch.setattr(kmoe.jax, "default_backend", lambda: "gpu")
    fn = functools.partial(kmoe.block_matmul.__wrapped__, interpret=False)
    try:
        text = jax.jit(fn).trace(x, ids, ids, w, s).lower(lowering_platforms=("cuda",)).as_text()
    except Exception as err:   # a jaxlib without the CUDA lowering rules
        pytest.skip(f"cannot lower for cuda here: {err}")
    assert "triton" in text and "grok_moe_block_matmul" in text
