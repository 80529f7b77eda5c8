"""Streaming, sharded checkpoint loading: each file is read once, by offset, straight onto the
devices that own its pieces.

`load_params(path, config, mesh)` builds every leaf of the model's params tree as a global
jax.Array sharded by grok/sharding.py's rules. Files are read in order, a bounded number at a
time, each split into chunks that worker threads copy with `pread` (releases the GIL; strided
slices are copied out of a memory map), only the slices this process's devices own.
Where the devices alias 64-byte-aligned host memory (XLA's CPU client) each slice is read
straight into the host array that becomes its device buffer -- a layer's slice into its slot
of the stacked [L, ...] array -- so each byte is copied once. Elsewhere (GPUs) slices are read
into a pool of reused host buffers, handed to the devices, and a layer's piece is written
into its slot of the stacked leaf on device (a donated in-place update), so the host never
holds more than `max_inflight` files' slices. In a multi-process run each process reads only
its own devices' slices. Headers come from grok/header.py, the byte copies from grok/fileio.py.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

import numpy as np

from grok import checkpoint as ck
from grok.checkpoint import fileio
from grok.parallel import rules as sh
from grok.config import GrokConfig
from grok.checkpoint.fileio import Index
from grok.checkpoint.header import header_problem, read_header
from grok.leaves import Entry, checkpoint_entries
from grok.progress import Progress

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def _aliases(device: Any) -> bool:
    """Whether jax.device_put onto `device` aliases aligned host memory instead of copying it
    (XLA's CPU client does): then a buffer handed over must never be written again."""
    import jax
    probe = fileio.host_array((4096,), np.int8)
    probe[:] = 0
    try:
        return jax.device_put(probe, device, may_alias=True).unsafe_buffer_pointer() == \
            probe.ctypes.data
    except Exception:   # no unsafe_buffer_pointer on this backend: assume a copy
        return False


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
        out.setdefault(fileio.slice_key(index), index)
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
    source: fileio.Source
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
        key = fileio.slice_key(_full(index, len(shape)))
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
    pool = fileio.HostPool()
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
                        target.buffers[key] = fileio.host_array(shape, target.dtype)
                pieces += [_Piece(target, key, index[1:], target.buffers[key][entry.layer])
                           for key, index in indices.items()]
                continue
            sharding = target.piece_sharding if target.stacked else target.sharding
            for key, index in _local_indices(sharding, target.layer_shape).items():
                shape = tuple(len(range(*s.indices(n))) for s, n in zip(index, target.layer_shape))
                if zero_copy:
                    host = fileio.host_array(shape, target.dtype)
                else:
                    raw, host = pool.get(shape, target.dtype)
                    raws.append(raw)
                pieces.append(_Piece(target, key, index, host))
        held = sum(p.host.size * header.parts[p.target.part].dtype.itemsize for p in pieces)
        pool.cap = max(pool.cap, max_inflight * held)
        item = _File(entry, feeds, fileio.Source(str(file)), pieces, [], held, raws)
        stats.acquire(held)
        window.append(item)   # from here on, an error closes it (see below)
        for p in pieces:
            ref = header.parts[p.target.part]
            for index, rows in fileio.chunks(p.index, ref.shape, ref.dtype.itemsize):
                item.futures.append(threads.submit(fileio.copy_slice, item.source, ref, index,
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
