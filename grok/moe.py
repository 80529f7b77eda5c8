"""Top-k routed mixture of experts over int8 expert weights (SPEC §2, the MoE block).

Two evaluations with the same results (up to bfloat16 rounding):
- "dense": every expert on every token, weighted by a gate matrix that is zero off the chosen
  experts (the release's way; kept as the reference path for tests and benchmarks);
- "gather": each token multiplies only its chosen experts' weights, taken by index (few tokens).
"auto" takes "gather" while tokens x selected experts <= experts, else "dense".
"""
from __future__ import annotations

import haiku as hk
import jax
import jax.numpy as jnp

from grok.config import GrokConfig
from grok.quant import BF16, QuantizedWeight8bit, dot, expert_qlinear

MOE_IMPLS = ("auto", "dense", "gather")


class Router(hk.Module):
    """Softmax router in float32; the chosen experts' gates are their probabilities (no renorm)."""

    def __init__(self, config: GrokConfig):
        super().__init__(name="router")
        self.config = config

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        w = hk.get_parameter("w", [x.shape[-1], self.config.num_experts], jnp.float32,
                             init=jnp.zeros)
        logits = jnp.einsum("btd,de->bte", x.astype(jnp.float32), w.astype(jnp.float32))
        probs = jax.nn.softmax(logits, axis=-1)
        gates, experts = jax.lax.top_k(probs, self.config.num_selected_experts)
        return gates, experts


class _ExpertWeight(hk.Module):
    def __call__(self, shape: list[int]) -> QuantizedWeight8bit:
        return hk.get_parameter("w", shape, jnp.int8, init=_unset)


def _unset(shape, dtype):
    raise ValueError("MoE weights come from a checkpoint")


class MoE(hk.Module):
    """gelu(x W1) * (x Wv) W2 per chosen expert, summed with the router's gates."""

    def __init__(self, config: GrokConfig, impl: str = "auto"):
        super().__init__(name="moe")
        if impl not in MOE_IMPLS:
            raise ValueError(f"moe_impl must be one of {MOE_IMPLS}, got {impl!r}")
        self.config = config
        self.impl = impl

    def __call__(self, x: jax.Array, gates: jax.Array, experts: jax.Array) -> jax.Array:
        """x [B, T, D] bfloat16 -> float32 [B, T, D] (rounded by the norm that follows)."""
        c = self.config
        b, t, d = x.shape
        e, f = c.num_experts, c.ffn_size
        w1 = _ExpertWeight(name="linear")([e, d, f])
        wv = _ExpertWeight(name="linear_v")([e, d, f])
        w2 = _ExpertWeight(name="linear_1")([e, f, d])
        tokens = x.reshape(b * t, d)
        gates = gates.reshape(b * t, -1)
        experts = experts.reshape(b * t, -1)
        impl = self.impl
        if impl == "auto":
            impl = "gather" if b * t * c.num_selected_experts <= e else "dense"
        if impl == "dense":
            out = _dense(tokens, gates, experts, w1, wv, w2)
        else:
            out = _gather(tokens, gates, experts, w1, wv, w2)
        return out.reshape(b, t, d)


# Elementwise work runs in float32 between the bfloat16 matmul inputs (fewer roundings).
def _dense(x, gates, experts, w1, wv, w2):
    f32 = jnp.float32
    hidden = jax.nn.gelu(expert_qlinear(x, w1, f32)) * expert_qlinear(x, wv, f32)  # [N, E, F]
    y = expert_qlinear(hidden.astype(BF16), w2, f32)                               # [N, E, D]
    gate_matrix = jnp.zeros(y.shape[:2], jnp.float32).at[
        jnp.arange(x.shape[0])[:, None], experts].set(gates)
    return dot("ne,ned->nd", gate_matrix, y)


def _take(w: QuantizedWeight8bit, experts: jax.Array) -> QuantizedWeight8bit:
    """The chosen experts' weights [N, k, In, Out], taken by index."""
    return QuantizedWeight8bit(w.weight[experts], w.scales[experts])


def _per_token_qlinear(x: jax.Array, w: QuantizedWeight8bit) -> jax.Array:  # float32 out
    """x [N, k, In] times per-(token, choice) int8 weights [N, k, In, Out], scaled per row block."""
    n, k, rows, cols = w.weight.shape
    blocks = w.scales.shape[-2]
    xb = x.reshape(n, k, blocks, rows // blocks)
    wb = w.weight.reshape(n, k, blocks, rows // blocks, cols).astype(x.dtype)
    y = dot("nksi,nksio->nkso", xb, wb)
    return jnp.einsum("nkso,nkso->nko", y, w.scales.astype(jnp.float32))


def _gather(x, gates, experts, w1, wv, w2):
    chosen = jnp.broadcast_to(x[:, None, :], (*experts.shape, x.shape[-1]))    # [N, k, D]
    hidden = jax.nn.gelu(_per_token_qlinear(chosen, _take(w1, experts))) \
        * _per_token_qlinear(chosen, _take(wv, experts))                        # [N, k, F]
    y = _per_token_qlinear(hidden.astype(BF16), _take(w2, experts))             # [N, k, D]
    return dot("nk,nkd->nd", gates, y)
