"""The KV cache of every layer: keys and values per slot, and which slots hold real tokens."""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from grok.config import GrokConfig
from grok.quant import BF16


class KVCache(NamedTuple):
    """Keys and values of every layer plus which slots hold real (non-pad) tokens.

    k, v: [L, B, Hkv, S, K] bfloat16 (a tuple of per-layer [B, Hkv, S, K] for the unrolled model):
    heads before slots, so the attention matmuls batch over (B, Hkv) with no transpose of the
    cache; valid: [B, S] bool, shared by all layers.
    """

    k: Any
    v: Any
    valid: jax.Array

    @property
    def length(self) -> int:
        return int(self.valid.shape[1])


def init_cache(config: GrokConfig, batch: int, length: int, scan: bool = True) -> KVCache:
    """An empty cache of `length` slots for `batch` sequences."""
    k, v = zero_layers(config, (batch, config.num_kv_heads, length, config.key_size), scan)
    return KVCache(k, v, jnp.zeros((batch, length), bool))


def zero_layers(config: GrokConfig, shape: tuple[int, ...], scan: bool) -> tuple[Any, Any]:
    """Zero keys and values of every layer, each layer's of `shape`: stacked [L, *shape] for the
    layer scan, else a tuple of per-layer arrays."""
    if scan:
        return tuple(jnp.zeros((config.num_layers, *shape), BF16) for _ in range(2))
    return tuple(tuple(jnp.zeros(shape, BF16) for _ in range(config.num_layers))
                 for _ in range(2))
