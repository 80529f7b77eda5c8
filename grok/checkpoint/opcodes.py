"""A strict, bounded reader of pickle opcode streams: the only code that reads a checkpoint pickle.

The release's files are one of two tiny pickles (a numpy array; a QuantizedWeight8bit of two),
about 100 opcodes each. This reader runs that opcode stream itself instead of handing it to
`pickle`: it knows only the opcodes those files use, resolves globals through a caller-given
table, never hashes, compares or prints a value it built (so a memo-built DAG or a deep nest costs
nothing), and bounds everything a hostile file could grow -- opcodes, memo, stack, marks, nesting,
container sizes, string and integer lengths. A bytes object (array data) is not read: it becomes a
`RawRef` (offset, length) in the file, which is skipped after checking the file holds it. Frames
must hold exactly the bytes they claim; exactly one STOP must end the file.

The result is a tree of Python values and the caller's stand-in objects; `unpickle.validate`
decides whether it is one of the release's shapes.
"""
from __future__ import annotations

import os
import pickle
import struct
from typing import Any, BinaryIO, Callable

from grok.checkpoint.arrays import RawRef

MAX_OPCODES = 1024   # the release's files have ~50 (an array) or ~110 (QuantizedWeight8bit)
MAX_MEMO = 64        # memo slots; the release's files use at most 40
MAX_STACK = 32       # values + marks on the stack; the release's deepest point holds ~14
MAX_ITEMS = 16       # items of one tuple or dict (the largest is numpy's 8-field dtype state)
MAX_DEPTH = 4        # nesting of tuples/dicts (array state > shape: 2)
MAX_NODES = 64       # values reachable from one value, memo references counted every time
MAX_TEXT = 64        # bytes of a string (the longest is "numpy._core.multiarray")
MAX_INT_BYTES = 8    # LONG1 integers (shape entries never need more)
FRAME_MIN = 4        # pickle's framer writes a shorter run of opcodes without a FRAME
LARGE_BYTES = 1 << 16   # ... and bytes objects from this size outside any frame
SMALL_BYTES = 16     # bytes objects up to this size are also read (numpy's typecode b'b')


class PickleError(Exception):
    """What is wrong with the stream (the caller adds the file's name)."""


class Mark:
    """The MARK opcode's stack entry."""


MARK = Mark()


class Builder:
    """What the reader asks of its caller: globals and the objects REDUCE, NEWOBJ and BUILD may
    make (stand-ins; anything else raises PickleError)."""

    def find_global(self, module: str, name: str) -> Any:
        raise NotImplementedError

    def call(self, func: Any, args: tuple) -> Any:
        raise NotImplementedError

    def new(self, cls: Any, args: tuple) -> Any:
        raise NotImplementedError

    def build(self, obj: Any, state: Any) -> None:
        raise NotImplementedError


class _Reader:
    def __init__(self, f: BinaryIO, size: int, builder: Builder) -> None:
        self.f = f
        self.size = size
        self.builder = builder
        self.pos = f.tell()
        self.frame_end: int | None = None   # end offset of the current frame
        self.stack: list[Any] = []
        self.memo: list[Any] = []
        self.shape: dict[int, tuple[int, int]] = {}   # id(container) -> (depth, nodes)
        self.keep: list[Any] = []           # keeps containers alive, so ids are not reused
        self.raws: list[RawRef] = []
        self.protocol = 0
        self.op_start = self.pos
        self.run_start = self.pos         # where the current run of unframed opcodes began

    # --- bytes ---------------------------------------------------------------------------------
    def _limit(self, n: int) -> None:
        end = self.pos + n
        if self.frame_end is not None and end > self.frame_end:
            raise PickleError(f"an opcode at byte {self.pos} runs past the end of its frame "
                              f"(byte {self.frame_end})")
        if end > self.size:
            raise PickleError(f"truncated: {n} bytes needed at byte {self.pos}, the file has "
                              f"{self.size}")

    def read(self, n: int) -> bytes:
        self._limit(n)
        data = self.f.read(n)
        if len(data) != n:
            raise PickleError(f"truncated at byte {self.pos} (the file changed while read?)")
        self._advance(n)
        return data

    def _advance(self, n: int) -> None:
        self.pos += n
        if self.pos == self.frame_end:
            self.frame_end = None
            self.run_start = self.pos

    def skip(self, n: int) -> RawRef:
        self._limit(n)
        raw = RawRef(self.pos, n)
        if self.frame_end is None and n >= LARGE_BYTES:
            self.check_framing(self.op_start)   # the framer flushed its frame before these
            self.run_start = self.pos + n
        self.f.seek(n, os.SEEK_CUR)
        self._advance(n)
        self.raws.append(raw)
        return raw

    def check_framing(self, end: int) -> None:
        """Protocol 4 writers frame every opcode but large bytes objects and runs of fewer than
        FRAME_MIN bytes; a longer unframed run means bytes were cut or spliced (e.g. array data
        9 bytes short swallowing the next FRAME header, which would shift every value)."""
        if self.protocol >= 4 and self.frame_end is None and end - self.run_start >= FRAME_MIN:
            raise PickleError(f"{end - self.run_start} bytes of opcodes outside any frame at "
                              f"byte {self.run_start} (bytes cut from or spliced into the file?)")

    def unpack(self, fmt: str) -> int:
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    # --- the stack -----------------------------------------------------------------------------
    def push(self, value: Any) -> None:
        if len(self.stack) >= MAX_STACK:
            raise PickleError(f"stack deeper than {MAX_STACK}")
        self.stack.append(value)

    def pop(self) -> Any:
        if not self.stack or self.stack[-1] is MARK:
            raise PickleError("an opcode needs a value the stack does not hold")
        return self.stack.pop()

    def pop_mark(self) -> list[Any]:
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i] is MARK:
                items = self.stack[i + 1:]
                del self.stack[i:]
                return items
        raise PickleError("no MARK for an opcode that needs one")

    def measure(self, value: Any) -> tuple[int, int]:
        return self.shape.get(id(value), (0, 1))

    def container(self, value: Any, items: list[Any]) -> Any:
        """Register a tuple or dict made of `items`, bounding its size, depth and reach."""
        if len(items) > MAX_ITEMS:
            raise PickleError(f"a container of {len(items)} items (at most {MAX_ITEMS})")
        depth, nodes = 1, 1
        for item in items:
            d, n = self.measure(item)
            depth, nodes = max(depth, d + 1), nodes + n
        if depth > MAX_DEPTH:
            raise PickleError(f"values nested deeper than {MAX_DEPTH}")
        if nodes > MAX_NODES:
            raise PickleError(f"a value reaching more than {MAX_NODES} others (a memo-built "
                              "graph?)")
        self.shape[id(value)] = (depth, nodes)
        self.keep.append(value)
        return value

    def text(self, n: int) -> str:
        if n > MAX_TEXT:
            raise PickleError(f"a string of {n} bytes (at most {MAX_TEXT})")
        try:
            return self.read(n).decode("utf-8")
        except UnicodeDecodeError:
            raise PickleError(f"a string at byte {self.pos - n} is not UTF-8") from None

    def data(self, n: int) -> RawRef:
        """A bytes object as where it is in the file; small ones (typecodes) also hold it."""
        if n > SMALL_BYTES:
            return self.skip(n)
        raw = RawRef(self.pos, n, self.read(n))
        self.raws.append(raw)
        return raw

    def memo_put(self, index: int) -> None:
        if index != len(self.memo) or index >= MAX_MEMO:
            raise PickleError(f"memo slot {index} (slots are filled in order, at most "
                              f"{MAX_MEMO})")
        if not self.stack or self.stack[-1] is MARK:
            raise PickleError("memoizing an empty stack")
        self.memo.append(self.stack[-1])

    def memo_get(self, index: int) -> None:
        if not 0 <= index < len(self.memo):
            raise PickleError(f"memo slot {index} was never filled")
        self.push(self.memo[index])

    # --- the opcodes ---------------------------------------------------------------------------
    def run(self) -> Any:
        for count in range(MAX_OPCODES):
            start = self.op_start = self.pos
            op = self.read(1)
            handler = _HANDLERS.get(op)
            if handler is None:
                if op in (pickle.PERSID, pickle.BINPERSID):
                    raise PickleError(f"a persistent id (byte {start}) is not allowed in a "
                                      "checkpoint file")
                name = _NAMES.get(op, f"0x{op[0]:02x}")
                raise PickleError(f"opcode {name} at byte {start} is not one a checkpoint "
                                  "file uses")
            if count == 0 and op != pickle.PROTO:
                raise PickleError("does not start with a pickle PROTO opcode")
            stop = handler(self) is _STOP
            if op != pickle.PROTO:
                self.check_framing(self.pos)
            else:
                self.run_start = self.pos   # framing starts after PROTO
            if stop:
                return self.finish()
        raise PickleError(f"more than {MAX_OPCODES} opcodes")

    def finish(self) -> Any:
        if len(self.stack) != 1 or self.stack[0] is MARK:
            raise PickleError(f"STOP with {len(self.stack)} entries on the stack (expected one "
                              "value)")
        if self.pos != self.size:
            raise PickleError(f"{self.size - self.pos} trailing bytes after the pickle's STOP "
                              f"(file is {self.size} bytes)")
        return self.stack[0]


_STOP = object()


def _proto(r: _Reader) -> None:
    if r.protocol:
        raise PickleError("a second PROTO opcode")
    r.protocol = r.read(1)[0]
    if r.protocol not in (3, 4):
        raise PickleError(f"pickle protocol {r.protocol} (checkpoint files use 4)")


def _frame(r: _Reader) -> None:
    if r.frame_end is not None:
        raise PickleError(f"a FRAME at byte {r.pos - 1} inside the previous frame")
    length = r.unpack("<Q")
    if length > r.size - r.pos:
        raise PickleError(f"truncated: a frame of {length} bytes at byte {r.pos}, "
                          f"{r.size - r.pos} left in the file")
    r.frame_end = r.pos + length if length else None


def _stop(r: _Reader) -> object:
    if r.frame_end is not None:
        raise PickleError(f"STOP at byte {r.pos - 1} inside a frame that ends at {r.frame_end}")
    return _STOP


def _global(r: _Reader, module: str, name: str) -> None:
    r.push(r.builder.find_global(module, name))


def _text_line(r: _Reader) -> str:
    line = b""
    while not line.endswith(b"\n"):
        line += r.read(1)
        if len(line) > MAX_TEXT:
            raise PickleError(f"a GLOBAL name longer than {MAX_TEXT} bytes")
    try:
        return line[:-1].decode("ascii")
    except UnicodeDecodeError:
        raise PickleError("a GLOBAL name is not ASCII") from None


def _stack_global(r: _Reader) -> None:
    name, module = r.pop(), r.pop()
    if type(module) is not str or type(name) is not str:
        raise PickleError("STACK_GLOBAL of non-strings")
    _global(r, module, name)


def _tuple(r: _Reader, n: int | None) -> None:
    if n is None:
        items = r.pop_mark()
    else:
        items = [r.pop() for _ in range(n)][::-1]
    r.push(r.container(tuple(items), items))


def _setitems(r: _Reader, items: list[Any]) -> None:
    if len(items) % 2:
        raise PickleError("SETITEMS with an odd number of values")
    target = r.pop()
    if type(target) is not dict:
        raise PickleError("SETITEM(S) on something not a dict")
    for key, value in zip(items[::2], items[1::2]):
        if type(key) is not str:   # never hash a hostile value
            raise PickleError("a dict key that is not a string")
        if key in target:
            raise PickleError("a dict key set twice")
        target[key] = value
    r.push(r.container(target, list(target.values())))


def _reduce(r: _Reader) -> None:
    args, func = r.pop(), r.pop()
    if type(args) is not tuple:
        raise PickleError("REDUCE arguments are not a tuple")
    r.push(r.builder.call(func, args))


def _newobj(r: _Reader) -> None:
    args, cls = r.pop(), r.pop()
    if type(args) is not tuple:
        raise PickleError("NEWOBJ arguments are not a tuple")
    r.push(r.builder.new(cls, args))


def _build(r: _Reader) -> None:
    state = r.pop()
    target = r.stack[-1] if r.stack and r.stack[-1] is not MARK else None
    if target is None:
        raise PickleError("BUILD without an object")
    r.builder.build(target, state)


def _int_bytes(r: _Reader) -> None:
    n = r.read(1)[0]
    if n > MAX_INT_BYTES:
        raise PickleError(f"an integer of {n} bytes (at most {MAX_INT_BYTES})")
    r.push(int.from_bytes(r.read(n), "little", signed=True))


_HANDLERS: dict[bytes, Callable[[_Reader], Any]] = {
    pickle.PROTO: _proto,
    pickle.FRAME: _frame,
    pickle.STOP: _stop,
    pickle.MARK: lambda r: r.push(MARK),
    pickle.NONE: lambda r: r.push(None),
    pickle.NEWTRUE: lambda r: r.push(True),
    pickle.NEWFALSE: lambda r: r.push(False),
    pickle.BININT: lambda r: r.push(r.unpack("<i")),
    pickle.BININT1: lambda r: r.push(r.read(1)[0]),
    pickle.BININT2: lambda r: r.push(r.unpack("<H")),
    pickle.LONG1: _int_bytes,
    pickle.SHORT_BINUNICODE: lambda r: r.push(r.text(r.read(1)[0])),
    pickle.BINUNICODE: lambda r: r.push(r.text(r.unpack("<I"))),
    pickle.SHORT_BINBYTES: lambda r: r.push(r.data(r.read(1)[0])),
    pickle.BINBYTES: lambda r: r.push(r.data(r.unpack("<I"))),
    pickle.BINBYTES8: lambda r: r.push(r.data(r.unpack("<Q"))),
    pickle.EMPTY_TUPLE: lambda r: _tuple(r, 0),
    pickle.TUPLE1: lambda r: _tuple(r, 1),
    pickle.TUPLE2: lambda r: _tuple(r, 2),
    pickle.TUPLE3: lambda r: _tuple(r, 3),
    pickle.TUPLE: lambda r: _tuple(r, None),
    pickle.EMPTY_DICT: lambda r: r.push(r.container({}, [])),
    pickle.SETITEM: lambda r: _setitems(r, [r.pop(), r.pop()][::-1]),
    pickle.SETITEMS: lambda r: _setitems(r, r.pop_mark()),
    pickle.GLOBAL: lambda r: _global(r, _text_line(r), _text_line(r)),
    pickle.STACK_GLOBAL: _stack_global,
    pickle.REDUCE: _reduce,
    pickle.NEWOBJ: _newobj,
    pickle.BUILD: _build,
    pickle.MEMOIZE: lambda r: r.memo_put(len(r.memo)),
    pickle.BINPUT: lambda r: r.memo_put(r.read(1)[0]),
    pickle.LONG_BINPUT: lambda r: r.memo_put(r.unpack("<I")),
    pickle.BINGET: lambda r: r.memo_get(r.read(1)[0]),
    pickle.LONG_BINGET: lambda r: r.memo_get(r.unpack("<I")),
}
_NAMES = {bytes([code]): name for name, code in
          ((n, getattr(pickle, n)[0]) for n in dir(pickle)
           if n.isupper() and isinstance(getattr(pickle, n), bytes) and len(getattr(pickle, n)) == 1)}


def read_pickle(f: BinaryIO, size: int, builder: Builder) -> tuple[Any, list[RawRef]]:
    """Run the pickle in `f` (from its current position to `size`, the file's length) under the
    bounds above. Returns the value it leaves and every bytes object it skipped (RawRefs, in file
    order). Anything outside the bounds or the opcode set -> PickleError; nothing is allocated
    in proportion to what the file claims."""
    reader = _Reader(f, size, builder)
    return reader.run(), reader.raws
