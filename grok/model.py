"""The Grok-1 transformer in haiku (SPEC §2), as pure functions over a KV cache.

Precision: matmul inputs, attention weights and the KV cache are bfloat16 as in the release;
norms, softmax, router and RoPE run in float32, and so does the residual stream (the release
rounds it to bfloat16 after every add; keeping it float32 costs B*T*D*4 bytes and halves the
error against an exact evaluation on the parity fixtures).

Einsum letters: b batch, t query positions, s cache slots, d model width, h kv heads,
g query heads per kv head, k head dim, n tokens, e experts, f expert width, v vocabulary.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp

from grok.config import GrokConfig
from grok.moe import MoE, Router
from grok.params import EMBED_MODULE, FINAL_NORM_MODULE, LAYER_MODULE, is_scanned
from grok.quant import BF16, LayerSlice, dot, is_quantized, qlinear, qlinears

NEG_INF = -1e30


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
    shape = (batch, config.num_kv_heads, length, config.key_size)
    if scan:
        k = jnp.zeros((config.num_layers, *shape), BF16)
        v = jnp.zeros((config.num_layers, *shape), BF16)
    else:
        k = tuple(jnp.zeros(shape, BF16) for _ in range(config.num_layers))
        v = tuple(jnp.zeros(shape, BF16) for _ in range(config.num_layers))
    return KVCache(k, v, jnp.zeros((batch, length), bool))


# --- haiku modules ------------------------------------------------------------------------------

class RMSNorm(hk.Module):
    """x / sqrt(mean(x^2) + eps) * scale, in float32, returned as bfloat16."""

    def __init__(self, eps: float, name: str):
        super().__init__(name=name)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        scale = hk.get_parameter("scale", [x.shape[-1]], jnp.float32, init=jnp.ones)
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return (x * scale.astype(jnp.float32)).astype(BF16)


class Linear8(hk.Module):
    """A bias-free linear layer over a QuantizedWeight8bit parameter `w` [In, Out] (a LayerSlice
    in the scanned model; `kernel` as in grok.quant.qlinear)."""

    def __init__(self, out_size: int, name: str, kernel: str = "off"):
        super().__init__(name=name)
        self.out_size = out_size
        self.kernel = kernel

    def weight(self, in_size: int) -> Any:
        """The parameter `w` [In, Out] (for several weights multiplied together: qlinears)."""
        return hk.get_parameter("w", [in_size, self.out_size], jnp.int8, init=_no_init)

    def __call__(self, x: jax.Array, out_dtype: Any = BF16) -> jax.Array:
        return qlinear(x, self.weight(x.shape[-1]), out_dtype, self.kernel)


def _no_init(shape: Any, dtype: Any) -> Any:
    raise ValueError("grok parameters come from a checkpoint or grok.params.random_flat; "
                     "the haiku modules do not initialise them")


def rope(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
    """Half-split rotary embedding of x [B, T, H, K] at integer positions [B, T], in float32
    (returned in x's dtype). The halves are viewed as an axis of 2 and swapped by a reverse, not
    sliced and concatenated: plain elementwise work that XLA fuses into the projection's split-K
    sum (the H100 decode profile's costliest small fusion was rooted at a concatenate)."""
    b, t, h, k = x.shape
    half = k // 2
    inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / k)
    theta = positions.astype(jnp.float32)[..., None] * inv_freq          # [B, T, K/2]
    theta = theta[:, :, None, None, :]                                   # [B, T, 1, 1, K/2]
    u = x.astype(jnp.float32).reshape(b, t, h, 2, half)
    sign = jnp.array([-1.0, 1.0], jnp.float32)[:, None]                  # (x1, x2) -> (-x2, x1)
    rotated = jnp.flip(u, axis=3) * sign
    out = u * jnp.cos(theta) + rotated * jnp.sin(theta)
    return out.reshape(b, t, h, k).astype(x.dtype)


class Attention(hk.Module):
    """Grouped-query attention with RoPE and a tanh-capped score.

    The new tokens attend to the cache's first A slots (`k_old`, `v_old` [B, Hkv, A, K], read
    only, None for fresh sequences) and causally to each other. Their own keys and values are
    returned for the caller to write into the cache, so no layer copies its cache.
    """

    def __init__(self, config: GrokConfig, kernel: str = "off"):
        super().__init__(name="multi_head_attention")
        self.config = config
        self.kernel = kernel

    def __call__(self, x, k_old, v_old, positions, start, old_valid, new_valid):
        c = self.config
        b, t, _ = x.shape
        groups = c.num_q_heads // c.num_kv_heads
        # Projections stay float32 through RoPE and are rounded to bfloat16 once. Decoding, the
        # kernel computes all three in one launch.
        linear = functools.partial(Linear8, kernel=self.kernel)
        weights = [linear(size, name=name).weight(x.shape[-1]) for size, name in
                   ((c.q_size, "query"), (c.kv_size, "key"), (c.kv_size, "value"))]
        q, k, v = qlinears(x, weights, jnp.float32, self.kernel)
        q = q.reshape(b, t, c.num_q_heads, c.key_size)
        k = k.reshape(b, t, c.num_kv_heads, c.key_size)
        v = v.astype(BF16).reshape(b, t, c.num_kv_heads, c.key_size)
        q = rope(q, positions, c.rope_base).astype(BF16)
        q = q.reshape(b, t, c.num_kv_heads, groups, c.key_size)
        k = rope(k, positions, c.rope_base).astype(BF16)

        causal = jnp.arange(t)[None, :] <= jnp.arange(t)[:, None]               # [T, U]
        # (scores, mask, values, einsum) over the new tokens and, when reading the cache, its slots.
        parts = [(dot("bthgk,buhk->bhgtu", q, k), new_valid[:, None, :] & causal[None], v,
                  "bhgtu,buhk->bthgk")]
        if k_old is not None:
            slots = jnp.arange(k_old.shape[2])
            old = old_valid[:, :k_old.shape[2]] & (slots[None, :] < start[:, None])   # [B, S]
            parts.insert(0, (dot("bthgk,bhsk->bhgts", q, k_old), old[:, None, :], v_old,
                             "bhgts,bhsk->bthgk"))
        # One softmax over all parts without concatenating them (each part's scores stay where
        # its matmul wrote them): exp(x - max) / sum, as jax.nn.softmax, with shared max and sum.
        capped = []
        for scores, mask, _, _ in parts:
            scores = scores * c.attn_output_multiplier
            scores = c.attn_logit_cap * jnp.tanh(scores / c.attn_logit_cap)
            capped.append(jnp.where(mask[:, None, None], scores, NEG_INF))
        top = jax.lax.stop_gradient(
            functools.reduce(jnp.maximum, [x.max(axis=-1, keepdims=True) for x in capped]))
        exps = [jnp.exp(x - top) for x in capped]
        total = functools.reduce(jnp.add, [e.sum(axis=-1, keepdims=True) for e in exps])
        out = None
        for e, (_, _, values, spec) in zip(exps, parts):
            term = dot(spec, (e / total).astype(BF16), values)
            out = term if out is None else out + term
        out = out.astype(BF16).reshape(b, t, c.q_size)
        return linear(c.emb_size, name="linear")(out, jnp.float32), k, v


class DecoderLayer(hk.Module):
    """Attention and MoE blocks, each wrapped in a pre-norm and a post-norm (sandwich norms)."""

    def __init__(self, config: GrokConfig, moe_impl: str, mesh_kernel: Any = None,
                 routing: bool = False):
        super().__init__(name=LAYER_MODULE)
        self.config = config
        self.moe_impl = moe_impl
        self.mesh_kernel = mesh_kernel
        self.routing = routing    # also return the router's (probs, gates, experts)

    def __call__(self, h, k_old, v_old, positions, start, old_valid, new_valid):
        c = self.config
        eps = c.rms_norm_eps
        with jax.named_scope("attention"):
            x = RMSNorm(eps, name="rms_norm")(h)
            # The projections take the Pallas kernel where the MoE may (decoding, in place), on
            # one device: on a mesh GSPMD would gather their weights for the custom call.
            kernel = {"auto": "auto", "pallas": "always"}.get(self.moe_impl, "off")
            kernel = "off" if self.mesh_kernel is not None else kernel
            o, k_new, v_new = Attention(c, kernel)(x, k_old, v_old, positions, start, old_valid,
                                                   new_valid)
            h = h + RMSNorm(eps, name="rms_norm_1")(o).astype(jnp.float32)
        with jax.named_scope("moe"):
            x = RMSNorm(eps, name="rms_norm_2")(h)
            probs, gates, experts = Router(c).route(x)
            m = MoE(c, self.moe_impl, self.mesh_kernel)(x, gates, experts)
            h = h + RMSNorm(eps, name="rms_norm_3")(m).astype(jnp.float32)
        if self.routing:
            return h, k_new, v_new, (probs, gates, experts)
        return h, k_new, v_new


class InOutEmbed(hk.Module):
    """The token embedding, shared (tied) by the input lookup and the output logits."""

    def __init__(self, config: GrokConfig):
        super().__init__(name=EMBED_MODULE.rsplit("/", 1)[-1])
        self.config = config

    def _table(self) -> jax.Array:
        c = self.config
        shape = [c.vocab_size, c.emb_size]
        table = hk.get_parameter("embeddings", shape, BF16, init=_no_init)
        return table if table.dtype == jnp.float32 else table.astype(BF16)

    def embed(self, tokens: jax.Array) -> jax.Array:
        rows = self._table()[tokens].astype(jnp.float32)
        return rows * self.config.embedding_multiplier_scale

    def logits(self, h: jax.Array) -> jax.Array:
        out = dot("btd,vd->btv", h, self._table())
        return out * self.config.output_multiplier_scale


def _embed_fn(config: GrokConfig, tokens: jax.Array) -> jax.Array:
    with hk.name_scope(EMBED_MODULE.split("/")[0]):
        return InOutEmbed(config).embed(tokens)


def _logits_fn(config: GrokConfig, h: jax.Array) -> jax.Array:
    with hk.name_scope(EMBED_MODULE.split("/")[0]):
        h = RMSNorm(config.rms_norm_eps, name=FINAL_NORM_MODULE.rsplit("/", 1)[-1])(h)
        return InOutEmbed(config).logits(h)


# --- pure functions -----------------------------------------------------------------------------

def forward(params: dict[str, Any], tokens: jax.Array, cache: KVCache, start: jax.Array, *,
            config: GrokConfig, attend_len: int | None = None, rows: jax.Array | None = None,
            logit_index: jax.Array | None = None, moe_impl: str = "auto",
            unroll: int | bool = 1, mesh_kernel: Any = None, routing: bool = False) -> Any:
    """Run `tokens` [B, T] at positions start[b] .. start[b] + T - 1 and write their keys and
    values into those cache slots.

    The tokens attend to the first `attend_len` cache slots (default: all; bucket it to the live
    context when decoding) and to each other, causally. `attend_len=0` starts fresh sequences
    (prefill): the old cache is not read, and the rows are cleared before the write. `rows` [B]
    picks the cache rows to write (default: row b for token row b; only with attend_len=0).
    Returns float32 logits [B, T, V], or [B, V] at `logit_index` [B] when given, and the cache.
    `unroll` layers run per step of the scanned model's layer loop (True: all, a straight-line
    program: no per-layer loop overhead on a GPU, a longer compile). `mesh_kernel`
    (grok.moe_mesh.kernel_plan) runs the MoE kernels per device on a multi-device mesh.
    `routing=True` also returns what each layer's router decided, as a third value
    (probs [L, B, T, E] float32, gates [L, B, T, k] float32, experts [L, B, T, k] int32).
    """
    b, t = tokens.shape
    attend_len = cache.length if attend_len is None else attend_len
    if rows is not None and attend_len:
        raise ValueError("rows= is for prefilling fresh sequences (attend_len=0)")
    rows = jnp.arange(b) if rows is None else rows.astype(jnp.int32)
    start = start.astype(jnp.int32)
    positions = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    new_valid = tokens > config.pad_token

    embed = hk.without_apply_rng(hk.transform(lambda x: _embed_fn(config, x)))
    layer = hk.without_apply_rng(hk.transform(
        lambda *a: DecoderLayer(config, moe_impl, mesh_kernel, routing)(*a)))
    unembed = hk.without_apply_rng(hk.transform(lambda x: _logits_fn(config, x)))

    def one_layer(h, layer_params, k_cache, v_cache):
        k_old = k_cache[:, :, :attend_len] if attend_len else None
        v_old = v_cache[:, :, :attend_len] if attend_len else None
        return layer.apply(layer_params, h, k_old, v_old, positions, start, cache.valid,
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
                                                      unroll=unroll)
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
        valid = cache.valid if attend_len else cache.valid.at[rows].set(False)
        valid = valid.at[rows[:, None], positions].set(new_valid, mode="drop")
        cache = KVCache(write(cache.k, k_new), write(cache.v, v_new), valid)

    with jax.named_scope("logits"):
        if logit_index is not None:
            h = jnp.take_along_axis(h, logit_index[:, None, None].astype(jnp.int32), axis=1)
        logits = unembed.apply(params["embed"], h)
        if logit_index is not None:
            logits = logits[:, 0]
    if routing:
        return logits, cache, routes[0]
    return logits, cache
