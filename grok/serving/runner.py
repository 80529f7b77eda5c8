"""Jitted prefill, decode and full-forward steps of one model (compiled once per shape)."""
from __future__ import annotations

import collections
import logging
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from grok.config import GrokConfig
from grok.leaves import EMBED_MODULE, is_scanned
from grok.model import KVCache, forward, init_cache
from grok.model.paged import copy_pages, init_pool
from grok.parallel.rules import Placement
from grok.kernels.plan import ExecutionPlan, resolve_plan
from grok.serving.sampling import MAX_LOGPROBS, sample, token_logprobs

log = logging.getLogger(__name__)


def with_compute_embedding(params: dict[str, Any], dtype: Any) -> dict[str, Any]:
    """The params with the embedding in the plan's compute dtype: where dots widen their operands
    (CPU) its bfloat16 values widened to float32 once here, instead of by every logits dot."""
    table = params["embed"][EMBED_MODULE]["embeddings"]
    if table.dtype == dtype:
        return params
    embed = {**params["embed"], EMBED_MODULE: {"embeddings": table.astype(dtype)}}
    return {**params, "embed": embed}


class ModelRunner:
    """Jitted prefill / decode / full-forward functions of one model (compiled once per shape)."""

    def __init__(self, params: dict[str, Any], config: GrokConfig, moe_impl: str = "auto",
                 mesh: Any = None, plan: ExecutionPlan | None = None):
        """`moe_impl` (grok.kernels.plan.MOE_IMPLS) is resolved into this runner's execution
        plan for the backend, `mesh` and the params' layout on it, unless `plan` is given."""
        # The Pallas kernels have no partitioning rule (GSPMD would gather their sharded weights):
        # on a multi-device mesh the plan runs them per device where the layout allows.
        self.plan = plan = plan or resolve_plan(moe_impl, params=params, mesh=mesh,
                                                exact_gelu=config.exact_gelu)
        self.params = with_compute_embedding(params, plan.embedding_dtype)
        self.config = config
        self.scan = is_scanned(params)
        self.compiles: collections.Counter[str] = collections.Counter()
        # On a mesh (grok.parallel.rules): params arrive sharded, the cache is made sharded, and the
        # jitted functions pin the cache / logits layouts of their outputs (identity without one).
        self.mesh = mesh
        self.place = place = Placement(mesh, config)
        fwd = dict(config=config, plan=plan)   # see forward

        def prefill(params, cache, tokens, rows, lengths):
            # Prompts [R, P] as fresh sequences, prompt r written straight into cache row
            # rows[r] (a row index past the cache's batch writes nothing: padding).
            logits, cache = forward(params, tokens, cache, jnp.zeros(tokens.shape[:1], jnp.int32),
                                    attend_len=0, rows=rows, logit_index=lengths - 1, **fwd)
            return place.constrain("logits", logits), place.cache(cache)

        def chunk(params, cache, tokens, rows, starts, lengths, attend_len):
            # The next pieces [R, C] of prompts whose first starts[r] tokens are in cache row
            # rows[r]: they attend to those slots and causally to each other.
            logits, cache = forward(params, tokens, cache, starts, attend_len=attend_len,
                                    rows=rows, logit_index=lengths - 1, **fwd)
            return place.constrain("logits", logits), place.cache(cache)

        def copy_rows(cache, sources, targets):
            # Requests that share a prompt: its keys and values copied into each one's row.
            def copy(c, axis):
                taken = jnp.take(c, sources, axis=axis)
                index = (slice(None),) * axis + (targets,)
                return c.at[index].set(taken, mode="drop")
            axis = 1 if self.scan else 0
            k, v = (jax.tree.map(lambda c: copy(c, axis), part) for part in (cache.k, cache.v))
            return place.cache(KVCache(k, v, copy(cache.valid, 0)))

        def paged_prefill(params, pool, tokens, table, starts, lengths, attend_len):
            # Prompt pieces [R, C] from positions starts[r] of the sequences with block tables
            # table [R, n]: they attend to the first attend_len slots (0: none, a fresh prompt)
            # and causally to each other; their keys and values land in their pages.
            logits, pool = forward(params, tokens, pool, starts, attend_len=attend_len,
                                   table=table, logit_index=lengths - 1, **fwd)
            return place.constrain("logits", logits), place.cache(pool)

        def paged_decode(params, pool, tokens, table, positions, attend_len):
            logits, pool = forward(params, tokens[:, None], pool, positions,
                                   attend_len=attend_len, table=table,
                                   logit_index=jnp.zeros_like(positions), **fwd)
            return place.constrain("logits", logits), place.cache(pool)

        def decode(params, cache, tokens, positions, attend_len):
            logits, cache = forward(params, tokens[:, None], cache, positions,
                                    attend_len=attend_len, logit_index=jnp.zeros_like(positions),
                                    **fwd)
            return place.constrain("logits", logits), place.cache(cache)

        def full(params, tokens):
            cache = init_cache(config, tokens.shape[0], tokens.shape[1], self.scan)
            logits, _ = forward(params, tokens, cache, jnp.zeros(tokens.shape[:1], jnp.int32),
                                attend_len=0, **fwd)
            return place.constrain("logits", logits)

        def prompt_logprobs(params, tokens):
            # [B, T - 1]: log p(tokens[:, t + 1] | tokens[:, :t + 1]), the float32 log-softmax of
            # the full forward's logits at position t, and the MAX_LOGPROBS most likely there
            # (values and ids [B, T - 1, k]; only these leave the device, not the logits).
            logp = jax.nn.log_softmax(full(params, tokens)[:, :-1].astype(jnp.float32), axis=-1)
            values, ids = jax.lax.top_k(logp, min(MAX_LOGPROBS, logp.shape[-1]))
            chosen = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
            return chosen, values, ids.astype(jnp.int32)

        self.prefill = jax.jit(self._counted("prefill", prefill), donate_argnums=1)
        self.decode = jax.jit(self._counted("decode", decode), donate_argnums=1,
                               static_argnums=4)
        self.chunk = jax.jit(self._counted("chunk", chunk), donate_argnums=1, static_argnums=6)
        self.paged_prefill = jax.jit(self._counted("paged_prefill", paged_prefill),
                                     donate_argnums=1, static_argnums=6)
        self.paged_decode = jax.jit(self._counted("paged_decode", paged_decode),
                                    donate_argnums=1, static_argnums=5)
        self.copy_pages = jax.jit(self._counted("copy_pages", lambda pool, s, t: place.cache(
            copy_pages(pool, s, t))), donate_argnums=0)
        self.copy_rows = jax.jit(self._counted("copy_rows", copy_rows), donate_argnums=0)
        self.take_rows = jax.jit(lambda logits, rows: jnp.take(logits, rows, axis=0))
        self.full = jax.jit(self._counted("forward", full))
        self.sample = jax.jit(sample)
        # Log-probabilities, called only for the steps and prompts of requests that ask for them.
        self.logprobs = jax.jit(lambda logits, tokens: token_logprobs(logits, tokens,
                                                                      MAX_LOGPROBS))
        self.full_logprobs = jax.jit(self._counted("prompt_logprobs", prompt_logprobs))

    @property
    def moe_impl(self) -> str:
        """The MoE evaluation the plan resolved ("auto": kernels where a call's shapes fit)."""
        return self.plan.moe

    def _counted(self, name: str, fn: Callable) -> Callable:
        def traced(*args):
            shapes = [tuple(a.shape) for a in args if hasattr(a, "shape")]
            self.compiles[name] += 1
            log.info("compiling %s for shapes %s", name, shapes[-3:])
            return fn(*args)
        return traced

    def new_cache(self, batch: int, length: int) -> KVCache:
        return self.place.new_cache(init_cache, self.config, batch, length, self.scan)

    def new_pool(self, pages: int, page_size: int) -> Any:
        """An empty paged KV cache (`grok.model.paged.PagedCache`), placed on the mesh."""
        return self.place.new_cache(init_pool, self.config, pages, page_size, self.scan)

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        return np.asarray(self.full(self.params, self._tokens(tokens)))

    def prompt_logprobs(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each token of `tokens` [B, T] after the first: its log-probability given the ones
        before it (the log-softmax of the full forward's raw logits) [B, T - 1] float32, and the
        MAX_LOGPROBS most likely tokens there, values (descending) and ids [B, T - 1, k]."""
        return tuple(np.asarray(a) for a in self.full_logprobs(self.params,
                                                                self._tokens(tokens)))

    def _tokens(self, tokens: np.ndarray) -> jax.Array:
        if self.mesh is not None:   # a global array, batch over "data" (any process count)
            return self.place.put("tokens", np.asarray(tokens, np.int32))
        return jnp.asarray(tokens, jnp.int32)
