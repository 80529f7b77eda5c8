"""The engine's executor: runs one `StepPlan` on the device side and records what it returns.

For each prefill call of the plan, and then its decode call, it builds the host inputs from the
requests' state (under the engine's lock), runs the device call with no lock held, and records
the tokens, log-probabilities and cache progress (under the lock again): a call that fails ends
its own requests only. vLLM v1 splits its engine the same way: the scheduler decides, the
executor runs, the KV manager owns the pages.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable, TypeVar

import numpy as np

from grok.errors import one_line
from grok.serving import batching
from grok.serving.request import Result
from grok.serving.scheduler import PrefillCall, StepPlan
from grok.serving.steps import Drawn

if TYPE_CHECKING:
    from grok.serving.engine import Engine

log = logging.getLogger(__name__)
T = TypeVar("T")
# Decode calls run a multiple of 8 rows, as vLLM's captured batch sizes: few shapes to compile,
# little padding, and never the one- or two-row dots whose CPU kernel differs from the others'.
DECODE_ROWS = 8


class Executor:
    """The device half of `Engine.step` (it uses the engine's lock, book, scheduler and steps)."""

    def __init__(self, engine: "Engine"):
        self.engine = engine

    def run(self, plan: StepPlan) -> list[tuple[int, int]]:
        """Run the plan's prefill calls, then its decode call (no lock held on entry); the
        (request id, token) pairs produced."""
        e = self.engine
        events: list[tuple[int, int]] = []
        with e._lock:
            calls = [(call, self._prefill_inputs(call)) for call in plan.prefills]
        for call, inputs in calls:
            events += self._prefill(call, *inputs)
        with e._lock:   # the rows still running once the prefills drew their tokens
            rows = sorted((slot, rid) for slot, rid in plan.decode if rid in e.scheduler.seqs
                          and not e.results[rid].done)
            decode = self._decode_inputs(rows, plan.attend) if rows else None
        if decode is not None and e.steps.cache is not None:
            out = self._call(e.steps.decode, *decode)
            with e._lock:
                if not isinstance(out, Exception):
                    for _, rid in rows:   # each wrote its last token's slot
                        e.scheduler.decoded(rid)
                events += self.record([(row, rid) for row, (_, rid) in enumerate(rows)], out)
        return events

    # --- inputs (under the lock) ----------------------------------------------------------------
    def _prefill_inputs(self, call: PrefillCall) -> tuple:
        """A prefill call's host inputs, its draw, and the prompt-logprob rows."""
        e = self.engine
        # The pages the call reads and writes: at most its span and its length (a static
        # function of the call's shape, so no new compiles).
        width = e.scheduler.kv.pages_for(min(call.attend + call.length, e.max_len))
        tables = e.scheduler.table([p.rid for p in call.pieces], width)
        inputs = batching.piece_inputs(call, tables, e.config.pad_token, e.max_batch,
                                       e.scheduler.kv.pages)
        members = [(i, e.results[rid]) for i, rid in enumerate(inputs.members)]
        draw = self._draw_inputs(members, inputs.draw_rows) if members else None
        asking = [res for _, res in members
                  if res.request.prompt_logprobs and not res.prompt_logprobs]
        prompts = batching.prompt_rows([res.prompt for res in asking], e.max_len,
                                       e.config.pad_token) if asking else None
        return inputs, draw, asking, prompts

    def _decode_inputs(self, rows: list[tuple[int, int]], attend: int) -> tuple:
        """The decode call's inputs for its (slot, request id) rows, packed in slot order (a
        sequence's cache is its block table, not its row) and padded to a multiple of
        DECODE_ROWS (padding rows have no pages: they write nothing)."""
        e = self.engine
        size = -(-len(rows) // DECODE_ROWS) * DECODE_ROWS
        tokens = np.zeros(size, np.int32)
        positions = np.zeros(size, np.int32)
        rids: list[int | None] = [None] * size
        for row, (_, rid) in enumerate(rows):
            tokens[row], rids[row] = e.results[rid].tokens[-1], rid
            positions[row] = e.scheduler.seqs[rid].computed
        table = e.scheduler.table(rids, e.scheduler.kv.pages_for(attend))   # the slots read
        draw = self._draw_inputs([(row, e.results[rid]) for row, (_, rid) in enumerate(rows)],
                                 size)
        return tokens, table, positions, attend, draw

    def _draw_inputs(self, rows: list[tuple[int, Result]], batch: int) -> batching.Draw:
        return batching.draw_inputs(rows, batch, self.engine.config, self.engine.book.seen)

    # --- calls (no lock held) -------------------------------------------------------------------
    def _call(self, fn: Callable[..., T], *args: Any) -> T | Exception:
        """Run a device call: its value, or the error."""
        try:
            return fn(*args)
        except Exception as err:
            log.error("engine step failed: %s", err, exc_info=True)
            return err

    def _prefill(self, call: PrefillCall, inputs: batching.PieceInputs,
                 draw: batching.Draw | None, asking: list[Result], prompts: Any
                 ) -> list[tuple[int, int]]:
        e = self.engine
        scored = self._call(e.steps.prompt_logprobs, prompts) if asking else None
        out = self._call(e.steps.prefill, inputs.tokens, inputs.table, inputs.starts,
                         inputs.lengths, call.attend, draw, inputs.take)
        if inputs.copies is not None and not isinstance(out, Exception):
            copied = self._call(e.steps.copy_pages, *inputs.copies)
            out = copied if isinstance(copied, Exception) else out
        with e._lock:
            if isinstance(out, Exception):
                for rid in [r for p in call.pieces for r in (p.rid, *p.sharing)]:
                    e._finish(rid, "error", error=one_line(f"{type(out).__name__}: {out}"))
                e._check_cache()
                return []
            for piece in call.pieces:
                e.scheduler.prefilled(piece)
            if asking:
                self._set_prompt_logprobs(asking, scored)
            return self.record(list(enumerate(inputs.members)), out) if out is not None else []

    # --- outputs (under the lock) ---------------------------------------------------------------
    def _set_prompt_logprobs(self, results: list[Result], scored: Any) -> None:
        """Fill each result's `prompt_logprobs` from row i of `scored` (before its first event);
        on an error, end those requests."""
        for i, res in enumerate(results):
            if res.done:
                continue
            if isinstance(scored, Exception):
                self.engine._finish(res.id, "error", error=one_line(
                    f"prompt log-probabilities: {type(scored).__name__}: {scored}"))
            else:
                chosen, values, ids = scored
                n, k = len(res.prompt) - 1, res.request.logprobs
                res.prompt_logprobs = [None] + chosen[i, :n].tolist()
                if k:
                    res.prompt_top_logprobs = [None] + [
                        tuple(zip(t, v)) for t, v in zip(ids[i, :n, :k].tolist(),
                                                         values[i, :n, :k].tolist())]

    def record(self, rows: list[tuple[int, int]], out: Drawn | Exception
               ) -> list[tuple[int, int]]:
        """Record a call's tokens for its (logits row, request id) pairs, skipping requests
        cancelled meanwhile; on an error, end its requests (and, if the pool went with it,
        every live one: it is re-made at the next step)."""
        e = self.engine
        produced = []
        for row, rid in rows:
            res = e.results.get(rid)
            if res is None or res.done:
                continue
            if isinstance(out, Exception):
                e._finish(rid, "error", error=one_line(f"{type(out).__name__}: {out}"))
                continue
            token = int(out.tokens[row])
            logprob = top = None
            k = res.request.logprobs
            if k and isinstance(out.scores, Exception):
                e._finish(rid, "error", error=one_line(
                    f"log-probabilities: {type(out.scores).__name__}: {out.scores}"))
                continue
            if k and out.scores is not None:
                chosen, values, ids = out.scores
                logprob = float(chosen[row])
                top = tuple(zip(ids[row, :k].tolist(), values[row, :k].tolist()))
            try:
                e.book.append(rid, token, logprob, top)
            except Exception as err:  # e.g. a tokenizer that cannot decode it: this request only
                log.exception("request %d failed to take token %d", rid, token)
                e._finish(rid, "error", error=one_line(f"{type(err).__name__}: {err}"))
                continue
            produced.append((rid, token))
            if res.done:
                e.scheduler.free(rid)
        if isinstance(out, Exception):
            e._check_cache()
        return produced
