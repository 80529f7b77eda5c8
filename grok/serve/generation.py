"""One completion's engine requests: submitted (one per prompt and choice), their events bridged
to asyncio (the engine's listener feeding one queue through `loop.call_soon_threadsafe`), and
turned into OpenAI's answer by the endpoint's `Shape`: a whole completion, or server-sent events.
A request ends, whatever way it ends, with `engine.cancel` and `engine.release`, so its slot
frees within one step and the engine keeps nothing of it."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import StreamingResponse

from grok.errors import RequestError, one_line
from grok.serve.protocol import SEED_LIMIT, ApiError, CompletionParams
from grok.serve.state import ServerState
from grok.serving.detokenizer import Detokenizer
from grok.serving.request import Event
from grok.serving.request import Request as EngineRequest

log = logging.getLogger(__name__)
DISCONNECT_POLL_S = 0.25              # how often a whole completion checks its client is there
FINISH = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "cancelled"}
# The engine's field names in its RequestError messages -> the API's.
ENGINE_FIELDS = {"max_new_tokens": "max_tokens", "stop_strings": "stop", "prompt": "prompt",
                 "seed": "seed", "temperature": "temperature", "top_p": "top_p",
                 "top_k": "top_k", "repetition_penalty": "repetition_penalty",
                 "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty"}


def submit(state: ServerState, params: CompletionParams) -> list[int]:
    """Queue one engine request per prompt and choice (choice j of a prompt: seed + j); a
    request the engine refuses is a 400 naming the field."""
    try:
        sampling = dataclasses.replace(state.model.sampling_defaults, **params.sampling)
        scored = params.logprobs is not None
        # The engine gives a token's log-probability only with its top k >= 1 (k 0 is off):
        # asked for no alternatives, the answer leaves them out (Choice, ChatShape).
        k = max(params.logprobs, 1) if scored else 0
        # max_tokens 0 (echo with logprobs): one token is generated and not shown
        requests = [EngineRequest(p.ids, max(params.max_tokens, 1), sampling,
                                  (params.seed + j) % SEED_LIMIT, params.stop_ids, params.stops,
                                  logprobs=k, prompt_logprobs=scored and params.echo)
                    for p in params.prompts for j in range(params.n)]
        rids = state.engine.submit_all(requests)
    except RequestError as err:
        first = str(err).split(" ", 1)[0].strip(":=")
        raise ApiError(400, str(err), ENGINE_FIELDS.get(first)) from None
    state.live.update(rids)
    state.metrics.prompt_tokens.inc(sum(len(p.ids) for p in params.prompts) * params.n)
    return rids


def end_request(state: ServerState, rid: int) -> None:
    """Cancel (if still running) and forget an engine request."""
    try:
        state.engine.cancel(rid)
        state.engine.release(rid)
    except Exception:                 # never let clean-up hide what ended the request
        log.exception("ending request %d failed", rid)
    state.live.discard(rid)


class Generation:
    """The events of one HTTP request's engine requests, merged into one asyncio queue (the
    engine hands each event over as it happens: `Engine.listen`); `close()` ends them all
    (idempotent)."""

    def __init__(self, state: ServerState, rids: list[int], loop: asyncio.AbstractEventLoop):
        self.state, self.rids, self.loop = state, rids, loop
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.open = set(range(len(rids)))
        self.tokens = [0] * len(rids)
        self.cached = [0] * len(rids)       # prompt tokens the prefix cache served, per request
        self.start = time.monotonic()
        self._last: list[float | None] = [None] * len(rids)
        self._closed = False
        for index, rid in enumerate(rids):
            try:
                state.engine.listen(rid, lambda event, index=index: self._put(index, event))
            except Exception as err:  # released meanwhile (then nobody listens), or a bug
                self._put(index, Event(id=rid, token=None, text=None, finish_reason="error",
                                       error=one_line(f"{err}")))

    def _put(self, index: int, event: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))
        except RuntimeError:          # the loop has closed: the server is gone
            pass

    async def next(self) -> tuple[int, Event]:
        """The next event of any of the requests still open."""
        index, event = await self.queue.get()
        if event.token is not None:
            now = time.monotonic()
            last = self._last[index]
            metrics = self.state.metrics
            metrics.generated_tokens.inc()
            if last is None:
                metrics.ttft.observe(now - self.start)
            else:
                metrics.token_latency.observe(now - last)
            self._last[index] = now
            self.tokens[index] += 1
        if event.done:
            self.open.discard(index)
            # read now: the engine forgets the request once `close` releases it
            result = self.state.engine.results.get(self.rids[index])
            self.cached[index] = result.cached_tokens if result is not None else 0
        return index, event

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            for rid in self.rids:
                end_request(self.state, rid)


class Choice:
    """One choice's answer as it grows: its text, and OpenAI's logprobs lists when asked (the
    tokens' pieces, their log-probabilities, the top alternatives as {piece: logprob}, and each
    piece's offset in the choice's text)."""

    def __init__(self, state: ServerState, params: CompletionParams, rid: int, prompt: Any):
        self.state, self.params, self.rid, self.prompt = state, params, rid, prompt
        self.text = ""
        self.reason: str | None = None
        self.started = False
        self.logprobs = self._empty()

    def take(self, event: Event) -> tuple[str, dict[str, list] | None]:
        """Add one engine event; the text and logprobs it adds to the answer (the echoed prompt
        first, on the choice's first event)."""
        text, scores = "", self._empty()
        if not self.started:
            self.started = True
            if self.params.echo:
                text += self.prompt.text
                if scores is not None:
                    self._extend(scores, self.prompt.ids, *self._prompt_scores(),
                                 self._prompt_offsets())
        shown = event.token is not None and self.params.max_tokens > 0
        if shown:
            offset = len(self.text) + len(text)     # where this token's text begins
            text += event.text or ""
            k = self.params.logprobs       # 0: each token's own entry, as a prompt token's
            top = None if event.top_logprobs is None else \
                [event.top_logprobs[:k] if k else ((event.token, event.logprob),)]
            self._extend(scores, [event.token], [event.logprob], top or [None], [offset])
        elif event.text and self.params.max_tokens > 0:
            text += event.text        # held-back text released by the last event
        if event.done:
            self.reason = FINISH.get(event.finish_reason, event.finish_reason)
        self.text += text
        if scores is not None and self.logprobs is not None:
            for key, values in scores.items():
                self.logprobs[key] += values
        return text, scores

    def _empty(self) -> dict[str, list] | None:
        return None if self.params.logprobs is None else \
            {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def _prompt_scores(self) -> tuple[list[float | None], list]:
        """The echoed prompt tokens' log-probabilities and top alternatives (None for the first
        token; with logprobs 0, each token's own entry), as the engine scored them."""
        n = len(self.prompt.ids)
        result = self.state.engine.results.get(self.rid)
        scores = list(result.prompt_logprobs) if result is not None else []
        if len(scores) != n:
            return [None] * n, [None] * n
        tops = list(result.prompt_top_logprobs)
        if len(tops) != n or not self.params.logprobs:
            tops = [None] + [[(t, v)] for t, v in zip(self.prompt.ids[1:], scores[1:])]
        return scores, tops

    def _prompt_offsets(self) -> list[int]:
        """Where each prompt token's text begins in the echoed prompt: the length of the text
        the tokens before it decode to (read incrementally, as the engine's events are)."""
        detok, offsets, length = Detokenizer(self.state.model.tokenizer), [], 0
        for token in self.prompt.ids:
            offsets.append(min(length, len(self.prompt.text)))
            length += len(detok.add(token))
        return offsets

    def _extend(self, scores: dict[str, list] | None, ids: list[int], values: list, tops: list,
                offsets: list[int]) -> None:
        if scores is None:
            return
        tokenizer = self.state.model.tokenizer
        for token, value, top, offset in zip(ids, values, tops, offsets):
            scores["tokens"].append(tokenizer.piece(token))
            scores["token_logprobs"].append(value)
            scores["top_logprobs"].append(
                None if top is None else {tokenizer.piece(t): s for t, s in top})
            scores["text_offset"].append(offset)


def usage(params: CompletionParams, gen: Generation) -> dict[str, Any]:
    """OpenAI's usage: prompt tokens (each prompt once, whatever `n`), generated tokens, and
    of the prompt tokens those the prefix cache served (`prompt_tokens_details.cached_tokens`)."""
    prompt = sum(len(p.ids) for p in params.prompts)
    done = sum(gen.tokens) if params.max_tokens > 0 else 0
    # once per prompt, as prompt_tokens: its choice 0's, the request that looked the prompt up
    cached = sum(gen.cached[i * params.n] for i in range(len(params.prompts)))
    return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done,
            "prompt_tokens_details": {"cached_tokens": cached}}


def failed(event: Event) -> ApiError:
    return ApiError(500, f"generation failed: {event.error or 'unknown error'}", None,
                    "generation_failed", kind="server_error")


def closing_error() -> ApiError:
    return ApiError(503, "the server is shutting down", None, "server_shutdown",
                    kind="server_error")


def ended_by(state: ServerState, event: Event) -> ApiError | None:
    """The error that ended a request, if one did: a failed step, or the shutdown."""
    if event.finish_reason == "error":
        return failed(event)
    if event.finish_reason == "cancelled" and state.closing:
        return ApiError(503, "the server shut down before this completion finished", None,
                        "server_shutdown", kind="server_error")
    return None


class Shape:
    """How an endpoint turns its engine requests' events into OpenAI's answer: the whole
    completion's choices, or a stream's chunks (TextShape: /v1/completions'; grok.serve.chat's
    ChatShape: /v1/chat/completions')."""

    id_prefix = "cmpl"
    object = "text_completion"             # of a whole answer
    chunk_object = "text_completion"       # of a stream's chunks

    def __init__(self, state: ServerState, params: CompletionParams, gen: Generation):
        self.state, self.params = state, params

    def opening(self) -> list[dict[str, Any]]:
        """The choice entries a stream begins with, before any event (none by default)."""
        return []

    def take(self, index: int, event: Event) -> list[dict[str, Any]]:
        """Add one event of choice `index`; the choice entries it adds to a stream (a chunk
        each)."""
        raise NotImplementedError

    def choices(self) -> list[dict[str, Any]]:
        """The whole answer's choices, once every event is taken."""
        raise NotImplementedError


class TextShape(Shape):
    """/v1/completions' text completions: choice i continues prompt i // n, its text (the
    prompt first with echo) and logprobs in OpenAI's legacy lists."""

    def __init__(self, state: ServerState, params: CompletionParams, gen: Generation):
        super().__init__(state, params, gen)
        self.answers = [Choice(state, params, rid, params.prompts[i // params.n])
                        for i, rid in enumerate(gen.rids)]

    def take(self, index: int, event: Event) -> list[dict[str, Any]]:
        choice = self.answers[index]
        text, scores = choice.take(event)
        if text or event.done or (scores and scores["tokens"]):
            return [{"index": index, "text": text, "logprobs": scores,
                     "finish_reason": choice.reason}]
        return []

    def choices(self) -> list[dict[str, Any]]:
        return [{"index": i, "text": a.text, "logprobs": a.logprobs, "finish_reason": a.reason}
                for i, a in enumerate(self.answers)]


async def complete(state: ServerState, params: CompletionParams, gen: Generation,
                   request: Request, shape: Shape) -> dict[str, Any]:
    """The whole completion, shaped by `shape`; stops early (and cancels) if the client goes
    away."""
    checked = time.monotonic()
    while gen.open:
        if time.monotonic() - checked >= DISCONNECT_POLL_S:
            if await request.is_disconnected():
                raise ApiError(499, "the client closed the connection", None, "client_closed")
            checked = time.monotonic()
        try:
            index, event = await asyncio.wait_for(gen.next(), timeout=DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
            continue
        error = ended_by(state, event)
        if error is not None:
            raise error
        shape.take(index, event)
    return {"id": f"{shape.id_prefix}-{uuid.uuid4().hex}", "object": shape.object,
            "created": int(time.time()), "model": state.model_name, "choices": shape.choices(),
            "usage": usage(params, gen)}


async def chunks(state: ServerState, params: CompletionParams, gen: Generation, shape: Shape
                 ) -> AsyncIterator[bytes]:
    """Server-sent events: a chunk per choice entry `shape` makes (a piece of text; the last
    of each choice with its finish_reason), then (with stream_options.include_usage) the usage,
    then `[DONE]`; an error that ends a request is an error event, then `[DONE]`."""
    base = {"id": f"{shape.id_prefix}-{uuid.uuid4().hex}", "object": shape.chunk_object,
            "created": int(time.time()), "model": state.model_name}
    for entry in shape.opening():
        yield sse(dict(base, choices=[entry]))
    while gen.open:
        index, event = await gen.next()
        error = ended_by(state, event)
        if error is not None:
            yield sse(error.body())
            yield b"data: [DONE]\n\n"
            return
        for entry in shape.take(index, event):
            yield sse(dict(base, choices=[entry]))
    if params.include_usage:
        yield sse(dict(base, choices=[], usage=usage(params, gen)))
    yield b"data: [DONE]\n\n"


def sse(body: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(body, separators=(",", ":")).encode("utf-8") + b"\n\n"


class EventStreamResponse(StreamingResponse):
    """A streaming response that runs `cleanup` however it ends (finished, client gone,
    cancelled at shutdown): the generator's own `finally` would wait for its collection."""

    def __init__(self, content: AsyncIterator[bytes], cleanup: Any, **kwargs: Any):
        super().__init__(content, **kwargs)
        self._cleanup = cleanup

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._cleanup()
