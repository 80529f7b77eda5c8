"""The engine's device side: the paged KV cache and the calls that read and write it (a prefill
of prompt pieces, a decode step, a copy of pages), each with the sampler over its logits.

Every method takes host values only (numpy arrays, ints, `Draw`) and says in its arguments all
it needs: a multi-host leader (`grok.serving.lockstep`) replays each call on the other processes
by sending the method's name and arguments, so that they run the same programs on their part of
the cache. One thread at a time calls it (the engine's stepping thread).
"""
from __future__ import annotations

import collections
import logging
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from grok.serving.batching import Draw
from grok.serving.runner import ModelRunner
from grok.serving.sampling import row_keys

log = logging.getLogger(__name__)


class Drawn(NamedTuple):
    """A device call's tokens [R] and, when a row asked for them, their log-probabilities
    (`grok.serving.sampling.token_logprobs`: chosen [R], top values [R, k], top ids [R, k]); an
    exception there fails only the requests that asked."""

    tokens: np.ndarray
    scores: tuple[np.ndarray, np.ndarray, np.ndarray] | Exception | None


class DeviceSteps:
    """The paged KV cache and the engine's device calls on it, with counters of the shapes they
    ran (each new shape is a compile)."""

    # The methods a multi-host leader replays on the other processes (grok.serving.lockstep).
    REPLAYED = ("new_pool", "drop_cache", "prefill", "decode", "copy_pages", "prompt_logprobs")

    def __init__(self, runner: ModelRunner):
        self.runner = runner
        self.cache: Any = None
        self.allocations = 0
        self.prefill_shapes: collections.Counter[tuple[int, int]] = collections.Counter()  # R, P
        self.chunk_shapes: collections.Counter[tuple[int, int]] = collections.Counter()    # R, C
        self.attend_spans: collections.Counter[int] = collections.Counter()  # decode steps by span

    def new_pool(self, pages: int, page_size: int) -> None:
        """Replace the cache by an empty pool of `pages` pages of `page_size` slots (the old
        one is freed first)."""
        self.cache = None
        self.cache = self.runner.new_pool(pages, page_size)
        self.allocations += 1

    def drop_cache(self) -> None:
        self.cache = None

    @property
    def lost(self) -> bool:
        """Whether the cache went with a failed call (it was donated): to be re-made."""
        return self.cache is not None and any(getattr(x, "is_deleted", lambda: False)()
                                              for x in jax.tree.leaves(self.cache))

    def prefill(self, tokens: np.ndarray, table: np.ndarray, starts: np.ndarray,
                lengths: np.ndarray, attend: int, draw: Draw | None = None,
                take: np.ndarray | None = None) -> Drawn | None:
        """Prompt pieces `tokens` [R, C] (`lengths` [R] real) from positions `starts` [R] of the
        sequences with block tables `table` [R, n], attending over their first `attend` slots
        (0: fresh prompts); then, with `draw`, a token for each of its rows i from logits row
        `take[i]` (default: row i)."""
        (self.chunk_shapes if attend else self.prefill_shapes)[tokens.shape] += 1
        logits, self.cache = self.runner.paged_prefill(
            self.runner.params, self.cache, jnp.asarray(tokens), jnp.asarray(table),
            jnp.asarray(starts), jnp.asarray(lengths), int(attend))
        return self._draw(logits, draw, take)

    def copy_pages(self, sources: np.ndarray, targets: np.ndarray) -> None:
        """Pages `sources` copied into `targets` (requests sharing a prompt's last page)."""
        self.cache = self.runner.copy_pages(self.cache, jnp.asarray(sources),
                                            jnp.asarray(targets))

    def decode(self, tokens: np.ndarray, table: np.ndarray, positions: np.ndarray, attend: int,
               draw: Draw) -> Drawn:
        """One token for each row: `tokens` [B] at `positions` [B] of the sequences with block
        tables `table` [B, n] (idle rows: no pages, they write nothing), attending over their
        first `attend` slots."""
        self.attend_spans[attend] += 1
        logits, self.cache = self.runner.paged_decode(
            self.runner.params, self.cache, jnp.asarray(tokens), jnp.asarray(table),
            jnp.asarray(positions), int(attend))
        return self._draw(logits, draw)

    def prompt_logprobs(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each token's log-probability given those before it [R, P - 1], and the top
        alternatives' values and ids [R, P - 1, k] (a full forward)."""
        return self.runner.prompt_logprobs(tokens)

    def _draw(self, logits: jax.Array, draw: Draw | None,
              take: np.ndarray | None = None) -> Drawn | None:
        if draw is None:
            return None
        if take is not None:
            logits = self.runner.take_rows(logits, jnp.asarray(take))
        keys = row_keys(jnp.asarray(draw.seeds), jnp.asarray(draw.steps))
        s = draw.settings
        tokens = np.asarray(self.runner.sample(logits, keys, jnp.asarray(s[0]), jnp.asarray(s[1]),
                                               jnp.asarray(s[2], jnp.int32), draw.penalties))
        scores: Any = None
        if draw.logprobs:       # a second call, on the same logits: the tokens are as drawn
            try:
                scores = tuple(np.asarray(a) for a in self.runner.logprobs(logits, tokens))
            except Exception as err:
                log.error("log-probabilities failed: %s", err, exc_info=True)
                scores = err
        return Drawn(tokens, scores)
