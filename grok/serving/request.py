"""What the engine takes and gives: `Request`, `Result`, `Event`, and the checks a request passes
at `Engine.submit` (so that no request can fail a batch once admitted)."""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from grok.errors import RequestError
from grok.serving.sampling import MAX_LOGPROBS, SamplingParams, describe, is_int

SEED_LIMIT = 2 ** 32            # seeds are uint32 (jax.random.key)
FINISH_REASONS = ("eos", "stop", "length", "cancelled", "error")


@dataclasses.dataclass(frozen=True)
class Request:
    """One prompt (token ids) and how to continue it.

    Log-probabilities (off by default; see `Result`): `logprobs` k in [0, MAX_LOGPROBS] gives each
    generated token's log-probability and the k most likely tokens with theirs (0 or None: off);
    `prompt_logprobs` gives each prompt token's log-probability given the tokens before it (an
    extra full forward over the prompt). Every log-probability is the float32 log-softmax of the
    model's raw logits at that position: before penalties, temperature, top-k and top-p (as
    vLLM's default), so it describes the model, not the sampler's modified distribution."""

    prompt: Sequence[int]
    max_new_tokens: int = 64
    sampling: SamplingParams = SamplingParams()
    seed: int = 0
    stop_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    truncate: str | None = None     # None: refuse a prompt that does not fit; "left": cut its start
    logprobs: int | None = 0        # top alternatives per generated token, 0..20; 0 / None: off
    prompt_logprobs: bool = False   # the prompt tokens' log-probabilities


@dataclasses.dataclass
class Result:
    """What a request produced so far; `finish_reason` is None while it runs, then one of "eos",
    "stop" (a stop id or string), "length", "cancelled" or "error" (then `error` says why).
    `text` (with a tokenizer) is the final text, cut before a stop string; for a cancelled or
    failed request, the text its events carried.

    With `request.logprobs` on: `logprobs[i]` is the log-probability of `tokens[i]` and
    `top_logprobs[i]` the k most likely (token id, log-probability) pairs at that step, most
    likely first. With `request.prompt_logprobs`: `prompt_logprobs[j]` is that of `prompt[j]`
    given `prompt[:j]` (None for the first token, which has no context), and with logprobs k
    also `prompt_top_logprobs[j]`, the k most likely there; filled before the first event.
    Each list stays empty when not asked for (definition: `Request`). `cached_tokens`: how
    many prompt tokens the prefix cache served (their prefill skipped); `preemptions`: how
    often the request gave its pages back to others and was recomputed."""

    id: int
    request: Request
    prompt: list[int]
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    top_logprobs: list[tuple[tuple[int, float], ...]] = dataclasses.field(default_factory=list)
    prompt_logprobs: list[float | None] = dataclasses.field(default_factory=list)
    prompt_top_logprobs: list[tuple[tuple[int, float], ...] | None] = dataclasses.field(
        default_factory=list)
    finish_reason: str | None = None
    text: str | None = None
    error: str | None = None
    cached_tokens: int = 0
    preemptions: int = 0

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass(frozen=True)
class Event:
    """One step of one request: the new `token` (None on a last event that brings none: a
    cancelled or failed request), the `text` that became safe to show (None without a
    tokenizer), and on the last event its `finish_reason` (and `error` when it failed).
    With `request.logprobs` on, a token's event carries its `logprob` and the `top_logprobs`
    ((token id, log-probability) pairs, most likely first); both None otherwise."""

    id: int
    token: int | None
    text: str | None
    finish_reason: str | None = None
    error: str | None = None
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


MAX_PROMPT_TOKENS = 1 << 24     # the longest prompt looked at, even one to be truncated


def token_ids(tokens: object, vocab_size: int, what: str = "prompt", *,
              allow_empty: bool = False) -> list[int]:
    """`tokens` as a list of ints in [0, vocab_size) (non-empty unless `allow_empty`);
    RequestError naming `what` (e.g. "prompt", "token list 2") and the value otherwise.

    Token ids are Python ints and numpy integer scalars, in a sequence (a list, a tuple) or a
    1-D integer numpy array; anything else (floats, bools, strings, bytes) is refused, never
    converted."""
    if isinstance(tokens, np.ndarray):
        if tokens.ndim != 1 or tokens.dtype.kind not in "iuO":
            raise RequestError(f"{what} must be a 1-D array of integer token ids, got "
                               f"{describe(tokens)}")
    elif isinstance(tokens, (str, bytes, bytearray)) or not isinstance(tokens, Sequence):
        raise RequestError(f"{what} must be a sequence of token ids, got {describe(tokens)}")
    if len(tokens) > MAX_PROMPT_TOKENS:
        raise RequestError(f"{what} has {len(tokens)} tokens, more than {MAX_PROMPT_TOKENS}")
    if isinstance(tokens, np.ndarray) and tokens.dtype.kind in "iu":
        ids = tokens.tolist()
    else:
        where = _first_index(tokens, lambda t: not is_int(t))
        if where is not None:         # by index: the bad value may itself be None
            raise RequestError(f"{what} holds {describe(tokens[where])}; token ids are ints")
        ids = [int(t) for t in tokens]
    if not ids and not allow_empty:
        raise RequestError(f"{what} is empty: give at least one token")
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        shown = f"id {bad}" if abs(bad) < 10 ** 40 else f"an id of {bad.bit_length()} bits"
        raise RequestError(f"{what}: {shown} is outside [0, {vocab_size}), the vocabulary")
    return ids


def _first_index(items: Sequence, wrong: Callable[[object], bool]) -> int | None:
    """The index of the first item `wrong` holds for, or None when there is none."""
    return next((i for i, item in enumerate(items) if wrong(item)), None)


def checked_request(request: object, vocab_size: int, context: int, has_tokenizer: bool
                    ) -> tuple[Request, list[int]]:
    """`request` with every field validated and normalized (plain ints, tuples, a re-checked
    `SamplingParams`), and the prompt ids it will run with in a context of `context` tokens;
    RequestError, naming the field and value, when it cannot run. Nothing a request holds is
    looked at again after this: a request that passes cannot fail a batch."""
    if not isinstance(request, Request):
        raise RequestError(f"expected a grok.Request, got {describe(request)}")
    new = request.max_new_tokens
    if not is_int(new) or new < 1:
        raise RequestError(f"max_new_tokens must be an integer >= 1, got {describe(new)}")
    if new >= context:
        raise RequestError(f"max_new_tokens={describe(new)} leaves no room for a prompt in a "
                           f"context of {context} tokens")
    new = int(new)
    truncate = request.truncate
    if not (truncate is None or (isinstance(truncate, str) and truncate == "left")):
        raise RequestError(f"truncate must be None or 'left', got {describe(truncate)}")
    room = context - new
    prompt = request.prompt
    sized = isinstance(prompt, np.ndarray) and prompt.ndim == 1 or (
        isinstance(prompt, Sequence) and not isinstance(prompt, (str, bytes, bytearray)))
    if truncate is None and sized and len(prompt) > room:   # before looking at every id
        raise RequestError(f"prompt of {len(prompt)} tokens + max_new_tokens={new} "
                           f"exceeds the context of {context} tokens (pass truncate='left' to "
                           f"drop the prompt's start)")
    ids = token_ids(prompt, vocab_size)[-room:]
    if not isinstance(request.sampling, SamplingParams):
        raise RequestError(f"sampling must be a grok.SamplingParams, got "
                           f"{describe(request.sampling)}")
    sampling = request.sampling.checked()
    seed = request.seed
    if not is_int(seed) or not 0 <= seed < SEED_LIMIT:
        raise RequestError(f"seed must be an integer in [0, 2**32), got {describe(seed)}")
    stop_ids = tuple(token_ids(request.stop_ids, vocab_size, "stop_ids", allow_empty=True))
    stops = request.stop_strings
    if isinstance(stops, (str, bytes, bytearray)) or not isinstance(stops, Sequence):
        raise RequestError(f"stop_strings must be a sequence of strings, got {describe(stops)}")
    where = _first_index(stops, lambda s: not isinstance(s, str))
    if where is not None:
        raise RequestError(f"stop_strings must be a sequence of strings; it holds "
                           f"{describe(stops[where])}")
    if stops and not has_tokenizer:
        raise RequestError("stop_strings need a tokenizer")
    logprobs = 0 if request.logprobs is None else request.logprobs
    if not is_int(logprobs) or not 0 <= logprobs <= MAX_LOGPROBS:
        raise RequestError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}] (0 or None: off), "
                           f"got {describe(request.logprobs)}")
    prompt_logprobs = request.prompt_logprobs
    if not isinstance(prompt_logprobs, (bool, np.bool_)):
        raise RequestError(f"prompt_logprobs must be True or False, got "
                           f"{describe(prompt_logprobs)}")
    checked = Request(prompt, new, sampling, int(seed), stop_ids, tuple(stops), truncate,
                      int(logprobs), bool(prompt_logprobs))
    return checked, ids


def check_request(request: object, vocab_size: int, context: int, has_tokenizer: bool
                  ) -> list[int]:
    """The prompt ids `request` will run with in a context of `context` tokens; RequestError,
    naming the field and value, when it cannot run (see `checked_request`)."""
    return checked_request(request, vocab_size, context, has_tokenizer)[1]


def top_k_setting(top_k: int, vocab_size: int) -> float:
    """top_k as the sampler's float setting: any k >= V keeps every token (and fits a float)."""
    return float(min(top_k, vocab_size))

