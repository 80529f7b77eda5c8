"""The engine's record of its requests: results, the waiting queue, each request's event buffer,
detokenizer and penalty counts. No locking here: `Engine` calls it under its one lock."""
from __future__ import annotations

import collections
import logging
from typing import Any, Callable

from grok.errors import RequestError
from grok.serving.detokenizer import Detokenizer
from grok.serving.request import Event, Request, Result

log = logging.getLogger(__name__)


class Book:
    """Requests by id, from `add` until `pop` / `drop`."""

    def __init__(self, eos_token: int, tokenizer: Any = None):
        self.eos_token, self.tokenizer = eos_token, tokenizer
        self.results: dict[int, Result] = {}
        self.waiting: collections.deque[int] = collections.deque()
        # Requests with penalties: every token id seen (prompt and output) -> its output count.
        self.seen: dict[int, dict[int, int]] = {}
        self._detok: dict[int, Detokenizer] = {}
        self._events: dict[int, collections.deque[Event]] = {}
        self._listeners: dict[int, Callable[[Event], None]] = {}
        self._next_id = 0

    def add(self, request: Request, prompt: list[int]) -> int:
        """Queue a checked request; its id."""
        rid, self._next_id = self._next_id, self._next_id + 1
        self.results[rid] = Result(rid, request, prompt)
        self._events[rid] = collections.deque()
        if request.sampling.penalized:
            self.seen[rid] = dict.fromkeys(prompt, 0)
        if self.tokenizer is not None:
            self._detok[rid] = Detokenizer(self.tokenizer, request.stop_strings)
        self.waiting.append(rid)
        return rid

    def append(self, rid: int, token: int, logprob: float | None = None,
               top: tuple[tuple[int, float], ...] | None = None) -> None:
        """Record a request's new token (with its log-probability and the top alternatives' when
        the request asked for them) and its event; finish it on eos, a stop or its length."""
        res = self.results[rid]
        req = res.request
        res.tokens.append(token)
        if logprob is not None:
            res.logprobs.append(logprob)
            res.top_logprobs.append(top or ())
        seen = self.seen.get(rid)
        if seen is not None:
            seen[token] = seen.get(token, 0) + 1
        detok = self._detok.get(rid)
        # A token that ends the request (eos, a stop id) stays out of the text, as OpenAI and
        # SGLang leave it: Grok-2's would show as "<|eos|>" or "<|separator|>".
        ends = token == self.eos_token or token in req.stop_ids
        text = detok.add(token) if detok is not None and not ends else \
            ("" if detok is not None else None)
        reason = ("eos" if token == self.eos_token
                  else "stop" if token in req.stop_ids or (detok is not None and detok.stopped)
                  else "length" if len(res.tokens) >= req.max_new_tokens else None)
        if reason is None:
            self._push(rid, Event(rid, token, text, logprob=logprob, top_logprobs=top))
        else:
            self.finish(rid, reason, token, text, logprob=logprob, top=top)

    def finish(self, rid: int, reason: str, token: int | None = None, text: str | None = None,
               error: str | None = None, *, logprob: float | None = None,
               top: tuple[tuple[int, float], ...] | None = None) -> bool:
        """End a request (False if unknown or already ended): settle its text, push its last
        event. The caller frees its slot."""
        res = self.results.get(rid)
        if res is None or res.done:
            return False
        res.finish_reason, res.error = reason, error
        if rid in self.waiting:
            self.waiting.remove(rid)
        self.seen.pop(rid, None)
        detok = self._detok.pop(rid, None)
        if detok is not None:
            # A cancelled or failed request keeps the text shown so far: what its events carried.
            text = (text or "") + (detok.finish() if reason in ("eos", "stop", "length") else "")
            res.text = detok.text
        self._push(rid, Event(rid, token, text, reason, error, logprob, top))
        return True

    def listen(self, rid: int, listener: Callable[[Event], None]) -> None:
        """Hand the request's events to `listener` from now on (those buffered first)."""
        queue = self._events.get(rid)
        if queue is None:
            raise RequestError(f"request {rid} is unknown (or released)")
        self._listeners[rid] = listener
        while queue and rid in self._listeners:
            self._push(rid, queue.popleft())

    def _push(self, rid: int, event: Event) -> None:
        listener = self._listeners.get(rid)
        if listener is None:
            self._events[rid].append(event)
            return
        try:
            listener(event)
        except Exception:       # a listener that fails hears no more (the request runs on)
            log.exception("the listener of request %d failed; it is dropped", rid)
            self._listeners.pop(rid, None)

    def next_event(self, rid: int) -> Event | None:
        """The request's next buffered event, or None."""
        queue = self._events.get(rid)
        if queue is None:
            raise RequestError(f"request {rid} is unknown (or released)")
        return queue.popleft() if queue else None

    def pop(self, rid: int) -> Result:
        res = self.results.get(rid)
        if res is None or not res.done:
            raise RequestError(f"request {rid} is {'unknown' if res is None else 'running'}")
        self.drop(rid)
        return res

    def drop(self, rid: int) -> None:
        """Forget an ended request (an unknown id is ignored)."""
        self.results.pop(rid, None)
        self._events.pop(rid, None)
        self._listeners.pop(rid, None)
