"""Quantised weights (one type that carries its storage format) and the one scaled matmul over
them, `qeinsum`, that never dequantises a whole weight on an accelerator.

Two formats share one layout of scales: weight [..., In, Out] with bfloat16 scales
[..., S, Out], row block s of In scaled by scales[s]. INT8 is the release's (SPEC §3: S = 1 or
the config's scale_blocks). INT4 holds values in [-7, 7] packed two per byte along In (byte r
of a column: row 2r in the low nibble, row 2r + 1 in the high one; uint8 [..., In/2, Out]), with
one scale per group of In/S rows (`group_size_for` picks each tensor's group). `qeinsum`
runs an INT4 weight as two int8 matmuls over its low and high nibbles (x's even and odd inputs),
so nothing is interleaved and the unpacking can fuse into the dots.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

if TYPE_CHECKING:
    from grok.kernels.plan import ExecutionPlan

BF16 = jnp.bfloat16
# Scaling each row block's product after the dot makes a float32 [..., S, Out] of them: fine for
# the release's S <= 8, but int4's groups of 32 give S = In / 32 (a 6144-row weight: 192 times
# the output; a prefill's would not fit). Past this the weight is dequantised inside the dot.
MAX_BLOCKS_AFTER_DOT = 8


@dataclasses.dataclass(frozen=True)
class WeightFormat:
    """How a quantised weight is stored: `name`, bits per weight, the storage dtype of `weight`
    and of `scales`."""

    name: str
    bits: int
    dtype: Any
    scales_dtype: Any

    @property
    def per_byte(self) -> int:
        """Values packed in one storage element along In (1 for int8, 2 for int4)."""
        return 8 // self.bits

    def storage_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The stored weight's shape for a logical [..., In, Out] weight."""
        *lead, rows, cols = shape
        return (*lead, rows // self.per_byte, cols)

    def logical_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The logical [..., In, Out] of a stored weight of `shape`."""
        *lead, rows, cols = shape
        return (*lead, rows * self.per_byte, cols)


INT8 = WeightFormat("int8", 8, np.dtype(np.int8), np.dtype(ml_dtypes.bfloat16))
INT4 = WeightFormat("int4", 4, np.dtype(np.uint8), np.dtype(ml_dtypes.bfloat16))
FORMATS = {INT8.name: INT8, INT4.name: INT4}
FORMAT_BITS = {f.bits: f for f in FORMATS.values()}
INT4_MAX = 7   # symmetric: values in [-7, 7], so -w and w quantise alike


@jax.tree_util.register_pytree_node_class
class QuantizedWeight:
    """A quantised `weight` [..., In, Out] with `scales` [..., S, Out] in format `fmt` (INT8: int8
    values; INT4: uint8 [..., In/2, Out] of packed pairs; row block s of In scaled by
    scales[s]). `shape` is the logical [..., In, Out] whatever the packing. The release pickles
    the int8 format as `__main__.QuantizedWeight8bit` (grok.checkpoint reads and writes that
    name)."""

    def __init__(self, weight: Any, scales: Any, fmt: WeightFormat = INT8):
        self.weight = weight
        self.scales = scales
        self.fmt = fmt

    @property
    def shape(self) -> tuple[int, ...]:
        return self.fmt.logical_shape(self.weight.shape)

    @property
    def dtype(self) -> Any:
        return self.weight.dtype

    @property
    def group_size(self) -> int:
        """Rows of In per scale (In / S)."""
        return self.shape[-2] // self.scale_blocks

    @property
    def scale_blocks(self) -> int:
        return int(self.scales.shape[-2])

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.weight.shape)) * np.dtype(self.weight.dtype).itemsize + \
            int(np.prod(self.scales.shape)) * np.dtype(self.scales.dtype).itemsize

    def __getitem__(self, index: Any) -> "QuantizedWeight":
        """Index the leading (stacking) axes of weight and scales alike: w[layer], w[l, e]."""
        return QuantizedWeight(self.weight[index], self.scales[index], self.fmt)

    def tree_flatten(self):
        return (self.weight, self.scales), self.fmt

    @classmethod
    def tree_unflatten(cls, fmt, children):
        return cls(*children, fmt)

    def __repr__(self) -> str:
        return (f"QuantizedWeight({self.fmt.name}, weight={getattr(self.weight, 'dtype', '?')}"
                f"{list(self.weight.shape)}, scales={list(self.scales.shape)})")


QuantizedWeight8bit = QuantizedWeight   # the release's name for the int8 format


def is_quantized(x: Any) -> bool:
    return isinstance(x, QuantizedWeight)


@jax.tree_util.register_pytree_node_class
class LayerSlice:
    """Layer `layer` of an int8 weight stacked over layers ([L, ..., In, Out]), left unsliced.

    The scanned model hands each layer its quantized weights this way: a Pallas kernel reads the
    layer straight out of the stack, where a slice would be copied first (XLA cannot pass a
    custom call a slice in place). `.get()` is the plain slice, for the XLA paths. `shape` is
    one layer's, so haiku's parameter checks see the layer's weight.
    """

    def __init__(self, stack: QuantizedWeight, layer: Any):
        self.stack = stack
        self.layer = layer

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.stack.shape[1:])

    @property
    def dtype(self) -> Any:
        return self.stack.dtype

    def get(self) -> QuantizedWeight:
        return self.stack[self.layer]

    def tree_flatten(self):
        return (self.stack, self.layer), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children)


def quantize(w: np.ndarray, blocks: int = 1) -> QuantizedWeight8bit:
    """Symmetric int8 quantisation of float `w` [..., In, Out] with `blocks` row blocks of In.

    Each (block, output column) gets scale max|w| / 127, stored as bfloat16; the int8 values are
    computed against the rounded scale, so |w - dequantize(q)| <= scale / 2 elementwise.
    """
    w = np.asarray(w, dtype=np.float32)
    if w.ndim < 2:
        raise ValueError(f"quantize needs a matrix [..., In, Out], got shape {w.shape}")
    rows = w.shape[-2]
    if blocks < 1 or rows % blocks:
        raise ValueError(f"{blocks} scale blocks do not divide the {rows} input rows")
    blocked = w.reshape(*w.shape[:-2], blocks, rows // blocks, w.shape[-1])
    scales = np.abs(blocked).max(axis=-2) / 127.0            # [..., S, Out]
    scales = np.where(scales > 0, scales, 1.0).astype(ml_dtypes.bfloat16)
    exact = scales.astype(np.float32)[..., :, None, :]
    weight = np.clip(np.rint(blocked / exact), -127, 127).astype(np.int8).reshape(w.shape)
    return QuantizedWeight8bit(weight, scales)


def group_size_for(rows: int, requested: int) -> int:
    """The group (rows per scale) of a weight with `rows` inputs: the largest divisor of `rows`
    not above `requested` (e.g. 88 for the demo's expert width 176 and 128 asked)."""
    if requested < 1 or rows < 1:
        raise ValueError(f"group size {requested} for {rows} rows: both must be positive")
    return next(g for g in range(min(requested, rows), 0, -1) if rows % g == 0)


def pack_int4(q: np.ndarray) -> np.ndarray:
    """int8 values in [-8, 7], [..., In, Out] with In even -> uint8 [..., In/2, Out] (row 2r in
    the low nibble of byte r, row 2r + 1 in the high one)."""
    q = np.asarray(q, np.int8)
    if q.shape[-2] % 2:
        raise ValueError(f"int4 packing needs an even number of rows, got {q.shape[-2]}")
    nibbles = q.view(np.uint8) & 0x0F
    return nibbles[..., 0::2, :] | (nibbles[..., 1::2, :] << 4)


def nibbles(packed: Any, xp: Any = np) -> tuple[Any, Any]:
    """uint8 [..., In/2, Out] -> the int8 values of the even rows and of the odd rows, each
    [..., In/2, Out] (elementwise: no interleaving)."""
    signed = packed.astype(xp.int8)   # (arithmetic shifts sign-extend)
    return xp.right_shift(xp.left_shift(signed, 4), 4), xp.right_shift(signed, 4)


def unpack_int4(packed: Any, xp: Any = np) -> Any:
    """uint8 [..., In/2, Out] -> int8 [..., In, Out] (numpy, or jax.numpy with xp=jnp)."""
    low, high = nibbles(packed, xp)
    *lead, half, cols = packed.shape
    return xp.stack([low, high], axis=-2).reshape(*lead, 2 * half, cols)


def quantize_int4(w: np.ndarray, group_size: int) -> QuantizedWeight:
    """Symmetric int4 quantisation of float `w` [..., In, Out] with one bfloat16 scale per
    (group of `group_size` rows, column): scale max|w| / 7, values rounded against the rounded
    scale, so |w - dequantize(q)| <= scale / 2 elementwise. `group_size` must divide In (see
    `group_size_for`)."""
    w = np.asarray(w, dtype=np.float32)
    rows = w.shape[-2]
    if group_size < 1 or rows % group_size:
        raise ValueError(f"group size {group_size} does not divide the {rows} input rows")
    blocks = rows // group_size
    blocked = w.reshape(*w.shape[:-2], blocks, group_size, w.shape[-1])
    scales = np.abs(blocked).max(axis=-2) / INT4_MAX
    scales = np.where(scales > 0, scales, 1.0).astype(ml_dtypes.bfloat16)
    exact = scales.astype(np.float32)[..., :, None, :]
    q = np.clip(np.rint(blocked / exact), -INT4_MAX, INT4_MAX).astype(np.int8).reshape(w.shape)
    return QuantizedWeight(pack_int4(q), scales, INT4)


def as_int8(q: QuantizedWeight, xp: Any = np) -> QuantizedWeight:
    """The same weight with int8 storage (INT4 unpacked; the scales are unchanged)."""
    if q.fmt is INT8:
        return q
    return QuantizedWeight(unpack_int4(q.weight, xp), q.scales, INT8)


def dequantize(q: QuantizedWeight8bit, dtype: Any = np.float32) -> np.ndarray:
    """The float weight (numpy; for tests, oracles and conversion, never on the hot path)."""
    q = as_int8(QuantizedWeight(np.asarray(q.weight), q.scales, q.fmt))
    weight = np.asarray(q.weight)
    scales = np.asarray(q.scales).astype(np.float64)
    blocks, rows = scales.shape[-2], weight.shape[-2]
    blocked = weight.astype(np.float64).reshape(*weight.shape[:-2], blocks, rows // blocks,
                                                 weight.shape[-1])
    return (blocked * scales[..., :, None, :]).reshape(weight.shape).astype(dtype)


def dot(spec: str, a: jax.Array, b: jax.Array, plan: "ExecutionPlan") -> jax.Array:
    """einsum with float32 accumulation and result. Where the plan says the backend's dots take
    no bfloat16 operands (XLA's CPU runtime) they are widened first (exact: bf16 is in f32)."""
    if plan.widen_dots:
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _dequantize_f32(q: QuantizedWeight) -> jax.Array:
    """weight * scales in float32: exact (an int8 times a bfloat16 needs 16 significant bits).

    For backends whose dots widen their operands anyway (XLA's CPU: a convert feeding a dot is
    always written out in full there, so scaling inside that convert costs nothing and leaves one
    plain dot; scaling row blocks after the dot instead is 2-3x slower on CPU). Accelerators keep
    the convert inside the dot and scale each row block's product afterwards.
    """
    blocks = q.scale_blocks
    *lead, rows, cols = q.weight.shape
    w = q.weight.reshape(*lead, blocks, rows // blocks, cols).astype(jnp.float32)
    w = w * q.scales.astype(jnp.float32)[..., :, None, :]
    return w.reshape(*lead, rows, cols)


def qeinsum(spec: str, x: jax.Array, w: Any, plan: "ExecutionPlan",
            out_dtype: Any = jnp.float32) -> jax.Array:
    """einsum(spec, x, w) for any weight: a float array, a QuantizedWeight or a LayerSlice.

    `spec` names the weight's last two axes (In, Out) last, and x's last axis is In, e.g.
    "...i,io->...o" (a linear layer), "ni,eio->neo" (every expert), "nki,nkio->nko" (per-token
    experts). The int8 weight is converted inside the dot with float32 accumulation and each row
    block's product is scaled after it, unless the plan says to dequantise the weight in float32
    first (the CPU; see `_dequantize_f32`) or it has more than MAX_BLOCKS_AFTER_DOT row blocks
    (then it is dequantised in the dot's dtype: bfloat16 on accelerators)."""
    if isinstance(w, LayerSlice):
        w = w.get()
    if not is_quantized(w):
        return dot(spec, x, w.astype(x.dtype), plan).astype(out_dtype)
    if w.fmt is INT4 and w.group_size % 2 == 0:
        return _int4_halves(spec, x, w, plan).astype(out_dtype)
    w = as_int8(w, jnp)   # int4 with odd groups: unpacked (interleaved) inside the computation
    if not plan.scales_after_dot or w.scale_blocks > MAX_BLOCKS_AFTER_DOT:
        weight = _dequantize_f32(w)
        if not plan.widen_dots:   # one rounding of the exact product, like the release's copies
            weight = weight.astype(x.dtype)
        return dot(spec, x, weight, plan).astype(out_dtype)
    inputs, out = spec.split("->")
    xs, ws = inputs.split(",")
    s = next(c for c in "zyxwsrqp" if c not in spec)      # a letter for the row blocks
    blocks = w.scale_blocks
    *lead, rows, cols = w.weight.shape
    xb = x.reshape(*x.shape[:-1], blocks, x.shape[-1] // blocks)
    wb = w.weight.reshape(*lead, blocks, rows // blocks, cols).astype(x.dtype)
    blocked_out = out[:-1] + s + out[-1]
    y = dot(f"{xs[:-1]}{s}{xs[-1]},{ws[:-2]}{s}{ws[-2:]}->{blocked_out}", xb, wb, plan)
    scales = w.scales.astype(jnp.float32)
    return jnp.einsum(f"{blocked_out},{ws[:-2]}{s}{ws[-1]}->{out}", y, scales).astype(out_dtype)


def _int4_halves(spec: str, x: jax.Array, w: QuantizedWeight, plan: "ExecutionPlan"
                 ) -> jax.Array:
    """einsum(spec, x, w) of an int4 weight as x's even inputs times the low nibbles plus its
    odd inputs times the high ones: two int8 matmuls of In/2 rows over the same scales (an even
    group keeps rows 2r and 2r + 1 in one group), with nothing interleaved, so XLA can fuse the
    nibbles' shifts into each dot's operand -> float32."""
    pairs = x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    low, high = nibbles(w.weight, jnp)
    halves = [qeinsum(spec, pairs[..., i], QuantizedWeight(v, w.scales, INT8), plan)
              for i, v in enumerate((low, high))]
    return halves[0] + halves[1]


def linears(x: jax.Array, ws: Sequence[Any], plan: "ExecutionPlan",
            out_dtype: Any = BF16) -> list[jax.Array]:
    """x [..., In] times several weights [In, Out_i] that share it: through one kernel launch
    where the plan takes the kernel for them (decoding: layer slices read in place), else each by
    `qeinsum` (the reference)."""
    ys = plan.linear_kernel(x, ws, out_dtype)
    if ys is not None:
        return ys
    return [qeinsum("...i,io->...o", x, w, plan, out_dtype) for w in ws]
