"""Generation: a continuous-batching engine over batch slots and a shared KV cache.

A finished request frees its slot and the next waiting request is prefilled into it while the
others keep decoding. Prompts admitted together are prefilled together, grouped by power-of-two
length bucket, in power-of-two row counts (at most `prefill_tokens` tokens per call); decode steps
attend over the cache up to the longest live sequence (also bucketed), so the number of compiles
stays bounded by the number of buckets.

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
from typing import Any, Callable, Iterator, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from grok.config import PREFILL_TOKENS
from grok.errors import RequestError, one_line
from grok.serving import batching
from grok.serving.batching import bucket
from grok.serving.book import Book
from grok.serving.request import Event, Request, Result, check_request, checked_request
from grok.serving.runner import ModelRunner
from grok.serving.sampling import describe, is_int, row_keys

__all__ = ["Engine", "EventStream", "Event", "ModelRunner", "Request", "Result", "bucket"]
log = logging.getLogger(__name__)
T = TypeVar("T")


class Engine:
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
                 grow: bool = False):
        config = runner.config
        for name, value, least in (("batch_size", batch_size, 1), ("max_len", max_len, 2),
                                   ("prefill_tokens", prefill_tokens, 1)):
            if not (value is None and name == "max_len") and (not is_int(value) or value < least):
                raise RequestError(f"{name} must be an integer >= {least}, got {describe(value)}")
        self.runner, self.config, self.tokenizer = runner, config, tokenizer
        self.prefill_tokens = int(prefill_tokens)
        self.max_batch = int(batch_size)
        self.max_context = min(config.sequence_len if max_len is None else int(max_len),
                               config.sequence_len)
        self.grow = grow
        # The cache's shape now (made at the first admission; grown up to the limits with grow).
        self.batch_size = 0 if grow else self.max_batch
        self.max_len = 0 if grow else self.max_context
        self.slots: list[int | None] = [None] * self.batch_size
        self.cache: Any = None
        self.cache_allocations = 0
        self.book = Book(config.eos_token, tokenizer)
        self.results, self.waiting = self.book.results, self.book.waiting   # by id; queued ids
        self.attend_spans: collections.Counter[int] = collections.Counter()  # decode steps by span
        self.prefill_shapes: collections.Counter[tuple[int, int]] = collections.Counter()  # (R, P)
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
        """Admit waiting requests into free slots (prefilling them), then decode one token for
        every live slot. Returns the (request id, token) pairs produced. A device call that
        fails ends the requests in it with finish_reason "error"; the others go on. Should the
        step itself fail (a bug), it ends the requests it held with "error" (and logs it),
        rather than raise: the engine goes on serving the rest."""
        with self._lock:
            while self._stepping:
                self._changed.wait()
            self._stepping = True
            self._drop_released()
        admitted: set[int] = set()    # taken off the queue, not yet in a slot: lost if not ended
        live: list[tuple[int, Result]] = []
        events: list[tuple[int, int]] = []
        failure = None
        try:
            with self._lock:
                groups = []
                for group, length in self._admit(admitted):
                    inputs = batching.prefill_inputs(group, length, self.batch_size, self.config)
                    draw = self._draw_inputs(list(enumerate(r for _, r in group)),
                                             len(inputs[0]))
                    groups.append((group, inputs, draw))
            for group, inputs, draw in groups:
                asking, prompt_tokens = batching.prompt_logprob_rows(group, inputs[0])
                scored = self._prompt_logprobs(prompt_tokens) if asking else None
                out = self._call(self._prefill, inputs, draw)
                with self._lock:
                    if asking:
                        self._set_prompt_logprobs([group[i][1] for i in asking], scored)
                    events += self._apply([(i, slot, res.id) for i, (slot, res) in
                                           enumerate(group)], out, place=True)
                    admitted -= {res.id for _, res in group}
            with self._lock:
                live = [(s, self.results[rid]) for s, rid in enumerate(self.slots)
                        if rid is not None]
                if live:
                    inputs = batching.decode_inputs(live, self.batch_size, self.max_len)
                    draw = self._draw_inputs(live, self.batch_size)
            if live:
                out = self._call(self._decode, inputs, draw)
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
                    for rid in sorted(admitted) + [res.id for _, res in live]:
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

    def _admit(self, admitted: set[int]) -> list[tuple[list[tuple[int, Result]], int]]:
        """Take waiting requests for free slots (first in, first out), re-making the cache when
        the next ones need more; returns the prefill groups (slot, result) with their length.
        The ids taken off the queue are added to `admitted` as they are taken."""
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
        for slot in free:
            if not self.waiting or self._need(self.waiting[0]) > self.max_len:
                break
            rid = self.waiting.popleft()
            admitted.add(rid)
            res = self.results[rid]
            groups[bucket(len(res.prompt), self.max_len)].append((slot, res))
        out = []
        for length, group in sorted(groups.items()):
            most = max(1, self.prefill_tokens // length)
            out += [(group[i:i + most], length) for i in range(0, len(group), most)]
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
        self.cache = None           # the old one is freed before the new one is made
        try:
            self.cache = self.runner.new_cache(batch, length)
        except Exception as err:
            log.exception("making a KV cache of %d x %d failed", batch, length)
            error = one_line(f"the KV cache ({batch} x {length}) could not be made: "
                             f"{type(err).__name__}: {err}")
            for rid in list(self.waiting)[:batch]:
                self._finish(rid, "error", error=error)
            return False
        self.batch_size, self.max_len = batch, length
        self.cache_allocations += 1
        self.slots = [None] * self.batch_size
        return True

    def _draw_inputs(self, rows: list[tuple[int, Result]], batch: int) -> batching.Draw:
        return batching.draw_inputs(rows, batch, self.config, self.book.seen)

    def _call(self, fn: Callable, inputs: tuple, draw: batching.Draw) -> Drawn | Exception:
        """Run a device call and the sampler (no lock held): the tokens drawn and, when a row
        asked, their log-probabilities (`Drawn`); or the error."""
        try:
            logits = fn(*inputs)
            keys = row_keys(jnp.asarray(draw.seeds), jnp.asarray(draw.steps))
            s = draw.settings
            tokens = self.runner.sample(logits, keys, jnp.asarray(s[0]), jnp.asarray(s[1]),
                                        jnp.asarray(s[2], jnp.int32), draw.penalties)
            tokens = np.asarray(tokens)
        except Exception as err:
            log.error("engine step failed: %s", err, exc_info=True)
            return err
        scores: Any = None
        if draw.logprobs:           # a second call, on the same logits: the tokens are as drawn
            try:
                scores = tuple(np.asarray(a) for a in self.runner.logprobs(logits, tokens))
            except Exception as err:  # fails the requests that asked only
                log.error("log-probabilities failed: %s", err, exc_info=True)
                scores = err
        return Drawn(tokens, scores)

    def _prompt_logprobs(self, tokens: np.ndarray) -> np.ndarray | Exception:
        """The prompt tokens' log-probabilities [R, length - 1] of the prefill rows `tokens`
        (one full forward, no lock held), or the error."""
        try:
            return self.runner.prompt_logprobs(tokens)
        except Exception as err:
            log.error("prompt log-probabilities failed: %s", err, exc_info=True)
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
                res.prompt_logprobs = [None] + scored[i, :len(res.prompt) - 1].tolist()

    def _prefill(self, tokens: np.ndarray, rows: np.ndarray, lengths: np.ndarray) -> jax.Array:
        self.prefill_shapes[tokens.shape] += 1
        logits, self.cache = self.runner.prefill(self.runner.params, self.cache,
                                                  jnp.asarray(tokens), jnp.asarray(rows),
                                                  jnp.asarray(lengths))
        return logits

    def _decode(self, tokens: np.ndarray, positions: np.ndarray, attend: int) -> jax.Array:
        self.attend_spans[attend] += 1
        logits, self.cache = self.runner.decode(self.runner.params, self.cache,
                                                 jnp.asarray(tokens), jnp.asarray(positions),
                                                 attend)
        return logits

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
        if self.cache is not None and any(getattr(x, "is_deleted", lambda: False)()
                                          for x in jax.tree.leaves(self.cache)):
            for rid in [r for r in self.slots if r is not None]:
                self._finish(rid, "error", error="the KV cache was lost when a step failed")
            self.cache = None

    def _finish(self, rid: int, reason: str, error: str | None = None) -> None:
        """End a request, free its slot and wake its readers."""
        if self.book.finish(rid, reason, error=error):
            self.slots = [None if r == rid else r for r in self.slots]
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


class Drawn(NamedTuple):
    """A device call's tokens [R] and, when a row asked for them, their log-probabilities
    (`grok.serving.sampling.token_logprobs`: chosen [R], top values [R, k], top ids [R, k])."""

    tokens: np.ndarray
    scores: tuple[np.ndarray, np.ndarray, np.ndarray] | Exception | None


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
