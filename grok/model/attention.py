"""Grouped-query attention with RoPE and a tanh-capped score (SPEC §2), as a haiku module.

Einsum letters: b batch, t query positions, u new keys, s cache slots, h kv heads, g query heads
per kv head, k head dim.
"""
from __future__ import annotations

import functools
import math

import haiku as hk
import jax
import jax.numpy as jnp

from grok.config import GrokConfig
from grok.kernels.plan import ExecutionPlan
from grok.model.linear import Linear
from grok.quant import BF16, dot, linears

NEG_INF = -1e30


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


def attention_temperature(positions: jax.Array, length: int) -> jax.Array | None:
    """Grok-2's attention temperature for queries at absolute positions [B, T]: log2(p) /
    log2(length) past `length`, else 1, shaped [B, 1, 1, T, 1] against scores [B, H, G, T, S];
    None where the config has none (length 0)."""
    if not length:
        return None
    p = positions.astype(jnp.float32)
    factor = jnp.where(p > length, jnp.log2(jnp.maximum(p, 1.0)) / math.log2(length), 1.0)
    return factor[:, None, None, :, None]


class Attention(hk.Module):
    """Grouped-query attention with RoPE and a tanh-capped score.

    The new tokens attend to the cache's first A slots (`k_old`, `v_old` [B, Hkv, A, K], read
    only, None for fresh sequences) and causally to each other. Their own keys and values are
    returned for the caller to write into the cache, so no layer copies its cache.
    """

    def __init__(self, config: GrokConfig, plan: ExecutionPlan):
        super().__init__(name="multi_head_attention")
        self.config = config
        self.plan = plan

    def __call__(self, x, k_old, v_old, positions, start, old_valid, new_valid):
        c = self.config
        b, t, _ = x.shape
        groups = c.num_q_heads // c.num_kv_heads
        # Projections stay float32 through RoPE and are rounded to bfloat16 once. Decoding, the
        # kernel computes all three in one launch.
        linear = functools.partial(Linear, plan=self.plan)
        weights = [linear(size, name=name).weight(x.shape[-1]) for size, name in
                   ((c.q_size, "query"), (c.kv_size, "key"), (c.kv_size, "value"))]
        q, k, v = linears(x, weights, self.plan, jnp.float32)
        q = q.reshape(b, t, c.num_q_heads, c.key_size)
        k = k.reshape(b, t, c.num_kv_heads, c.key_size)
        v = v.astype(BF16).reshape(b, t, c.num_kv_heads, c.key_size)
        q = rope(q, positions, c.rope_base).astype(BF16)
        q = q.reshape(b, t, c.num_kv_heads, groups, c.key_size)
        k = rope(k, positions, c.rope_base).astype(BF16)

        causal = jnp.arange(t)[None, :] <= jnp.arange(t)[:, None]               # [T, U]
        # (scores, mask, values, einsum) over the new tokens and, when reading the cache, its slots.
        parts = [(dot("bthgk,buhk->bhgtu", q, k, self.plan), new_valid[:, None, :] & causal[None], v,
                  "bhgtu,buhk->bthgk")]
        if k_old is not None:
            slots = jnp.arange(k_old.shape[2])
            old = old_valid[:, :k_old.shape[2]] & (slots[None, :] < start[:, None])   # [B, S]
            parts.insert(0, (dot("bthgk,bhsk->bhgts", q, k_old, self.plan), old[:, None, :], v_old,
                             "bhgts,bhsk->bthgk"))
        # One softmax over all parts without concatenating them (each part's scores stay where
        # its matmul wrote them): exp(x - max) / sum, as jax.nn.softmax, with shared max and sum.
        temperature = attention_temperature(positions, c.attn_temperature_len)
        capped = []
        for scores, mask, _, _ in parts:
            scores = scores * c.attn_output_multiplier
            scores = c.attn_logit_cap * jnp.tanh(scores / c.attn_logit_cap)
            if temperature is not None:   # (after the cap, as SGLang runs Grok-2)
                scores = scores * temperature
            capped.append(jnp.where(mask[:, None, None], scores, NEG_INF))
        top = jax.lax.stop_gradient(
            functools.reduce(jnp.maximum, [x.max(axis=-1, keepdims=True) for x in capped]))
        exps = [jnp.exp(x - top) for x in capped]
        total = functools.reduce(jnp.add, [e.sum(axis=-1, keepdims=True) for e in exps])
        out = None
        for e, (_, _, values, spec) in zip(exps, parts):
            term = dot(spec, (e / total).astype(BF16), values, self.plan)
            out = term if out is None else out + term
        out = out.astype(BF16).reshape(b, t, c.q_size)
        return linear(c.emb_size, name="linear")(out, jnp.float32), k, v
