"""The decoder layer, norms, linear layers and the tied embedding of Grok-1 (SPEC §2), in haiku.

Precision: matmul inputs, attention weights and the KV cache are bfloat16 as in the release;
norms, softmax, router and RoPE run in float32, and so does the residual stream (the release
rounds it to bfloat16 after every add; keeping it float32 costs B*T*D*4 bytes and halves the
error against an exact evaluation on the parity fixtures).
"""
from __future__ import annotations


import haiku as hk
import jax
import jax.numpy as jnp

from grok.config import GrokConfig
from grok.leaves import EMBED_MODULE, FINAL_NORM_MODULE, LAYER_MODULE
from grok.model.attention import Attention
from grok.model.linear import RMSNorm, no_init
from grok.model.moe import MoE, Router
from grok.kernels.plan import ExecutionPlan
from grok.quant import BF16, dot


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
            h = h + RMSNorm(eps, name="rms_norm_3")(m).astype(jnp.float32)
        if self.routing:
            return h, k_new, v_new, (probs, gates, experts)
        return h, k_new, v_new


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

    def logits(self, h: jax.Array) -> jax.Array:
        out = dot("btd,vd->btv", h, self._table(), self.plan)
        return out * self.config.output_multiplier_scale


def embed_tokens(config: GrokConfig, tokens: jax.Array) -> jax.Array:
    with hk.name_scope(EMBED_MODULE.split("/")[0]):
        return InOutEmbed(config).embed(tokens)


def final_logits(config: GrokConfig, plan: ExecutionPlan, h: jax.Array) -> jax.Array:
    with hk.name_scope(EMBED_MODULE.split("/")[0]):
        h = RMSNorm(config.rms_norm_eps, name=FINAL_NORM_MODULE.rsplit("/", 1)[-1])(h)
        return InOutEmbed(config, plan).logits(h)
