"""What the server's handlers share: the model and its engine, the settings, the metrics and
the engine requests in flight."""
from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any, Callable

from grok.errors import RequestError
from grok.serve.metrics import Metrics
from grok.serve.protocol import TextLimits

log = logging.getLogger(__name__)
# Seconds a client has to send a whole request (at most 4 MB): a real client needs milliseconds;
# 30 s allows a slow link (about 140 KB/s for the largest body) yet bounds a slow-loris client.
DEFAULT_READ_TIMEOUT = 30.0


class ServerState:
    """What the handlers share: the model, the settings (`max_waiting` and `read_timeout` may
    be changed while serving), the metrics and the engine requests in flight."""

    def __init__(self, model: Any, model_name: str, api_key: str | None, max_waiting: int,
                 text_limits: TextLimits = TextLimits(),
                 read_timeout: float = DEFAULT_READ_TIMEOUT):
        if model.tokenizer is None:
            raise RequestError("serving needs a model with a tokenizer")
        for name, value in (("max_waiting", max_waiting),
                            ("max_prompt_chars", text_limits.prompt_chars),
                            ("max_stop_chars", text_limits.stop_chars)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise RequestError(f"{name} must be an integer >= 1, got {value!r}")
        if isinstance(read_timeout, bool) or not isinstance(read_timeout, (int, float)) \
                or not 0 < read_timeout < math.inf:
            raise RequestError(f"read_timeout must be a number of seconds > 0, got "
                               f"{read_timeout!r}")
        self.model, self.engine = model, model.engine
        self.model_name, self.api_key, self.max_waiting = model_name, api_key, max_waiting
        self.text_limits, self.read_timeout = text_limits, float(read_timeout)
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
