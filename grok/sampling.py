"""Per-row token sampling: greedy, temperature, top-k and top-p (nucleus), in one jitted function.

Every row carries its own settings and its own random key, so a sequence's draws never depend
on what else shares the batch.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token. temperature 0 is greedy; top_k 0 means no limit."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) \
                or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")


def filter_logits(logits: jax.Array, temperature: jax.Array, top_p: jax.Array,
                  top_k: jax.Array) -> jax.Array:
    """Scaled float32 logits [B, V] with everything outside each row's top-k / top-p set at -inf."""
    logits = logits.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)[:, None]
    order = jnp.argsort(-logits, axis=-1)
    ranked = jnp.take_along_axis(logits, order, axis=-1)
    rank = jnp.arange(logits.shape[-1])[None, :]
    probs = jax.nn.softmax(ranked, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = (mass_before < top_p[:, None]) | (rank == 0)         # smallest set reaching top_p
    keep &= (top_k[:, None] <= 0) | (rank < top_k[:, None])
    ranked = jnp.where(keep, ranked, -jnp.inf)
    inverse = jnp.argsort(order, axis=-1)
    return jnp.take_along_axis(ranked, inverse, axis=-1)


def sample(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_p: jax.Array,
           top_k: jax.Array) -> jax.Array:
    """Next token per row [B] from logits [B, V]; rows with temperature 0 take the argmax."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    filtered = filter_logits(logits, temperature, top_p, top_k)
    drawn = jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, filtered)
    return jnp.where(temperature > 0, drawn.astype(jnp.int32), greedy)


def row_keys(seeds: jax.Array, steps: jax.Array) -> jax.Array:
    """One key per row from its own seed and the index of the token being drawn."""
    return jax.vmap(lambda s, t: jax.random.fold_in(jax.random.key(s), t))(seeds, steps)
