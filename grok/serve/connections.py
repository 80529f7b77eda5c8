"""The HTTP connections of `python -m grok.serve`: uvicorn's h11 protocol with the two limits
uvicorn lacks, so that no client can hold the server's connections or file descriptors.

- At most `max_connections` open at once: one more is answered 503 at once and closed (its
  file descriptor freed, rather than held while it waits).
- `read_timeout`: a connection must deliver a whole request (request line and headers; a body
  the app does not read) within that many seconds of opening or of its previous answer, else it
  is closed. uvicorn's own keep-alive timer only starts after an answer and stops at the first
  byte, so a client trickling its headers (slow loris), or sending nothing, is never cut off.
  A body the app reads has the app's own deadline (a 408, `create_app(read_timeout=...)`).
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from grok.serve.state import DEFAULT_READ_TIMEOUT

log = logging.getLogger(__name__)
# Every stream holds a connection: --max-batch decoding and --max-waiting (64) queued are about
# 100 at full load; 256 leaves room for probes and idle keep-alive connections while staying
# far below the usual 1024 open files a process may have.
DEFAULT_MAX_CONNECTIONS = 256
RETRY_AFTER_S = 1
WARN_EVERY_S = 10.0                   # a refusal is logged at most this often: no log floods


@dataclasses.dataclass(frozen=True)
class ConnectionLimits:
    """How many connections may be open at once, and how long one may take to send a request."""

    max_connections: int = DEFAULT_MAX_CONNECTIONS
    read_timeout: float = DEFAULT_READ_TIMEOUT


def refusal(limit: int) -> bytes:
    """The whole HTTP answer to a connection over `limit`: 503 with OpenAI's error body."""
    body = json.dumps({"error": {
        "message": f"the server already has its limit of {limit} open connections; retry later",
        "type": "server_error", "param": None, "code": "too_many_connections"}}).encode()
    head = (f"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nretry-after: {RETRY_AFTER_S}\r\n"
            f"connection: close\r\n\r\n")
    return head.encode("ascii") + body


def protocol(limits: ConnectionLimits) -> type[H11Protocol]:
    """uvicorn's h11 protocol class holding to `limits` (for `uvicorn.Config(http=...)`)."""
    return type("LimitedH11Protocol", (_LimitedH11Protocol,),
                {"limits": limits, "answer_refused": refusal(limits.max_connections),
                 "last_warned": -WARN_EVERY_S})


class _LimitedH11Protocol(H11Protocol):
    limits: ConnectionLimits
    answer_refused: bytes
    last_warned: float

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline: asyncio.TimerHandle | None = None
        if len(self.connections) > self.limits.max_connections:
            self._refuse()
        else:
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()               # the next request has read_timeout seconds to arrive

    def _refuse(self) -> None:
        now = time.monotonic()
        if now - type(self).last_warned >= WARN_EVERY_S:
            type(self).last_warned = now
            log.warning("refusing new connections: %d are open, the limit (--max-connections)",
                        self.limits.max_connections)
        self.transport.write(self.answer_refused)
        self.transport.close()

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.limits.read_timeout, self._read_deadline)

    def _disarm(self) -> None:
        if getattr(self, "_deadline", None) is not None:
            self._deadline.cancel()
            self._deadline = None

    def _read_deadline(self) -> None:
        self._deadline = None
        waiting = self.conn.their_state is h11.IDLE         # no whole request line and headers
        answered = self.cycle is not None and self.cycle.response_complete
        trickling = self.conn.their_state is h11.SEND_BODY and answered  # a body nobody reads
        if (waiting or trickling) and not self.transport.is_closing():
            log.info("closed a connection from %s: no whole request within %g s",
                     self.client, self.limits.read_timeout)
            self.transport.close()


def server_config(app: Any, *, host: str = "127.0.0.1", port: int = 8000,
                  max_connections: int = DEFAULT_MAX_CONNECTIONS,
                  read_timeout: float = DEFAULT_READ_TIMEOUT, shutdown_timeout: float = 30.0,
                  log_level: str = "warning") -> uvicorn.Config:
    """The uvicorn configuration `python -m grok.serve` runs `app` with: the limits above, and
    `shutdown_timeout` + 5 s for uvicorn's own graceful shutdown (the app's is the first)."""
    return uvicorn.Config(app, host=host, port=port,
                          http=protocol(ConnectionLimits(max_connections, read_timeout)),
                          timeout_graceful_shutdown=shutdown_timeout + 5, log_level=log_level)
