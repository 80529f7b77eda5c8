"""Generation: a continuous-batching engine over fixed batch slots and a shared KV cache.

A finished request frees its slot and the next waiting request is prefilled into it while the
others keep decoding. Prompts admitted together are prefilled together, grouped by power-of-two
length bucket, in power-of-two row counts (at most `prefill_tokens` tokens per call); decode steps
attend over the cache up to the longest live sequence (also bucketed), so the number of compiles
stays bounded by the number of buckets.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from grok.config import PREFILL_TOKENS
from grok.serving.runner import ModelRunner
from grok.serving.sampling import Penalties, SamplingParams, row_keys

log = logging.getLogger(__name__)
MIN_BUCKET = 16          # prompt lengths
MIN_ATTEND_BUCKET = 256  # decode attention spans: below this a wider span costs less than a compile


def bucket(n: int, limit: int, minimum: int = MIN_BUCKET) -> int:
    """The smallest power of two >= n (at least `minimum`), capped at `limit`."""
    size = minimum
    while size < n:
        size *= 2
    return min(size, limit)


@dataclasses.dataclass(frozen=True)
class Request:
    """One prompt (token ids) and how to continue it."""

    prompt: Sequence[int]
    max_new_tokens: int = 64
    sampling: SamplingParams = SamplingParams()
    seed: int = 0
    stop_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    truncate: str | None = None     # None: refuse a prompt that does not fit; "left": cut its start


@dataclasses.dataclass
class Result:
    """What a request produced so far; `finish_reason` is None while it runs."""

    id: int
    request: Request
    prompt: list[int]
    tokens: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None   # "eos", "stop" (id or string) or "length"
    text: str | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class Engine:
    """Continuous batching over `batch_size` slots of a cache of `max_len` positions.

    Use from a notebook: `rid = engine.submit(Request(...))`, then `engine.step()` until
    `engine.idle`, and read `engine.results[rid]`; or iterate `engine.run()` for token events.
    """

    def __init__(self, runner: ModelRunner, batch_size: int = 8, max_len: int | None = None,
                 tokenizer: Any = None, prefill_tokens: int = PREFILL_TOKENS):
        config = runner.config
        self.runner = runner
        self.config = config
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_len = min(max_len or config.sequence_len, config.sequence_len)
        self.cache = runner.new_cache(batch_size, self.max_len)
        self.results: dict[int, Result] = {}
        self.waiting: collections.deque[int] = collections.deque()
        self.slots: list[int | None] = [None] * batch_size
        self.prefill_tokens = prefill_tokens
        self.attend_spans: collections.Counter[int] = collections.Counter()  # decode steps by span
        self.prefill_shapes: collections.Counter[tuple[int, int]] = collections.Counter()  # (R, P)
        # Requests with penalties: every token id seen (prompt and output) -> its output count.
        self._seen: dict[int, dict[int, int]] = {}
        self._next_id = 0

    # --- requests -----------------------------------------------------------------------------
    def check(self, request: Request) -> list[int]:
        """The prompt ids the request will run with; ValueError when it cannot run."""
        prompt = [int(t) for t in request.prompt]
        if not prompt:
            raise ValueError("the prompt is empty: give at least one token")
        bad = [t for t in prompt if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, "
                             f"{self.config.vocab_size})")
        new = request.max_new_tokens
        if isinstance(new, bool) or not isinstance(new, int) or new < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {new!r}")
        if new >= self.max_len:
            raise ValueError(f"max_new_tokens={new} leaves no room for a prompt in a context of "
                             f"{self.max_len} tokens")
        if request.truncate not in (None, "left"):
            raise ValueError(f"truncate must be None or 'left', got {request.truncate!r}")
        room = self.max_len - new
        if len(prompt) > room:
            if request.truncate != "left":
                raise ValueError(f"prompt of {len(prompt)} tokens + max_new_tokens={new} exceeds "
                                 f"the context of {self.max_len} tokens (pass truncate='left' to "
                                 f"drop the prompt's start)")
            prompt = prompt[-room:]
        if request.stop_strings and self.tokenizer is None:
            raise ValueError("stop_strings need a tokenizer")
        return prompt

    def submit(self, request: Request) -> int:
        """Queue a request; returns its id. Invalid requests raise ValueError here."""
        prompt = self.check(request)
        rid = self._next_id
        self._next_id += 1
        self.results[rid] = Result(rid, request, prompt)
        if request.sampling.penalized:
            self._seen[rid] = dict.fromkeys(prompt, 0)
        self.waiting.append(rid)
        return rid

    @property
    def idle(self) -> bool:
        return not self.waiting and all(s is None for s in self.slots)

    # --- stepping -----------------------------------------------------------------------------
    def step(self) -> list[tuple[int, int]]:
        """Admit waiting requests into free slots, then decode one token for every live slot.
        Returns the (request id, token) pairs produced."""
        events = self._admit()
        live = [(slot, rid) for slot, rid in enumerate(self.slots) if rid is not None]
        if not live:
            return events
        tokens = np.zeros(self.batch_size, np.int32)
        positions = np.full(self.batch_size, self.max_len, np.int32)  # idle slots write nothing
        seeds = np.zeros(self.batch_size, np.uint32)
        steps = np.zeros(self.batch_size, np.int32)
        settings = np.zeros((3, self.batch_size), np.float32)
        for slot, rid in live:
            res = self.results[rid]
            tokens[slot] = res.tokens[-1]
            positions[slot] = len(res.prompt) + len(res.tokens) - 1
            seeds[slot], steps[slot] = res.request.seed, len(res.tokens)
            s = res.request.sampling
            settings[:, slot] = (s.temperature, s.top_p, s.top_k)
        attend = bucket(int(max(positions[s] for s, _ in live)) + 1, self.max_len,
                        MIN_ATTEND_BUCKET)
        self.attend_spans[attend] += 1
        logits, self.cache = self.runner.decode(self.runner.params, self.cache,
                                                 jnp.asarray(tokens), jnp.asarray(positions),
                                                 attend)
        chosen = self._draw(logits, seeds, steps, settings, self._penalties(live, self.batch_size))
        for slot, rid in live:
            events.append((rid, self._append(slot, rid, int(chosen[slot]))))
        return events

    def _draw(self, logits, seeds, steps, settings, penalties=None) -> np.ndarray:
        keys = row_keys(jnp.asarray(seeds), jnp.asarray(steps))
        return np.asarray(self.runner.sample(logits, keys, jnp.asarray(settings[0]),
                                              jnp.asarray(settings[1]),
                                              jnp.asarray(settings[2], jnp.int32), penalties))

    def _penalties(self, rows: list[tuple[int, int]], batch: int) -> Penalties | None:
        """Penalty inputs for the (row, request id) pairs of a call whose logits have `batch`
        rows; None when no request among them has a penalty (then the plain sampler runs)."""
        used = [(row, rid) for row, rid in rows if rid in self._seen]
        if not used:
            return None
        # Ids padded to a power of two (few compiles); the pad id, V, is dropped by the scatter.
        width = bucket(max(len(self._seen[rid]) for _, rid in used), 1 << 30, minimum=64)
        ids = np.full((batch, width), self.config.vocab_size, np.int32)
        counts = np.zeros((batch, width), np.int32)
        factors = np.zeros((3, batch), np.float32)
        factors[0] = 1.0
        for row, rid in used:
            seen = self._seen[rid]
            ids[row, :len(seen)] = list(seen)
            counts[row, :len(seen)] = list(seen.values())
            s = self.results[rid].request.sampling
            factors[:, row] = (s.repetition_penalty, s.presence_penalty, s.frequency_penalty)
        return Penalties(*(jnp.asarray(a) for a in (ids, counts, *factors)))

    def _admit(self) -> list[tuple[int, int]]:
        """Move waiting requests into free slots, prefilling those of one length bucket together."""
        groups: dict[int, list[tuple[int, int]]] = collections.defaultdict(list)
        for slot in range(self.batch_size):
            if self.slots[slot] is None and self.waiting:
                rid = self.waiting.popleft()
                groups[bucket(len(self.results[rid].prompt), self.max_len)].append((slot, rid))
        events = []
        for length, group in sorted(groups.items()):
            most = max(1, self.prefill_tokens // length)
            for start in range(0, len(group), most):
                events += self._prefill(group[start:start + most], length)
        return events

    def _prefill(self, group: list[tuple[int, int]], length: int) -> list[tuple[int, int]]:
        """Prefill the (slot, request id) pairs of `group` in one call, padded to `length` tokens
        and a power-of-two row count (pad rows repeat the first prompt and write nothing), then
        draw each request's first token."""
        rows = min(bucket(len(group), self.batch_size, minimum=1), self.batch_size)
        tokens = np.full((rows, length), self.config.pad_token, np.int32)
        cache_rows = np.full(rows, self.batch_size, np.int32)   # past the cache: dropped
        lengths = np.ones(rows, np.int32)
        seeds = np.zeros(rows, np.uint32)
        settings = np.zeros((3, rows), np.float32)
        for i, (slot, rid) in enumerate(group):
            res = self.results[rid]
            tokens[i, :len(res.prompt)] = res.prompt
            cache_rows[i], lengths[i], seeds[i] = slot, len(res.prompt), res.request.seed
            s = res.request.sampling
            settings[:, i] = (s.temperature, s.top_p, s.top_k)
        tokens[len(group):], lengths[len(group):] = tokens[0], lengths[0]
        self.prefill_shapes[(rows, length)] += 1
        logits, self.cache = self.runner.prefill(
            self.runner.params, self.cache, jnp.asarray(tokens), jnp.asarray(cache_rows),
            jnp.asarray(lengths))
        chosen = self._draw(logits, seeds, np.zeros(rows, np.int32), settings,
                            self._penalties([(i, rid) for i, (_, rid) in enumerate(group)], rows))
        events = []
        for i, (slot, rid) in enumerate(group):
            self.slots[slot] = rid
            events.append((rid, self._append(slot, rid, int(chosen[i]))))
        return events

    def _append(self, slot: int, rid: int, token: int) -> int:
        res = self.results[rid]
        req = res.request
        res.tokens.append(token)
        seen = self._seen.get(rid)
        if seen is not None:
            seen[token] = seen.get(token, 0) + 1
        if token == self.config.eos_token:
            res.finish_reason = "eos"
        elif token in req.stop_ids:
            res.finish_reason = "stop"
        elif req.stop_strings and self._hit_stop_string(res):
            res.finish_reason = "stop"
        elif len(res.tokens) >= req.max_new_tokens:
            res.finish_reason = "length"
        if res.done:
            self.slots[slot] = None
            self._seen.pop(rid, None)
            if self.tokenizer is not None and res.text is None:
                res.text = self.tokenizer.decode(res.tokens)
        return token

    def _hit_stop_string(self, res: Result) -> bool:
        text = self.tokenizer.decode(res.tokens)
        hits = [text.find(s) for s in res.request.stop_strings if s and s in text]
        if not hits:
            return False
        res.text = text[:min(hits)]
        return True

    def run(self) -> Iterator[tuple[int, int]]:
        """Step until every request has finished, yielding (request id, token) as produced."""
        while not self.idle:
            yield from self.step()
