"""Generation: a continuous-batching engine over batch slots and a shared KV cache.

A finished request frees its slot and the next waiting request is prefilled into it while the
others keep decoding. Each step prefills at most about `prefill_tokens` prompt tokens (padded to
their length bucket), then decodes one token for every live slot:
- prompts admitted together are prefilled together, grouped by power-of-two length bucket, in
  power-of-two row counts; requests with the same prompt (a server's `n`) share one prefill row,
  its cache row copied to the others;
- a prompt longer than the chunk (the largest power of two <= `prefill_tokens`) is prefilled a
  chunk per step, one such prompt at a time, so a long prompt never stalls the others' decoding.
Decode steps attend over the cache up to the longest live sequence (bucketed), so the number of
compiles stays bounded by the number of buckets. The device calls and the cache are a
`grok.serving.steps.DeviceSteps` (on several hosts, a `grok.serving.lockstep.Leader`).

Threading: one lock (`Engine._lock`, with the condition `_changed` on it) guards the requests'
bookkeeping: the queue, the slots, results and event buffers. It is held only while that state
is read or changed, never during a device call, so `submit`, `cancel`, `release` and event
readers on other threads wait at most for some bookkeeping. One thread at a time runs a step
(`_stepping`, under the lock); the device calls and the cache belong to that thread.
"""
from __future__ import annotations

import collections
import logging
import threading
from typing import Any, Callable, Iterator, TypeVar

import numpy as np

from grok.config import PREFILL_TOKENS, prefill_chunk
from grok.errors import RequestError, one_line
from grok.serving import batching
from grok.serving.admission import Admission
from grok.serving.batching import bucket
from grok.serving.book import Book
from grok.serving.request import Event, Request, Result, check_request, checked_request
from grok.serving.runner import ModelRunner
from grok.serving.sampling import describe, is_int
from grok.serving.steps import DeviceSteps, Drawn

__all__ = ["Engine", "EventStream", "Event", "ModelRunner", "Request", "Result", "bucket"]
log = logging.getLogger(__name__)
T = TypeVar("T")


class Engine(Admission):
    """Continuous batching over `batch_size` slots of a cache of `max_len` positions (default:
    the model's context). With `grow=True` those are limits: the cache starts empty and is
    re-made, in powers of two, when a waiting request needs more slots or a longer context; that
    happens only with no request in a slot (the engine stops admitting and lets the live ones
    finish first), so compiles stay bounded and no live request is moved.

    From one thread (a notebook): `rid = engine.submit(Request(...))`, then iterate
    `engine.events(rid)` (it steps the engine itself), or `engine.step()` until `engine.idle` and
    read `engine.results[rid]`. From several: `engine.start()` runs the steps on a thread of its
    own (`stop()` ends it); `submit`, `cancel`, `events` and `wait` may then be called from any
    thread.
    """

    def __init__(self, runner: ModelRunner, batch_size: int = 8, max_len: int | None = None,
                 tokenizer: Any = None, prefill_tokens: int = PREFILL_TOKENS, *,
                 grow: bool = False, steps: DeviceSteps | None = None):
        """`steps`: the device side (default: a DeviceSteps of `runner`; a multi-host leader
        passes its `grok.serving.lockstep.Leader`)."""
        config = runner.config
        for name, value, least in (("batch_size", batch_size, 1), ("max_len", max_len, 2),
                                   ("prefill_tokens", prefill_tokens, 1)):
            if not (value is None and name == "max_len") and (not is_int(value) or value < least):
                raise RequestError(f"{name} must be an integer >= {least}, got {describe(value)}")
        self.runner, self.config, self.tokenizer = runner, config, tokenizer
        self.prefill_tokens = int(prefill_tokens)
        self.chunk_len = prefill_chunk(self.prefill_tokens)
        self.max_batch = int(batch_size)
        self.max_context = min(config.sequence_len if max_len is None else int(max_len),
                               config.sequence_len)
        self.grow = grow
        # The cache's shape now (made at the first admission; grown up to the limits with grow).
        self.batch_size = 0 if grow else self.max_batch
        self.max_len = 0 if grow else self.max_context
        self.slots: list[int | None] = [None] * self.batch_size
        self.steps = steps if steps is not None else DeviceSteps(runner)
        self.book = Book(config.eos_token, tokenizer)
        self.results, self.waiting = self.book.results, self.book.waiting   # by id; queued ids
        # The request being prefilled a chunk per step (in a slot, not yet decoding) -> the
        # prompt tokens already in its cache row.
        self._chunking: dict[int, int] = {}
        self._released: collections.deque[int] = collections.deque()  # appended without the lock
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)   # notified on every change of state
        self._stepping = False
        self._driver: threading.Thread | None = None
        self._stopping = False

    # --- requests (any thread) ------------------------------------------------------------------
    def check(self, request: Request) -> list[int]:
        """The prompt ids the request will run with; RequestError when it cannot run."""
        return check_request(request, self.config.vocab_size, self.max_context,
                             self.tokenizer is not None)

    def submit(self, request: Request) -> int:
        """Queue a request; returns its id. Invalid requests raise RequestError here."""
        return self.submit_all([request])[0]

    def submit_all(self, requests: list[Request]) -> list[int]:
        """Queue several requests together; every one is checked first, so a bad one (a
        RequestError) queues none of them. Each is queued as checked: plain ints, tuples and
        re-validated sampling settings (`grok.serving.request.checked_request`)."""
        if isinstance(requests, Request) or not isinstance(requests, (list, tuple)):
            raise RequestError(f"submit_all takes a list of grok.Request, got "
                               f"{describe(requests)}")
        checked = [checked_request(r, self.config.vocab_size, self.max_context,
                                   self.tokenizer is not None) for r in requests]
        with self._lock:
            ids = [self.book.add(r, p) for r, p in checked]
            self._changed.notify_all()
        return ids

    def cancel(self, rid: int) -> bool:
        """End a waiting or running request with finish_reason "cancelled"; its slot is free for
        the next step. False when it had already finished (or is unknown)."""
        _check_id(rid)
        with self._lock:
            return self._cancel(rid)

    def release(self, rid: int) -> None:
        """Cancel the request if it runs and forget it (result and events). Takes the lock only
        if free, else leaves it to the next step: safe from finalizers and any thread."""
        _check_id(rid)
        self._released.append(rid)
        if self._lock.acquire(blocking=False):
            try:
                self._drop_released()
            finally:
                self._lock.release()

    def pop(self, rid: int) -> Result:
        """Remove a finished request's result (and events) and return it: a long-lived engine
        keeps every result until then."""
        _check_id(rid)
        with self._lock:
            return self.book.pop(rid)

    def events(self, rid: int) -> "EventStream":
        """An iterator over request `rid`'s events (`grok.serving.request.Event`), the last one
        with its finish reason; it steps the engine itself when no driving thread runs."""
        _check_id(rid)
        with self._lock:
            if rid not in self.results:
                raise RequestError(f"request {rid} is unknown (or released)")
        return EventStream(self, rid)

    def listen(self, rid: int, listener: Callable[[Event], None]) -> None:
        """Hand request `rid`'s events to `listener` as they happen (any already buffered
        first) instead of buffering them for `events` / `next_event`: for a server, with a
        thread driving the engine (`start()`), so that no thread waits per request. It is
        called on the stepping thread with the engine's lock held: it must be quick and must
        not call the engine. One that raises is dropped (logged); the request runs on."""
        _check_id(rid)
        with self._lock:
            self.book.listen(rid, listener)

    def wait(self, rid: int) -> Result:
        """The request's result once it has finished (stepping when no driving thread runs)."""
        _check_id(rid)

        def finished() -> Result | None:
            res = self.results.get(rid)
            if res is None:
                raise RequestError(f"request {rid} is unknown (or released)")
            return res if res.done else None
        return self._until(rid, finished)

    def next_event(self, rid: int) -> Event:
        """Request `rid`'s next event, waiting (or stepping) for it; RequestError once its last
        event has been read."""
        _check_id(rid)
        return self._until(rid, lambda: self.book.next_event(rid))

    @property
    def cache(self) -> Any:
        """The KV cache (None until the first admission, or after it was lost)."""
        return self.steps.cache

    @property
    def cache_allocations(self) -> int:
        return self.steps.allocations

    @property
    def prefill_shapes(self) -> collections.Counter[tuple[int, int]]:
        """Prefill calls by (rows, padded length)."""
        return self.steps.prefill_shapes

    @property
    def chunk_shapes(self) -> collections.Counter[tuple[int, int]]:
        """Calls prefilling a later chunk of a long prompt, by (rows, chunk length)."""
        return self.steps.chunk_shapes

    @property
    def attend_spans(self) -> collections.Counter[int]:
        """Decode steps by attention span."""
        return self.steps.attend_spans

    @property
    def idle(self) -> bool:
        with self._lock:
            return not self._stepping and self._idle()

    @property
    def driving(self) -> bool:
        """Whether a `start()` thread is stepping the engine."""
        with self._lock:
            return self._driver is not None and not self._stopping

    # --- driving ------------------------------------------------------------------------------
    def start(self) -> None:
        """Run steps on a background thread whenever there is work (for a server)."""
        with self._lock:
            if self._driver is None:
                self._stopping = False
                self._driver = threading.Thread(target=self._drive, name="grok-engine",
                                                daemon=True)
                self._driver.start()

    def stop(self) -> None:
        """End the driving thread after its current step; requests left stay queued (event
        readers step them again themselves)."""
        with self._lock:
            thread, self._stopping = self._driver, True
            self._changed.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def run(self) -> Iterator[tuple[int, int]]:
        """Step until every request has finished, yielding (request id, token) as produced."""
        while not self.idle:
            yield from self.step()

    def step(self) -> list[tuple[int, int]]:
        """Admit waiting requests into free slots and prefill them (a long prompt: its next
        chunk), then decode one token for every live slot. Returns the (request id, token) pairs
        produced. A device call that fails ends the requests in it with finish_reason "error";
        the others go on. Should the step itself fail (a bug), it ends the requests it held with
        "error" (and logs it), rather than raise: the engine goes on serving the rest."""
        with self._lock:
            while self._stepping:
                self._changed.wait()
            self._stepping = True
            self._drop_released()
        held: set[int] = set()     # ids in this step's prefills: ended if the step fails
        live: list[tuple[int, Result]] = []
        events: list[tuple[int, int]] = []
        failure = None
        try:
            with self._lock:
                piece = self._next_piece()
                budget = self.prefill_tokens - (piece.tokens.shape[1] if piece else 0)
                calls = [self._group_call(group, length)
                         for group, length in self._admit(held, budget, first=piece is None)]
                if piece is None:           # a long prompt admitted just now: its first chunk
                    piece = self._next_piece()
                held |= set(self._chunking)
            for call in calls:
                events += self._run_group(*call)
            if piece is not None:
                events += self._run_piece(piece)
            held.clear()
            with self._lock:
                live = [(s, self.results[rid]) for s, rid in enumerate(self.slots)
                        if rid is not None and rid not in self._chunking]
                if live:
                    inputs = batching.decode_inputs(live, self.batch_size, self.max_len)
                    draw = self._draw_inputs(live, self.batch_size)
            if live:
                out = self._call(self.steps.decode, *inputs, draw)
                with self._lock:
                    events += self._apply([(s, s, res.id) for s, res in live], out)
                    live = []
        except Exception as err:
            log.exception("engine step failed")
            failure = one_line(f"engine step failed: {type(err).__name__}: {err}")
        except BaseException:         # KeyboardInterrupt & co.: the slots' requests stay live
            live = []
            failure = "the step was interrupted"
            raise
        finally:
            with self._lock:
                if failure is not None:
                    # The step's requests, whose state is unknown: ended, so that no later step
                    # meets the same failure (the live ones could otherwise fail every step).
                    for rid in sorted(held) + [res.id for _, res in live]:
                        self._finish(rid, "error", error=failure)
                    self._check_cache()
                self._stepping = False
                self._changed.notify_all()
        return events

    # --- internals (the lock is held unless noted) --------------------------------------------
    def _idle(self) -> bool:
        return not self.waiting and all(s is None for s in self.slots)

    def _until(self, rid: int, ready: Callable[[], T | None]) -> T:
        """Wait for `ready()` (called under the lock) to give request `rid`'s next value; step
        while no other thread does. An idle engine makes no more progress: then a request
        that never ended was lost (a bug), and is ended; one that has, has no more to give."""
        while True:
            with self._lock:
                value = ready()
                if value is not None:
                    return value
                if self._stepping or (self._driver is not None and not self._stopping):
                    self._changed.wait()
                    continue
                if self._idle() and not self._released:
                    res = self.results[rid]     # ready() refuses an unknown id
                    if res.done:
                        raise RequestError(f"request {rid} has ended: no more events")
                    log.error("request %d was lost by the engine", rid)
                    self._finish(rid, "error", error="the engine lost this request")
                    continue
            self.step()

    def _drive(self) -> None:
        try:
            while True:
                with self._lock:
                    while not self._stopping and self._idle() and not self._released:
                        self._changed.wait()
                    if self._stopping:
                        return
                try:
                    self.step()
                except Exception as err:   # a bug, not a model error (step handles those)
                    log.exception("engine step failed")
                    with self._lock:
                        for rid in [r for r in self.slots if r is not None] + list(self.waiting):
                            self._finish(rid, "error", error=one_line(f"engine step failed: {err}"))
        finally:
            with self._lock:
                self._driver = None
                self._changed.notify_all()

    def _draw_inputs(self, rows: list[tuple[int, Result]], batch: int) -> batching.Draw:
        return batching.draw_inputs(rows, batch, self.config, self.book.seen)

    def _call(self, fn: Callable[..., T], *args: Any) -> T | Exception:
        """Run a device call (no lock held): its value, or the error."""
        try:
            return fn(*args)
        except Exception as err:
            log.error("engine step failed: %s", err, exc_info=True)
            return err

    def _set_prompt_logprobs(self, results: list[Result], scored: np.ndarray | Exception
                             ) -> None:
        """Fill each result's `prompt_logprobs` from row i of `scored` (before its first event);
        on an error, end those requests."""
        for i, res in enumerate(results):
            if res.done:
                continue
            if isinstance(scored, Exception):
                self._finish(res.id, "error", error=one_line(
                    f"prompt log-probabilities: {type(scored).__name__}: {scored}"))
            else:
                chosen, values, ids = scored
                n, k = len(res.prompt) - 1, res.request.logprobs
                res.prompt_logprobs = [None] + chosen[i, :n].tolist()
                if k:
                    res.prompt_top_logprobs = [None] + [
                        tuple(zip(t, v)) for t, v in zip(ids[i, :n, :k].tolist(),
                                                         values[i, :n, :k].tolist())]

    def _apply(self, rows: list[tuple[int, int, int]], out: Drawn | Exception,
               place: bool = False) -> list[tuple[int, int]]:
        """Record a call's tokens for its (row, slot, request id) triples, skipping requests
        cancelled meanwhile; on an error, end its requests (and, if the cache went with it,
        every live one: the cache is re-made at the next admission)."""
        produced = []
        for row, slot, rid in rows:
            res = self.results.get(rid)
            if res is None or res.done:
                continue
            if isinstance(out, Exception):
                self._finish(rid, "error", error=one_line(f"{type(out).__name__}: {out}"))
                continue
            if place:
                self.slots[slot] = rid
            token = int(out.tokens[row])
            logprob = top = None
            k = res.request.logprobs
            if k and isinstance(out.scores, Exception):
                self._finish(rid, "error", error=one_line(
                    f"log-probabilities: {type(out.scores).__name__}: {out.scores}"))
                continue
            if k and out.scores is not None:
                chosen, values, ids = out.scores
                logprob = float(chosen[row])
                top = tuple(zip(ids[row, :k].tolist(), values[row, :k].tolist()))
            try:
                self.book.append(rid, token, logprob, top)
            except Exception as err:  # e.g. a tokenizer that cannot decode it: this request only
                log.exception("request %d failed to take token %d", rid, token)
                self._finish(rid, "error", error=one_line(f"{type(err).__name__}: {err}"))
                self.slots = [None if r == rid else r for r in self.slots]   # even if it ended
                continue
            produced.append((rid, token))
            if res.done:
                self.slots[slot] = None
        if isinstance(out, Exception):
            self._check_cache()
        return produced

    def _check_cache(self) -> None:
        """After a failed call: if the cache went with it (donated), end every live request
        (their keys and values are gone) and leave the cache to be re-made."""
        if self.steps.lost:
            for rid in [r for r in self.slots if r is not None]:
                self._finish(rid, "error", error="the KV cache was lost when a step failed")
            self.steps.drop_cache()

    def _finish(self, rid: int, reason: str, error: str | None = None) -> None:
        """End a request, free its slot and wake its readers."""
        if self.book.finish(rid, reason, error=error):
            self.slots = [None if r == rid else r for r in self.slots]
            self._chunking.pop(rid, None)
            self._changed.notify_all()

    def _cancel(self, rid: int) -> bool:
        res = self.results.get(rid)
        if res is None or res.done:
            return False
        self._finish(rid, "cancelled")
        return True

    def _drop_released(self) -> None:
        while self._released:
            rid = self._released.popleft()
            self._cancel(rid)
            self.book.drop(rid)


def _check_id(rid: object) -> None:
    if not is_int(rid):
        raise RequestError(f"request ids are ints, got {describe(rid)}")


class EventStream:
    """Iterator over one request's events (`Engine.events`); `close()` cancels the request if it
    has not finished."""

    def __init__(self, engine: Engine, rid: int):
        self.engine, self.id, self._done = engine, rid, False

    def __iter__(self) -> "EventStream":
        return self

    def __next__(self) -> Event:
        if self._done:
            raise StopIteration
        event = self.engine.next_event(self.id)
        self._done = event.done
        return event

    def close(self) -> None:
        if not self._done:
            self.engine.cancel(self.id)
            self._done = True
