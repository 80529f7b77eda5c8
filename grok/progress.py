"""A tiny dependency-free progress bar for long file operations (reading / writing checkpoints).

    with Progress(total=len(files), desc="reading", logger=log) as bar:
        for f in files:
            ...
            bar.update(nbytes=size)

On a terminal it redraws one line on stderr (items done / total, GB, GB/s); otherwise, or when
disabled, it draws nothing and logs one summary line through `logger` when it closes.
`update` is thread-safe, so worker threads may report directly.
"""
from __future__ import annotations

import logging
import sys
import threading
import time
from typing import IO, Any

_GB = 1e9


class Progress:
    """One-line progress bar on a TTY stream, or a single log line at the end."""

    def __init__(self, total: int, desc: str = "", *, enabled: bool = True,
                 logger: logging.Logger | None = None, stream: IO[str] | None = None,
                 unit: str = "files", width: int = 30, min_interval: float = 0.1) -> None:
        self.total = max(int(total), 0)
        self.desc = desc
        self.unit = unit
        self.width = width
        self.min_interval = min_interval
        self.logger = logger or logging.getLogger(__name__)
        self.stream = stream if stream is not None else sys.stderr
        self.draw = bool(enabled) and _isatty(self.stream)
        self.done = 0
        self.nbytes = 0
        self._lock = threading.Lock()
        self._start = time.monotonic()
        self._last_draw = 0.0
        self._drawn = False
        self._closed = False

    # --- context manager ------------------------------------------------------------------------
    def __enter__(self) -> "Progress":
        self._start = time.monotonic()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(ok=exc_type is None)

    # --- reporting ------------------------------------------------------------------------------
    @property
    def elapsed(self) -> float:
        return max(time.monotonic() - self._start, 1e-9)

    def update(self, items: int = 1, nbytes: int = 0) -> None:
        """Record `items` more finished items and `nbytes` more bytes; redraw if due."""
        with self._lock:
            self.done += items
            self.nbytes += nbytes
            now = time.monotonic()
            if self.draw and (now - self._last_draw >= self.min_interval or self.done >= self.total):
                self._last_draw = now
                self._render()

    def summary(self) -> str:
        """e.g. 'reading: 146/146 files, 7.9 GB in 3.1 s (2.55 GB/s)'."""
        gb = self.nbytes / _GB
        prefix = f"{self.desc}: " if self.desc else ""
        return (f"{prefix}{self.done}/{self.total} {self.unit}, {gb:.2f} GB in {self.elapsed:.1f} s "
                f"({gb / self.elapsed:.2f} GB/s)")

    def close(self, ok: bool = True) -> None:
        """Finish the bar's line (TTY) or log the summary (otherwise). Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self.draw:
                self._render()
                self.stream.write("\n")
                self.stream.flush()
            elif ok:
                self.logger.info("%s", self.summary())

    def _render(self) -> None:
        frac = self.done / self.total if self.total else 1.0
        filled = int(round(self.width * min(frac, 1.0)))
        bar = "#" * filled + "-" * (self.width - filled)
        gb = self.nbytes / _GB
        prefix = f"{self.desc} " if self.desc else ""
        line = (f"\r{prefix}[{bar}] {self.done}/{self.total} {self.unit}  {gb:.2f} GB  "
                f"{gb / self.elapsed:.2f} GB/s")
        self.stream.write(line)
        self.stream.flush()
        self._drawn = True


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):   # no isatty, or a closed stream
        return False
