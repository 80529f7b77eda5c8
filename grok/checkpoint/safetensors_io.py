"""Checkpoints in safetensors files: `ckpt-0/tensor{i:05d}_000.safetensors` holds leaf i of the
leaf table, as the release's pickle `tensor{i:05d}_000` does (what `python -m grok.checkpoint
convert` writes: int8 or int4 weights, config.json saying which).

A file is an 8-byte little-endian header length, a JSON header ({tensor name: {"dtype", "shape",
"data_offsets"}} and a "__metadata__" of strings) and the tensors' bytes; no code can run from
it. The header is parsed here, bounded and checked against the file's size (every tensor's bytes
in the file, none overlapping, no gap, nothing after them) and against the leaf table: tensor
names, dtypes, shapes, and the metadata's weight format and group size. Tensor names: the SPEC
path of a float32 leaf; "<path>/weight" and "<path>/scales" of a quantised one. Files are written
here too, byte for byte reproducibly (the `safetensors` package reads them: tests check both
ways).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from typing import Any

import ml_dtypes
import numpy as np

from grok.checkpoint.arrays import ArrayRef, RawRef, leaf_problem
from grok.checkpoint.directory import ST_SUFFIX
from grok.checkpoint.values import scales_problem
from grok.errors import CheckpointError, one_line
from grok.files import NotRegularFile, open_regular, unique_keys
from grok.leaves import Entry
from grok.quant import QuantizedWeight

MAX_HEADER_BYTES = 1 << 20      # one leaf's header is a few hundred bytes
MAX_DIMS = 8
DTYPES = {"F32": np.dtype(np.float32), "BF16": np.dtype(ml_dtypes.bfloat16),
          "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8)}
CODES = {dtype: code for code, dtype in DTYPES.items()}   # numpy dtype -> the header's name
FORMAT_TAG = "grok"             # __metadata__["format"] of the files convert writes


@dataclasses.dataclass(frozen=True)
class StHeader:
    """A safetensors file's tensors (located by absolute offset) and metadata; `size` is the
    file's size, which the header accounts for exactly."""

    path: str
    tensors: dict[str, ArrayRef]
    metadata: dict[str, str]
    size: int


def filename(entry: Entry) -> str:
    return entry.filename + ST_SUFFIX


def tensor_names(entry: Entry) -> dict[str, str]:
    """{part: tensor name} of a leaf's file."""
    if entry.quantized:
        return {"weight": f"{entry.name}/weight", "scales": f"{entry.name}/scales"}
    return {"array": entry.name}


def _is_count(value: Any, most: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= most


def _tensor(where: str, name: str, spec: Any, data_start: int, data_size: int) -> ArrayRef:
    """One header entry as an ArrayRef; CheckpointError naming the field otherwise."""
    field = f"{where}: header field {one_line(repr(name), 120)}"
    if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
        raise CheckpointError(f"{field}: expected exactly dtype, shape and data_offsets")
    dtype = DTYPES.get(spec["dtype"]) if isinstance(spec["dtype"], str) else None
    if dtype is None:
        raise CheckpointError(f"{field}.dtype: {one_line(repr(spec['dtype']), 40)} is not one "
                              f"of {sorted(DTYPES)}")
    shape = spec["shape"]
    if not isinstance(shape, list) or len(shape) > MAX_DIMS \
            or not all(_is_count(n, 1 << 40) for n in shape):
        raise CheckpointError(f"{field}.shape: {one_line(repr(shape), 80)} is not a list of at "
                              f"most {MAX_DIMS} sizes")
    offsets = spec["data_offsets"]
    if not isinstance(offsets, list) or len(offsets) != 2 \
            or not all(_is_count(n, data_size) for n in offsets) or offsets[0] > offsets[1]:
        raise CheckpointError(f"{field}.data_offsets: {one_line(repr(offsets), 80)} is not a "
                              f"[begin, end] range within the {data_size} data bytes")
    nbytes = math.prod(shape) * dtype.itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise CheckpointError(f"{field}.data_offsets: {offsets[1] - offsets[0]} bytes, but "
                              f"{spec['dtype']}{shape} takes {nbytes}")
    return ArrayRef(tuple(shape), dtype, RawRef(data_start + offsets[0], nbytes))


def _header_length(where: str, prefix: bytes, size: int) -> int:
    """The header length a file of `size` bytes announces in its first 8 bytes, bounded."""
    if len(prefix) < 8:
        raise CheckpointError(f"{where}: truncated ({size} bytes, no header length)")
    length = int.from_bytes(prefix[:8], "little")
    if length > MAX_HEADER_BYTES or 8 + length > size:
        raise CheckpointError(f"{where}: header length {length} exceeds "
                              f"{'the file' if length <= MAX_HEADER_BYTES else 'the limit'}"
                              f" ({size} bytes; at most {MAX_HEADER_BYTES})")
    return length


def read_st_header(path: str | os.PathLike) -> StHeader:
    """Parse and check a safetensors file's header (reading only the header; see
    `parse_st_header`). Any problem (missing, not a regular file, truncated, a header length
    past the file, not JSON, an unknown dtype, offsets outside the file, overlapping or leaving
    gaps) -> CheckpointError naming file and field."""
    where = os.fspath(path)
    try:
        with open_regular(where) as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            head = prefix + f.read(_header_length(where, prefix, size))
    except FileNotFoundError:
        raise CheckpointError(f"{where}: missing") from None
    except (NotRegularFile, OSError) as err:
        raise CheckpointError(f"{where}: cannot read ({getattr(err, 'strerror', None) or err})") \
            from None
    return parse_st_header(where, head, size)


def parse_st_header(where: str, head: bytes, size: int) -> StHeader:
    """The checked header of the safetensors file `where` of `size` bytes, from `head`, its
    first bytes (at least the 8-byte length and the header it announces): a JSON object of
    tensors (each exactly dtype, shape and data_offsets) and string metadata, whose tensors
    account for every data byte, none overlapping. CheckpointError naming the field otherwise."""
    length = _header_length(where, head, size)
    raw = head[8:8 + length]
    if len(raw) != length:
        raise CheckpointError(f"{where}: truncated inside the header")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=unique_keys)
        # a lone surrogate (\ud800) is valid to Python's json only: no UTF-8 name has one
        json.dumps(header, ensure_ascii=False).encode("utf-8")
    except (UnicodeError, ValueError, RecursionError) as err:
        raise CheckpointError(f"{where}: header is not JSON ({one_line(err, 120)})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{where}: header is a {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{where}: header field '__metadata__' must map names to strings")
    start = 8 + length
    tensors = {name: _tensor(where, name, spec, start, size - start)
               for name, spec in header.items()}
    end = start
    for name, ref in sorted(tensors.items(), key=lambda item: item[1].raw.offset):
        if ref.raw.offset != end:
            what = "overlaps the tensor before it" if ref.raw.offset < end else "leaves a gap"
            raise CheckpointError(f"{where}: header field {one_line(repr(name), 120)}"
                                  f".data_offsets {what}")
        end += ref.raw.length
    if end != size:
        raise CheckpointError(f"{where}: {size - end} bytes after the last tensor "
                              "(the header does not account for the file)")
    return StHeader(where, tensors, metadata, size)


def leaf_parts(header: StHeader, entry: Entry) -> dict[str, ArrayRef]:
    """{part: ArrayRef} of `entry`'s leaf in its file, checked against the leaf table: the
    tensor names, the metadata's leaf name (if any), weight format and group size, dtypes and
    shapes."""
    where = header.path
    names = tensor_names(entry)
    if set(header.tensors) != set(names.values()):
        got = ", ".join(sorted(one_line(repr(n), 80) for n in header.tensors)[:4]) or "none"
        raise CheckpointError(f"{where}: holds tensors {got}; leaf {entry.name} expects "
                              f"{', '.join(repr(n) for n in names.values())}")
    leaf = header.metadata.get("leaf", entry.name)   # (optional: the tensor names say it too)
    if leaf != entry.name:
        raise CheckpointError(f"{where}: __metadata__.leaf is {one_line(repr(leaf), 80)} but the "
                              f"leaf table puts leaf {entry.name} in this file")
    if entry.quantized:
        for field, want in (("weight_format", entry.fmt.name),
                            ("group_size", str(entry.group_size))):
            got = header.metadata.get(field)
            if got != want:
                raise CheckpointError(
                    f"{where}: __metadata__.{field} is {one_line(repr(got), 40)} but the config "
                    f"(weight_bits={entry.fmt.bits}) expects {want!r} for leaf {entry.name}")
    parts = {part: header.tensors[name] for part, name in names.items()}
    problem = leaf_problem(parts, entry)
    if problem:
        raise CheckpointError(f"{where}: {problem} (leaf {entry.name})")
    return parts


def read_leaf(path: str | os.PathLike, entry: Entry) -> Any:
    """The whole leaf of one file: a float32 array or a QuantizedWeight of `entry`'s format
    (whose scales must be finite and > 0)."""
    header = read_st_header(path)
    parts = leaf_parts(header, entry)
    arrays = {}
    with open_regular(header.path) as f:
        if os.fstat(f.fileno()).st_size != header.size:
            raise CheckpointError(f"{header.path}: changed size while read")
        for part, ref in parts.items():
            f.seek(ref.raw.offset)
            array = np.empty(ref.shape, ref.dtype)   # read straight into it: one copy in memory
            if f.readinto(array.reshape(-1).view(np.uint8)) != ref.raw.length:
                raise CheckpointError(f"{header.path}: truncated while reading {part}")
            arrays[part] = array
    if "array" in arrays:
        return arrays["array"]
    problem = scales_problem(arrays["scales"])
    if problem:
        raise CheckpointError(f"{header.path}: {problem} (leaf {entry.name})")
    return QuantizedWeight(arrays["weight"], arrays["scales"], entry.fmt)


def write_leaf(path: str | os.PathLike, entry: Entry, leaf: Any) -> str:
    """Write one leaf (checked against `entry` first) as a safetensors file; returns the SHA-256
    (hex) of the bytes written. The header is written with sorted keys and tensors in name
    order, so the same leaf always gives the same bytes (and digest)."""
    quantized = isinstance(leaf, QuantizedWeight)
    arrays = {"weight": leaf.weight, "scales": leaf.scales} if quantized else {"array": leaf}
    arrays = {part: np.ascontiguousarray(a) for part, a in arrays.items()}
    problem = leaf_problem(arrays, entry)
    if problem:
        raise CheckpointError(f"leaf {entry.name}: {problem}")
    metadata = {"format": FORMAT_TAG, "leaf": entry.name}
    if entry.quantized:
        metadata.update(weight_format=entry.fmt.name, group_size=str(entry.group_size))
    names = tensor_names(entry)
    header: dict[str, Any] = {"__metadata__": metadata}
    ordered, offset = sorted((names[part], a) for part, a in arrays.items()), 0
    for name, a in ordered:
        header[name] = {"dtype": CODES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)   # the format's alignment of the data: spaces
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for chunk in (len(text).to_bytes(8, "little"), text,
                      *(a.reshape(-1).view(np.uint8) for _, a in ordered)):   # no copies
            f.write(chunk)
            digest.update(chunk)
    return digest.hexdigest()
