"""The decoder layer, norms, linear layers and the tied embedding of Grok-1 (SPEC §2), in haiku.

Precision: matmul inputs, attention weights and the KV cache are bfloat16 as in the release;
norms, softmax, router and RoPE run in float32, and so does the residual stream (the release
rounds it to bfloat16 after every add; keeping it float32 costs B*T*D*4 bytes and halves the
error against an exact evaluation on the parity fixtures).
"""
from __future__ import annotations

import math

import haiku as hk
import jax
import jax.numpy as jnp

from grok.config import GrokConfig
from grok.leaves import EMBED_MODULE, FINAL_NORM_MODULE, LAYER_MODULE, LM_HEAD_MODULE
from grok.model.attention import Attention
from grok.model.linear import Linear, RMSNorm, no_init
from grok.model.moe import MoE, Router
from grok.kernels.plan import ExecutionPlan
from grok.quant import BF16, dot, linears


class DecoderLayer(hk.Module):
    """Attention and MoE blocks, each wrapped in a pre-norm and a post-norm (sandwich norms)."""

    def __init__(self, config: GrokConfig, plan: ExecutionPlan, routing: bool = False):
        super().__init__(name=LAYER_MODULE)
        self.config = config
        self.plan = plan
        self.routing = routing    # also return the router's (probs, gates, experts)

    def __call__(self, h, k_old, v_old, positions, start, old_valid, new_valid):
        c = self.config
        eps = c.rms_norm_eps
        with jax.named_scope("attention"):
            x = RMSNorm(eps, name="rms_norm")(h)
            o, k_new, v_new = Attention(c, self.plan)(x, k_old, v_old, positions, start,
                                                      old_valid, new_valid)
            h = h + RMSNorm(eps, name="rms_norm_1")(o).astype(jnp.float32)
        with jax.named_scope("moe"):
            x = RMSNorm(eps, name="rms_norm_2")(h)
            probs, gates, experts = Router(c).route(x)
            m = MoE(c, self.plan)(x, gates, experts)
            if c.dense_ffn_size:   # Grok-2: a dense MLP beside the experts, sum kept at scale
                with jax.named_scope("dense_mlp"):
                    m = (m + DenseMLP(c, self.plan)(x)) * (1 / math.sqrt(2))
            h = h + RMSNorm(eps, name="rms_norm_3")(m).astype(jnp.float32)
        if self.routing:
            return h, k_new, v_new, (probs, gates, experts)
        return h, k_new, v_new


class DenseMLP(hk.Module):
    """down(gelu(x gate) * (x up)) over every token: the MLP beside the experts (Grok-2)."""

    def __init__(self, config: GrokConfig, plan: ExecutionPlan):
        super().__init__(name="dense_mlp")
        self.config = config
        self.plan = plan

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, T, D] bfloat16 -> float32 [B, T, D]."""
        c = self.config
        gate, up = (Linear(c.dense_ffn_size, name=name, plan=self.plan).weight(x.shape[-1])
                    for name in ("linear", "linear_v"))
        g, u = linears(x, [gate, up], self.plan, jnp.float32)
        hidden = jax.nn.gelu(g, approximate=not c.exact_gelu) * u
        return Linear(c.emb_size, name="linear_1", plan=self.plan)(hidden.astype(BF16),
                                                                   jnp.float32)


class InOutEmbed(hk.Module):
    """The token embedding, shared (tied) by the input lookup and the output logits."""

    def __init__(self, config: GrokConfig, plan: ExecutionPlan | None = None):
        super().__init__(name=EMBED_MODULE.rsplit("/", 1)[-1])
        self.config = config
        self.plan = plan    # needed by `logits` only

    def _table(self) -> jax.Array:
        c = self.config
        shape = [c.vocab_size, c.emb_size]
        table = hk.get_parameter("embeddings", shape, BF16, init=no_init)
        return table if table.dtype == jnp.float32 else table.astype(BF16)

    def embed(self, tokens: jax.Array) -> jax.Array:
        rows = self._table()[tokens].astype(jnp.float32)
        return rows * self.config.embedding_multiplier_scale

    def logits(self, h: jax.Array, table: jax.Array | None = None) -> jax.Array:
        """The output logits: h times the tied table, or `table` (a separate lm_head [V, D]),
        times the output scale, then (Grok-2) the final tanh cap."""
        c = self.config
        table = self._table() if table is None else table
        out = dot("btd,vd->btv", h, table, self.plan) * c.output_multiplier_scale
        if c.final_logit_cap:
            out = c.final_logit_cap * jnp.tanh(out / c.final_logit_cap)
        return out


class LMHead(hk.Module):
    """The output matrix [V, D] of a model whose embedding is not tied (Grok-2's lm_head)."""

    def __init__(self, config: GrokConfig):
        super().__init__(name=LM_HEAD_MODULE.rsplit("/", 1)[-1])
        self.config = config

    def __call__(self) -> jax.Array:
        c = self.config
        table = hk.get_parameter("embeddings", [c.vocab_size, c.emb_size], BF16, init=no_init)
        return table if table.dtype == jnp.float32 else table.astype(BF16)


def embed_tokens(config: GrokConfig, tokens: jax.Array) -> jax.Array:
    with hk.name_scope(EMBED_MODULE.split("/")[0]):
        return InOutEmbed(config).embed(tokens)


def final_logits(config: GrokConfig, plan: ExecutionPlan, h: jax.Array) -> jax.Array:
    with hk.name_scope(EMBED_MODULE.split("/")[0]):
        h = RMSNorm(config.rms_norm_eps, name=FINAL_NORM_MODULE.rsplit("/", 1)[-1])(h)
        table = None if config.tied_embedding else LMHead(config)()
        return InOutEmbed(config, plan).logits(h, table)
