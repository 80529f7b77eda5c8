"""The SentencePiece tokenizer of a Grok checkpoint (prompts are encoded without BOS, as released)."""
from __future__ import annotations

import os
from typing import Sequence

from grok.errors import TokenizerError


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

    @property
    def vocab_size(self) -> int:
        return int(self._sp.GetPieceSize())

    @property
    def eos_id(self) -> int:
        return int(self._sp.eos_id())

    @property
    def pad_id(self) -> int:
        return int(self._sp.pad_id())

    def encode(self, text: str) -> list[int]:
        return list(self._sp.EncodeAsIds(text))

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.DecodeIds([int(i) for i in ids])

    def __repr__(self) -> str:
        return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size})"
