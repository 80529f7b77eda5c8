"""Start-up cost must not grow with depth: the layer scan lowers Grok-1 like a one-layer model."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from grok.config import GROK1
from grok.model import forward, init_cache
from grok.leaves import abstract_params


def _lowered_text(layers: int, scan: bool, tokens: int = 8, cache_len: int = 16) -> str:
    config = GROK1.replace(num_layers=layers)
    # the model's own cache layout, as shapes only (nothing allocated)
    cache = jax.eval_shape(lambda: init_cache(config, 1, cache_len, scan))
    ints = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
    step = jax.jit(lambda p, t, c, s: forward(p, t, c, s, config=config))
    return step.lower(abstract_params(config, scan), ints(1, tokens), cache, ints(1)).as_text()


def test_scanned_grok1_lowers_to_the_size_of_one_layer():
    one, full = _lowered_text(1, scan=True), _lowered_text(64, scan=True)
    assert len(full) < 1.05 * len(one)
    assert "tensor<64x8x6144x32768xi8>" in full       # stacked expert weights, read in the scan


def test_unrolled_layers_grow_the_program():
    two, four = _lowered_text(2, scan=False), _lowered_text(4, scan=False)
    assert len(four) > 1.6 * len(two)
