"""The pure forward pass of the Grok-1 transformer over an explicit KV cache (SPEC §2).

Einsum letters: b batch, t query positions, s cache slots, d model width, h kv heads,
g query heads per kv head, k head dim, n tokens, e experts, f expert width, v vocabulary.
"""
from __future__ import annotations

from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp

from grok.config import GrokConfig
from grok.leaves import is_scanned
from grok.model.cache import KVCache
from grok.model.layers import DecoderLayer, embed_tokens, final_logits
from grok.model.paged import PagedCache, read_pages, read_valid, slot_pages, write_pages
from grok.kernels.plan import ExecutionPlan, resolve_plan
from grok.quant import LayerSlice, is_quantized


LOGIT_ROWS = 8


def forward(params: dict[str, Any], tokens: jax.Array, cache: KVCache | PagedCache,
            start: jax.Array, *, config: GrokConfig, attend_len: int | None = None,
            rows: jax.Array | None = None, table: jax.Array | None = None,
            logit_index: jax.Array | None = None, plan: ExecutionPlan | None = None,
            routing: bool = False) -> Any:
    """Run `tokens` [B, T] at positions start[b] .. start[b] + T - 1 and write their keys and
    values into those cache slots.

    The tokens attend to the first `attend_len` cache slots (default: all; bucket it to the live
    context when decoding) and to each other, causally. `attend_len=0` starts fresh sequences
    (prefill): the old cache is not read, and the rows are cleared before the write. `rows` [B]
    picks the cache rows to read and write (default: row b for token row b; a row past the
    cache writes nothing): with attend_len > 0 token row b continues the sequence in cache row
    rows[b] (a chunk of a long prompt).
    With a `grok.model.paged.PagedCache`, `table` [B, n] is each row's block table instead of
    `rows`: the tokens read the row's first `attend_len` slots through it and write there.
    Returns float32 logits [B, T, V], or [B, V] at `logit_index` [B] when given, and the cache.
    `plan` (grok.kernels.plan; default: `resolve_plan()` for jax's backend) says how the step
    runs: which MoE path, which kernels, how many layers per step of the layer loop.
    `routing=True` also returns what each layer's router decided, as a third value
    (probs [L, B, T, E] float32, gates [L, B, T, k] float32, experts [L, B, T, k] int32).
    """
    plan = resolve_plan() if plan is None else plan
    b, t = tokens.shape
    paged = isinstance(cache, PagedCache)
    start = start.astype(jnp.int32)
    positions = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    if paged:
        attend_len = table.shape[1] * cache.page_size if attend_len is None else attend_len
        read_table = table[:, :-(-attend_len // cache.page_size)]   # the pages read
        old_valid = read_valid(cache.valid, read_table)
        page, offset = slot_pages(table, positions, cache.page_size, cache.pages)
    else:
        attend_len = cache.length if attend_len is None else attend_len
        gather = rows is not None and bool(attend_len)   # read the old slots of those rows only
        rows = jnp.arange(b) if rows is None else rows.astype(jnp.int32)
        old_valid = cache.valid[rows] if gather else cache.valid
    new_valid = tokens != config.pad_token   # (Grok-1 pads with 0, Grok-2 with <|pad|>)

    embed = hk.without_apply_rng(hk.transform(lambda x: embed_tokens(config, x)))
    layer = hk.without_apply_rng(hk.transform(
        lambda *a: DecoderLayer(config, plan, routing)(*a)))
    unembed = hk.without_apply_rng(hk.transform(lambda x: final_logits(config, plan, x)))

    def one_layer(h, layer_params, k_cache, v_cache):
        if paged:
            read = lambda c: read_pages(c, read_table)
        else:
            read = lambda c: (c[rows] if gather else c)[:, :, :attend_len]
        k_old, v_old = (read(k_cache), read(v_cache)) if attend_len else (None, None)
        return layer.apply(layer_params, h, k_old, v_old, positions, start, old_valid,
                           new_valid)

    with jax.named_scope("embed"):
        h = embed.apply(params["embed"], tokens)

    with jax.named_scope("layers"):
        if is_scanned(params):
            # int8 weights go whole, as LayerSlices of their stack (a kernel reads them in place;
            # a slice through the scan would be copied every layer); the small rest is sliced.
            tree = params["layers"]
            whole = {m: {p: w for p, w in leaves.items() if is_quantized(w)}
                     for m, leaves in tree.items()}
            rest = {m: {p: w for p, w in leaves.items() if not is_quantized(w)}
                    for m, leaves in tree.items()}

            def body(h, xs):
                rest_params, k_cache, v_cache, index = xs
                layer_params = {m: {**rest_params[m], **{p: LayerSlice(w, index)
                                                         for p, w in whole[m].items()}}
                                for m in tree}
                h, *out = one_layer(h, layer_params, k_cache, v_cache)
                return h, tuple(out)
            layers = jnp.arange(config.num_layers, dtype=jnp.int32)
            h, (k_new, v_new, *routes) = jax.lax.scan(body, h, (rest, cache.k, cache.v, layers),
                                                      unroll=plan.unroll)
            # Indices split by a slice put their dims first: updates are [B, T, L, Hkv, K].
            write = lambda c, new: c.at[:, rows[:, None], :, positions].set(
                new.transpose(1, 2, 0, 3, 4), mode="drop")
        else:
            k_new, v_new, per_layer = [], [], []
            for layer_params, k_cache, v_cache in zip(params["layers"], cache.k, cache.v):
                h, k, v, *route = one_layer(h, layer_params, k_cache, v_cache)
                k_new.append(k)
                v_new.append(v)
                per_layer += route
            routes = [jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)] if per_layer else []
            write = lambda cs, news: tuple(c.at[rows[:, None], :, positions].set(n, mode="drop")
                                           for c, n in zip(cs, news))

    with jax.named_scope("cache_write"):
        if paged:
            cache = write_pages(cache, k_new, v_new, new_valid, page, offset)
        else:
            valid = cache.valid if attend_len else cache.valid.at[rows].set(False)
            valid = valid.at[rows[:, None], positions].set(new_valid, mode="drop")
            cache = KVCache(write(cache.k, k_new), write(cache.v, v_new), valid)

    with jax.named_scope("logits"):
        if logit_index is not None:
            h = jnp.take_along_axis(h, logit_index[:, None, None].astype(jnp.int32), axis=1)
            # At least LOGIT_ROWS rows: a row's logits then come from the same matmul kernel
            # however many rows the call has (CPU dots of one or two rows take another path).
            h = jnp.pad(h, ((0, max(0, LOGIT_ROWS - b)), (0, 0), (0, 0)))
        logits = unembed.apply(params["embed"], h)
        if logit_index is not None:
            logits = logits[:b, 0]
    if routing:
        return logits, cache, routes[0]
    return logits, cache
