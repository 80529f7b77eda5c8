"""What the engine takes and gives: `Request`, `Result`, `Event`, and the checks a request passes
at `Engine.submit` (so that no request can fail a batch once admitted)."""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from grok.errors import RequestError
from grok.serving.sampling import SamplingParams

SEED_LIMIT = 2 ** 32            # seeds are uint32 (jax.random.key)
FINISH_REASONS = ("eos", "stop", "length", "cancelled", "error")


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
    """What a request produced so far; `finish_reason` is None while it runs, then one of "eos",
    "stop" (a stop id or string), "length", "cancelled" or "error" (then `error` says why).
    `text` (with a tokenizer) is the final text, cut before a stop string; for a cancelled or
    failed request, the text its events carried."""

    id: int
    request: Request
    prompt: list[int]
    tokens: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    text: str | None = None
    error: str | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass(frozen=True)
class Event:
    """One step of one request: the new `token` (None on a last event that brings none: a
    cancelled or failed request), the `text` that became safe to show (None without a
    tokenizer), and on the last event its `finish_reason` (and `error` when it failed)."""

    id: int
    token: int | None
    text: str | None
    finish_reason: str | None = None
    error: str | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def token_ids(tokens: object, vocab_size: int, what: str = "prompt") -> list[int]:
    """`tokens` as a non-empty list of ints in [0, vocab_size); RequestError naming `what` (e.g.
    "prompt", "token list 2") and the value otherwise."""
    if isinstance(tokens, (str, bytes)) or not isinstance(tokens, (Sequence, np.ndarray)):
        raise RequestError(f"{what} must be a sequence of token ids, got {type(tokens).__name__}")
    bad = next((t for t in tokens if not _is_int(t)), None)
    if bad is not None:
        raise RequestError(f"{what} holds {bad!r} ({type(bad).__name__}); token ids are ints"
                           [:200])
    ids = [int(t) for t in tokens]
    if not ids:
        raise RequestError(f"{what} is empty: give at least one token")
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise RequestError(f"{what}: id {bad} is outside [0, {vocab_size}), the vocabulary")
    return ids


def check_request(request: object, vocab_size: int, context: int, has_tokenizer: bool
                  ) -> list[int]:
    """The prompt ids `request` will run with in a context of `context` tokens; RequestError,
    naming the field and value, when it cannot run."""
    if not isinstance(request, Request):
        raise RequestError(f"expected a grok.Request, got {type(request).__name__}")
    prompt = token_ids(request.prompt, vocab_size)
    new = request.max_new_tokens
    if not _is_int(new) or new < 1:
        raise RequestError(f"max_new_tokens must be an integer >= 1, got {new!r}")
    if new >= context:
        raise RequestError(f"max_new_tokens={new} leaves no room for a prompt in a context of "
                           f"{context} tokens")
    if not isinstance(request.sampling, SamplingParams):
        raise RequestError(f"sampling must be a grok.SamplingParams, got "
                           f"{request.sampling!r}"[:200])
    if not _is_int(request.seed) or not 0 <= request.seed < SEED_LIMIT:
        raise RequestError(f"seed must be an integer in [0, 2**32), got {request.seed!r}"[:200])
    if isinstance(request.stop_ids, (str, bytes)) or not isinstance(request.stop_ids, Sequence) \
            or not all(_is_int(t) for t in request.stop_ids):
        raise RequestError(f"stop_ids must be a sequence of token ids, got "
                           f"{request.stop_ids!r}"[:200])
    stops = request.stop_strings
    if isinstance(stops, str) or not isinstance(stops, Sequence) \
            or not all(isinstance(s, str) for s in stops):
        raise RequestError(f"stop_strings must be a sequence of strings, got {stops!r}"[:200])
    if stops and not has_tokenizer:
        raise RequestError("stop_strings need a tokenizer")
    if request.truncate not in (None, "left"):
        raise RequestError(f"truncate must be None or 'left', got {request.truncate!r}"[:200])
    room = context - new
    if len(prompt) > room:
        if request.truncate != "left":
            raise RequestError(f"prompt of {len(prompt)} tokens + max_new_tokens={new} exceeds "
                               f"the context of {context} tokens (pass truncate='left' to drop "
                               f"the prompt's start)")
        prompt = prompt[-room:]
    return prompt


def top_k_setting(top_k: int, vocab_size: int) -> float:
    """top_k as the sampler's float setting: any k >= V keeps every token (and fits a float)."""
    return float(min(top_k, vocab_size))

