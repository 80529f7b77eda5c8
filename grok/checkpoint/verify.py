"""Check a downloaded checkpoint without loading it.

`verify(path, config)`: every file present, its header parsed and validated as `load_tensor`
would (the same allow-list and rules), shapes and dtypes as the config says, scales finite and
positive, float data and int4 weights sampled (or, with `full=True`, read in full) for values
outside their format (values.py).

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

from grok.checkpoint.arrays import ArrayRef, expected_parts, leaf_problem
from grok.checkpoint import safetensors_io, values
from grok.checkpoint.directory import ST_SUFFIX, PathLike, checkpoint_dir, tensor_suffix
from grok.checkpoint.header import read_header
from grok.config import GrokConfig
from grok.errors import CheckpointError
from grok.files import open_regular
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


# --- verify: headers, shapes, sizes, scales, float and int4 values ----------------------------

def _values_problem(file: Path, parts: Mapping[str, ArrayRef], entry: Entry,
                    sample_bytes: int | None, chunk_bytes: int,
                    advance: Callable[[int], None]) -> str | None:
    """What is wrong with the values of the file's parts (values.scan_part): every value when
    `sample_bytes` is None, else the scales in full and stretches of the rest."""
    problems = []
    with open_regular(file) as f:   # (not a map: a file that shrinks now is a report)
        for part, ref in parts.items():
            kind = values.check_kind(part, ref.dtype, entry)
            if kind is None:
                continue
            spans = values.stretches(ref, None if kind == values.SCALES else sample_bytes)
            problems += values.scan_part(f.fileno(), part, ref, kind, spans, chunk_bytes,
                                         str(file), advance)
    return "; ".join(problems) or None


def _full_bytes(entry: Entry) -> int:
    """The bytes of the entry's parts that a full check reads (float parts, int4 weights)."""
    return sum(math.prod(shape) * dtype.itemsize
               for part, (shape, dtype) in expected_parts(entry).items()
               if values.check_kind(part, dtype, entry) is not None)


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
        problem = leaf_problem(parts, entry) or _values_problem(
            file, parts, entry, None if full else sample_bytes, chunk_bytes,
            advance if full else lambda nbytes: None)
        if problem:
            return FileReport(file.name, entry.name, False, problem)
        notes = [f"{p} {r.dtype}{list(r.shape)}" for p, r in parts.items()]
        return FileReport(file.name, entry.name, True, f"{', '.join(notes)}, {size / 1e9:.3f} GB")
    except CheckpointError as err:
        text = str(err)
        prefix = f"{file}: "
        return FileReport(file.name, entry.name, False,
                          text[len(prefix):] if text.startswith(prefix) else text)
    except OSError as err:   # the file changed under us (swapped for a FIFO, removed)
        return FileReport(file.name, entry.name, False,
                          f"cannot read ({err.strerror or err})")
    finally:   # a file that failed early still moves the bar past its share
        if bar is not None:
            bar.add(_full_bytes(entry) - scanned)


def verify(path: PathLike, config: GrokConfig, *, workers: int = 4,
           sample_bytes: int = SAMPLE_BYTES, full: bool = False, progress: bool = True,
           chunk_bytes: int = CHUNK_BYTES) -> Iterator[FileReport]:
    """Check every file of the checkpoint at `path` against `config` without loading it: present,
    header parses under the allow-list, shapes and dtypes as the config says, file size equal to
    the size the header implies, scales (read fully) finite and > 0, samples of the float data
    finite and of int4 weights within [-7, 7].

    `full=True` reads every value the format constrains (float32 arrays, bf16 scales, int4
    weights; any int8 is an int8 weight's value) in `chunk_bytes` steps, so memory stays
    bounded, and reports each part's count of NaNs and Infs, scales <= 0 and int4 values of -8;
    `progress` draws a bar (in bytes) for that read.
    Yields one FileReport per expected file (in file order), then one per unexpected file."""
    ckpt = checkpoint_dir(path)
    entries = checkpoint_entries(config)
    suffix = tensor_suffix(ckpt, config)   # release pickles or safetensors files
    present = set(os.listdir(ckpt))
    bar = None
    if full:
        total = sum(_full_bytes(e) for e in entries if e.filename + suffix in present)
        bar = ByteBar(total, f"checking values in {ckpt}", progress)
    # Not a `with` block: leaving one waits for every running worker, and an interrupt must not.
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="verify")
    try:
        futures = [None if entry.filename + suffix not in present else
                   pool.submit(_verify_file, ckpt / (entry.filename + suffix), entry,
                               sample_bytes, full, chunk_bytes, bar)
                   for entry in entries]
        for entry, future in zip(entries, futures):
            yield (FileReport(entry.filename + suffix, entry.name, False, "missing")
                   if future is None else future.result())
    finally:   # on an early exit, queued files are dropped and running ones stop
        stop_pool(pool, bar)
        if bar is not None:
            bar.close()
    expected = {e.filename + suffix for e in entries}
    for name in sorted(n for n in present if n.startswith("tensor") and n not in expected):
        yield FileReport(name, "-", False, f"unexpected file: the config has {len(entries)} "
                         "tensors (wrong config?)")
