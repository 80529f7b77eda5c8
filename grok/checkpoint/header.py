"""Checkpoint headers: a release-format pickle parsed under the allow-list and validated by the
same rules as `load_tensor` (unpickle.py), without reading the array data. A raw-bytes opcode
outside the pickle's frames is replaced by its (offset, length) in the file, so `read_header(file)`
says each array's shape, dtype and where its bytes are, having read a few hundred bytes."""
from __future__ import annotations

import dataclasses
import os
import pickle
import struct
from typing import Any

from grok.checkpoint.arrays import ArrayRef, RawRef
from grok.checkpoint.directory import PathLike
from grok.checkpoint.unpickle import AllowList, BadPickle, open_regular, reading, validate


@dataclasses.dataclass(frozen=True)
class Header:
    """What a checkpoint file holds: a float32 `array`, or a QuantizedWeight8bit (`weight`,
    `scales`). `end` is where the pickle stops (the file's size when it is well formed)."""

    path: str
    parts: dict[str, ArrayRef]   # {"array": ...} or {"weight": ..., "scales": ...}
    end: int

    @property
    def quantized(self) -> bool:
        return "weight" in self.parts

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts.values())


INLINE = 1 << 16   # bytes objects up to this size are read, not skipped


class HeaderUnpickler(AllowList, pickle._Unpickler):
    """The pure-Python unpickler under the allow-list, whose bytes opcodes record where
    out-of-frame data lies and skip over it instead of reading it. It also checks what the C
    unpickler checks and the pure-Python one does not: a frame holds the bytes it claims."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: Any, where: str, size: int) -> None:
        super().__init__(file)
        self.file = file
        self.where = where
        self.size = size

    def _frame(self) -> None:
        length, = struct.unpack("<Q", self.read(8))
        left = self.size - self.file.tell()
        if length > left:
            raise BadPickle(f"truncated: a pickle frame of {length} bytes but {left} left")
        self._unframer.load_frame(length)

    def _bytes(self, length: int) -> None:
        frame = self._unframer.current_frame
        if (frame is not None and frame.tell() < len(frame.getbuffer())) or length <= INLINE:
            data = self.read(length)   # inside a frame, or small: read as usual
            if len(data) != length:
                raise BadPickle(f"truncated: {length} bytes of data, {len(data)} in the file")
            self.append(data)
            return
        self._unframer.current_frame = None
        offset = self.file.tell()
        if offset + length > self.size:
            raise BadPickle(f"truncated: array data needs bytes {offset}..{offset + length} "
                            f"but the file has {self.size}")
        self.file.seek(length, os.SEEK_CUR)
        self.append(RawRef(offset, length))

    def _load_binbytes(self) -> None:
        self._bytes(struct.unpack("<I", self.read(4))[0])

    def _load_binbytes8(self) -> None:
        self._bytes(struct.unpack("<Q", self.read(8))[0])

    def _load_short_binbytes(self) -> None:
        self._bytes(self.read(1)[0])

    dispatch[pickle.FRAME[0]] = _frame
    dispatch[pickle.BINBYTES[0]] = _load_binbytes
    dispatch[pickle.BINBYTES8[0]] = _load_binbytes8
    dispatch[pickle.SHORT_BINBYTES[0]] = _load_short_binbytes
    dispatch[pickle.BYTEARRAY8[0]] = _load_binbytes8


def read_header(path: PathLike) -> Header:
    """Parse one checkpoint file's pickle through the allow-list without reading array data; the
    same validation as `load_tensor`. Any problem (missing, hostile, malformed, big-endian or
    Fortran-ordered, truncated, trailing bytes) -> CheckpointError naming the file."""
    where = os.fspath(path)
    with reading(where):
        with open_regular(where) as f:
            size = os.fstat(f.fileno()).st_size
            obj = HeaderUnpickler(f, where, size).load()
            end = f.tell()
        if end != size:
            raise BadPickle(f"{size - end} trailing bytes after the pickle "
                            f"(file is {size} bytes, the pickle ends at {end})")
        return Header(where, validate(obj), end)
