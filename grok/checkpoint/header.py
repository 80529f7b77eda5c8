"""Checkpoint headers: a release-format pickle parsed under grok/checkpoint.py's allow-list
(same globals, same inert stand-ins) without materialising array data. A raw-bytes opcode outside
the pickle's frames is replaced by its (offset, length) in the file, so `read_header(file)` says
each array's shape, dtype and where its bytes are, having read a few hundred bytes."""
from __future__ import annotations

import dataclasses
import math
import os
import pickle
import struct
from typing import Any

import numpy as np

from grok import checkpoint as ck
from grok.errors import one_line
from grok.leaves import Entry


@dataclasses.dataclass(frozen=True)
class RawRef:
    """Raw array bytes in a file: `length` bytes at `offset` (or held `inline`, when the bytes sat
    inside a pickle frame; those are small)."""

    offset: int
    length: int
    inline: bytes | None = dataclasses.field(default=None, repr=False)


@dataclasses.dataclass(frozen=True)
class ArrayRef:
    """One C- or Fortran-ordered array inside a checkpoint file."""

    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool
    raw: RawRef

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


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


class _HeaderUnpickler(pickle._Unpickler):
    """The pure-Python unpickler with checkpoint.py's allow-list, whose bytes opcodes record
    where out-of-frame data lies and skip over it instead of reading it."""

    dispatch = dict(pickle._Unpickler.dispatch)
    find_class = ck._SafeUnpickler.find_class
    persistent_load = ck._SafeUnpickler.persistent_load

    def __init__(self, file: Any, where: str, size: int) -> None:
        super().__init__(file)
        self.file = file
        self.where = where
        self.size = size

    def _bytes(self, length: int) -> None:
        frame = self._unframer.current_frame
        if (frame is not None and frame.tell() < len(frame.getbuffer())) or length <= INLINE:
            self.append(self.read(length))   # inside a frame, or small: read as usual
            return
        self._unframer.current_frame = None
        offset = self.file.tell()
        if offset + length > self.size:
            raise ck._BadPickle(f"truncated: array data needs bytes {offset}..{offset + length} "
                                f"but the file has {self.size}")
        self.file.seek(length, os.SEEK_CUR)
        self.append(RawRef(offset, length))

    def _load_binbytes(self) -> None:
        self._bytes(struct.unpack("<I", self.read(4))[0])

    def _load_binbytes8(self) -> None:
        self._bytes(struct.unpack("<Q", self.read(8))[0])

    def _load_short_binbytes(self) -> None:
        self._bytes(self.read(1)[0])

    dispatch[pickle.BINBYTES[0]] = _load_binbytes
    dispatch[pickle.BINBYTES8[0]] = _load_binbytes8
    dispatch[pickle.SHORT_BINBYTES[0]] = _load_short_binbytes
    dispatch[pickle.BYTEARRAY8[0]] = _load_binbytes8


def _array_ref(stub: Any, what: str) -> ArrayRef:
    """checkpoint._to_array's checks, on a RawRef instead of the bytes."""
    if not isinstance(stub, ck._ArrayStub):
        raise ck._BadPickle(f"{what} is {ck._kind(stub)}, not a numpy array")
    state = stub.state
    if not (type(state) is tuple and len(state) == 5 and type(state[0]) is int and state[0] == 1):
        raise ck._BadPickle(f"malformed numpy {what} state")
    _, shape, dtype_stub, fortran, raw = state
    if type(shape) is not tuple or not all(type(n) is int and n >= 0 for n in shape):
        raise ck._BadPickle(f"malformed {what} shape")
    dtype = ck._to_dtype(dtype_stub)
    if isinstance(raw, (bytes, bytearray)):
        raw = RawRef(-1, len(raw), bytes(raw))
    if type(fortran) is not bool or not isinstance(raw, RawRef):
        raise ck._BadPickle(f"{what} data is not raw bytes")
    needed = math.prod(shape) * dtype.itemsize
    if raw.length != needed:
        raise ck._BadPickle(f"{what} holds {raw.length} bytes but {dtype}{list(shape)} "
                            f"needs {needed}")
    if dtype.byteorder == ">":
        raise ck._BadPickle(f"{what} is big-endian")
    return ArrayRef(shape, dtype, fortran, raw)


def _parts(obj: Any) -> dict[str, ArrayRef]:
    """checkpoint._materialize's checks, on references."""
    if isinstance(obj, ck._QWStub):
        if obj.state is None:
            raise ck._BadPickle("QuantizedWeight8bit without weight and scales")
        weight = _array_ref(obj.state["weight"], "weight")
        scales = _array_ref(obj.state["scales"], "scales")
        if weight.dtype != ck.I8:
            raise ck._BadPickle(f"QuantizedWeight8bit weight dtype {weight.dtype}, expected int8")
        if scales.dtype != ck.BF16:
            raise ck._BadPickle(f"QuantizedWeight8bit scales dtype {scales.dtype}, "
                                "expected bfloat16")
        ws, ss = weight.shape, scales.shape
        if (len(ws) < 2 or len(ss) != len(ws) or ss[-2] < 1 or ss[:-2] != ws[:-2]
                or ss[-1] != ws[-1] or ws[-2] % ss[-2]):
            raise ck._BadPickle(f"QuantizedWeight8bit scales shape {list(ss)} does not fit "
                                f"weight shape {list(ws)}")
        return {"weight": weight, "scales": scales}
    if isinstance(obj, ck._ArrayStub):
        array = _array_ref(obj, "array")
        if array.dtype != ck.F32:
            raise ck._BadPickle(f"dtype {array.dtype}, expected float32")
        return {"array": array}
    raise ck._BadPickle(f"holds {ck._kind(obj)}, expected a float32 array or QuantizedWeight8bit")


def read_header(path: ck.PathLike) -> Header:
    """Parse one checkpoint file's pickle through the allow-list without reading array data.
    Any problem (missing, hostile, malformed, truncated, trailing bytes) -> CheckpointError."""
    where = os.fspath(path)
    try:
        size = os.path.getsize(where)
        with open(where, "rb") as f:
            obj = _HeaderUnpickler(f, where, size).load()
            end = f.tell()
        if end != size:
            raise ck._BadPickle(f"{size - end} trailing bytes after the pickle "
                                f"(file is {size} bytes, the pickle ends at {end})")
        return Header(where, _parts(obj), end)
    except ck.CheckpointError:
        raise
    except FileNotFoundError:
        raise ck.CheckpointError(f"{where}: missing") from None
    except OSError as err:
        raise ck.CheckpointError(f"{where}: cannot read ({err.strerror or err})") from None
    except ck._BadPickle as err:
        raise ck.CheckpointError(f"{where}: {err}") from None
    except EOFError:
        empty = os.path.getsize(where) == 0
        raise ck.CheckpointError(f"{where}: {'empty file' if empty else 'truncated pickle'}") \
            from None
    except Exception as err:   # UnpicklingError, struct.error, ValueError, ...
        raise ck.CheckpointError(f"{where}: truncated or unreadable pickle "
                                 f"({type(err).__name__}: {one_line(err, 120)})") from None


def header_problem(header: Header, entry: Entry) -> str | None:
    """Why the file cannot be `entry` (type / shape / dtype), or None."""
    if entry.quantized:
        if not header.quantized:
            return (f"expected QuantizedWeight8bit (int8 weight {list(entry.shape)}, bfloat16 "
                    f"scales {list(entry.scales_shape)}), got float32 array "
                    f"{list(header.parts['array'].shape)}")
        want = {"weight": entry.shape, "scales": entry.scales_shape}
    else:
        if header.quantized:
            return f"expected a float32 array {list(entry.shape)}, got a QuantizedWeight8bit"
        want = {"array": entry.shape}
    for part, shape in want.items():
        if header.parts[part].shape != tuple(shape):
            return f"{part} shape {list(header.parts[part].shape)}, expected {list(shape)}"
    return None
