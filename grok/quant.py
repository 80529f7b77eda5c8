"""Quantised weights (one type that carries its storage format) and the one scaled matmul over
them, `qeinsum`, that never dequantises a whole weight on an accelerator.

Today's format is the release's: int8 [..., In, Out] with bfloat16 scales [..., S, Out], row
block s of In scaled by scales[s] (SPEC §3). A new format (int4 packed two per byte with
per-group scales) is a new `WeightFormat` and a branch in `qeinsum` / `dequantize`.
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


@dataclasses.dataclass(frozen=True)
class WeightFormat:
    """How a quantised weight is stored: `name`, bits per weight, the storage dtype of `weight`
    and of `scales`."""

    name: str
    bits: int
    dtype: Any
    scales_dtype: Any


INT8 = WeightFormat("int8", 8, np.dtype(np.int8), np.dtype(ml_dtypes.bfloat16))
FORMATS = {INT8.name: INT8}


@jax.tree_util.register_pytree_node_class
class QuantizedWeight:
    """A quantised `weight` [..., In, Out] with `scales` [..., S, Out] in format `fmt` (INT8: int8
    values, row block s of In scaled by scales[s]). The release pickles this type as
    `__main__.QuantizedWeight8bit` (grok.checkpoint reads and writes that name)."""

    def __init__(self, weight: Any, scales: Any, fmt: WeightFormat = INT8):
        self.weight = weight
        self.scales = scales
        self.fmt = fmt

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape)

    @property
    def dtype(self) -> Any:
        return self.weight.dtype

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
                f"{list(self.shape)}, scales={list(self.scales.shape)})")


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


def dequantize(q: QuantizedWeight8bit, dtype: Any = np.float32) -> np.ndarray:
    """The float weight (numpy; for tests, oracles and conversion, never on the hot path)."""
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
    first (the CPU; see `_dequantize_f32`)."""
    if isinstance(w, LayerSlice):
        w = w.get()
    if not is_quantized(w):
        return dot(spec, x, w.astype(x.dtype), plan).astype(out_dtype)
    if not plan.scales_after_dot:
        return dot(spec, x, _dequantize_f32(w), plan).astype(out_dtype)
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


def linears(x: jax.Array, ws: Sequence[Any], plan: "ExecutionPlan",
            out_dtype: Any = BF16) -> list[jax.Array]:
    """x [..., In] times several weights [In, Out_i] that share it: through one kernel launch
    where the plan takes the kernel for them (decoding: layer slices read in place), else each by
    `qeinsum` (the reference)."""
    ys = plan.linear_kernel(x, ws, out_dtype)
    if ys is not None:
        return ys
    return [qeinsum("...i,io->...o", x, w, plan, out_dtype) for w in ws]
