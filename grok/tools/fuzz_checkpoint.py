"""Differential fuzzing of the checkpoint readers: what the CI fuzz tests (tests/test_opcodes.py,
tests/test_safetensors.py, tests/test_digests.py) and the long campaign
(benchmarks/fuzz_checkpoint.py, atheris) run on each input. One check per parser:

- `check(data)` parses `data` as a release checkpoint file with the strict reader. A refusal must
  be a one-line PickleError; anything else escaping is a finding. An accepted file is then
  decoded a second, independent way -- Python's own unpickler, allowed only the real numpy /
  ml_dtypes reconstructors (safe: the strict reader has vetted the stream) -- and the two must
  give the same arrays, byte for byte.
- `check_safetensors(data)` parses `data` as a safetensors file's head with the header parser:
  a one-line CheckpointError, or tensors that tile the data exactly and that the `safetensors`
  package (where installed) reads with the same dtypes, shapes and bytes.
- `check_manifest(data)` parses `data` as a SHA256SUMS list: a one-line CheckpointError naming
  the list, or checksums whose paths are relative, normalized, without '..' or NUL, and whose
  digests are 64 lowercase hex digits.

`mutate(data, rng)` makes the kind of damage a download or an attacker does: flipped bits,
deleted / inserted / repeated bytes, truncation, splices.
"""
from __future__ import annotations

import io
import os
import pickle
import random
import re
from pathlib import PurePosixPath
from typing import Any

import ml_dtypes
import numpy as np

from grok.checkpoint.digests import parse_manifest
from grok.checkpoint.opcodes import PickleError
from grok.checkpoint.safetensors_io import CODES, parse_st_header
from grok.checkpoint.unpickle import parse_stream, read_array
from grok.errors import CheckpointError

MAX_MESSAGE = 400   # a refusal is one short line, whatever the input


class Finding(AssertionError):
    """The reader crashed, disagreed with the reference, or said something unreadable."""


class _QW:
    """The reference's QuantizedWeight8bit: NEWOBJ + BUILD fill its __dict__."""


_RECONSTRUCT = np.ndarray((0,), np.int8).__reduce__()[0]   # numpy's own, whatever its version
_REFERENCE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("ml_dtypes", "bfloat16"): ml_dtypes.bfloat16,
    ("__main__", "QuantizedWeight8bit"): _QW,
}


class _ReferenceUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        return _REFERENCE_GLOBALS[(module, name)]


def reference_parts(data: bytes) -> dict[str, np.ndarray]:
    """What Python's unpickler makes of an accepted file, as {"array"} or {"weight", "scales"}."""
    obj = _ReferenceUnpickler(io.BytesIO(data)).load()
    if isinstance(obj, _QW):
        return {"weight": obj.weight, "scales": obj.scales}
    return {"array": obj}


def check(data: bytes) -> str:
    """"refused" or "accepted" (after agreeing with the reference); Finding otherwise."""
    f = io.BytesIO(data)
    try:
        parts = parse_stream(f, len(data))
    except PickleError as err:
        message = str(err)
        if "\n" in message or len(message) > MAX_MESSAGE or not message:
            raise Finding(f"unreadable refusal: {message[:MAX_MESSAGE]!r}") from None
        return "refused"
    except Exception as err:   # anything but a clean refusal is a finding
        raise Finding(f"{type(err).__name__} escaped the reader: {err!s:.300}") from err
    ours = {name: read_array(f, ref) for name, ref in parts.items()}
    try:
        theirs = reference_parts(data)
    except Exception as err:
        raise Finding(f"accepted, but Python's unpickler fails: {type(err).__name__}: "
                      f"{err!s:.200}") from err
    if set(theirs) != set(ours):
        raise Finding(f"accepted as {sorted(ours)}, the reference sees {sorted(theirs)}")
    for name, array in ours.items():
        other = theirs[name]
        if not isinstance(other, np.ndarray) or other.dtype != array.dtype \
                or other.shape != array.shape \
                or np.ascontiguousarray(other).tobytes() != array.tobytes():
            raise Finding(f"{name}: accepted with values the reference disagrees with")
    return "accepted"


FUZZ_NAME = "<fuzz>"   # the name the inputs of check_safetensors and check_manifest go by


def _refusal(err: Exception) -> str:
    """"refused" for a clean one-line CheckpointError naming the input; Finding otherwise."""
    message = str(err)
    if "\n" in message or len(message) > MAX_MESSAGE or FUZZ_NAME not in message:
        raise Finding(f"unreadable refusal: {message[:MAX_MESSAGE]!r}") from None
    return "refused"


def check_safetensors(data: bytes) -> str:
    """"refused" or "accepted" for `data` as a whole safetensors file; Finding otherwise."""
    try:
        header = parse_st_header(FUZZ_NAME, data, len(data))
    except CheckpointError as err:
        return _refusal(err)
    except Exception as err:
        raise Finding(f"{type(err).__name__} escaped the header parser: {err!s:.300}") from err
    end = 8 + int.from_bytes(data[:8], "little")
    for ref in sorted(header.tensors.values(), key=lambda r: r.raw.offset):
        if ref.raw.offset != end or ref.raw.length != ref.nbytes:
            raise Finding(f"accepted a tensor at {ref.raw.offset}+{ref.raw.length}, not {end}")
        end += ref.raw.length
    if end != len(data):
        raise Finding(f"accepted, with {len(data) - end} bytes no tensor accounts for")
    try:
        from safetensors import deserialize
    except ImportError:
        return "accepted"
    try:
        theirs = {name: spec for name, spec in deserialize(data)}
    except Exception as err:
        raise Finding(f"accepted, but the safetensors package refuses it: {err!s:.200}") from err
    if set(theirs) != set(header.tensors):
        raise Finding(f"accepted as {sorted(header.tensors)[:4]}, the package sees "
                      f"{sorted(theirs)[:4]}")
    for name, ref in header.tensors.items():
        other = theirs[name]
        if other["dtype"] != CODES[ref.dtype] or tuple(other["shape"]) != ref.shape \
                or bytes(other["data"]) != data[ref.raw.offset:ref.raw.offset + ref.raw.length]:
            raise Finding(f"{name[:80]!r}: accepted as {ref.dtype}{list(ref.shape)}, the "
                          f"package reads {other['dtype']}{other['shape']}")
    return "accepted"


_DIGEST = re.compile(r"[0-9a-f]{64}")


def check_manifest(data: bytes) -> str:
    """"refused" or "accepted" for `data` as a SHA256SUMS list; Finding otherwise."""
    try:
        checksums = parse_manifest(FUZZ_NAME, data)
    except CheckpointError as err:
        return _refusal(err)
    except Exception as err:
        raise Finding(f"{type(err).__name__} escaped the manifest parser: {err!s:.300}") from err
    if not checksums or len({c.path for c in checksums}) != len(checksums):
        raise Finding(f"accepted {len(checksums)} checksums, some of one path or none")
    for c in checksums:
        pure = PurePosixPath(c.path)
        if pure.is_absolute() or ".." in pure.parts or "\0" in c.path \
                or c.path != os.path.normpath(c.path) or c.path == ".":
            raise Finding(f"accepted the path {c.path[:80]!r} (line {c.line})")
        if not _DIGEST.fullmatch(c.digest):
            raise Finding(f"accepted the digest {c.digest[:80]!r} (line {c.line})")
    return "accepted"


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One to four random edits of `data`, biased to its opcode bytes (array data is the tail
    of a big file, and damage there only changes values)."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        head = min(len(out), 512) or 1
        where = rng.randrange(head) if rng.random() < 0.8 or not out else rng.randrange(len(out))
        kind = rng.randrange(6)
        if kind == 0 and out:
            out[min(where, len(out) - 1)] ^= 1 << rng.randrange(8)
        elif kind == 1 and out:
            del out[where:where + rng.randint(1, 9)]
        elif kind == 2:
            out[where:where] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 9)))
        elif kind == 3:
            out = out[:rng.randrange(len(out) + 1)]
        elif kind == 4 and out:
            start = rng.randrange(len(out))
            out[where:where] = out[start:start + rng.randint(1, 32)]
        elif out:
            out[min(where, len(out) - 1)] = rng.choice(_INTERESTING)
    return bytes(out)


# Opcode bytes and values that steer a mutation into the reader's corners.
_INTERESTING = list(b"\x80\x95.(tbRch\x94j\x81q}ur\x8c\x88\x89KJ\x8a\x85\x86\x87") + [0, 0xFF, 0x7F]
