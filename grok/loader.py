"""Streaming, sharded checkpoint loading: each file is read once, by offset, straight onto the
devices that own its pieces.

1. `read_header(file)` walks a checkpoint pickle's opcodes with the allow-list of
   grok/checkpoint.py (same globals, same inert stand-ins) but never materialises array data: a
   raw-bytes opcode outside the pickle's frames is replaced by its (offset, length) in the file.
   The result says each array's shape, dtype and where its bytes are.
2. `load_params(path, config, mesh)` builds every leaf of the model's params tree as a global
   jax.Array sharded by grok/sharding.py's rules. Files are read in order, a bounded number at a
   time, each split into chunks that worker threads copy with `pread` (releases the GIL; strided
   slices are copied out of a memory map), only the slices this process's devices own.
   Where the devices alias 64-byte-aligned host memory (XLA's CPU client) each slice is read
   straight into the host array that becomes its device buffer -- a layer's slice into its slot
   of the stacked [L, ...] array -- so each byte is copied once. Elsewhere (GPUs) slices are read
   into a pool of reused host buffers, handed to the devices, and a layer's piece is written
   into its slot of the stacked leaf on device (a donated in-place update), so the host never
   holds more than `max_inflight` files' slices. In a multi-process run each process reads only
   its own devices' slices.
3. `verify(path, config)` checks a checkpoint without loading it (headers, sizes, scales, samples).
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import math
import mmap
import os
import pickle
import struct
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from grok import checkpoint as ck
from grok import sharding as sh
from grok.config import GrokConfig
from grok.params import Entry, checkpoint_entries
from grok.progress import Progress

log = logging.getLogger(__name__)


# --- header parsing ----------------------------------------------------------------------------
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
                                 f"({type(err).__name__}: {ck._one_line(err, 120)})") from None


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


# --- reading slices ----------------------------------------------------------------------------
Index = tuple[slice, ...]


def _key(index: Index) -> tuple:
    return tuple((s.start, s.stop, s.step) for s in index)


class _Mapped:
    """A read-only memory map of one file; arrays are views into it until `close`."""

    def __init__(self, path: str) -> None:
        self._file = open(path, "rb")
        size = os.fstat(self._file.fileno()).st_size
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size else None

    def array(self, ref: ArrayRef) -> np.ndarray:
        if ref.raw.inline is not None:
            buf = np.frombuffer(ref.raw.inline, ref.dtype)
        else:
            buf = np.frombuffer(self._map, ref.dtype, math.prod(ref.shape), ref.raw.offset)
        return buf.reshape(ref.shape, order="F" if ref.fortran else "C")

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
        self._file.close()


class _Source:
    """One open checkpoint file that worker threads copy slices out of: by `pread` when a slice
    is one contiguous byte range, else out of a memory map (made on first need)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        self._mapped: _Mapped | None = None
        self._lock = threading.Lock()

    def array(self, ref: ArrayRef) -> np.ndarray:
        with self._lock:
            if self._mapped is None:
                self._mapped = _Mapped(self.path)
            return self._mapped.array(ref)

    def pread(self, out: np.ndarray, offset: int) -> None:
        """Fill the C-contiguous `out` with the file's bytes from `offset` on."""
        view = memoryview(out.reshape(-1).view(np.uint8))
        done = 0
        while done < len(view):
            n = os.preadv(self.fd, [view[done:done + (1 << 30)]], offset + done)
            if n <= 0:
                raise ck.CheckpointError(f"{self.path}: truncated while reading")
            done += n

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self._mapped is not None:
            try:
                self._mapped.close()
            except BufferError:   # a worker still holds a view (only after an error)
                pass
            self._mapped = None


def _byte_range(ref: ArrayRef, index: Index) -> tuple[int, int] | None:
    """(file offset, length) of the slice `index` of `ref` when it is one contiguous byte range
    of the file (dims before some k select one element, dims after k are whole), else None."""
    if ref.raw.inline is not None or ref.fortran:
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


_ALIGN = 64            # XLA's CPU client aliases host memory aligned to this instead of copying
_MMAP_MIN = 1 << 20    # host arrays from this size on get their own (page-aligned) mapping
CHUNK = 32 << 20       # bytes one worker copies at a time
STAGE = 8 << 20        # per-thread staging buffer (dtype conversions)
HUGE_PAGES = True      # advise large host arrays for transparent huge pages


def _host_array(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """An uninitialised C-ordered host array, 64-byte aligned; large ones in their own private
    anonymous mapping, advised for transparent huge pages (fewer first-touch page faults), whose
    memory goes back to the system when the array (and any device buffer aliasing it) is freed."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < _MMAP_MIN:
        raw = np.empty(nbytes + _ALIGN, np.uint8)
        start = -raw.ctypes.data % _ALIGN
        return raw[start:start + nbytes].view(dtype).reshape(shape)
    mem = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if HUGE_PAGES and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            mem.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass
    return np.frombuffer(mem, dtype).reshape(shape)


_stage = threading.local()


def _staging(nbytes: int) -> np.ndarray:
    """This thread's reusable (so already page-faulted) staging buffer, at least `nbytes`."""
    buf = getattr(_stage, "buf", None)
    if buf is None or buf.nbytes < nbytes:
        buf = _stage.buf = _host_array((max(nbytes, STAGE),), np.uint8)
    return buf


def _copy(src: _Source, ref: ArrayRef, index: Index, out: np.ndarray) -> None:
    """Worker: the slice `index` of the file's array `ref` -> `out` (C-contiguous; its dtype may
    differ from the file's, e.g. float32 -> bfloat16), copying each byte once where it can."""
    where = _byte_range(ref, index)
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
        stage = _staging(n * ref.dtype.itemsize)[:n * ref.dtype.itemsize].view(ref.dtype)
        src.pread(stage, offset + start * ref.dtype.itemsize)
        np.copyto(flat[start:start + n], stage, casting="unsafe")


def _chunks(index: Index, shape: tuple[int, ...], itemsize: int) -> Iterator[tuple[Index, slice]]:
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


@functools.lru_cache(maxsize=None)
def _aliases(device: Any) -> bool:
    """Whether jax.device_put onto `device` aliases aligned host memory instead of copying it
    (XLA's CPU client does): then a buffer handed over must never be written again."""
    import jax
    probe = _host_array((4096,), np.int8)
    probe[:] = 0
    try:
        return jax.device_put(probe, device, may_alias=True).unsafe_buffer_pointer() == \
            probe.ctypes.data
    except Exception:   # no unsafe_buffer_pointer on this backend: assume a copy
        return False


class _Pool:
    """Reusable host buffers for the copying path (a device that does not alias host memory):
    once touched, reading into one again costs no page faults. At most `cap` bytes stay free."""

    def __init__(self) -> None:
        self.free: list[np.ndarray] = []
        self.cap = 0

    def get(self, shape: tuple[int, ...], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
        """(the raw buffer to `put` back later, a `shape` `dtype` view of it)."""
        nbytes = math.prod(shape) * dtype.itemsize
        fits = [b for b in self.free if nbytes <= b.nbytes <= 2 * nbytes + _MMAP_MIN]
        if fits:
            raw = min(fits, key=lambda b: b.nbytes)
            self.free = [b for b in self.free if b is not raw]
        else:
            raw = _host_array((nbytes,), np.uint8)
        return raw, raw[:nbytes].view(dtype).reshape(shape)

    def put(self, raws: list[np.ndarray]) -> None:
        self.free.extend(raws)
        while self.free and sum(b.nbytes for b in self.free) > self.cap:
            smallest = min(self.free, key=lambda b: b.nbytes)
            self.free = [b for b in self.free if b is not smallest]


@dataclasses.dataclass
class LoadStats:
    """What a load did: bytes copied out of files by this process, files opened, and the most
    tensors (files) / bytes held in host memory at once."""

    bytes_read: int = 0
    files: int = 0
    max_inflight_tensors: int = 0
    max_inflight_bytes: int = 0
    seconds: float = 0.0
    _inflight_tensors: int = 0
    _inflight_bytes: int = 0
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    def acquire(self, nbytes: int) -> None:
        with self._lock:
            self.files += 1
            self.bytes_read += nbytes
            self._inflight_tensors += 1
            self._inflight_bytes += nbytes
            self.max_inflight_tensors = max(self.max_inflight_tensors, self._inflight_tensors)
            self.max_inflight_bytes = max(self.max_inflight_bytes, self._inflight_bytes)

    def release(self, nbytes: int) -> None:
        with self._lock:
            self._inflight_tensors -= 1
            self._inflight_bytes -= nbytes

    @property
    def gb_per_s(self) -> float:
        return self.bytes_read / 1e9 / max(self.seconds, 1e-9)


last_stats: LoadStats | None = None   # of the latest load_params in this process


# --- the plan: which leaf, which file, which slices ---------------------------------------------
@dataclasses.dataclass
class _Target:
    """One leaf of the params tree (a whole array or one part of a QuantizedWeight8bit)."""

    path: str                    # rule path, e.g. layers/decoder_layer/moe/linear/w/weight
    part: str                    # "array", "weight" or "scales"
    layer_shape: tuple[int, ...]  # shape of one file's part
    dtype: np.dtype              # dtype on device
    stacked: bool                # has a leading [L] axis filled layer by layer
    sharding: Any = None         # of the whole leaf
    piece_sharding: Any = None   # of one layer's piece (stacked leaves)
    array: Any = None            # the global jax.Array being filled
    buffers: dict[tuple, np.ndarray] | None = None   # aliasing path: the final host arrays
    layers_done: int = 0


def _targets(config: GrokConfig, mesh: Any, layout: str, scan: bool, embed_dtype: Any
             ) -> tuple[dict[str, _Target], list[tuple[Entry, list[_Target]]]]:
    """The leaves to build, and for each checkpoint file (in file order) the targets it feeds."""
    sizes = sh.mesh_shape(mesh)
    sh.check_layout(config, sizes, layout)
    targets: dict[str, _Target] = {}
    per_file = []
    for entry in checkpoint_entries(config):
        top = "embed" if entry.layer is None else "layers"
        base = f"{top}/{entry.module}/{entry.param}"
        parts = ([("weight", entry.shape, ck.I8), ("scales", entry.scales_shape, ck.BF16)]
                 if entry.quantized else
                 [("array", entry.shape,
                   np.dtype(embed_dtype) if entry.param == "embeddings" else ck.F32)])
        feeds = []
        for part, shape, dtype in parts:
            path = base if part == "array" else f"{base}/{part}"
            stacked = entry.layer is not None and scan
            key = path if entry.layer is None or scan else f"{path}@{entry.layer}"
            if key not in targets:
                full = (config.num_layers, *shape) if stacked else tuple(shape)
                wshape = None
                if part == "scales":
                    wshape = (config.num_layers, *entry.shape) if stacked else entry.shape
                spec = sh.param_spec(path, full, sizes, config, layout, stacked, wshape)
                targets[key] = _Target(path, part, tuple(shape), dtype, stacked,
                                       sh.named(mesh, spec),
                                       sh.named(mesh, spec[1:]) if stacked else None)
            feeds.append(targets[key])
        per_file.append((entry, feeds))
    return targets, per_file


def _local_indices(sharding: Any, shape: tuple[int, ...]) -> dict[tuple, Index]:
    """The distinct slices this process's devices hold of an array of `shape`."""
    out: dict[tuple, Index] = {}
    for index in sharding.addressable_devices_indices_map(shape).values():
        index = tuple(index) + (slice(None),) * (len(shape) - len(index))
        out.setdefault(_key(index), index)
    return out


@dataclasses.dataclass
class _Piece:
    """This process's slice `index` of one part of a file, copied into `host`."""

    target: _Target
    key: tuple        # of the slice, as the device map of the piece's sharding says it
    index: Index
    host: np.ndarray


@dataclasses.dataclass
class _File:
    entry: Entry
    feeds: list[_Target]
    source: _Source
    pieces: list[_Piece]
    futures: list[Future]
    held: int                                   # bytes of slices, for LoadStats
    raws: list[np.ndarray] = dataclasses.field(default_factory=list)   # pool buffers taken


def _put_layer(stacked: Any, piece: Any, layer: Any) -> Any:
    """Write one layer's piece into slot `layer` of the stacked leaf (jitted with donation, so
    in place; the result keeps the stacked leaf's sharding)."""
    import jax
    return jax.lax.dynamic_update_index_in_dim(stacked, piece, layer, 0)


@functools.lru_cache(maxsize=None)
def _jitted_put() -> Callable:
    import jax
    return jax.jit(_put_layer, donate_argnums=0)


@functools.lru_cache(maxsize=256)
def _zeros_fn(shape: tuple[int, ...], dtype: np.dtype, sharding: Any) -> Callable:
    import jax
    import jax.numpy as jnp
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)


def _full(index: Any, ndim: int) -> Index:
    return tuple(index) + (slice(None),) * (ndim - len(tuple(index)))


def _to_device(host: np.ndarray, device: Any) -> Any:
    """One device's shard from host memory (on XLA's CPU client this aliases aligned memory)."""
    import jax
    return jax.device_put(host, device)


def _aliased(array: Any, host: np.ndarray) -> bool:
    try:
        return array.unsafe_buffer_pointer() == host.ctypes.data
    except Exception:   # a backend without buffer pointers: it copied
        return False


def _device_array(shape: tuple[int, ...], sharding: Any, host: dict[tuple, np.ndarray]
                  ) -> tuple[Any, bool]:
    """The global array of `shape` whose addressable shards are the host arrays `host` (by slice
    key), and whether any device took over host memory (then it must never be written again).
    A slice that several devices hold is handed over once; the others get copies."""
    import jax
    arrays, taken = [], set()
    aliased = False
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        key = _key(_full(index, len(shape)))
        source = host[key] if key not in taken else np.array(host[key])
        array = _to_device(source, device)
        aliased |= key not in taken and _aliased(array, source)
        arrays.append(array)
        taken.add(key)
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays), aliased


def load_params(path: ck.PathLike, config: GrokConfig, mesh: Any, *, layout: str = "tensor",
                scan: bool = True, workers: int = 4, max_inflight: int | None = None,
                progress: bool = True, stats: LoadStats | None = None,
                embed_dtype: Any = None, zero_copy: bool | None = None) -> dict[str, Any]:
    """The model's params tree ({"embed": ..., "layers": ...}, as grok.api.device_params builds
    it) as global jax.Arrays sharded over `mesh` by the layout's rules, streamed from the
    checkpoint at `path` (a dir holding ckpt-0/, or ckpt-0 itself).

    Files are read in order, at most `max_inflight` (default 2) at once, each split into chunks
    that `workers` threads copy with pread (or out of a memory map when a slice is strided).
    Where the devices alias host memory (XLA's CPU client; `zero_copy=None` probes it) each slice
    is read straight into the host array that becomes its device buffer (a stacked leaf's layer
    into its slot of the [L, ...] array), so every byte is copied once. Elsewhere (GPUs, TPUs)
    slices are read into a pool of reused host buffers, handed to the devices, and a layer's piece
    is written in place into its slot of the stacked leaf on device: at most `max_inflight`
    files' slices are in host memory at once. `stats` (a LoadStats) receives the bytes read and
    the in-flight peaks. Errors are CheckpointErrors."""
    import jax
    import ml_dtypes

    embed_dtype = np.dtype(ml_dtypes.bfloat16) if embed_dtype is None else np.dtype(embed_dtype)
    mesh = sh.make_mesh(mesh)
    stats = LoadStats() if stats is None else stats
    ckpt = ck._ckpt_dir(path)
    entries = checkpoint_entries(config)
    ck._check_files(ckpt, entries)
    targets, per_file = _targets(config, mesh, layout, scan, embed_dtype)
    workers = max(1, int(workers))
    max_inflight = max(1, int(max_inflight or 2))
    if zero_copy is None:
        zero_copy = all(_aliases(d) for d in mesh.local_devices)
    pool = _Pool()
    if not zero_copy:
        for target in targets.values():
            if target.stacked:
                target.array = _zeros_fn((config.num_layers, *target.layer_shape), target.dtype,
                                         target.sharding)()

    def start_file(entry: Entry, feeds: list[_Target]) -> _File:
        file = ckpt / entry.filename
        header = read_header(file)
        problem = header_problem(header, entry)
        if problem:
            raise ck.CheckpointError(f"{file}: {problem} (leaf {entry.name})")
        pieces, raws = [], []
        for target in feeds:
            if zero_copy and target.stacked:
                full = (config.num_layers, *target.layer_shape)
                indices = _local_indices(target.sharding, full)
                if target.buffers is None:
                    target.buffers = {}
                    for key, index in indices.items():
                        shape = tuple(len(range(*s.indices(n))) for s, n in zip(index, full))
                        target.buffers[key] = _host_array(shape, target.dtype)
                pieces += [_Piece(target, key, index[1:], target.buffers[key][entry.layer])
                           for key, index in indices.items()]
                continue
            sharding = target.piece_sharding if target.stacked else target.sharding
            for key, index in _local_indices(sharding, target.layer_shape).items():
                shape = tuple(len(range(*s.indices(n))) for s, n in zip(index, target.layer_shape))
                if zero_copy:
                    host = _host_array(shape, target.dtype)
                else:
                    raw, host = pool.get(shape, target.dtype)
                    raws.append(raw)
                pieces.append(_Piece(target, key, index, host))
        held = sum(p.host.size * header.parts[p.target.part].dtype.itemsize for p in pieces)
        pool.cap = max(pool.cap, max_inflight * held)
        item = _File(entry, feeds, _Source(str(file)), pieces, [], held, raws)
        stats.acquire(held)
        window.append(item)   # from here on, an error closes it (see below)
        for p in pieces:
            ref = header.parts[p.target.part]
            for index, rows in _chunks(p.index, ref.shape, ref.dtype.itemsize):
                item.futures.append(threads.submit(_copy, item.source, ref, index,
                                                   p.host[rows] if p.host.ndim else p.host))
        return item

    def finish_file(item: _File) -> None:
        for future in item.futures:
            future.result()
        item.source.close()
        arrays, keep = [], False
        for target in item.feeds:
            pieces = {p.key: p.host for p in item.pieces if p.target is target}
            if zero_copy and target.stacked:
                target.layers_done += 1
                if target.layers_done == config.num_layers:
                    target.array, _ = _device_array((config.num_layers, *target.layer_shape),
                                                    target.sharding, target.buffers)
                    target.buffers = None
            elif zero_copy:
                target.array, _ = _device_array(target.layer_shape, target.sharding, pieces)
            else:
                sharding = target.piece_sharding if target.stacked else target.sharding
                piece, aliased = _device_array(target.layer_shape, sharding, pieces)
                keep |= aliased
                arrays.append(piece)
                if target.stacked:
                    target.array = _jitted_put()(target.array, piece, np.int32(item.entry.layer))
                    arrays.append(target.array)
                else:
                    target.array = piece
        if arrays:   # the host buffers are reused: the transfers must be done
            jax.block_until_ready(arrays)
            if not keep:   # (unless a device aliases them: then they are its memory now)
                pool.put(item.raws)
            item.raws = []

    start = time.monotonic()
    desc = f"loading {ckpt} onto a {mesh.shape[sh.DATA]}x{mesh.shape[sh.MODEL]} mesh"
    window: collections.deque[_File] = collections.deque()
    threads = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="load")
    try:
        with Progress(len(per_file), desc, enabled=progress, logger=log) as bar:
            # Device work happens on this thread only, in file order: every process issues the
            # same computations in the same order (needed when the mesh spans processes).
            for entry, feeds in per_file:
                while len(window) >= max_inflight:
                    finish_file(window[0])
                    done = window.popleft()
                    stats.release(done.held)
                    bar.update(1, done.held)
                start_file(entry, feeds)
            while window:
                finish_file(window[0])
                done = window.popleft()
                stats.release(done.held)
                bar.update(1, done.held)
    except BaseException:
        for item in window:
            for future in item.futures:
                future.cancel()
        raise
    finally:
        threads.shutdown(wait=True)
        for item in window:
            item.source.close()
            stats.release(item.held)
    stats.seconds += time.monotonic() - start
    global last_stats
    last_stats = stats
    log.info("read %.2f GB in %.1f s (%.2f GB/s), at most %d files / %.2f GB in host memory "
             "(%s)", stats.bytes_read / 1e9, stats.seconds, stats.gb_per_s,
             stats.max_inflight_tensors, stats.max_inflight_bytes / 1e9,
             "read straight into device memory" if zero_copy else "via reused host buffers")
    return _assemble(config, targets, scan)


def _assemble(config: GrokConfig, targets: dict[str, _Target], scan: bool) -> dict[str, Any]:
    from grok.quant import QuantizedWeight8bit

    def tree(layer: int | None) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for entry in checkpoint_entries(config):
            if (entry.layer is None) != (layer is None) or (layer not in (None, entry.layer)):
                continue
            top = "embed" if entry.layer is None else "layers"
            base = f"{top}/{entry.module}/{entry.param}"
            suffix = "" if layer is None or scan else f"@{layer}"
            if entry.quantized:
                leaf = QuantizedWeight8bit(targets[f"{base}/weight{suffix}"].array,
                                           targets[f"{base}/scales{suffix}"].array)
            else:
                leaf = targets[base + suffix].array
            out.setdefault(entry.module, {})[entry.param] = leaf
        return out
    layers = tree(0) if scan else tuple(tree(i) for i in range(config.num_layers))
    return {"embed": tree(None), "layers": layers}


# --- verification --------------------------------------------------------------------------------
@dataclasses.dataclass
class FileReport:
    file: str
    leaf: str
    ok: bool
    message: str


SAMPLE_BYTES = 1 << 16


def _verify_file(file: Path, entry: Entry, sample_bytes: int) -> FileReport:
    try:
        header = read_header(file)
        problem = header_problem(header, entry)
        if problem:
            return FileReport(file.name, entry.name, False, problem)
        mapped = _Mapped(str(file))
        try:
            notes = []
            for part, ref in header.parts.items():
                data = mapped.array(ref).reshape(-1, order="A")
                if part == "scales" or ref.nbytes <= sample_bytes:
                    values = np.asarray(data, np.float32)
                else:   # samples: the first, a middle and the last stretch of the data
                    k = max(1, sample_bytes // (3 * ref.dtype.itemsize))
                    mid = data.size // 2
                    values = np.concatenate([data[:k], data[mid:mid + k], data[-k:]]
                                            ).astype(np.float32)
                bad = ~np.isfinite(values)
                if bad.any():
                    return FileReport(file.name, entry.name, False,
                                      f"{part}: {int(bad.sum())} non-finite value(s)")
                if part == "scales" and (values <= 0).any():
                    return FileReport(file.name, entry.name, False,
                                      f"scales: {int((values <= 0).sum())} value(s) <= 0")
                del data, values
            notes = [f"{p} {r.dtype}{list(r.shape)}" for p, r in header.parts.items()]
        finally:
            mapped.close()
        return FileReport(file.name, entry.name, True,
                          f"{', '.join(notes)}, {header.end / 1e9:.3f} GB")
    except ck.CheckpointError as err:
        text = str(err)
        prefix = f"{file}: "
        return FileReport(file.name, entry.name, False,
                          text[len(prefix):] if text.startswith(prefix) else text)


def verify(path: ck.PathLike, config: GrokConfig, *, workers: int = 4,
           sample_bytes: int = SAMPLE_BYTES) -> Iterator[FileReport]:
    """Check every file of the checkpoint at `path` against `config` without loading it: present,
    header parses under the allow-list, shapes and dtypes as the config says, file size equal to
    the size the header implies, scales (read fully) finite and > 0, float samples finite.
    Yields one FileReport per expected file (in file order), then one per unexpected file."""
    ckpt = ck._ckpt_dir(path)
    entries = checkpoint_entries(config)
    present = set(os.listdir(ckpt))
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="verify") as pool:
        futures = []
        for entry in entries:
            file = ckpt / entry.filename
            if entry.filename not in present:
                futures.append(None)
            else:
                futures.append(pool.submit(_verify_file, file, entry, sample_bytes))
        for entry, future in zip(entries, futures):
            yield (FileReport(entry.filename, entry.name, False, "missing") if future is None
                   else future.result())
    expected = {e.filename for e in entries}
    for name in sorted(n for n in present if n.startswith("tensor") and n not in expected):
        yield FileReport(name, "-", False, f"unexpected file: the config has {len(entries)} "
                         "tensors (wrong config?)")
