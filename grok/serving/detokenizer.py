"""Incremental detokenization of one request: text deltas that are safe to show as tokens arrive.

The text of the tokens so far can still change when more tokens come, in two ways:
- a character split across tokens: SentencePiece's byte pieces (`<0xE4>`, ...) decode an
  incomplete UTF-8 sequence as U+FFFD, replaced by the real character once its last byte arrives;
- a stop string: text that may be the start of a stop string is cut off if the stop string
  completes.
`Detokenizer` shows neither until it is settled, and cuts the final text before the first stop
string. Each token costs the decoding of a few tokens, not of the whole sequence.
"""
from __future__ import annotations

from typing import Any, Sequence

REPLACEMENT = "\ufffd"
# Tokens decoded ahead of the new ones: SentencePiece drops the leading space of a sequence's
# first piece, so the new tokens decoded alone could lose a space that belongs to them.
CONTEXT = 4


class Detokenizer:
    """The text of one request's tokens as they arrive. `add(token)` returns the new text that
    can be shown; `finish()` (once generation has ended) the rest; `text` is the final text,
    cut before the first stop string. The concatenated deltas always equal `text`."""

    def __init__(self, tokenizer: Any, stop_strings: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop_strings = tuple(s for s in stop_strings if s)
        self._longest = max(map(len, self.stop_strings), default=0)
        self._tokens: list[int] = []
        self._start = 0          # tokens[:_start] are settled: their text ends on a whole character
        self._settled = ""       # the text of tokens[:_start]
        self._pending = ""       # the text of tokens[_start:], maybe ending in U+FFFD
        self._searched = 0       # characters of the text already searched for stop strings
        self._shown = ""         # what add / finish returned so far, concatenated
        self._final: str | None = None
        self.stopped = False     # a stop string has appeared: generation should end

    @property
    def text(self) -> str:
        """The final text once `finish` ran (or a stop string appeared); before that, the text
        shown so far."""
        return self._final if self._final is not None else self._shown

    def add(self, token: int) -> str:
        """Take the next token; return the text that became safe to show (maybe "")."""
        if self._final is not None:
            return ""
        self._tokens.append(int(token))
        self._pending = self._decode_from(self._start)
        if not self._pending.endswith(REPLACEMENT):
            self._settled += self._pending
            self._start, self._pending = len(self._tokens), ""
        stable = self._settled + self._pending.rstrip(REPLACEMENT)
        return self._show(stable, self._visible(stable))

    def finish(self) -> str:
        """Generation has ended: return the text held back so far (a stop string's possible
        start, a trailing partial character, shown as U+FFFD like `decode` does)."""
        if self._final is None:
            self._final = self._settled + self._pending
        return self._show(self._final, len(self._final))

    def _decode_from(self, start: int) -> str:
        """The text of tokens[start:] as part of the whole sequence."""
        decode = self.tokenizer.decode
        context = max(0, start - CONTEXT)
        if context == start:
            return decode(self._tokens[start:])
        before, both = decode(self._tokens[context:start]), decode(self._tokens[context:])
        if both.startswith(before):
            return both[len(before):]
        # Pieces whose text depends on their neighbours: decode the whole sequence instead.
        return decode(self._tokens)[len(self._settled):]

    def _visible(self, stable: str) -> int:
        """How much of `stable` may be shown: all of it, less a tail that may start a stop
        string; on a stop string, up to its start (and the request is over)."""
        if not self.stop_strings:
            return len(stable)
        # A new match ends in the new text, so it starts at most `longest - 1` characters before.
        start = max(0, self._searched - self._longest + 1)
        self._searched = len(stable)
        hits = [i for i in (stable.find(s, start) for s in self.stop_strings) if i >= 0]
        if hits:
            self.stopped = True
            self._final = stable[:min(hits)]
            return min(hits)
        for held in range(min(self._longest - 1, len(stable)), 0, -1):
            tail = stable[-held:]
            if any(s.startswith(tail) for s in self.stop_strings):
                return len(stable) - held
        return len(stable)

    def _show(self, text: str, upto: int) -> str:
        # What was shown is never taken back: a held-back tail is a prefix of every later text.
        delta = text[len(self._shown):max(upto, len(self._shown))]
        self._shown += delta
        return delta
