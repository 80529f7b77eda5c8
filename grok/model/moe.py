"""Top-k routed mixture of experts over int8 expert weights (SPEC §2, the MoE block).

Evaluations with the same results (up to bfloat16 rounding and summation order):
- "dense": every expert on every token, weighted by a gate matrix that is zero off the chosen
  experts (the release's way; E/k times the work; kept as the reference for tests/benchmarks);
- "gather": each (token, choice) multiplies its expert's weights taken by index (XLA copies the
  taken slices; fine for a handful of tokens);
- "grouped": the (token, choice) rows are sorted by expert into blocks of `bm` rows (no row is
  ever dropped: a busy expert gets several blocks) and a scan runs each block through its
  expert's MLP; blocks with no rows are skipped by a cond, so only the chosen experts' weights
  are read (XLA; the default on CPU, for decoding and prefill alike);
- "pallas": the same blocks through `grok.kernels` (`gated_block_matmul` for gelu(x w1) * (x wv),
  `block_matmul` for w2), Pallas kernels that read each block's expert weights in place as int8
  (Triton on GPU; elsewhere the Pallas interpreter, which is slow: tests only);
- "tokamax": the (token, choice) rows sorted by expert and run through `tokamax.ragged_dot`
  with the weights as qwix QArrays (grok.kernels.tokamax_moe: Mosaic kernels on GPU and TPU, its
  XLA implementation on CPU); "grouped" is its reference.
Which one runs is the execution plan's choice (`plan.moe_path`, grok.kernels.plan): the one
kernel-or-reference branch, in `moe` below.

Inside the layer scan the expert weights arrive stacked over layers, [L, E, In, Out], with the
layer's index: slicing a layer out of the stack would copy it (XLA cannot hand a custom call a
slice in place), so every evaluation indexes (layer, expert) itself, and the kernel reads the
chosen experts straight out of the stack.

The XLA paths do not use `jax.lax.ragged_dot`: on CPU (jax 0.10) it lowers to a masked dense
product over every group, and on GPU it was measured reading every expert even for empty groups.
"""
from __future__ import annotations

import functools
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp

from grok.config import GrokConfig
from grok.kernels.plan import ExecutionPlan, block_rows_for
from grok.quant import BF16, LayerSlice, QuantizedWeight, dot, qeinsum



class Router(hk.Module):
    """Softmax router in float32; the chosen experts' gates are their probabilities (no renorm)."""

    def __init__(self, config: GrokConfig):
        super().__init__(name="router")
        self.config = config

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [B, T, D] -> gates [B, T, k] float32 and experts [B, T, k] int32 (most probable
        first)."""
        _, gates, experts = self.route(x)
        return gates, experts

    def route(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(probs [B, T, E], gates, experts): also the full distribution (grok.model.routing)."""
        w = hk.get_parameter("w", [x.shape[-1], self.config.num_experts], jnp.float32,
                             init=jnp.zeros)
        logits = jnp.einsum("btd,de->bte", x.astype(jnp.float32), w.astype(jnp.float32))
        cap = self.config.router_logit_cap
        if cap:   # Grok-2: tanh-capped logits, then the softmax over all experts
            logits = cap * jnp.tanh(logits / cap)
        probs = jax.nn.softmax(logits, axis=-1)
        gates, experts = jax.lax.top_k(probs, self.config.num_selected_experts)
        return probs, gates, experts


class _ExpertWeight(hk.Module):
    def __call__(self, shape: list[int]) -> QuantizedWeight:
        return hk.get_parameter("w", shape, jnp.int8, init=_unset)


def _unset(shape, dtype):
    raise ValueError("MoE weights come from a checkpoint")


class MoE(hk.Module):
    """gelu(x W1) * (x Wv) W2 per chosen expert, summed with the router's gates. In the scanned
    model the weights arrive as LayerSlices: the whole stack and the layer's index."""

    def __init__(self, config: GrokConfig, plan: ExecutionPlan):
        super().__init__(name="moe")
        self.config = config
        self.plan = plan

    def __call__(self, x: jax.Array, gates: jax.Array, experts: jax.Array) -> jax.Array:
        """x [B, T, D] bfloat16 -> float32 [B, T, D] (rounded by the norm that follows)."""
        c = self.config
        b, t, d = x.shape
        e, f = c.num_experts, c.ffn_size
        w1 = _ExpertWeight(name="linear")([e, d, f])
        wv = _ExpertWeight(name="linear_v")([e, d, f])
        w2 = _ExpertWeight(name="linear_1")([e, f, d])
        layer = None
        if isinstance(w1, LayerSlice):
            layer = w1.layer
            w1, wv, w2 = w1.stack, wv.stack, w2.stack
        return moe(x.reshape(b * t, d), gates.reshape(b * t, -1), experts.reshape(b * t, -1),
                   w1, wv, w2, self.plan, layer=layer, exact_gelu=c.exact_gelu).reshape(b, t, d)


def moe(x: jax.Array, gates: jax.Array, experts: jax.Array, w1, wv, w2, plan: ExecutionPlan,
        layer: jax.Array | int | None = None, exact_gelu: bool = False) -> jax.Array:
    """The MoE block on flat tokens: x [N, D] bfloat16, gates [N, k] float32, experts [N, k] int,
    stacked expert weights w1, wv [E, D, F] and w2 [E, F, D] (QuantizedWeights or float)
    -> float32 [N, D]. With `layer`, the weights are [L, E, In, Out] and layer `layer`'s experts
    are used, read in place. The evaluation is `plan.moe_path`'s; `exact_gelu`: erf GELU (our
    Pallas kernels compute the tanh form: grouped XLA runs instead)."""
    n, k = experts.shape
    impl = plan.moe_path(n * k, w1, wv, w2)
    gelu = functools.partial(jax.nn.gelu, approximate=not exact_gelu)
    if impl == "dense":
        if layer is not None:   # the reference evaluation takes the layer's slice
            w1, wv, w2 = w1[layer], wv[layer], w2[layer]
        return _dense(x, gates, experts, w1, wv, w2, plan, gelu)
    if impl == "gather":
        return _gather(x, gates, experts, w1, wv, w2, plan, layer, gelu)
    if impl == "tokamax":
        return _ragged(x, gates, experts, w1, wv, w2, plan, layer, exact_gelu)
    kernels = impl == "pallas" and not exact_gelu
    bm = block_rows_for(n * k, w1.shape[-3], "pallas" if kernels else "grouped")
    return grouped(x, gates, experts, w1, wv, w2, bm, plan, layer, kernels=kernels, gelu=gelu)


# Elementwise work runs in float32 between the bfloat16 matmul inputs (fewer roundings).
def _dense(x, gates, experts, w1, wv, w2, plan, gelu=jax.nn.gelu):
    f32 = jnp.float32
    hidden = gelu(qeinsum("ni,eio->neo", x, w1, plan)) \
        * qeinsum("ni,eio->neo", x, wv, plan)                                  # [N, E, F]
    y = qeinsum("nei,eio->neo", hidden.astype(BF16), w2, plan)                # [N, E, D]
    gate_matrix = jnp.zeros(y.shape[:2], f32).at[
        jnp.arange(x.shape[0])[:, None], experts].set(gates)
    return dot("ne,ned->nd", gate_matrix, y, plan)


def _take(w, experts: jax.Array, layer=None):
    """The chosen experts' weights [N, k, In, Out], taken by index."""
    return w[experts] if layer is None else w[layer, experts]


def _gather(x, gates, experts, w1, wv, w2, plan, layer=None, gelu=jax.nn.gelu):
    chosen = jnp.broadcast_to(x[:, None, :], (*experts.shape, x.shape[-1]))    # [N, k, D]
    per_token = lambda a, w: qeinsum("nki,nkio->nko", a, _take(w, experts, layer), plan)
    hidden = gelu(per_token(chosen, w1)) * per_token(chosen, wv)                # [N, k, F]
    y = per_token(hidden.astype(BF16), w2)                                      # [N, k, D]
    return dot("nk,nkd->nd", gates, y, plan)


def _ragged(x, gates, experts, w1, wv, w2, plan, layer=None, exact_gelu=False):
    """The rows sorted by expert (route_blocks with one-row blocks gives each its sorted
    position) through the plan's ragged-dot kernel, then back in (token, choice) order."""
    n, k = experts.shape
    slot, _, _ = route_blocks(experts, w1.shape[-3], 1)
    counts = jnp.zeros((w1.shape[-3],), jnp.int32).at[experts.reshape(-1)].add(1)
    source = jnp.zeros((n * k,), jnp.int32).at[slot].set(jnp.arange(n * k, dtype=jnp.int32) // k)
    y = plan.ragged_mlp(x[source], counts, w1, wv, w2, layer, exact_gelu)      # [N*k, D]
    return dot("nk,nkd->nd", gates, y[slot].reshape(n, k, -1), plan)


# --- grouped: (token, choice) rows sorted by expert into blocks of bm rows ------------------------

def num_blocks(assignments: int, num_experts: int, bm: int) -> int:
    """A static bound on the blocks any routing of A assignments can fill:
    sum_e ceil(count_e / bm) <= (A + min(E, A) (bm - 1)) / bm, and each block holds a row."""
    a = assignments
    return min(a, (a + min(num_experts, a) * (bm - 1)) // bm)


def route_blocks(experts: jax.Array, num_experts: int, bm: int):
    """Lay the (token, choice) assignments [N, k] out in expert-sorted blocks of `bm` rows.

    Returns slot [N*k] (each assignment's row in the [G*bm] block layout), block_expert [G] and
    block_rows [G] (valid rows of each block; 0 for blocks this routing leaves unused). Built from
    one-hot counts and comparisons, with no sort and no search loop: on a GPU each of those is a
    chain of small kernels (a search is a while loop synchronising with the host) in every layer.
    """
    flat = experts.reshape(-1).astype(jnp.int32)
    groups = num_blocks(flat.shape[0], num_experts, bm)
    onehot = (flat[:, None] == jnp.arange(num_experts, dtype=jnp.int32)).astype(jnp.int32)
    counts = onehot.sum(axis=0)                                              # [E]
    # Each assignment's rank among its expert's, in arrival order (what a stable sort gives).
    rank = jnp.sum((jnp.cumsum(onehot, axis=0) - onehot) * onehot, axis=1)   # [A]
    nblocks = (counts + bm - 1) // bm
    block_end = jnp.cumsum(nblocks)
    block_start = block_end - nblocks
    slot = jnp.sum(onehot * block_start, axis=1) * bm + rank
    g = jnp.arange(groups, dtype=jnp.int32)
    block_expert = jnp.sum(g[:, None] >= block_end[None, :], axis=1, dtype=jnp.int32)
    block_expert = jnp.minimum(block_expert, num_experts - 1)
    rows = counts[block_expert] - (g - block_start[block_expert]) * bm
    block_rows = jnp.where(g < block_end[-1], jnp.clip(rows, 0, bm), 0).astype(jnp.int32)
    return slot.astype(jnp.int32), block_expert, block_rows


def grouped(x, gates, experts, w1, wv, w2, bm: int, plan: ExecutionPlan, layer=None,
            kernels: bool = False, gelu: Any = jax.nn.gelu) -> jax.Array:
    """The grouped evaluation with blocks of `bm` rows (public for tuning and tests): XLA, or
    the Pallas kernels (tanh GELU) with `kernels`."""
    n, k = experts.shape
    slot, block_expert, block_rows = route_blocks(experts, w1.shape[-3], bm)
    groups = block_expert.shape[0]
    # The token in each block row (n for none: read as a zero row).
    source = jnp.full((groups * bm,), n, jnp.int32).at[slot].set(
        jnp.arange(n * k, dtype=jnp.int32) // k)
    xb = jnp.take(x, source, axis=0, mode="fill", fill_value=0).reshape(groups, bm, -1)
    if kernels:
        y = plan.expert_kernels(xb, block_expert, block_rows, w1, wv, w2, layer)
    else:
        y = _xla_mlp(xb, block_expert, block_rows, w1, wv, w2, plan, layer, gelu)  # [G, bm, D]
    y = y.reshape(groups * bm, -1)[slot].reshape(n, k, -1)                 # [N, k, D]
    return dot("nk,nkd->nd", gates, y, plan)


def _xla_mlp(xb, block_expert, block_rows, w1, wv, w2, plan, layer=None, gelu=jax.nn.gelu):
    """Each non-empty block through its expert's MLP, one block per scan step (XLA copies each
    block's expert weight [In, Out] out of the stack before its dot)."""
    f32 = jnp.float32
    at = (lambda w, e: w[e]) if layer is None else (lambda w, e: w[layer, e])
    linear = lambda a, w: qeinsum("...i,io->...o", a, w, plan)

    def mlp(xg, e):
        hidden = gelu(linear(xg, at(w1, e))) * linear(xg, at(wv, e))
        return linear(hidden.astype(BF16), at(w2, e))

    def skip(xg, e):
        return jnp.zeros((xg.shape[0], w2.shape[-1]), f32)

    def step(_, args):
        xg, e, rows = args
        return None, jax.lax.cond(rows > 0, mlp, skip, xg, e)

    _, y = jax.lax.scan(step, None, (xb, block_expert, block_rows))
    return y
