"""The SentencePiece tokenizer of a Grok checkpoint (prompts are encoded without BOS, as released)."""
from __future__ import annotations

import os
from typing import Any, Sequence

from grok.errors import RequestError, TokenizerError


def check_text(text: Any) -> str:
    """`text` if it is a string of valid Unicode (no lone surrogate) a tokenizer can take, else
    a one-line RequestError saying where it is not."""
    if not isinstance(text, str):
        raise RequestError(f"only text can be tokenized, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise RequestError(f"the text cannot be tokenized: {err.reason} at index "
                           f"{err.start} ({err.object[err.start:err.end]!a})") from None
    return text


class Tokenizer:
    """Text <-> token ids with a SentencePiece model file."""

    def __init__(self, path: str | os.PathLike):
        import sentencepiece

        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise TokenizerError(f"tokenizer file not found: {self.path}")
        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.Load(self.path)
        except (OSError, RuntimeError) as err:
            raise TokenizerError(f"{self.path}: not a SentencePiece model ({err})") from None
        self._size = int(self._sp.GetPieceSize())

    @property
    def vocab_size(self) -> int:
        return self._size

    @property
    def eos_id(self) -> int:
        return int(self._sp.eos_id())

    @property
    def pad_id(self) -> int:
        return int(self._sp.pad_id())

    def encode(self, text: str) -> list[int]:
        """The ids of `text`; RequestError for anything but a string SentencePiece can take
        (valid Unicode: no lone surrogate)."""
        return list(self._sp.EncodeAsIds(check_text(text)))

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`; an id outside the tokenizer's pieces (a model's vocabulary may be
        larger) decodes as its unknown piece, as SentencePiece shows unknown text."""
        size, unk = self._size, self._sp.unk_id()
        return self._sp.DecodeIds([i if 0 <= i < size else unk for i in map(int, ids)])

    def piece(self, token: int) -> str:
        """The text one token stands for, as a piece of a longer text (SentencePiece's word
        marker as a space; a byte piece as its <0xNN> name; an id outside the pieces: unknown).
        What OpenAI's logprobs `tokens` show."""
        token = int(token)
        if not 0 <= token < self._size:
            token = self._sp.unk_id()
        return self._sp.IdToPiece(token).replace("\u2581", " ")

    def __repr__(self) -> str:
        return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size})"
