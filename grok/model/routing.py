"""Which experts each layer routes each token to: `Grok.routing(tokens)` -> `Routing`.

The numbers come from the model's own forward pass (`grok.model.forward(..., routing=True)`,
the same `grok.model.moe.Router` the MoE blocks use), so they are exactly what the MoE used.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from grok.config import GrokConfig
from grok.kernels.plan import ExecutionPlan
from grok.model import forward, init_cache


@dataclasses.dataclass(frozen=True)
class Routing:
    """The router's decisions for one token list ([L, T, ...] arrays) or a batch ([B, L, T, ...]).

    experts  int32 [L, T, k]    the chosen experts of each layer and token, most probable first;
    weights  float32 [L, T, k]  their gate weights: what the MoE multiplies each chosen expert's
                                output by, the router probabilities themselves (SPEC §2: not
                                renormalised, so a token's weights sum to at most 1);
    probs    float32 [L, T, E]  the router's full softmax over all E experts;
    tokens   int32 [T]          the token ids routed.
    In a batch of lists of different lengths, positions past a list's end hold experts -1,
    weights 0, probs 0 and tokens -1.
    """

    experts: np.ndarray
    weights: np.ndarray
    probs: np.ndarray
    tokens: np.ndarray

    @property
    def num_layers(self) -> int:
        return int(self.experts.shape[-3])

    @property
    def num_experts(self) -> int:
        return int(self.probs.shape[-1])

    def expert_counts(self) -> np.ndarray:
        """int64 [L, E] (or [B, L, E]): how many tokens each layer sent to each expert."""
        onehot = self.experts[..., None] == np.arange(self.num_experts)   # [..., L, T, k, E]
        return onehot.sum(axis=(-3, -2))


def routing_arrays(params: dict[str, Any], tokens: jax.Array, *, config: GrokConfig,
                   scan: bool = True, plan: ExecutionPlan | None = None
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A full causal forward over tokens [B, T] (pad_token positions masked, as `Grok.logits`)
    -> (experts [B, L, T, k] int32, weights [B, L, T, k] float32, probs [B, L, T, E] float32).
    Pure and jittable; the logits and the cache it also computes are dropped (and so not
    computed under jit)."""
    b, t = tokens.shape
    cache = init_cache(config, b, t, scan)
    _, _, (probs, gates, experts) = forward(params, tokens, cache, jnp.zeros((b,), jnp.int32),
                                            config=config, attend_len=0, plan=plan, routing=True)
    batch_first = lambda a: jnp.moveaxis(a, 0, 1)   # [L, B, ...] -> [B, L, ...]
    return (batch_first(experts).astype(jnp.int32), batch_first(gates).astype(jnp.float32),
            batch_first(probs).astype(jnp.float32))


def jitted(config: GrokConfig, scan: bool, plan: ExecutionPlan | None = None):
    """`routing_arrays` for one model, jitted (compiled once per token shape)."""
    return jax.jit(lambda params, tokens: routing_arrays(
        params, tokens, config=config, scan=scan, plan=plan))


def from_arrays(experts: np.ndarray, weights: np.ndarray, probs: np.ndarray,
                lists: list[list[int]], single: bool) -> Routing:
    """The `Routing` of token `lists` from padded [B, L, T_pad, ...] arrays: cut to the longest
    list, positions past each list's end blanked (experts -1, weights and probs 0)."""
    longest = max(len(t) for t in lists)
    experts = np.array(experts[:, :, :longest], np.int32)
    weights = np.array(weights[:, :, :longest], np.float32)
    probs = np.array(probs[:, :, :longest], np.float32)
    tokens = np.full((len(lists), longest), -1, np.int32)
    for row, ids in enumerate(lists):
        tokens[row, :len(ids)] = ids
        experts[row, :, len(ids):] = -1
        weights[row, :, len(ids):] = 0
        probs[row, :, len(ids):] = 0
    if single:
        return Routing(experts[0], weights[0], probs[0], tokens[0])
    return Routing(experts, weights, probs, tokens)
