"""Generation: a continuous-batching engine over a paged KV cache with prefix caching.

Each step runs what `grok.serving.scheduler.Scheduler` plans for it (`StepPlan`): prefill calls
of admitted prompts and of a long prompt's next chunk, then one decode call that draws a token
for every sequence past its prompt. Sequences hold pages of a shared pool (`kv_cache_tokens`
slots, `page_size` a page) as they grow, so how many run at once is bounded by the tokens they
hold, not by `batch_size x max_len`; full pages are found again by later prompts that start
with the same tokens (the prefix cache, `prefix_cache=False` to turn it off), and when the pool
runs out the newest sequence is preempted and later recomputed. The device calls and the pool
are a `grok.serving.steps.DeviceSteps` (on several hosts, a `grok.serving.lockstep.Leader`).

Threading: one lock (`Engine._lock`, with the condition `_changed` on it) guards the requests'
bookkeeping: the queue, the scheduler's slots and pages, results and event buffers. It is held
only while that state is read or changed, never during a device call, so `submit`, `cancel`,
`release` and event readers on other threads wait at most for some bookkeeping. One thread at a
time runs a step (`_stepping`, under the lock); the device calls and the pool belong to it.
"""
from __future__ import annotations

import collections
import logging
import threading
from typing import Any, Callable, Iterator, TypeVar

from grok.config import MAX_KV_TOKENS, PAGE_SIZE, PREFILL_TOKENS, prefill_chunk
from grok.errors import RequestError, one_line
from grok.serving import batching
from grok.serving.batching import bucket
from grok.serving.book import Book
from grok.serving.kv_manager import KVManager
from grok.serving.executor import Executor
from grok.serving.scheduler import Scheduler, StepPlan
from grok.serving.request import Event, Request, Result, check_request, checked_request
from grok.serving.runner import ModelRunner
from grok.serving.sampling import describe, is_int
from grok.serving.steps import DeviceSteps

__all__ = ["Engine", "EventStream", "Event", "ModelRunner", "Request", "Result", "bucket"]
log = logging.getLogger(__name__)
T = TypeVar("T")


class Engine:
    """Continuous batching of up to `batch_size` sequences of at most `max_len` tokens (default:
    the model's context) over a paged KV cache of `kv_cache_tokens` slots (default: `batch_size
    x max_len`, the memory a contiguous cache of those would take), made at the first step.

    From one thread (a notebook): `rid = engine.submit(Request(...))`, then iterate
    `engine.events(rid)` (it steps the engine itself), or `engine.step()` until `engine.idle` and
    read `engine.results[rid]`. From several: `engine.start()` runs the steps on a thread of its
    own (`stop()` ends it); `submit`, `cancel`, `events` and `wait` may then be called from any
    thread.
    """

    def __init__(self, runner: ModelRunner, batch_size: int = 8, max_len: int | None = None,
                 tokenizer: Any = None, prefill_tokens: int = PREFILL_TOKENS, *,
                 kv_cache_tokens: int | None = None, page_size: int = PAGE_SIZE,
                 prefix_cache: bool = True, steps: DeviceSteps | None = None):
        """`steps`: the device side (default: a DeviceSteps of `runner`; a multi-host leader
        passes its `grok.serving.lockstep.Leader`)."""
        config = runner.config
        for name, value, least in (("batch_size", batch_size, 1), ("max_len", max_len, 2),
                                   ("prefill_tokens", prefill_tokens, 1),
                                   ("kv_cache_tokens", kv_cache_tokens, 2),
                                   ("page_size", page_size, 1)):
            if not (value is None and name in ("max_len", "kv_cache_tokens")) and (
                    not is_int(value) or value < least):
                raise RequestError(f"{name} must be an integer >= {least}, got {describe(value)}")
        if kv_cache_tokens is not None and kv_cache_tokens > MAX_KV_TOKENS:
            raise RequestError(f"kv_cache_tokens must be at most {MAX_KV_TOKENS}, got "
                               f"{describe(kv_cache_tokens)}")
        if page_size & (page_size - 1) or page_size > batching.MIN_ATTEND_BUCKET:
            raise RequestError(f"page_size must be a power of two <= "
                               f"{batching.MIN_ATTEND_BUCKET}, got {page_size}")
        self.runner, self.config, self.tokenizer = runner, config, tokenizer
        self.prefill_tokens = int(prefill_tokens)
        self.chunk_len = prefill_chunk(self.prefill_tokens)
        self.max_batch = self.batch_size = int(batch_size)
        context = min(config.sequence_len if max_len is None else int(max_len),
                      config.sequence_len)
        tokens = self.max_batch * context if kv_cache_tokens is None else int(kv_cache_tokens)
        self.page_size, self.pages = int(page_size), -(-tokens // int(page_size))
        self.kv_cache_tokens = self.pages * self.page_size
        # A request cannot hold more than the whole pool.
        self.max_context = self.max_len = min(context, self.kv_cache_tokens)
        self.prefix_cache = bool(prefix_cache)
        self.steps = steps if steps is not None else DeviceSteps(runner)
        self.book = Book(config.eos_token, tokenizer)
        self.results, self.waiting = self.book.results, self.book.waiting   # by id; queued ids
        self.scheduler = Scheduler(self.book, self.max_batch, self.max_context, self._new_kv(),
                                   self.prefill_tokens, self.chunk_len)
        self.executor = Executor(self)
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
        """The paged KV cache (None until the first step, or after it was lost)."""
        return self.steps.cache

    @property
    def slots(self) -> list[int | None]:
        """The request id in each of the `batch_size` rows (None: free)."""
        return self.scheduler.slots

    @property
    def cache_allocations(self) -> int:
        return self.steps.allocations

    @property
    def prefill_shapes(self) -> collections.Counter[tuple[int, int]]:
        """Calls prefilling fresh prompts by (rows, padded length)."""
        return self.steps.prefill_shapes

    @property
    def chunk_shapes(self) -> collections.Counter[tuple[int, int]]:
        """Calls prefilling pieces after cached tokens (a long prompt's later chunks, prompts
        past a prefix-cache hit) by (rows, padded length)."""
        return self.steps.chunk_shapes

    @property
    def attend_spans(self) -> collections.Counter[int]:
        """Decode steps by attention span."""
        return self.steps.attend_spans

    def kv_stats(self) -> dict[str, float]:
        """The pool and the prefix cache now: pages (all, used, cached, free), prompt tokens
        looked up and found, the hit rate, evictions and preemptions since the engine began."""
        with self._lock:
            kv = self.scheduler.kv
            return {"pages": kv.pages, "page_size": kv.page_size, "pages_used": kv.used,
                    "pages_cached": kv.cached, "pages_free": kv.available,
                    "prompt_tokens_queried": kv.stats.queried_tokens,
                    "prompt_tokens_cached": kv.stats.hit_tokens, "hit_rate": kv.stats.hit_rate,
                    "evictions": kv.stats.evictions, "preemptions": self.scheduler.preemptions}

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
        """Run one `StepPlan`: prefill what it admits (a long prompt: its next chunk), then
        decode one token for every sequence past its prompt. Returns the (request id, token)
        pairs produced. A device call that fails ends the requests in it with finish_reason
        "error"; the others go on. Should the step itself fail (a bug), it ends the requests it
        held with "error" (and logs it), rather than raise: the engine goes on serving the rest."""
        with self._lock:
            while self._stepping:
                self._changed.wait()
            self._stepping = True
            self._drop_released()
        held: set[int] = set()     # ids in this step's calls: ended if the step fails
        events: list[tuple[int, int]] = []
        failure = None
        try:
            with self._lock:
                plan = self._plan()
                held = {rid for call in plan.prefills for p in call.pieces
                        for rid in (p.rid, *p.sharing)} | {rid for _, rid in plan.decode}
            events = self.executor.run(plan)
            held.clear()
        except Exception as err:
            log.exception("engine step failed")
            failure = one_line(f"engine step failed: {type(err).__name__}: {err}")
        except BaseException:         # KeyboardInterrupt & co.: the requests stay live
            held.clear()
            failure = "the step was interrupted"
            raise
        finally:
            with self._lock:
                if failure is not None:
                    # The step's requests, whose state is unknown: ended, so that no later step
                    # meets the same failure (the live ones could otherwise fail every step).
                    for rid in sorted(held):
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

    def _new_kv(self) -> KVManager:
        """A KV manager for a new pool, its counters carried over (they count since the engine
        began, across a pool lost to a failed step)."""
        kv = KVManager(self.pages, self.page_size, self.prefix_cache)
        if hasattr(self, "scheduler"):
            kv.stats = self.scheduler.kv.stats
        return kv

    def _plan(self) -> StepPlan:
        """This step's plan, the pool made first if there is none (on failure, the requests it
        would have admitted, the first `batch_size` waiting, end with "error"; the next ones
        try again)."""
        if self.steps.cache is None and self.waiting:
            try:
                self.steps.new_pool(self.pages, self.page_size)
            except Exception as err:
                log.exception("making a KV pool of %d pages failed", self.pages)
                error = one_line(f"the KV cache ({self.pages} pages of {self.page_size}) could "
                                 f"not be made: {type(err).__name__}: {err}")
                for rid in list(self.waiting)[:self.max_batch]:
                    self._finish(rid, "error", error=error)
            self.scheduler.reset(self._new_kv())
        if self.steps.cache is None:
            return StepPlan((), (), 0, ())
        plan = self.scheduler.schedule()
        if plan.preempted:
            log.info("preempted requests %s: the KV pool is full", list(plan.preempted))
        return plan

    def _check_cache(self) -> None:
        """After a failed call: if the pool went with it (donated), end every live request
        (their keys and values are gone) and leave the pool to be re-made."""
        if self.steps.lost:
            for rid in [r for r in self.slots if r is not None]:
                self._finish(rid, "error", error="the KV cache was lost when a step failed")
            self.steps.drop_cache()
            self.scheduler.reset(self._new_kv())

    def _finish(self, rid: int, reason: str, error: str | None = None) -> None:
        """End a request, give back its slot and pages and wake its readers."""
        if self.book.finish(rid, reason, error=error):
            self.scheduler.free(rid)
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
