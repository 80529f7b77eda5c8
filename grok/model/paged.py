"""The paged KV cache: a pool of fixed-size pages shared by all sequences, read through block
tables (vLLM's layout, as `[L, pages, page, Hkv, K]`).

A sequence's slot p lives in page table[p // page] at offset p % page. Reads gather a row's pages
into the `[B, Hkv, S, K]` view attention takes (XLA's gather; the kernel-or-reference choice for
other backends is the execution plan's); writes scatter each new token's keys and values to its
page and offset. A table entry equal to the pool's page count is no page: it reads zeros and
writes nothing (padding rows, slots past a sequence's pages).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from grok.config import GrokConfig
from grok.model.cache import zero_layers


class PagedCache(NamedTuple):
    """k, v: [L, P, page, Hkv, K] bfloat16 (a tuple of per-layer [P, page, Hkv, K] for the unrolled
    model); valid: [P, page] bool, whether a slot holds a real (non-pad) token."""

    k: Any
    v: Any
    valid: jax.Array

    @property
    def pages(self) -> int:
        return int(self.valid.shape[0])

    @property
    def page_size(self) -> int:
        return int(self.valid.shape[1])


def init_pool(config: GrokConfig, pages: int, page_size: int, scan: bool = True) -> PagedCache:
    """An empty pool of `pages` pages of `page_size` slots."""
    k, v = zero_layers(config, (pages, page_size, config.num_kv_heads, config.key_size), scan)
    return PagedCache(k, v, jnp.zeros((pages, page_size), bool))


def read_pages(layer: jax.Array, table: jax.Array) -> jax.Array:
    """One layer's pages [P, page, Hkv, K] of each row's table [B, n] as [B, Hkv, n * page, K]."""
    b, n = table.shape
    _, page, heads, k = layer.shape
    taken = jnp.take(layer, table, axis=0, mode="fill", fill_value=0)   # [B, n, page, Hkv, K]
    return taken.reshape(b, n * page, heads, k).transpose(0, 2, 1, 3)


def read_valid(valid: jax.Array, table: jax.Array) -> jax.Array:
    """Which of each row's first n * page slots hold real tokens [B, n * page]."""
    b, n = table.shape
    return jnp.take(valid, table, axis=0, mode="fill", fill_value=False).reshape(b, -1)


def slot_pages(table: jax.Array, positions: jax.Array, page_size: int, pages: int
               ) -> tuple[jax.Array, jax.Array]:
    """The page [B, T] and offset [B, T] of each position (`pages`, writing nothing, past the
    row's table)."""
    index = positions // page_size
    page = jnp.take_along_axis(table, jnp.minimum(index, table.shape[1] - 1), axis=1)
    return jnp.where(index < table.shape[1], page, pages), positions % page_size


def write_pages(cache: PagedCache, k_new: Any, v_new: Any, new_valid: jax.Array,
                page: jax.Array, offset: jax.Array) -> PagedCache:
    """The cache with new keys and values ([L, B, T, Hkv, K], or per layer [B, T, Hkv, K]) and
    their validity [B, T] written at (page, offset) [B, T]."""
    if isinstance(cache.k, tuple):
        write = lambda cs, news: tuple(c.at[page, offset].set(n, mode="drop")
                                       for c, n in zip(cs, news))
    else:   # the two index arrays are adjacent: the update's dims stay in place, [L, B, T, ...]
        write = lambda c, new: c.at[:, page, offset].set(new, mode="drop")
    valid = cache.valid.at[page, offset].set(new_valid, mode="drop")
    return PagedCache(write(cache.k, k_new), write(cache.v, v_new), valid)


def copy_pages(cache: PagedCache, sources: jax.Array, targets: jax.Array) -> PagedCache:
    """Pages `sources` [M] copied into pages `targets` [M] (a target past the pool: none)."""
    def copy(c, axis):
        taken = jnp.take(c, sources, axis=axis)
        index = (slice(None),) * axis + (targets,)
        return c.at[index].set(taken, mode="drop")
    axis = 0 if isinstance(cache.k, tuple) else 1
    k, v = (jax.tree.map(lambda c: copy(c, axis), part) for part in (cache.k, cache.v))
    return PagedCache(k, v, copy(cache.valid, 0))
