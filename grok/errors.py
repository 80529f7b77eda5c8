"""The library's error types: every error raised on bad input is a `GrokError`, so a command
line (or a server) catches one type and prints its one-line message.

`GrokError` is a `ValueError`: code written against the earlier ValueErrors keeps working.
"""
from __future__ import annotations

from typing import Any


class GrokError(ValueError):
    """Bad input to the library: a checkpoint, a config, a mesh, a request. The message is one
    line naming the file, field or value."""


class ConfigError(GrokError):
    """A configuration that cannot describe a Grok-shaped model."""


class CheckpointError(GrokError):
    """Anything wrong with a checkpoint; the message is one line naming the file (or leaf)."""

    def __init__(self, message: Any) -> None:
        super().__init__(one_line(message))


class ShardingError(GrokError):
    """A mesh or layout that cannot be used."""


class TokenizerError(GrokError):
    """A tokenizer file that is missing or unreadable."""


class RequestError(GrokError):
    """A generation request, sampling setting or token list that cannot run."""


def one_line(text: Any, limit: int = 400) -> str:
    """`text` as one printable line of at most `limit` characters (for error messages)."""
    text = "".join(c if c.isprintable() else " " for c in str(text))
    return text if len(text) <= limit else text[:limit - 3] + "..."
