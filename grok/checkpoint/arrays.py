"""Format-neutral descriptions of a checkpoint leaf's arrays, and the one check of a leaf against
the leaf table.

A leaf is described by its *parts*: `{"array": a}` for a float32 leaf, `{"weight": w, "scales": s}`
for a QuantizedWeight8bit. A part is anything with `.shape` and `.dtype`: a numpy array (the
writer, the whole-file reader) or an `ArrayRef` (where a file holds the array's bytes: the header
parser, the streaming loader). `leaf_problem(parts, entry)` is the single shape/dtype check that
every path (reader, header parser, writer, verify, loader) applies.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import ml_dtypes
import numpy as np

from grok.leaves import Entry
from grok.quant import QuantizedWeight8bit

BF16 = np.dtype(ml_dtypes.bfloat16)
F32 = np.dtype(np.float32)
I8 = np.dtype(np.int8)


@dataclasses.dataclass(frozen=True)
class RawRef:
    """Raw array bytes: `length` bytes at `offset` in a file, or held `inline` (offset -1)."""

    offset: int
    length: int
    inline: bytes | None = dataclasses.field(default=None, repr=False)

    def __setstate__(self, state: Any) -> None:
        # The header parser pushes RawRefs onto the unpickler's stack: a BUILD opcode must not
        # rewrite their fields (it would point the array's data anywhere in the file).
        raise TypeError("raw array bytes cannot be built")


@dataclasses.dataclass(frozen=True)
class ArrayRef:
    """One C-ordered, little-endian (or byte-order-free) array: shape, dtype and its bytes."""

    shape: tuple[int, ...]
    dtype: np.dtype
    raw: RawRef

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def leaf_parts(leaf: Any) -> dict[str, Any]:
    """The parts of an in-memory leaf: {"weight", "scales"} of a QuantizedWeight8bit, else
    {"array": leaf}."""
    if isinstance(leaf, QuantizedWeight8bit):
        return {"weight": leaf.weight, "scales": leaf.scales}
    return {"array": leaf}


def expected_parts(entry: Entry) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{part: (shape, dtype)} that the file of `entry` must hold."""
    if entry.quantized:
        return {"weight": (tuple(entry.weight_shape), np.dtype(entry.fmt.dtype)),
                "scales": (tuple(entry.scales_shape), np.dtype(entry.fmt.scales_dtype))}
    return {"array": (tuple(entry.shape), BF16 if entry.bf16 else F32)}


def _summary(parts: Mapping[str, Any]) -> str:
    def one(a: Any) -> str:
        return f"{getattr(a, 'dtype', type(a).__name__)}{list(getattr(a, 'shape', ()))}"
    if set(parts) == {"weight", "scales"}:
        return f"QuantizedWeight8bit(weight {one(parts['weight'])}, scales {one(parts['scales'])})"
    return " + ".join(one(a) for a in parts.values())


def leaf_problem(parts: Mapping[str, Any], entry: Entry) -> str | None:
    """Why a leaf with these parts cannot be `entry` (kind, dtype or shape); None if it fits."""
    want = expected_parts(entry)
    if set(parts) != set(want):
        if entry.quantized:
            kind = "QuantizedWeight8bit" if entry.fmt.bits == 8 else "an int4 QuantizedWeight"
            return (f"expected {kind} ({np.dtype(entry.fmt.dtype)} weight "
                    f"{list(entry.weight_shape)}, bfloat16 scales {list(entry.scales_shape)}), "
                    f"got {_summary(parts)}")
        return f"expected a float32 array {list(entry.shape)}, got {_summary(parts)}"
    for part, (shape, dtype) in want.items():
        array = parts[part]
        if not hasattr(array, "dtype") or not hasattr(array, "shape"):
            return f"{part} is a {type(array).__name__}, not an array"
        if array.dtype != dtype:
            return f"{part} dtype {array.dtype}, expected {dtype}"
        if tuple(array.shape) != shape:
            return f"{part} shape {list(array.shape)}, expected {list(shape)}"
    return None
