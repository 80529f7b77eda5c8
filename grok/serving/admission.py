"""The engine's prefill scheduling (a mixin of `grok.serving.engine.Engine`, whose state and lock
it uses): which waiting requests a step admits into free slots within its prefill budget, the
cache re-made when they need more, the prefill calls of the groups admitted, and the long
prompt prefilled a chunk per step. Methods run under the engine's lock unless they say not."""
from __future__ import annotations

import collections
import logging
from typing import Any

import numpy as np

from grok.errors import one_line
from grok.serving import batching
from grok.serving.batching import MIN_ATTEND_BUCKET, bucket
from grok.serving.request import Result

log = logging.getLogger(__name__)


class Admission:
    """Prefill scheduling for `Engine` (see the engine module's docstring for the policy)."""

    def _admit(self, held: set[int], budget: int
               ) -> list[tuple[list[tuple[int, Result]], int]]:
        """Take waiting requests for free slots (first in, first out) while this step's prefill
        `budget` (tokens, padded to each prompt's bucket) lasts, re-making the cache when the
        next ones need more; returns the prefill groups (slot, result) with their length. A long
        prompt goes into its slot at once, to be prefilled a chunk per step (one at a time). The
        ids taken off the queue are added to `held` as they are taken."""
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
        spent, first = 0, budget == self.prefill_tokens   # the first prefill always runs
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
            # calls of at most `most` distinct prompts; a repeated prompt joins its first's call
            most = max(1, self.prefill_tokens // length)
            calls: list[list[tuple[int, Result]]] = []
            distinct: list[int] = []
            call_of: dict[tuple[int, ...], int] = {}
            for slot, res in group:
                key = tuple(res.prompt)
                if key not in call_of:
                    if not calls or distinct[-1] == most:
                        calls.append([])
                        distinct.append(0)
                    call_of[key] = len(calls) - 1
                    distinct[-1] += 1
                calls[call_of[key]].append((slot, res))
            out += [(call, length) for call in calls]
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

    def _next_piece(self) -> tuple | None:
        """The next chunk of the long prompt being prefilled: (request id, tokens [1, C], start,
        real length, draw (its last chunk only)), or None."""
        if not self._chunking:
            return None
        rid, start = next(iter(self._chunking.items()))
        res = self.results[rid]
        n = min(self.chunk_len, len(res.prompt) - start)
        tokens = np.full((1, bucket(n, self.chunk_len)), self.config.pad_token, np.int32)
        tokens[0, :n] = res.prompt[start:start + n]
        last = start + n == len(res.prompt)
        return rid, tokens, start, n, self._draw_inputs([(0, res)], 1) if last else None

    def _run_piece(self, rid: int, tokens: np.ndarray, start: int, n: int,
                   draw: batching.Draw | None) -> list[tuple[int, int]]:
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
            prompt = np.full((1, bucket(len(res.prompt), self.max_len)), self.config.pad_token,
                             np.int32)
            prompt[0, :len(res.prompt)] = res.prompt
            scored = self._call(self.steps.prompt_logprobs, prompt)
        with self._lock:
            if res.done:                        # cancelled meanwhile: its slot is free already
                return []
            if isinstance(out, Exception) or draw is None:
                if isinstance(out, Exception):
                    self._finish(rid, "error", error=one_line(f"{type(out).__name__}: {out}"))
                    self._check_cache()
                else:
                    self._chunking[rid] = start + n
                return []
            del self._chunking[rid]
            if scored is not None:
                self._set_prompt_logprobs([res], scored)
            return self._apply([(0, slot, rid)], out)

