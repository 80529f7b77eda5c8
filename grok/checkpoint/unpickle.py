"""The release's two shapes of checkpoint file, and the one validator every reader uses.

A pickle can run any code when loaded, so checkpoint pickles are never given to `pickle`: the
strict opcode reader (opcodes.py) runs them, resolving only numpy's array / dtype reconstructors,
`ml_dtypes.bfloat16` and `__main__.QuantizedWeight8bit`, each to an inert stand-in that merely
records what the pickle asked for. `parse_file(path)` then turns the stand-ins into `ArrayRef`s
(shape, dtype, where the bytes are) under one set of rules -- a float32 array, or a
QuantizedWeight8bit of an int8 weight and bfloat16 scales; C order and little-endian only; each
bytes object used as one array's data and nowhere else. The whole-file reader
(`release.load_tensor`), the header parser (`header.read_header`), verify and the streaming loader
all go through `parse_file`, so they cannot disagree about what a file holds.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, BinaryIO, Iterator

import numpy as np

from grok.checkpoint.arrays import BF16, F32, I8, ArrayRef, RawRef
from grok.checkpoint.opcodes import Builder, PickleError, read_pickle
from grok.errors import CheckpointError, one_line
from grok.files import NotRegularFile, describe, open_regular

MAX_NDIM = 8           # the release's arrays have at most 3 dims
MAX_DIM = 1 << 40      # one dimension; the array's bytes must also fit in the file


class BadPickle(PickleError):
    """A file that is not one of the release's shapes; `reading` adds the file name."""


def _kind(obj: Any) -> str:
    return f"a {type(obj).__name__}"


def _name(text: str) -> str:
    """A name from a hostile file, as it can be printed on one line."""
    text = text[:64]
    return text if text.isprintable() else ascii(text)


def _brief(obj: Any) -> str:
    """A short, bounded description of a value from a hostile file: only strings are shown."""
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
        if subtype is not NDARRAY or type(shape) is not tuple or len(shape) != 1 \
                or type(shape[0]) is not int or shape[0] != 0 or type(typecode) is not RawRef \
                or typecode.inline != b"b":
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


class ReleaseBuilder(Builder):
    """The allow-list: what the opcode reader may make, all of it inert. `typecodes` are the
    bytes objects consumed as numpy's typecode argument (not array data)."""

    def __init__(self) -> None:
        self.typecodes: list[RawRef] = []

    def find_global(self, module: str, name: str) -> Any:
        try:
            return ALLOWED[(module, name)]
        except KeyError:
            raise BadPickle(f"disallowed global {_name(module)}.{_name(name)} (checkpoint files may "
                            "only reference numpy arrays, ml_dtypes.bfloat16 and "
                            "__main__.QuantizedWeight8bit)") from None

    def call(self, func: Any, args: tuple) -> Any:
        if func is RECONSTRUCT and len(args) == 3:
            stub = RECONSTRUCT(*args)
            self.typecodes.append(args[2])
            return stub
        if func is DtypeStub and len(args) == 3:
            spec, align, copy = args
            if not (spec is BFLOAT16 or (type(spec) is str and spec in TYPECODES)):
                raise BadPickle(f"dtype {_brief(spec)} not allowed (only plain numeric dtypes "
                                "and bfloat16)")
            if type(align) is not bool or type(copy) is not bool:
                raise BadPickle("malformed numpy dtype arguments")
            return DtypeStub(spec)
        raise BadPickle(f"call of {getattr(func, 'name', _kind(func))} not allowed "
                        "(only numpy's array and dtype reconstructors)")

    def new(self, cls: Any, args: tuple) -> Any:
        if cls is not QWStub or args:
            raise BadPickle(f"NEWOBJ of {getattr(cls, '__name__', _kind(cls))} not allowed "
                            "(only QuantizedWeight8bit, without arguments)")
        return QWStub()

    def build(self, obj: Any, state: Any) -> None:
        if not isinstance(obj, Stub):
            raise BadPickle(f"{getattr(obj, 'name', _kind(obj))} cannot be built")
        obj.__setstate__(state)


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
            and type(state[1]) is str and state[2] is None and state[3] is None
            and state[4] is None and all(type(v) is int for v in state[5:])
            and state[5] in (-1, base.itemsize) and state[6] in (-1, base.alignment)
            and state[7] in (0, base.flags)):   # numpy acts on other flags (e.g. 'holds objects')
        raise BadPickle(f"malformed {base} dtype state")
    order = state[1]
    if order == ">" and base.itemsize > 1:
        raise BadPickle(f"{what} is big-endian {base} (the release writes little-endian only)")
    if order not in ("<", "|") if base.itemsize > 1 else order not in ("<", "|", ">"):
        raise BadPickle(f"{what} has byte order {_brief(order)} (the release writes '<')")
    return base


def _array(stub: Any, what: str) -> ArrayRef:
    if not isinstance(stub, ArrayStub):
        raise BadPickle(f"{what} is {_kind(stub)}, not a numpy array")
    state = stub.state
    if not (type(state) is tuple and len(state) == 5 and type(state[0]) is int and state[0] == 1):
        raise BadPickle(f"malformed numpy {what} state")
    _, shape, dtype_stub, fortran, raw = state
    if type(shape) is not tuple or len(shape) > MAX_NDIM \
            or not all(type(n) is int and 0 <= n <= MAX_DIM for n in shape):
        raise BadPickle(f"malformed {what} shape")
    dtype = _dtype(dtype_stub, what)
    if type(fortran) is not bool:
        raise BadPickle(f"malformed {what} order flag")
    if fortran:
        raise BadPickle(f"{what} is Fortran-ordered (the release writes C order only)")
    if type(raw) is not RawRef:
        raise BadPickle(f"{what} data is not raw bytes")
    needed = dtype.itemsize
    for n in shape:   # each n <= 2**40 and at most 8 of them: exact and cheap
        needed *= n
    if raw.length != needed:
        raise BadPickle(f"{what} holds {raw.length} bytes but {dtype}{list(shape)} needs {needed}")
    return ArrayRef(shape, dtype, raw)


def validate(obj: Any) -> dict[str, ArrayRef]:
    """The stand-ins a pickle left -> the file's parts ({"array"} of a float32 array, or
    {"weight", "scales"} of a QuantizedWeight8bit with int8 weight, bfloat16 scales of a fitting
    shape). Anything else -> BadPickle."""
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


def read_array(f: BinaryIO, ref: ArrayRef) -> np.ndarray:
    """A new C-ordered array holding the bytes `ref` locates in the open file `f` (a validated
    ArrayRef: its size was checked against the file before this allocates it)."""
    array = np.empty(ref.shape, ref.dtype)
    view = memoryview(array.reshape(-1).view(np.uint8))
    f.seek(ref.raw.offset)
    done = 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            raise BadPickle(f"truncated while reading {len(view)} bytes at offset "
                            f"{ref.raw.offset} (the file changed while read?)")
        done += n
    return array


# --- files and errors -----------------------------------------------------------------------------
def parse_stream(f: BinaryIO, size: int) -> dict[str, ArrayRef]:
    """The parts of the checkpoint pickle that fills the seekable `f` (`size` bytes), validated,
    each locating its bytes in `f`; only the pickle's opcodes are read. BadPickle (a PickleError)
    on any problem."""
    if size == 0:
        raise BadPickle("empty file")
    builder = ReleaseBuilder()
    obj, raws = read_pickle(f, size, builder)
    parts = validate(obj)
    data = [ref.raw for ref in parts.values()]
    if len({id(raw) for raw in data}) != len(data):
        raise BadPickle("weight and scales share the same data bytes")
    consumed = {id(raw) for raw in data + builder.typecodes}
    stray = [raw for raw in raws if id(raw) not in consumed]
    if stray:
        raise BadPickle(f"{len(stray)} bytes object(s) not part of any array (e.g. "
                        f"{stray[0].length} bytes at offset {stray[0].offset})")
    return parts


def parse_file(where: str) -> tuple[dict[str, ArrayRef], int]:
    """One checkpoint file's parts (`parse_stream`) and its size; BadPickle / OSError on any
    problem."""
    with open_regular(where) as f:
        size = os.fstat(f.fileno()).st_size
        return parse_stream(f, size), size


@contextlib.contextmanager
def reading(where: str) -> Iterator[None]:
    """Every failure inside the block -> one CheckpointError naming `where`."""
    try:
        yield
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise CheckpointError(f"{describe(where)}: missing") from None
    except (NotRegularFile, PickleError) as err:
        raise CheckpointError(f"{describe(where)}: {err}") from None
    except OSError as err:
        raise CheckpointError(f"{describe(where)}: cannot read ({err.strerror or err})") from None
    except (ValueError, MemoryError) as err:   # numpy refusing a shape, memory running out
        raise CheckpointError(f"{describe(where)}: unreadable ({type(err).__name__}: "
                              f"{one_line(err, 120)})") from None
