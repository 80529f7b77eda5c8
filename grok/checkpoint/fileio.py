"""Copying checkpoint bytes into host arrays: one slice of one array of one file, by `pread` at
its offset when the slice is a contiguous byte range, else out of a memory map; float32 ->
bfloat16 on the way through a reused staging buffer. Host arrays are 64-byte aligned (XLA's CPU
client then aliases them instead of copying) and large ones advised for transparent huge pages."""
from __future__ import annotations

import math
import mmap
import os
import threading
from typing import Any, BinaryIO, Iterator

import numpy as np

from grok.checkpoint.arrays import ArrayRef
from grok.errors import CheckpointError
from grok.files import open_regular


Index = tuple[slice, ...]


def slice_key(index: Index) -> tuple:
    """A hashable key of a slice tuple (slices are not hashable before Python 3.12)."""
    return tuple((s.start, s.stop, s.step) for s in index)


def _open(path: str) -> BinaryIO:
    """A checkpoint file opened for reading; one that vanished or became a FIFO or device since
    its header was read is a CheckpointError naming it."""
    try:
        return open_regular(path)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read ({getattr(err, 'strerror', None) or err})") \
            from None


class Mapped:
    """A read-only memory map of one file; arrays are views into it until `close`."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._file = _open(path)
        size = os.fstat(self._file.fileno()).st_size
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size else None

    def array(self, ref: ArrayRef) -> np.ndarray:
        if ref.raw.inline is not None:
            buf = np.frombuffer(ref.raw.inline, ref.dtype)
        else:
            mapped = len(self._map) if self._map is not None else 0
            if ref.raw.offset + ref.nbytes > mapped:   # it shrank after its header was read
                raise CheckpointError(f"{self.path}: truncated while reading ({mapped} bytes, "
                                      f"the header says {ref.raw.offset + ref.nbytes})")
            buf = np.frombuffer(self._map, ref.dtype, math.prod(ref.shape), ref.raw.offset)
        return buf.reshape(ref.shape)

    def close(self) -> None:
        """Unmap and close; a view still alive (only after an error) keeps the map open until
        it goes, instead of raising BufferError over the error being reported."""
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                pass
            self._map = None
        self._file.close()


class Source:
    """One open checkpoint file that worker threads copy slices out of: by `pread` when a slice
    is one contiguous byte range, else out of a memory map (made on first need)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._file = _open(path)
        self.fd = self._file.fileno()
        self._mapped: Mapped | None = None
        self._lock = threading.Lock()

    def array(self, ref: ArrayRef) -> np.ndarray:
        with self._lock:
            if self._mapped is None:
                self._mapped = Mapped(self.path)
            return self._mapped.array(ref)

    def pread(self, out: np.ndarray, offset: int) -> None:
        """Fill the C-contiguous `out` with the file's bytes from `offset` on."""
        view = memoryview(out.reshape(-1).view(np.uint8))
        done = 0
        while done < len(view):
            n = os.preadv(self.fd, [view[done:done + (1 << 30)]], offset + done)
            if n <= 0:
                raise CheckpointError(f"{self.path}: truncated while reading")
            done += n

    def close(self) -> None:
        if self.fd >= 0:
            self._file.close()
            self.fd = -1
        if self._mapped is not None:
            self._mapped.close()
            self._mapped = None


def byte_range(ref: ArrayRef, index: Index) -> tuple[int, int] | None:
    """(file offset, length) of the slice `index` of `ref` when it is one contiguous byte range
    of the file (dims before some k select one element, dims after k are whole), else None."""
    if ref.raw.inline is not None:
        return None
    ranges = [s.indices(n) for s, n in zip(index, ref.shape)]
    if any(step != 1 for _, _, step in ranges):
        return None
    lengths = [max(0, stop - start) for start, stop, _ in ranges]
    k = next((d for d, n in enumerate(lengths) if n != 1), len(lengths))
    if any(lengths[d] != ref.shape[d] for d in range(k + 1, len(lengths))):
        return None
    offset, stride = 0, ref.dtype.itemsize
    for d in reversed(range(len(ref.shape))):
        offset += ranges[d][0] * stride
        stride *= ref.shape[d]
    return ref.raw.offset + offset, math.prod(lengths) * ref.dtype.itemsize


ALIGN = 64             # XLA's CPU client aliases host memory aligned to this instead of copying
MMAP_MIN = 1 << 20     # host arrays from this size on get their own (page-aligned) mapping
CHUNK = 32 << 20       # bytes one worker copies at a time
STAGE = 8 << 20        # per-thread staging buffer (dtype conversions)
HUGE_PAGES = True      # advise large host arrays for transparent huge pages


def host_array(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """An uninitialised C-ordered host array, 64-byte aligned; large ones in their own private
    anonymous mapping, advised for transparent huge pages (fewer first-touch page faults), whose
    memory goes back to the system when the array (and any device buffer aliasing it) is freed."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < MMAP_MIN:
        raw = np.empty(nbytes + ALIGN, np.uint8)
        start = -raw.ctypes.data % ALIGN
        return raw[start:start + nbytes].view(dtype).reshape(shape)
    mem = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if HUGE_PAGES and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            mem.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass
    return np.frombuffer(mem, dtype).reshape(shape)


_stage = threading.local()


def staging(nbytes: int) -> np.ndarray:
    """This thread's reusable (so already page-faulted) staging buffer, at least `nbytes`."""
    buf = getattr(_stage, "buf", None)
    if buf is None or buf.nbytes < nbytes:
        buf = _stage.buf = host_array((max(nbytes, STAGE),), np.uint8)
    return buf


def copy_slice(src: Source, ref: ArrayRef, index: Index, out: np.ndarray) -> None:
    """Worker: the slice `index` of the file's array `ref` -> `out` (C-contiguous; its dtype may
    differ from the file's, e.g. float32 -> bfloat16), copying each byte once where it can."""
    where = byte_range(ref, index)
    if where is None:      # strided: copy the elements out of the memory map
        np.copyto(out, src.array(ref)[index], casting="unsafe")
        return
    offset, nbytes = where
    if out.dtype == ref.dtype:
        src.pread(out, offset)
        return
    flat = out.reshape(-1)
    step = max(1, STAGE // ref.dtype.itemsize)
    for start in range(0, flat.size, step):
        n = min(step, flat.size - start)
        stage = staging(n * ref.dtype.itemsize)[:n * ref.dtype.itemsize].view(ref.dtype)
        src.pread(stage, offset + start * ref.dtype.itemsize)
        np.copyto(flat[start:start + n], stage, casting="unsafe")


def chunks(index: Index, shape: tuple[int, ...], itemsize: int) -> Iterator[tuple[Index, slice]]:
    """Split the slice `index` of an array of `shape` along its first axis into pieces of about
    CHUNK bytes: (the piece's index into the array, its rows within the slice)."""
    if not shape:
        yield index, slice(None)
        return
    start, stop, _ = index[0].indices(shape[0])
    rows = max(0, stop - start)
    row_bytes = math.prod(len(range(*s.indices(n))) for s, n in zip(index[1:], shape[1:])) \
        * itemsize
    step = max(1, CHUNK // max(1, row_bytes))
    if rows == 0:
        yield index, slice(0, 0)
    for a in range(0, rows, step):
        b = min(rows, a + step)
        yield (slice(start + a, start + b), *index[1:]), slice(a, b)


class HostPool:
    """Reusable host buffers for the copying path (a device that does not alias host memory):
    once touched, reading into one again costs no page faults. At most `cap` bytes stay free."""

    def __init__(self) -> None:
        self.free: list[np.ndarray] = []
        self.cap = 0

    def get(self, shape: tuple[int, ...], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
        """(the raw buffer to `put` back later, a `shape` `dtype` view of it)."""
        nbytes = math.prod(shape) * dtype.itemsize
        fits = [b for b in self.free if nbytes <= b.nbytes <= 2 * nbytes + MMAP_MIN]
        if fits:
            raw = min(fits, key=lambda b: b.nbytes)
            self.free = [b for b in self.free if b is not raw]
        else:
            raw = host_array((nbytes,), np.uint8)
        return raw, raw[:nbytes].view(dtype).reshape(shape)

    def put(self, raws: list[np.ndarray]) -> None:
        self.free.extend(raws)
        while self.free and sum(b.nbytes for b in self.free) > self.cap:
            smallest = min(self.free, key=lambda b: b.nbytes)
            self.free = [b for b in self.free if b is not smallest]
