"""What the server's handlers share: the model and its engine, the settings, the metrics and
the engine requests in flight."""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from grok.errors import RequestError
from grok.serve.metrics import Metrics

log = logging.getLogger(__name__)


class ServerState:
    """What the handlers share: the model, the settings (`max_waiting` may be changed while
    serving), the metrics and the engine requests in flight."""

    def __init__(self, model: Any, model_name: str, api_key: str | None, max_waiting: int):
        if model.tokenizer is None:
            raise RequestError("serving needs a model with a tokenizer")
        if not isinstance(max_waiting, int) or max_waiting < 1:
            raise RequestError(f"max_waiting must be an integer >= 1, got {max_waiting!r}")
        self.model, self.engine = model, model.engine
        self.model_name, self.api_key, self.max_waiting = model_name, api_key, max_waiting
        self.created = int(time.time())
        self.metrics = Metrics(self.engine)
        self.live: set[int] = set()           # engine ids of requests being answered
        self.closing = False                  # shutting down: new completions get 503
        self.on_close: list[Callable[[], None]] = []   # called once the engine has stopped

    def shut_down(self, grace: float) -> None:
        """Begin a shutdown (`python -m grok.serve` calls this on SIGTERM): completions asked
        from now on get 503, and those still running after `grace` seconds are cancelled and
        end with a "server_shutdown" error (a streamed one: an error event, then [DONE])."""
        self.closing = True
        timer = threading.Timer(grace, self.cancel_live)
        timer.daemon = True
        timer.start()

    def cancel_live(self) -> None:
        for rid in list(self.live):
            try:
                self.engine.cancel(rid)
            except Exception:
                log.exception("cancelling request %d failed", rid)
