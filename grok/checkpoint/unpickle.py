"""The allow-list unpickler and the one validator of what it produced, shared by the whole-file
reader (`release.load_tensor`) and the header parser (`header.read_header`).

A pickle can run any code when loaded, so checkpoint files are unpickled with an allow-list: the
only globals resolved are numpy's array / dtype reconstructors, `ml_dtypes.bfloat16` and
`__main__.QuantizedWeight8bit`, and even those resolve to inert stand-ins that merely record what
the pickle asked for. `validate(obj)` then turns the stand-ins into `ArrayRef`s (shape, dtype,
bytes) under one set of rules -- the release's two shapes of file (a float32 array; a
QuantizedWeight8bit of an int8 weight and bfloat16 scales), C order and little-endian only -- so
the two parsers cannot disagree about what a file holds.
"""
from __future__ import annotations

import contextlib
import math
import os
import pickle
import stat
from typing import Any, BinaryIO, Iterator

import numpy as np

from grok.checkpoint.arrays import BF16, F32, I8, ArrayRef, RawRef
from grok.errors import CheckpointError, one_line

MAX_NDIM = 8   # the release's arrays have at most 3 dims; bounds math.prod on hostile shapes


class BadPickle(Exception):
    """A file that is not one of the release's shapes; `reading` adds the file name."""


def _kind(obj: Any) -> str:
    return f"a {type(obj).__name__}"


def _brief(obj: Any) -> str:
    """A short, bounded description of a value from a hostile file (repr() of a memo-built
    structure can take exponential time, so only strings are shown)."""
    return repr(obj[:40]) if isinstance(obj, str) else _kind(obj)


# --- inert stand-ins for the allowed globals ------------------------------------------------------
class Stub:
    """Base of the stand-ins: a BUILD may only go through the explicit __setstate__ below."""

    state: Any = None

    def __setstate__(self, state: Any) -> None:
        if self.state is not None:
            raise BadPickle(f"{type(self).__name__} state set twice")
        self.state = state


class ArrayStub(Stub):
    """What numpy's `_reconstruct(ndarray, (0,), b'b')` + BUILD asked for."""


class DtypeStub(Stub):
    """What `numpy.dtype(spec, align, copy)` + BUILD asked for."""

    spec: Any = None

    def __init__(self, spec: Any = None, align: Any = False, copy: Any = True) -> None:
        self.spec = spec


class QWStub(Stub):
    """`__main__.QuantizedWeight8bit`: NEWOBJ + BUILD may only set `weight` and `scales`."""

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict) or set(state) != {"weight", "scales"}:
            keys = [k if isinstance(k, str) else _kind(k) for k in list(state)[:8]] \
                if isinstance(state, dict) else None
            raise BadPickle(f"QuantizedWeight8bit state must be a dict with exactly 'weight' and "
                            f"'scales', got {sorted(keys) if keys is not None else _kind(state)}")
        super().__setstate__(dict(state))


class Marker:
    """Stands for a type that may appear only as an argument (numpy.ndarray, ml_dtypes.bfloat16).
    Markers cannot be built (a BUILD on a plain function would write to its __dict__)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __setstate__(self, state: Any) -> None:
        raise BadPickle(f"{self.name} cannot be built")


class Reconstruct(Marker):
    """numpy's `_reconstruct(ndarray, (0,), b'b')`, the only call numpy's pickles make."""

    __slots__ = ()

    def __call__(self, subtype: Any, shape: Any, typecode: Any) -> ArrayStub:
        if subtype is not NDARRAY or type(shape) is not tuple or shape != (0,) \
                or typecode != b"b":
            raise BadPickle("unexpected arguments to numpy's _reconstruct")
        return ArrayStub()


NDARRAY = Marker("numpy.ndarray")
BFLOAT16 = Marker("ml_dtypes.bfloat16")
RECONSTRUCT = Reconstruct("numpy _reconstruct")
ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): RECONSTRUCT,    # numpy 1.x (the release)
    ("numpy._core.multiarray", "_reconstruct"): RECONSTRUCT,   # numpy 2.x
    ("numpy", "ndarray"): NDARRAY,
    ("numpy", "dtype"): DtypeStub,
    ("ml_dtypes", "bfloat16"): BFLOAT16,
    ("__main__", "QuantizedWeight8bit"): QWStub,
}
# Plain numeric dtypes are let through (and rejected later with a precise message if wrong).
TYPECODES = frozenset("b1 i1 u1 i2 u2 i4 u4 i8 u8 f2 f4 f8 c8 c16".split())


class AllowList:
    """The allow-list, mixed into an Unpickler class (the C one, or the header parser's
    pure-Python one); the instance has `where` (the file, for messages)."""

    where: str

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED[(module, name)]
        except (KeyError, TypeError):
            raise CheckpointError(f"{self.where}: disallowed global {module}.{name} (checkpoint "
                                  "files may only reference numpy arrays, ml_dtypes.bfloat16 and "
                                  "__main__.QuantizedWeight8bit)") from None

    def persistent_load(self, pid: Any) -> Any:
        raise CheckpointError(f"{self.where}: persistent id ({_brief(pid)}) "
                              "not allowed in a checkpoint file")


class SafeUnpickler(AllowList, pickle.Unpickler):
    """The C unpickler under the allow-list (the whole-file reader)."""

    def __init__(self, file: BinaryIO, where: str) -> None:
        super().__init__(file)
        self.where = where


# --- the validator --------------------------------------------------------------------------------
def _dtype(stub: Any, what: str) -> np.dtype:
    if not isinstance(stub, DtypeStub):
        raise BadPickle(f"{what} dtype is {_kind(stub)}, not a numpy dtype")
    if stub.spec is BFLOAT16:
        base = BF16
    elif isinstance(stub.spec, str) and stub.spec in TYPECODES:
        base = np.dtype(stub.spec)
    else:
        raise BadPickle(f"dtype {_brief(stub.spec)} not allowed "
                        "(only plain numeric dtypes and bfloat16)")
    # numpy writes (3, byteorder, subarray, names, fields, elsize, alignment, flags).
    state = stub.state
    if not (type(state) is tuple and len(state) == 8 and type(state[0]) is int and state[0] == 3
            and state[1] in ("<", ">", "|", "=") and state[2:5] == (None, None, None)
            and type(state[5]) is int and state[5] in (-1, base.itemsize)):
        raise BadPickle(f"malformed {base} dtype state")
    if state[1] == ">" and base.itemsize > 1:
        raise BadPickle(f"{what} is big-endian {base} (the release writes little-endian only)")
    return base


def _array(stub: Any, what: str) -> ArrayRef:
    if not isinstance(stub, ArrayStub):
        raise BadPickle(f"{what} is {_kind(stub)}, not a numpy array")
    state = stub.state
    if not (type(state) is tuple and len(state) == 5 and type(state[0]) is int and state[0] == 1):
        raise BadPickle(f"malformed numpy {what} state")
    _, shape, dtype_stub, fortran, raw = state
    if type(shape) is not tuple or len(shape) > MAX_NDIM \
            or not all(type(n) is int and n >= 0 for n in shape):
        raise BadPickle(f"malformed {what} shape")
    dtype = _dtype(dtype_stub, what)
    if type(fortran) is not bool:
        raise BadPickle(f"malformed {what} order flag")
    if fortran:
        raise BadPickle(f"{what} is Fortran-ordered (the release writes C order only)")
    if isinstance(raw, (bytes, bytearray)):
        raw = RawRef(-1, len(raw), bytes(raw))
    elif not isinstance(raw, RawRef):
        raise BadPickle(f"{what} data is not raw bytes")
    needed = math.prod(shape) * dtype.itemsize
    if raw.length != needed:
        raise BadPickle(f"{what} holds {raw.length} bytes but {dtype}{list(shape)} needs {needed}")
    return ArrayRef(shape, dtype, raw)


def validate(obj: Any) -> dict[str, ArrayRef]:
    """The unpickled stand-ins -> the file's parts ({"array"} of a float32 array, or {"weight",
    "scales"} of a QuantizedWeight8bit with int8 weight, bfloat16 scales of a fitting shape).
    Anything else -> BadPickle."""
    if isinstance(obj, QWStub):
        if obj.state is None:
            raise BadPickle("QuantizedWeight8bit without weight and scales")
        weight = _array(obj.state["weight"], "weight")
        scales = _array(obj.state["scales"], "scales")
        if weight.dtype != I8:
            raise BadPickle(f"QuantizedWeight8bit weight dtype {weight.dtype}, expected int8")
        if scales.dtype != BF16:
            raise BadPickle(f"QuantizedWeight8bit scales dtype {scales.dtype}, expected bfloat16")
        ws, ss = weight.shape, scales.shape
        if (len(ws) < 2 or len(ss) != len(ws) or ss[-2] < 1 or ss[:-2] != ws[:-2]
                or ss[-1] != ws[-1] or ws[-2] % ss[-2]):
            raise BadPickle(f"QuantizedWeight8bit scales shape {list(ss)} does not fit "
                            f"weight shape {list(ws)}")
        return {"weight": weight, "scales": scales}
    if isinstance(obj, ArrayStub):
        array = _array(obj, "array")
        if array.dtype != F32:
            raise BadPickle(f"dtype {array.dtype}, expected float32")
        return {"array": array}
    raise BadPickle(f"holds {_kind(obj)}, expected a float32 array or QuantizedWeight8bit")


def to_numpy(ref: ArrayRef) -> np.ndarray:
    """The array of a validated ArrayRef whose bytes are held inline (no copy)."""
    if ref.raw.inline is None:
        raise ValueError("to_numpy needs the array's bytes in memory")
    array = np.ndarray.__new__(np.ndarray, (0,), "b")
    array.__setstate__((1, ref.shape, ref.dtype, False, ref.raw.inline))   # vetted inputs
    return array


# --- files and errors -----------------------------------------------------------------------------
def open_regular(where: str) -> BinaryIO:
    """Open a tensor file for reading; only regular files (or links to them): opening a FIFO
    would block forever, a device could be read without end."""
    mode = os.stat(where).st_mode   # follows links, raises FileNotFoundError
    if not stat.S_ISREG(mode):
        target = f" (a link to {os.path.realpath(where)})" if os.path.islink(where) else ""
        raise BadPickle(f"not a regular file{target}")
    return open(where, "rb")


@contextlib.contextmanager
def reading(where: str) -> Iterator[None]:
    """Every failure inside the block -> one CheckpointError naming `where`."""
    try:
        yield
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise CheckpointError(f"{where}: missing") from None
    except OSError as err:
        raise CheckpointError(f"{where}: cannot read ({err.strerror or err})") from None
    except BadPickle as err:
        raise CheckpointError(f"{where}: {err}") from None
    except EOFError:
        empty = os.path.isfile(where) and os.path.getsize(where) == 0
        raise CheckpointError(f"{where}: {'empty file' if empty else 'truncated pickle'}") from None
    except Exception as err:   # UnpicklingError, struct.error, ValueError, MemoryError, ...
        raise CheckpointError(f"{where}: truncated or unreadable pickle "
                              f"({type(err).__name__}: {one_line(err, 120)})") from None
