"""What a checkpoint's values may be: float data finite, scales finite and > 0, int4 values in
the format's [-7, 7] (a nibble of 8 is -8, outside it; grok/quant.py). Damage that keeps a
file's header intact shows only here.

`scales_problem(scales)` is the check every load runs on the scales it reads (small arrays: a
cheap pass over their bits); `scan_part` is verify's, reading one part's values -- all of them,
or stretches -- by pread in bounded chunks, so memory stays at one chunk and a file that shrinks
meanwhile is a CheckpointError, not a crash."""
from __future__ import annotations

import math
import os
from typing import Callable

import numpy as np

from grok.checkpoint.arrays import BF16, ArrayRef
from grok.errors import CheckpointError
from grok.leaves import Entry

FLOAT, SCALES, INT4 = "float", "scales", "int4"   # the checks a part's values get
# bfloat16 bits, as uint16, of the finite values > 0 are 0x0001..0x7F7F (sign 0, exponent not
# all ones, not zero); minus one, wrapping, every other pattern is >= 0x7F7F.
_BF16_GOOD_SPAN = np.uint16(0x7F7F)


def bad_scales(scales: np.ndarray) -> np.ndarray:
    """A boolean mask of the scales that are not finite and > 0 (NaN, Inf, zero, negative)."""
    if scales.dtype == BF16:   # on the bits: no float32 copy of the scales
        return (scales.view(np.uint16) - np.uint16(1)) >= _BF16_GOOD_SPAN
    values = np.asarray(scales, np.float32)
    return ~(np.isfinite(values) & (values > 0))


def scales_problem(scales: np.ndarray) -> str | None:
    """Why these scales cannot scale a weight (how many are not finite and > 0, and the first),
    or None: a NaN, infinite, zero or negative scale turns its whole block into garbage."""
    bad = bad_scales(scales).reshape(-1)
    count = int(np.count_nonzero(bad))
    if not count:
        return None
    first = int(np.argmax(bad))
    value = float(np.asarray(scales).reshape(-1)[first])
    return (f"scales: {count} value(s) not finite and > 0 (the first, at flat index {first}, "
            f"is {value})")


def check_kind(part: str, dtype: np.dtype, entry: Entry) -> str | None:
    """Which values check a part of `dtype` gets: FLOAT (float arrays), SCALES, INT4 (packed
    weights), or None (int8 weights: every int8 is a value of the format)."""
    if part == "scales":
        return SCALES
    if part == "weight":
        return INT4 if entry.fmt.bits == 4 else None
    return None if dtype.kind in "iub" else FLOAT


def stretches(ref: ArrayRef, sample_bytes: int | None) -> list[tuple[int, int]]:
    """(first element, count) of the parts of `ref` to read: all of it when `sample_bytes` is
    None or the array is no larger, else its first, a middle and its last stretch."""
    total = math.prod(ref.shape)
    if sample_bytes is None or ref.nbytes <= sample_bytes:
        return [(0, total)]
    k = max(1, sample_bytes // (3 * ref.dtype.itemsize))
    mid = total // 2
    return [(0, k), (mid, min(k, total - mid)), (total - k, k)]


def pread_exact(fd: int, out: np.ndarray, offset: int, name: str) -> None:
    """Fill the uint8 array `out` with the file's bytes from `offset` on (a copy: no view into
    a memory map exists, so a file that shrinks is an error here, not a SIGBUS later)."""
    view = memoryview(out)
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise CheckpointError(f"{name}: truncated while reading")
        done += n


class _Found:
    """How many values failed one test so far, and the flat index of the first."""

    def __init__(self) -> None:
        self.count, self.first = 0, -1

    def add(self, mask: np.ndarray, start: int, count: int | None = None) -> None:
        n = int(np.count_nonzero(mask)) if count is None else count
        if n and self.first < 0:
            self.first = start + int(np.argmax(mask))
        self.count += n


def scan_part(fd: int, part: str, ref: ArrayRef, kind: str, spans: list[tuple[int, int]],
              chunk_bytes: int, name: str, advance: Callable[[int], None]) -> list[str]:
    """Read the elements `spans` (see `stretches`) of one part from the open file `fd` (or its
    inline bytes), `chunk_bytes` at a time, and say what is wrong with them by `kind`: NaNs and
    Infs (FLOAT, SCALES), scales <= 0, int4 values of -8; each with its count and the flat index
    of the first (of its packed byte, for int4). `advance(nbytes)` follows the reading."""
    itemsize = ref.dtype.itemsize
    per_chunk = max(1, chunk_bytes // itemsize)
    buf = np.empty(min(per_chunk, max(count for _, count in spans)) * itemsize, np.uint8)
    nan, inf, low, minus_eight = _Found(), _Found(), _Found(), _Found()
    for begin, count in spans:
        for start in range(begin, begin + count, per_chunk):
            n = min(per_chunk, begin + count - start)
            if ref.raw.inline is not None:
                raw = np.frombuffer(ref.raw.inline, np.uint8, n * itemsize, start * itemsize)
            else:
                raw = buf[:n * itemsize]
                pread_exact(fd, raw, ref.raw.offset + start * itemsize, name)
            if kind == INT4:   # a nibble of 8 is -8 in two's complement: outside [-7, 7]
                lows, highs = (raw & 0x0F) == 8, (raw & 0xF0) == 0x80
                minus_eight.add(lows | highs, start,
                                int(np.count_nonzero(lows)) + int(np.count_nonzero(highs)))
            else:
                values = raw.view(ref.dtype).astype(np.float32, copy=False)
                nans, infs = np.isnan(values), np.isinf(values)
                nan.add(nans, start)
                inf.add(infs, start)
                if kind == SCALES:
                    low.add(values <= 0, start)
            advance(n * itemsize)
    problems = []
    if nan.count or inf.count:
        first = min(i for i in (nan.first, inf.first) if i >= 0)
        problems.append(f"{part}: {nan.count + inf.count} non-finite value(s) ({nan.count} NaN, "
                        f"{inf.count} Inf), the first at flat index {first}")
    if low.count:
        problems.append(f"{part}: {low.count} value(s) <= 0, the first at flat index {low.first}")
    if minus_eight.count:
        problems.append(f"{part}: {minus_eight.count} int4 value(s) of -8, outside the format's "
                        f"[-7, 7], the first in packed byte {minus_eight.first}")
    return problems
