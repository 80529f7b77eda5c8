"""Streaming, sharded checkpoint loading: each file is read once, by offset, straight onto the
devices that own its pieces.

`load_params(reader, config, shardings)` builds every leaf of the model's params tree as a global
jax.Array with the sharding given for it (grok.parallel.rules.params_shardings makes that tree).
Where the bytes are comes from a `CheckpointReader` (reader.py; a directory path means the
release's pickles), so the loader knows no file format. Files are read in order, a bounded number
at a time, each split into chunks that worker threads copy with `pread` (releases the GIL; strided
slices are copied out of a memory map), only the slices this process's devices own.
Where the devices alias 64-byte-aligned host memory (XLA's CPU client) each slice is read
straight into the host array that becomes its device buffer -- a layer's slice into its slot
of the stacked [L, ...] array -- so each byte is copied once. Elsewhere (GPUs) slices are read
into a pool of reused host buffers, handed to the devices, and a layer's piece is written
into its slot of the stacked leaf on device (a donated in-place update), so the host never
holds more than `max_inflight` files' slices. In a multi-process run each process reads only
its own devices' slices. Byte copies are fileio.py's, host -> device transfer.py's.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import numpy as np

from grok.checkpoint import fileio, transfer
from grok.checkpoint.arrays import BF16, leaf_problem
from grok.checkpoint.directory import PathLike
from grok.checkpoint.reader import CheckpointReader, Part, as_reader
from grok.checkpoint.targets import FileWork, Piece, Target, assemble, plan_targets
from grok.checkpoint.values import scales_problem
from grok.config import GrokConfig
from grok.errors import CheckpointError
from grok.leaves import Entry
from grok.progress import Progress

log = logging.getLogger(__name__)


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


class _Stream:
    """One load: files started (headers located, slices submitted to the copy threads) and
    finished (handed to the devices) in file order, at most `max_inflight` at once."""

    def __init__(self, reader: CheckpointReader, config: GrokConfig, zero_copy: bool,
                 workers: int, max_inflight: int, stats: LoadStats) -> None:
        self.reader, self.config, self.zero_copy = reader, config, zero_copy
        self.max_inflight, self.stats = max_inflight, stats
        self.pool = fileio.HostPool()
        self.threads = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="load")
        self.window: collections.deque[FileWork] = collections.deque()

    def _pieces(self, entry: Entry, target: Target, raws: list[np.ndarray]) -> list[Piece]:
        """This process's slices of `target` in `entry`'s file, with the host arrays to fill."""
        layers = self.config.num_layers
        if self.zero_copy and target.stacked:   # straight into the final [L, ...] host arrays
            full = (layers, *target.layer_shape)
            indices = transfer.local_indices(target.sharding, full)
            if target.buffers is None:
                target.buffers = {key: fileio.host_array(transfer.slice_shape(index, full),
                                                         target.dtype)
                                  for key, index in indices.items()}
            return [Piece(target, key, index[1:], target.buffers[key][entry.layer])
                    for key, index in indices.items()]
        sharding = target.piece_sharding if target.stacked else target.sharding
        pieces = []
        for key, index in transfer.local_indices(sharding, target.layer_shape).items():
            shape = transfer.slice_shape(index, target.layer_shape)
            if self.zero_copy:
                host = fileio.host_array(shape, target.dtype)
            else:
                raw, host = self.pool.get(shape, target.dtype)
                raws.append(raw)
            pieces.append(Piece(target, key, index, host))
        return pieces

    def start(self, entry: Entry, feeds: list[Target]) -> None:
        parts = self.reader.locate(entry)
        problem = leaf_problem({k: p.array for k, p in parts.items()}, entry)
        if problem:   # a reader must check this itself; a wrong shape here would corrupt memory
            raise CheckpointError(f"{self.reader}: {problem} (leaf {entry.name})")
        raws: list[np.ndarray] = []
        pieces = [p for target in feeds for p in self._pieces(entry, target, raws)]
        held = sum(p.host.size * parts[p.target.part].array.dtype.itemsize for p in pieces)
        self.pool.cap = max(self.pool.cap, self.max_inflight * held)
        item = FileWork(entry, feeds, {}, pieces, [], held, raws,
                        {name: part.file for name, part in parts.items()})
        self.stats.acquire(held)
        self.window.append(item)   # from here on, an error closes it (see load_params)
        for p in pieces:
            part: Part = parts[p.target.part]
            if part.file not in item.sources:
                item.sources[part.file] = fileio.Source(part.file)
            ref = part.array
            for index, rows in fileio.chunks(p.index, ref.shape, ref.dtype.itemsize):
                item.futures.append(self.threads.submit(
                    fileio.copy_slice, item.sources[part.file], ref, index,
                    p.host[rows] if p.host.ndim else p.host))

    def finish(self, item: FileWork) -> None:
        for future in item.futures:
            future.result()
        item.close()
        for piece in item.pieces:   # this process's scales, before any reaches a device
            problem = scales_problem(piece.host) if piece.target.part == "scales" else None
            if problem:
                raise CheckpointError(f"{item.files['scales']}: {problem} (leaf "
                                      f"{item.entry.name})")
        layers = self.config.num_layers
        arrays, keep = [], False
        for target in item.feeds:
            pieces = {p.key: p.host for p in item.pieces if p.target is target}
            if self.zero_copy and target.stacked:
                target.layers_done += 1
                if target.layers_done == layers:
                    target.array, _ = transfer.device_array((layers, *target.layer_shape),
                                                            target.sharding, target.buffers)
                    target.buffers = None
            elif self.zero_copy:
                target.array, _ = transfer.device_array(target.layer_shape, target.sharding,
                                                        pieces)
            else:
                sharding = target.piece_sharding if target.stacked else target.sharding
                piece, aliased = transfer.device_array(target.layer_shape, sharding, pieces)
                keep |= aliased
                arrays.append(piece)
                if target.stacked:
                    target.array = transfer.put_layer(target.array, piece, item.entry.layer)
                    arrays.append(target.array)
                else:
                    target.array = piece
        if arrays:   # the host buffers are reused: the transfers must be done
            jax.block_until_ready(arrays)
            if not keep:   # (unless a device aliases them: then they are its memory now)
                self.pool.put(item.raws)
            item.raws = []

    def finish_oldest(self, bar: Progress) -> None:
        self.finish(self.window[0])
        done = self.window.popleft()
        self.stats.release(done.held)
        bar.update(1, done.held)

    def close(self) -> None:
        """After the last file, or an error: no copy left running, every file closed."""
        for item in self.window:
            for future in item.futures:
                future.cancel()
        self.threads.shutdown(wait=True)
        for item in self.window:
            item.close()
            self.stats.release(item.held)
        self.window.clear()


def load_params(source: CheckpointReader | PathLike, config: GrokConfig, shardings: Any, *,
                scan: bool = True, workers: int = 4, max_inflight: int | None = None,
                progress: bool = True, stats: LoadStats | None = None,
                embed_dtype: Any = None, zero_copy: bool | None = None) -> dict[str, Any]:
    """The model's params tree ({"embed": ..., "layers": ...}, as grok.api.device_params builds
    it) as global jax.Arrays placed by `shardings`, streamed from `source`: a CheckpointReader, or
    a directory of the release format (holding ckpt-0/, or ckpt-0 itself).

    `shardings` is the params tree of shardings, e.g. `grok.parallel.rules.params_shardings(
    grok.leaves.abstract_params(config, scan), mesh, config, layout)`: the same structure as the
    tree returned, a QuantizedWeight8bit node holding its (weight, scales) shardings; a stacked
    leaf's layer axis must not be sharded. `scan` stacks the layers on a leading axis (else a
    tuple of per-layer trees); `embed_dtype` is the embedding's dtype on device (bfloat16).

    Files are read in order, at most `max_inflight` (default 2) at once, each split into chunks
    that `workers` threads copy with pread (or out of a memory map when a slice is strided).
    Where the devices alias host memory (XLA's CPU client; `zero_copy=None` probes it) each slice
    is read straight into the host array that becomes its device buffer (a stacked leaf's layer
    into its slot of the [L, ...] array), so every byte is copied once. Elsewhere (GPUs, TPUs)
    slices are read into a pool of reused host buffers, handed to the devices, and a layer's piece
    is written in place into its slot of the stacked leaf on device: at most `max_inflight`
    files' slices are in host memory at once. `stats` (a LoadStats) receives the bytes read and
    the in-flight peaks. Errors are CheckpointErrors (ShardingError for a bad shardings tree),
    scales that are not finite and > 0 among them (checked as they are read: a few MB of
    Grok-1's files; the weights themselves are not scanned)."""
    embed_dtype = BF16 if embed_dtype is None else np.dtype(embed_dtype)
    stats = LoadStats() if stats is None else stats
    reader = as_reader(source, config)
    targets, per_file = plan_targets(config, shardings, scan, embed_dtype)
    devices = {d for t in targets.values() for d in t.sharding.addressable_devices}
    if zero_copy is None:
        zero_copy = all(transfer.aliases(d) for d in devices)
    if not zero_copy:
        for target in targets.values():
            if target.stacked:
                target.array = transfer.zeros((config.num_layers, *target.layer_shape),
                                              target.dtype, target.sharding)
    start = time.monotonic()
    stream = _Stream(reader, config, zero_copy, max(1, int(workers)),
                     max(1, int(max_inflight or 2)), stats)
    desc = f"loading {reader} onto {len(devices)} local device(s)"
    try:
        with Progress(len(per_file), desc, enabled=progress, logger=log) as bar:
            # Device work happens on this thread only, in file order: every process issues the
            # same computations in the same order (needed when the mesh spans processes).
            for entry, feeds in per_file:
                while len(stream.window) >= stream.max_inflight:
                    stream.finish_oldest(bar)
                stream.start(entry, feeds)
            while stream.window:
                stream.finish_oldest(bar)
    finally:
        stream.close()
    stats.seconds += time.monotonic() - start
    global last_stats
    last_stats = stats
    log.info("read %.2f GB in %.1f s (%.2f GB/s), at most %d files / %.2f GB in host memory "
             "(%s)", stats.bytes_read / 1e9, stats.seconds, stats.gb_per_s,
             stats.max_inflight_tensors, stats.max_inflight_bytes / 1e9,
             "read straight into device memory" if zero_copy else "via reused host buffers")
    return assemble(config, targets, scan)
