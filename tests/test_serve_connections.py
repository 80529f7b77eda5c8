"""The connection limits of `python -m grok.serve` (grok.serve.connections) on loopback: the
read deadline that cuts off slow-loris and silent clients, and the cap on open connections.
Served by uvicorn exactly as the command configures it, in front of a tiny ASGI app (no model)."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time

import pytest

uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from grok.serve.connections import server_config       # noqa: E402
from rawhttp import closed_by_server, connect, exchange, read_answer, request, trickle  # noqa: E402


async def _app(scope, receive, send):
    """200 "ok": at once on /early (the body unread), after 1.5 s on /slow, else once the body
    has arrived."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            done = message["type"] == "lifespan.shutdown"
            await send({"type": message["type"] + ".complete"})
            if done:
                return
    if scope["path"] == "/slow":
        await asyncio.sleep(1.5)
    elif scope["path"] != "/early":
        while (await receive()).get("more_body"):
            pass
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


@contextlib.contextmanager
def _served(max_connections: int, read_timeout: float):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(server_config(_app, max_connections=max_connections,
                                          read_timeout=read_timeout, shutdown_timeout=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def quick():
    """A server whose clients have 1 s to send each request."""
    with _served(max_connections=64, read_timeout=1.0) as url:
        yield url


def test_a_silent_connection_is_closed_after_the_read_timeout(quick):
    with connect(quick) as sock:
        closed = trickle(sock, b"", every=0.05, limit=6)
    assert closed is not None and 0.8 <= closed <= 3, closed


def test_a_client_trickling_its_headers_is_cut_off(quick):
    """A byte every 0.1 s: each would restart uvicorn's keep-alive timer; the deadline holds."""
    with connect(quick) as sock:
        closed = trickle(sock, b"GET / HTTP/1.1\r\nX-Slow: " + b"a" * 1000, every=0.1, limit=6)
    assert closed is not None and 0.8 <= closed <= 3, closed


def test_a_body_nobody_reads_cannot_be_trickled_after_the_answer(quick):
    with connect(quick) as sock:
        answer = exchange(sock, request("POST", "/early", b"a", length=10 ** 6))
        assert (answer.status, answer.body) == (200, b"ok")
        closed = trickle(sock, b"a", every=0.1, limit=6)
    assert closed is not None and closed <= 3, closed


def test_requests_in_time_are_served_however_long_the_connection_or_the_answer_lasts(quick):
    """The deadline restarts with each answer, and never cuts an answer being made (/slow takes
    longer than the read timeout)."""
    with connect(quick) as sock:
        for path in ("/", "/", "/slow", "/"):
            assert exchange(sock, request("POST", path, b"{}")).status == 200
            time.sleep(0.6)
        assert not closed_by_server(sock)


def test_connections_over_the_limit_are_answered_503_and_closed_and_logged_once():
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("grok.serve.connections")
    logger.addHandler(handler)
    try:
        with _served(max_connections=3, read_timeout=30) as url, \
                contextlib.ExitStack() as stack:
            held = [stack.enter_context(connect(url)) for _ in range(3)]
            for sock in held:             # each accepted and counted
                assert exchange(sock, request("GET", "/")).status == 200
            for _ in range(3):
                with connect(url) as extra:
                    answer = read_answer(extra)
                    assert answer.status == 503 and answer.headers["retry-after"] == "1"
                    assert answer.json()["error"]["code"] == "too_many_connections"
                    assert answer.headers["connection"] == "close"
                    time.sleep(0.05)
                    assert closed_by_server(extra)
            assert exchange(held[0], request("GET", "/")).status == 200   # the open ones go on
            held.pop().close()
            deadline = time.monotonic() + 5
            while True:                   # served once the server has seen that one close
                with connect(url) as sock:
                    try:
                        if exchange(sock, request("GET", "/")).status == 200:
                            break
                    except ConnectionError:
                        pass
                assert time.monotonic() < deadline, "a freed connection was not reused"
                time.sleep(0.05)
    finally:
        logger.removeHandler(handler)
    warnings = [r for r in records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "--max-connections" in warnings[0].getMessage()
