"""Checkpoint headers: where a release-format file's arrays are, without reading them.

`read_header(file)` runs the file's pickle through the strict reader and the one validator
(unpickle.parse_file) and says each array's shape, dtype and byte range, having read a few
hundred bytes; `load_tensor` reads the same byte ranges, so the two cannot disagree."""
from __future__ import annotations

import dataclasses
import os

from grok.checkpoint.arrays import ArrayRef
from grok.checkpoint.directory import PathLike
from grok.checkpoint.unpickle import parse_file, reading


@dataclasses.dataclass(frozen=True)
class Header:
    """What a checkpoint file holds: a float32 `array`, or a QuantizedWeight8bit (`weight`,
    `scales`). `end` is where the pickle stops: the file's size (nothing may follow it)."""

    path: str
    parts: dict[str, ArrayRef]   # {"array": ...} or {"weight": ..., "scales": ...}
    end: int

    @property
    def quantized(self) -> bool:
        return "weight" in self.parts

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts.values())


def read_header(path: PathLike) -> Header:
    """Parse one checkpoint file's pickle without reading array data; the same validation as
    `load_tensor`. Any problem (missing, not a regular file, hostile, malformed, big-endian or
    Fortran-ordered, truncated, trailing bytes) -> CheckpointError naming the file."""
    where = os.fspath(path)
    with reading(where):
        parts, size = parse_file(where)
    return Header(where, parts, size)
