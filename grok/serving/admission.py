"""The engine's prefill scheduling (a mixin of `grok.serving.engine.Engine`, whose state and lock
it uses): which waiting requests a step admits into free slots within its prefill budget, the
cache re-made when they need more, the prefill calls of the groups admitted, and the long
prompt prefilled a chunk per step. Methods run under the engine's lock unless they say not."""
from __future__ import annotations

import collections
import logging
from typing import Any, NamedTuple

import numpy as np

from grok.errors import one_line
from grok.serving import batching
from grok.serving.batching import MIN_ATTEND_BUCKET, bucket
from grok.serving.request import Result

log = logging.getLogger(__name__)


class Piece(NamedTuple):
    """One chunk of a long prompt: its `tokens` [1, C] (padded), from prompt position `start`,
    `length` of them real; `draw` on its last chunk only (the first token is drawn then)."""

    rid: int
    tokens: np.ndarray
    start: int
    length: int
    draw: batching.Draw | None


class Admission:
    """Prefill scheduling for `Engine` (see the engine module's docstring for the policy)."""

    def _admit(self, held: set[int], budget: int, first: bool
               ) -> list[tuple[list[tuple[int, Result]], int]]:
        """Take waiting requests for free slots (first in, first out) while this step's prefill
        `budget` (tokens, padded to each prompt's bucket) lasts, re-making the cache when the
        next ones need more; returns the prefill groups (slot, result) with their length. A long
        prompt goes into its slot at once, to be prefilled a chunk per step (one at a time).
        `first`: no chunk runs this step, so the first request is admitted whatever it costs.
        The ids taken off the queue are added to `held` as they are taken."""
        free = [s for s, rid in enumerate(self.slots) if rid is None]
        if not self.waiting:
            return []
        if self.cache is None or self._need(self.waiting[0]) > self.max_len or (
                len(self.waiting) > len(free) and self.batch_size < self.max_batch and self.grow):
            if len(free) < self.batch_size:
                return []           # let the live requests finish before the cache changes
            if not self._remake():
                return []
            free = list(range(self.batch_size))
        groups: dict[int, list[tuple[int, Result]]] = collections.defaultdict(list)
        spent = 0
        prompts: set[tuple[int, ...]] = set()     # admitted now: a repeat shares their row
        for slot in free:
            if not self.waiting or self._need(self.waiting[0]) > self.max_len:
                break
            res = self.results[self.waiting[0]]
            length = bucket(len(res.prompt), self.max_len)
            cost = 0 if tuple(res.prompt) in prompts else min(length, self.chunk_len)
            if (length > self.chunk_len and self._chunking) or (
                    spent + cost > budget and not (first and spent == 0)):
                break
            held.add(self.waiting.popleft())
            spent += cost
            if length > self.chunk_len:
                self.slots[slot], self._chunking[res.id] = res.id, 0
            else:
                groups[length].append((slot, res))
                prompts.add(tuple(res.prompt))
        out = []
        for length, group in sorted(groups.items()):
            # calls of at most `most` distinct prompts, each with every request sharing them
            most = max(1, self.prefill_tokens // length)
            sharing: dict[tuple[int, ...], list[tuple[int, Result]]] = {}
            for slot, res in group:
                sharing.setdefault(tuple(res.prompt), []).append((slot, res))
            same = list(sharing.values())
            out += [([pair for members in same[i:i + most] for pair in members], length)
                    for i in range(0, len(same), most)]
        return out

    def _need(self, rid: int) -> int:
        res = self.results[rid]
        return len(res.prompt) + res.request.max_new_tokens

    def _remake(self) -> bool:
        """A new, empty cache big enough for the next waiting requests (no slot is live). If it
        cannot be made (out of memory), the requests it was for end with "error" (the next
        ones try again): False."""
        batch, length = self.batch_size, self.max_len
        if self.grow:
            batch = max(batch, bucket(min(len(self.waiting), self.max_batch), self.max_batch,
                                      minimum=1))
            need = max(self._need(r) for r in list(self.waiting)[:batch])
            length = max(length, bucket(need, self.max_context))
        try:
            self.steps.new_cache(batch, length)   # the old one is freed before
        except Exception as err:
            log.exception("making a KV cache of %d x %d failed", batch, length)
            error = one_line(f"the KV cache ({batch} x {length}) could not be made: "
                             f"{type(err).__name__}: {err}")
            for rid in list(self.waiting)[:batch]:
                self._finish(rid, "error", error=error)
            return False
        self.batch_size, self.max_len = batch, length
        self.slots = [None] * self.batch_size
        return True

    def _group_call(self, group: list[tuple[int, Result]], length: int) -> tuple:
        """The inputs of a group's prefill: the call, its draw and the prompt-logprob rows."""
        call = batching.prefill_inputs(group, length, self.batch_size, self.config)
        draw = self._draw_inputs(list(enumerate(r for _, r in group)), call.draw_rows)
        asking, prompt_tokens = batching.prompt_logprob_rows(group, call.member_tokens())
        return group, call, draw, asking, prompt_tokens

    def _run_group(self, group: list[tuple[int, Result]], call: batching.PrefillCall,
                   draw: batching.Draw, asking: list[int], prompt_tokens: Any
                   ) -> list[tuple[int, int]]:
        scored = self._call(self.steps.prompt_logprobs, prompt_tokens) if asking else None
        out = self._call(self.steps.prefill, call.tokens, call.rows, call.lengths, draw,
                         call.take, call.sources, call.targets)
        with self._lock:
            if asking:
                self._set_prompt_logprobs([group[i][1] for i in asking], scored)
            return self._apply([(i, slot, res.id) for i, (slot, res) in enumerate(group)], out,
                               place=True)

    def _next_piece(self) -> Piece | None:
        """The next chunk of the long prompt being prefilled, or None."""
        if not self._chunking:
            return None
        rid, start = next(iter(self._chunking.items()))
        res = self.results[rid]
        n = min(self.chunk_len, len(res.prompt) - start)
        tokens = np.full((1, bucket(n, self.chunk_len)), self.config.pad_token, np.int32)
        tokens[0, :n] = res.prompt[start:start + n]
        last = start + n == len(res.prompt)
        return Piece(rid, tokens, start, n, self._draw_inputs([(0, res)], 1) if last else None)

    def _run_piece(self, piece: Piece) -> list[tuple[int, int]]:
        rid, tokens, start, n, draw = piece
        with self._lock:
            res, slot = self.results[rid], self.slots.index(rid)
        rows, lengths = np.array([slot], np.int32), np.array([n], np.int32)
        if start == 0:
            out = self._call(self.steps.prefill, tokens, rows, lengths, draw)
        else:
            attend = bucket(start, self.max_len, MIN_ATTEND_BUCKET)
            out = self._call(self.steps.chunk, tokens, rows, np.array([start], np.int32),
                             lengths, attend, draw)
        scored = None
        if draw is not None and res.request.prompt_logprobs:   # a full forward over the prompt
            whole = batching.prefill_inputs([(slot, res)], bucket(len(res.prompt), self.max_len),
                                            self.batch_size, self.config)
            scored = self._call(self.steps.prompt_logprobs, whole.tokens)
        with self._lock:
            if res.done:                        # cancelled meanwhile: its slot is free already
                return []
            if isinstance(out, Exception):
                self._finish(rid, "error", error=one_line(f"{type(out).__name__}: {out}"))
                self._check_cache()
                return []
            if draw is None:                    # more chunks to come
                self._chunking[rid] = start + n
                return []
            del self._chunking[rid]
            if scored is not None:
                self._set_prompt_logprobs([res], scored)
            return self._apply([(0, slot, rid)], out)

