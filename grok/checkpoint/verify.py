"""Check a downloaded checkpoint without loading it.

`verify(path, config)`: every file present, its header parsed and validated as `load_tensor`
would (the same allow-list and rules), shapes and dtypes as the config says, scales finite and
positive, float data sampled (or, with `full=True`, read in full) for non-finite values.

(`digests.verify_digests(path, manifest)` checks every file's SHA-256 against a manifest.)

It yields one `FileReport` per file; a problem with a file is a report, never an exception."""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, Mapping

import numpy as np

from grok.checkpoint.arrays import ArrayRef, expected_parts, leaf_problem
from grok.checkpoint import safetensors_io
from grok.checkpoint.directory import ST_SUFFIX, PathLike, checkpoint_dir, tensor_suffix
from grok.checkpoint.fileio import Mapped
from grok.checkpoint.header import read_header
from grok.config import GrokConfig
from grok.errors import CheckpointError
from grok.leaves import Entry, checkpoint_entries
from grok.progress import Progress

log = logging.getLogger(__name__)


@dataclasses.dataclass
class FileReport:
    """One file's verdict: `ok`, and what it holds or what is wrong with it. `leaf` is the leaf
    the file holds ("-" where unknown: an unexpected file, and every digest report)."""

    file: str
    leaf: str
    ok: bool
    message: str


SAMPLE_BYTES = 1 << 16
CHUNK_BYTES = 8 << 20          # read (and hashed, scanned) per step; bounds the memory per worker
_MB = 10 ** 6                  # the progress bars count decimal megabytes


class _Stopped(Exception):
    """Raised in a worker whose caller stopped listening (an interrupt, a closed generator)."""


class ByteBar:
    """A `Progress` bar counted in MB (and bytes in its postfix) that worker threads feed with
    byte counts; once stopped, a worker's next report raises _Stopped, ending its read."""

    def __init__(self, total_bytes: int, desc: str, enabled: bool) -> None:
        self._progress = Progress(-(-total_bytes // _MB), desc, enabled=enabled, logger=log,
                                  unit="MB")
        self._lock = threading.Lock()
        self._bytes = 0
        self._stopped = False

    def add(self, nbytes: int) -> None:
        if self._stopped:
            raise _Stopped
        if nbytes <= 0:
            return
        with self._lock:
            before = -(-self._bytes // _MB)
            self._bytes += nbytes
            self._progress.update(-(-self._bytes // _MB) - before, nbytes=nbytes)

    def stop(self) -> None:
        self._stopped = True

    def close(self) -> None:
        self._progress.close()


def _pread(fd: int, out: np.ndarray, offset: int, name: str) -> None:
    """Fill the uint8 array `out` with the file's bytes from `offset` on (a copy: no view into a
    memory map exists, so nothing can keep one open)."""
    view = memoryview(out)
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise CheckpointError(f"{name}: truncated while reading")
        done += n


def _is_float(ref: ArrayRef) -> bool:
    """Whether the part can hold non-finite values (float32 arrays, bf16 scales; not int8)."""
    return ref.dtype.kind not in "iub"


# --- verify: headers, shapes, sizes, scales, float values --------------------------------------

def _values(mapped: Mapped, part: str, ref: ArrayRef, sample_bytes: int) -> np.ndarray:
    """A float32 copy of the part's values: all of them for scales and small parts, else the
    first, a middle and the last stretch. A copy, so no view into the map outlives this call
    (an open view makes closing the map raise BufferError)."""
    data = mapped.array(ref).reshape(-1)
    if part == "scales" or ref.nbytes <= sample_bytes:
        return data.astype(np.float32)
    k = max(1, sample_bytes // (3 * ref.dtype.itemsize))
    mid = data.size // 2
    return np.concatenate([data[:k], data[mid:mid + k], data[-k:]]).astype(np.float32)


def _sampled_problem(file: Path, parts: Mapping[str, ArrayRef], sample_bytes: int) -> str | None:
    mapped = Mapped(str(file))
    try:
        for part, ref in parts.items():
            if not _is_float(ref):
                continue
            values = _values(mapped, part, ref, sample_bytes)
            bad = int(np.count_nonzero(~np.isfinite(values)))
            if bad:
                return f"{part}: {bad} non-finite value(s)"
            if part == "scales" and (values <= 0).any():
                return f"scales: {int((values <= 0).sum())} value(s) <= 0"
        return None
    finally:
        mapped.close()


def _scan(fd: int, ref: ArrayRef, name: str, chunk_bytes: int, advance: Callable[[int], None],
          positive: bool) -> tuple[int, int, int, int]:
    """Every value of one float part, read in chunks: (NaNs, Infs, values <= 0 where `positive`
    they must not be, flat index of the first non-finite value or -1). The chunks are read by
    pread into one buffer, not viewed in a memory map: memory stays at one chunk, no view can
    keep a map open, and a file that shrinks meanwhile is a report, not a SIGBUS."""
    itemsize = ref.dtype.itemsize
    total = math.prod(ref.shape)
    per_chunk = max(1, chunk_bytes // itemsize)
    buf = np.empty(min(per_chunk, total) * itemsize, np.uint8)
    nans = infs = nonpositive = 0
    first = -1
    for start in range(0, total, per_chunk):
        count = min(per_chunk, total - start)
        if ref.raw.inline is not None:
            raw = np.frombuffer(ref.raw.inline, np.uint8, count * itemsize, start * itemsize)
        else:
            raw = buf[:count * itemsize]
            _pread(fd, raw, ref.raw.offset + start * itemsize, name)
        values = raw.view(ref.dtype).astype(np.float32, copy=False)
        nan = np.isnan(values)
        inf = np.isinf(values)
        n_nan, n_inf = int(np.count_nonzero(nan)), int(np.count_nonzero(inf))
        if (n_nan or n_inf) and first < 0:
            first = start + int(np.argmax(nan | inf))
        nans += n_nan
        infs += n_inf
        if positive:
            nonpositive += int(np.count_nonzero(values <= 0))
        advance(count * itemsize)
    return nans, infs, nonpositive, first


def _full_problem(file: Path, parts: Mapping[str, ArrayRef], chunk_bytes: int,
                  advance: Callable[[int], None]) -> str | None:
    problems = []
    fd = os.open(file, os.O_RDONLY)
    try:
        for part, ref in parts.items():
            if not _is_float(ref):
                continue
            nans, infs, nonpositive, first = _scan(fd, ref, str(file), chunk_bytes, advance,
                                                  positive=part == "scales")
            if nans or infs:
                problems.append(f"{part}: {nans + infs} non-finite value(s) ({nans} NaN, "
                                f"{infs} Inf), the first at flat index {first}")
            if part == "scales" and nonpositive:
                problems.append(f"scales: {nonpositive} value(s) <= 0")
    finally:
        os.close(fd)
    return "; ".join(problems) or None


def _float_bytes(entry: Entry) -> int:
    """The bytes of the entry's parts that a full check reads (its float parts)."""
    return sum(math.prod(shape) * dtype.itemsize
               for shape, dtype in expected_parts(entry).values() if dtype.kind not in "iub")


def stop_pool(pool: ThreadPoolExecutor, bar: ByteBar | None) -> None:
    """Drop the files not started and make the running ones stop at their next chunk (after
    every report was taken, nothing is left to stop)."""
    if bar is not None:
        bar.stop()
    pool.shutdown(wait=False, cancel_futures=True)


def _verify_file(file: Path, entry: Entry, sample_bytes: int, full: bool, chunk_bytes: int,
                 bar: ByteBar | None) -> FileReport:
    scanned = 0

    def advance(nbytes: int) -> None:
        nonlocal scanned
        scanned += nbytes
        if bar is not None:
            bar.add(nbytes)

    try:
        if file.name.endswith(ST_SUFFIX):   # a converted checkpoint: checked by its header
            st = safetensors_io.read_st_header(file)
            parts, size = safetensors_io.leaf_parts(st, entry), st.size
        else:
            header = read_header(file)
            parts, size = header.parts, header.end
        problem = leaf_problem(parts, entry) or (
            _full_problem(file, parts, chunk_bytes, advance) if full
            else _sampled_problem(file, parts, sample_bytes))
        if problem:
            return FileReport(file.name, entry.name, False, problem)
        notes = [f"{p} {r.dtype}{list(r.shape)}" for p, r in parts.items()]
        return FileReport(file.name, entry.name, True, f"{', '.join(notes)}, {size / 1e9:.3f} GB")
    except CheckpointError as err:
        text = str(err)
        prefix = f"{file}: "
        return FileReport(file.name, entry.name, False,
                          text[len(prefix):] if text.startswith(prefix) else text)
    except OSError as err:   # the file changed under us (e.g. shrank between header and map)
        return FileReport(file.name, entry.name, False,
                          f"cannot read ({err.strerror or err})")
    finally:   # a file that failed early still moves the bar past its share
        if bar is not None:
            bar.add(_float_bytes(entry) - scanned)


def verify(path: PathLike, config: GrokConfig, *, workers: int = 4,
           sample_bytes: int = SAMPLE_BYTES, full: bool = False, progress: bool = True,
           chunk_bytes: int = CHUNK_BYTES) -> Iterator[FileReport]:
    """Check every file of the checkpoint at `path` against `config` without loading it: present,
    header parses under the allow-list, shapes and dtypes as the config says, file size equal to
    the size the header implies, scales (read fully) finite and > 0, float samples finite.

    `full=True` reads every value of every float part (float32 arrays, bf16 scales; int8
    weights cannot be non-finite) in `chunk_bytes` steps, so memory stays bounded, and reports
    each part's count of NaNs and Infs; `progress` draws a bar (in bytes) for that read.
    Yields one FileReport per expected file (in file order), then one per unexpected file."""
    ckpt = checkpoint_dir(path)
    entries = checkpoint_entries(config)
    suffix = tensor_suffix(ckpt, config)   # release pickles or safetensors files
    present = set(os.listdir(ckpt))
    bar = None
    if full:
        total = sum(_float_bytes(e) for e in entries if e.filename + suffix in present)
        bar = ByteBar(total, f"checking values in {ckpt}", progress)
    try:
        with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="verify") as pool:
            try:
                futures = []
                for entry in entries:
                    if entry.filename + suffix not in present:
                        futures.append(None)
                    else:
                        futures.append(pool.submit(_verify_file, ckpt / (entry.filename + suffix),
                                                   entry,
                                                   sample_bytes, full, chunk_bytes, bar))
                for entry, future in zip(entries, futures):
                    yield (FileReport(entry.filename + suffix, entry.name, False, "missing")
                           if future is None else future.result())
            finally:   # on an early exit, queued files are dropped and running ones stop
                stop_pool(pool, bar)
    finally:
        if bar is not None:
            bar.close()
    expected = {e.filename + suffix for e in entries}
    for name in sorted(n for n in present if n.startswith("tensor") and n not in expected):
        yield FileReport(name, "-", False, f"unexpected file: the config has {len(entries)} "
                         "tensors (wrong config?)")
