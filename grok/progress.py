"""Progress bars for long file operations (reading / writing checkpoints), drawn by `tqdm.auto`.

    with Progress(total=len(files), desc="reading", logger=log) as bar:
        for f in files:
            ...
            bar.update(nbytes=size)

The bar draws in a terminal (on stderr, when it is a TTY) and in a Jupyter notebook (a widget
where ipywidgets is installed, else text); otherwise, or when disabled, it draws nothing and logs
one summary line through `logger` when it closes. `update` is thread-safe, so worker threads may
report directly.
"""
from __future__ import annotations

import logging
import sys
import threading
import time
import warnings
from typing import IO, Any

_GB = 1e9
_MB = 1e6
# Items done / total, then the bytes and their rate (the postfix), e.g.
# "reading ckpt-0:  40%|████      | 58/146 files [00:01<00:02, 3.11 GB, 2.55 GB/s]".
_BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar:WIDTH}| {n_fmt}/{total_fmt} {unit} " \
              "[{elapsed}<{remaining}{postfix}]"


def _auto_tqdm() -> type:
    """tqdm.auto's class: the notebook widget inside a Jupyter kernel with ipywidgets, else the
    text bar (tqdm warns about a notebook without ipywidgets, or about the widget being
    experimental: neither is the user's concern here)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from tqdm.auto import tqdm
    return tqdm


def in_notebook() -> bool:
    """Whether this runs inside a Jupyter (ipykernel) kernel."""
    shell = sys.modules.get("IPython")
    if shell is None or "ipykernel" not in sys.modules:
        return False
    try:
        ip = shell.get_ipython()
    except Exception:   # noqa: BLE001 - an IPython without a shell
        return False
    return ip is not None and type(ip).__name__ == "ZMQInteractiveShell"


class Progress:
    """A tqdm progress bar (items and bytes) on a TTY or in a notebook, or a single log line at
    the end.

    `stream`: where a text bar draws (default sys.stderr; it draws only if that is a TTY, or the
    default stream inside a notebook). `min_interval`: seconds between redraws.
    """

    def __init__(self, total: int, desc: str = "", *, enabled: bool = True,
                 logger: logging.Logger | None = None, stream: IO[str] | None = None,
                 unit: str = "files", width: int = 30, min_interval: float = 0.1) -> None:
        self.total = max(int(total), 0)
        self.desc = desc
        self.unit = unit
        self.logger = logger or logging.getLogger(__name__)
        self.stream = stream if stream is not None else sys.stderr
        notebook = stream is None and in_notebook()
        self.draw = bool(enabled) and (notebook or _isatty(self.stream))
        self.done = 0
        self.nbytes = 0
        self._lock = threading.Lock()
        self._start = time.monotonic()
        self._closed = False
        self._bar: Any = None
        if self.draw:
            if notebook:
                cls = _auto_tqdm()
            else:   # a text bar on the given stream
                from tqdm.std import tqdm as cls
            kwargs = dict(total=self.total, desc=desc or "progress", unit=unit,
                          mininterval=min_interval, leave=True, postfix=self._bytes(),
                          bar_format=_BAR_FORMAT.replace("WIDTH", str(max(int(width), 1))))
            if cls.__module__ == "tqdm.std":
                kwargs.update(file=self.stream, ascii=not _unicode(self.stream))
            self._bar = cls(**kwargs)

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
            if self._bar is not None and not self._closed:
                self._bar.set_postfix_str(self._bytes(), refresh=False)
                self._bar.update(items)

    def summary(self) -> str:
        """e.g. 'reading: 146/146 files, 7.90 GB in 3.1 s (2.55 GB/s)'."""
        prefix = f"{self.desc}: " if self.desc else ""
        return (f"{prefix}{self.done}/{self.total} {self.unit}, {_size(self.nbytes)} in "
                f"{self.elapsed:.1f} s ({_size(self.nbytes / self.elapsed)}/s)")

    def close(self, ok: bool = True) -> None:
        """Finish the bar (drawn) or log the summary (otherwise). Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._bar is not None:
                self._bar.set_postfix_str(self._bytes(), refresh=False)
                self._bar.close()
            elif ok:
                self.logger.info("%s", self.summary())

    def _bytes(self) -> str:
        return f"{_size(self.nbytes)}, {_size(self.nbytes / self.elapsed)}/s"


def _size(nbytes: float) -> str:
    """Bytes in GB from 1 GB up, else in MB: '7.90 GB', '14.21 MB'."""
    return f"{nbytes / _GB:.2f} GB" if nbytes >= _GB else f"{nbytes / _MB:.2f} MB"


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):   # no isatty, or a closed stream
        return False


def _unicode(stream: Any) -> bool:
    """Whether block characters can be written to `stream` (else tqdm draws '#')."""
    encoding = getattr(stream, "encoding", None)
    return bool(encoding) and "utf" in encoding.lower()
