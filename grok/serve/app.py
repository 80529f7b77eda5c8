"""The FastAPI application: OpenAI's /v1/completions, /v1/chat/completions (and /v1/models)
over a model's one long-lived engine, plus /health, Prometheus /metrics and vLLM's tokenizer
endpoints (/tokenizer_info, /tokenize, /detokenize: tokenize.py).

The engine steps on its own thread (`Engine.start()`, at startup); generation.py bridges each
completion's engine requests to asyncio and shapes the answers; chat.py reads and shapes chats.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from grok.serve.chat import ChatShape, checked_chat
from grok.serve.metrics import CONTENT_TYPE
from grok.serve.generation import (EventStreamResponse, Generation, Shape, chunks,
                                   TextShape, closing_error, complete, end_request, submit)
from grok.serve.protocol import (DEFAULT_MAX_STOP_CHARS, ApiError, prompt_chars_for,
                                 CompletionParams, TextLimits, check_model, completion_params,
                                 parse_json)
from grok.serve.state import DEFAULT_READ_TIMEOUT, ServerState
from grok.serve.tokenize import checked_detokenize, checked_tokenize, tokenizer_info

log = logging.getLogger(__name__)
MAX_BODY = 4 << 20                    # bytes of a request body
DEFAULT_MAX_WAITING = 64
RETRY_AFTER_S = 1
ENDPOINTS = ("/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions",
             "/tokenizer_info", "/tokenize", "/detokenize")
OPEN_PATHS = ("/health",)             # liveness probes carry no key (as vLLM's /health)


def create_app(model: Any, *, model_name: str | None = None, api_key: str | None = None,
               max_waiting: int = DEFAULT_MAX_WAITING,
               max_prompt_chars: int | None = None,
               max_stop_chars: int = DEFAULT_MAX_STOP_CHARS,
               read_timeout: float = DEFAULT_READ_TIMEOUT) -> FastAPI:
    """An app serving `model` (a `grok.Grok` with a tokenizer) as `model_name`. With `api_key`
    every request but GET /health needs `Authorization: Bearer <api_key>`. A completion is
    refused with 429 while `max_waiting` or more engine requests wait for a slot; with 400 if a
    prompt is longer than `max_prompt_chars` characters (default: 32 a token of the model's
    context, at least 262,144) or a stop string than `max_stop_chars`
    (before anything is tokenized); with 408 if its body takes more than `read_timeout` seconds
    to arrive."""
    if max_prompt_chars is None:
        max_prompt_chars = prompt_chars_for(model.config.sequence_len)
    if model_name is None:   # the family's name (grok-2, grok-1); a model built in memory: demo
        model_name = getattr(getattr(model, "family", None), "model_name", None) or "demo"
    state = ServerState(model, model_name, api_key or None, max_waiting,
                        TextLimits(max_prompt_chars, max_stop_chars), read_timeout)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.engine.start()
        try:
            yield
        finally:
            for rid in list(state.live):      # any left after the server's grace period
                end_request(state, rid)
            await asyncio.to_thread(state.engine.stop)
            for close in state.on_close:
                close()

    app = FastAPI(title="grok", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.grok = state
    app.add_middleware(_Gate, state=state)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), err.status, headers=err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        body = ApiError(err.status_code, f"{request.method} {request.url.path}: {err.detail}",
                        code=code).body()
        return JSONResponse(body, err.status_code, headers=getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def server_error(request: Request, err: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        body = ApiError(500, f"internal error: {type(err).__name__}: {err}",
                        kind="server_error").body()
        return JSONResponse(body, 500)

    @app.get("/health")
    async def health() -> JSONResponse:
        running = state.engine.driving
        return JSONResponse({"status": "ok" if running else "stopped", "model": state.model_name},
                            200 if running else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(state)]}

    @app.get("/v1/models/{name:path}")
    async def model_card(name: str) -> dict[str, Any]:
        if name != state.model_name:
            raise ApiError(404, f"the model {json.dumps(name)} does not exist: this server "
                                f"serves {json.dumps(state.model_name)}", "model",
                           "model_not_found")
        return _model_card(state)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await _body(request, state.read_timeout)
        # the template rendered and the prompt tokenized off the loop, as completions'
        params = await asyncio.to_thread(checked_chat, state, body)
        return await _answer(state, request, params, ChatShape)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await _body(request, state.read_timeout)
        # Parsing, checking and tokenizing take up to a fraction of a second: never on the loop
        # that answers every other client.
        params = await asyncio.to_thread(_checked_completion, state, body)
        return await _answer(state, request, params, TextShape)

    # vLLM's tokenizer endpoints (lm-evaluation-harness's tokenizer_backend=remote reads them)
    @app.get("/tokenizer_info")
    async def get_tokenizer_info() -> dict[str, Any]:
        return tokenizer_info(state)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> JSONResponse:
        body = await _body(request, state.read_timeout)
        return JSONResponse(await asyncio.to_thread(checked_tokenize, state, body))

    @app.post("/detokenize")
    async def detokenize(request: Request) -> JSONResponse:
        body = await _body(request, state.read_timeout)
        return JSONResponse(await asyncio.to_thread(checked_detokenize, state, body))

    return app


async def _answer(state: ServerState, request: Request, params: CompletionParams,
                  shape: type[Shape]) -> Response:
    """Run a checked request's completions on the engine and answer them, whole or streamed,
    in the endpoint's `shape`; 429 while the engine's queue is full."""
    waiting = len(state.engine.waiting)
    if waiting >= state.max_waiting:
        raise ApiError(429, f"the server is busy: {waiting} requests are waiting for a slot; "
                            f"retry later", None, "queue_full", kind="rate_limit_error",
                       headers={"Retry-After": str(RETRY_AFTER_S)})
    rids = submit(state, params)
    try:
        gen = Generation(state, rids, asyncio.get_running_loop())
        answer = shape(state, params, gen)
    except BaseException:
        for rid in rids:
            end_request(state, rid)
        raise
    if params.stream:
        return EventStreamResponse(chunks(state, params, gen, answer), gen.close,
                                   media_type="text/event-stream",
                                   headers={"Cache-Control": "no-cache"})
    try:
        return JSONResponse(await complete(state, params, gen, request, answer))
    finally:
        gen.close()


def _checked_completion(state: ServerState, body: bytes) -> CompletionParams:
    """A /v1/completions body parsed and checked (its prompts tokenized); ApiError otherwise."""
    data = parse_json(body)
    check_model(data, state.model_name)
    if state.closing:
        raise closing_error()
    return completion_params(data, state.model.tokenizer, state.model.config.vocab_size,
                             state.engine.max_context, state.text_limits)


def _model_card(state: ServerState) -> dict[str, Any]:
    return {"id": state.model_name, "object": "model", "created": state.created,
            "owned_by": "grok", "max_model_len": state.engine.max_context}


class _Gate:
    """ASGI middleware: the API key check (401; /health needs none), and every answer counted
    by endpoint and status (a streaming answer when it ends)."""

    def __init__(self, app: Any, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def counted(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else "/v1/models/{model}" \
            if path.startswith("/v1/models/") else "other"
        try:
            refusal = None if self.state.api_key is None or path in OPEN_PATHS \
                else self._refusal(scope)
            if refusal is not None:
                err = ApiError(401, refusal, None, "invalid_api_key",
                               headers={"WWW-Authenticate": "Bearer"})
                await JSONResponse(err.body(), 401, headers=err.headers)(scope, receive, counted)
                return
            await self.app(scope, receive, counted)
        finally:
            self.state.metrics.requests.labels(endpoint, str(status)).inc()

    def _refusal(self, scope: dict) -> str | None:
        """Why the request's key is refused, or None when it is the server's."""
        headers = [v for k, v in scope.get("headers") or [] if k == b"authorization"]
        if len(headers) > 1:          # which would decide? Proxies and servers disagree
            return f"{len(headers)} Authorization headers: send exactly one"
        scheme, _, key = (headers[0] if headers else b"").strip().partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(
                key.strip(), self.state.api_key.encode("utf-8")):
            return None
        return "invalid or missing API key: send the header 'Authorization: Bearer <key>'"


async def _body(request: Request, timeout: float) -> bytes:
    """The request's body: 413 past MAX_BODY bytes, 408 (and the connection closed) when it
    takes more than `timeout` seconds to arrive; 499 when the client goes away meanwhile."""
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > MAX_BODY:
        raise ApiError(413, f"the body is {size} bytes, more than {MAX_BODY}", None,
                       "request_too_large")
    try:
        return await asyncio.wait_for(_read_body(request), timeout)
    except asyncio.TimeoutError:
        raise ApiError(408, f"the request's body did not arrive within {timeout:g} s", None,
                       "request_timeout", headers={"Connection": "close"}) from None
    except ClientDisconnect:
        # the client's doing, not the server's: no traceback, not a 500
        log.info("%s %s: the client left before sending its whole body", request.method,
                 request.url.path)
        raise ApiError(499, "the client closed the connection", None, "client_closed") from None


async def _read_body(request: Request) -> bytes:
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > MAX_BODY:
            raise ApiError(413, f"the body is more than {MAX_BODY} bytes", None,
                           "request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)
