"""8-bit weights with row-block scales (SPEC §3) and matmuls that never dequantise a whole weight."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

BF16 = jnp.bfloat16


@jax.tree_util.register_pytree_node_class
class QuantizedWeight8bit:
    """int8 `weight` [..., In, Out] with `scales` [..., S, Out]: row block s of In uses scales[s].

    The class name is the one the release pickles as `__main__.QuantizedWeight8bit`.
    """

    def __init__(self, weight: Any, scales: Any):
        self.weight = weight
        self.scales = scales

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

    def __getitem__(self, index: Any) -> "QuantizedWeight8bit":
        """Index the leading (stacking) axes of weight and scales alike: w[layer], w[l, e]."""
        return QuantizedWeight8bit(self.weight[index], self.scales[index])

    def tree_flatten(self):
        return (self.weight, self.scales), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children)

    def __repr__(self) -> str:
        return (f"QuantizedWeight8bit(weight={getattr(self.weight, 'dtype', '?')}"
                f"{list(self.shape)}, scales={list(self.scales.shape)})")


def is_quantized(x: Any) -> bool:
    return isinstance(x, QuantizedWeight8bit)


@jax.tree_util.register_pytree_node_class
class LayerSlice:
    """Layer `layer` of an int8 weight stacked over layers ([L, ..., In, Out]), left unsliced.

    The scanned model hands each layer its quantized weights this way: a Pallas kernel reads the
    layer straight out of the stack, where a slice would be copied first (XLA cannot pass a
    custom call a slice in place). `.get()` is the plain slice, for the XLA paths. `shape` is
    one layer's, so haiku's parameter checks see the layer's weight.
    """

    def __init__(self, stack: QuantizedWeight8bit, layer: Any):
        self.stack = stack
        self.layer = layer

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.stack.shape[1:])

    @property
    def dtype(self) -> Any:
        return self.stack.dtype

    def get(self) -> QuantizedWeight8bit:
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


def dot(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """einsum with float32 accumulation and result. XLA's CPU runtime lacks some bf16 x bf16 -> f32
    dots, so on CPU the operands are widened first (exact: bfloat16 is a subset of float32)."""
    if jax.default_backend() == "cpu":   # the runtime's limit, not a choice of path
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def on_cpu() -> bool:
    """Whether computations run on XLA's CPU backend, whose dots take no int8 or bfloat16
    operands in some layouts: weights are then widened to float32 before the dot (elsewhere the
    conversion happens inside the dot and scales are applied per row block after it)."""
    return jax.default_backend() == "cpu"


def on_gpu() -> bool:
    """Whether computations run on a GPU (where the Pallas kernels run through Triton)."""
    return jax.default_backend() == "gpu"


# Matmuls of at most this many rows (decoding) run through the kernel when allowed: they read
# the weight once, in place. Larger ones are compute-bound, where XLA's GEMMs do better.
KERNEL_ROWS = 64
KERNEL_MODES = ("off", "auto", "always")   # auto: on GPU only; always: also interpreted elsewhere


def _kernel_linears(x: jax.Array, ws: Sequence[Any], kernel: str) -> list[jax.Array] | None:
    """x [..., In] times layer w.layer of each stack, by one Pallas kernel launch (float32
    [..., Out_i] each), or None where the kernel is off or does not apply to all of them."""
    if kernel == "off" or (kernel == "auto" and not on_gpu()) or not all(
            isinstance(w, LayerSlice) and is_quantized(w.stack) for w in ws):
        return None
    from grok.kernels.block_matmul import block_matmul, kernel_applies, multi_block_matmul
    *lead, rows = x.shape
    n = int(np.prod(lead))
    bm = max(16, 1 << (n - 1).bit_length())
    interpret = not on_gpu()
    if n > KERNEL_ROWS or any(w.shape[-2] != rows or not kernel_applies(
            rows, w.shape[-1], w.stack.scale_blocks, bm, interpret,
            weight_bytes=int(np.prod(w.stack.shape))) for w in ws):
        return None
    xb = jnp.pad(x.reshape(n, rows).astype(BF16), ((0, bm - n), (0, 0)))[None]
    layer = jnp.reshape(jnp.asarray(ws[0].layer, jnp.int32), (1,))
    valid = jnp.full((1,), n, jnp.int32)
    if len(ws) == 1:
        ys = [block_matmul(xb, layer, valid, ws[0].stack.weight, ws[0].stack.scales,
                           interpret=interpret)]
    else:
        ys = multi_block_matmul(xb, layer, valid, tuple((w.stack.weight, w.stack.scales)
                                                        for w in ws), interpret=interpret)
    return [y[0, :n].reshape(*lead, y.shape[-1]) for y in ys]


def embedding_dtype() -> Any:
    """The embedding's dtype in compute: bfloat16, or on CPU its bfloat16 values widened to float32
    (CPU dots widen bf16 operands, which would cost a full copy of the table at every step)."""
    return jnp.float32 if on_cpu() else BF16


def _dequantize_f32(q: QuantizedWeight8bit) -> jax.Array:
    """weight * scales in float32: exact (an int8 times a bfloat16 needs 16 significant bits).

    The CPU path only: XLA's CPU dots cannot take an int8 or bfloat16 operand and a convert feeding
    a dot is always written out in full there, so scaling inside that convert costs nothing and
    leaves one plain dot (scaling row blocks after the dot instead is 2-3x slower on CPU). GPU
    backends keep the convert inside the dot and scale each row block's product afterwards.
    """
    blocks = q.scale_blocks
    *lead, rows, cols = q.weight.shape
    w = q.weight.reshape(*lead, blocks, rows // blocks, cols).astype(jnp.float32)
    w = w * q.scales.astype(jnp.float32)[..., :, None, :]
    return w.reshape(*lead, rows, cols)


def _blocked(x: jax.Array, blocks: int) -> jax.Array:
    """[..., In] -> [..., S, In/S]: the row blocks that share one row of scales."""
    return x.reshape(*x.shape[:-1], blocks, x.shape[-1] // blocks)


def qlinear(x: jax.Array, q: QuantizedWeight8bit | LayerSlice | jax.Array, out_dtype: Any = BF16,
            kernel: str = "off") -> jax.Array:
    """x [..., In] times the int8 weight [In, Out]: int8 converted inside the dot, float32
    accumulation, each row block's product scaled after the matmul. A float weight (training,
    tests) is used as it is. A LayerSlice of a few rows goes through the Pallas kernel when
    `kernel` allows (see KERNEL_MODES), reading the layer in place."""
    if isinstance(q, LayerSlice):
        ys = _kernel_linears(x, [q], kernel)
        if ys is not None:
            return ys[0].astype(out_dtype)
        q = q.get()
    if not is_quantized(q):
        return dot("...i,io->...o", x, q.astype(x.dtype)).astype(out_dtype)
    if on_cpu():
        return dot("...i,io->...o", x, _dequantize_f32(q)).astype(out_dtype)
    blocks = q.scale_blocks
    rows, cols = q.weight.shape
    w = q.weight.reshape(blocks, rows // blocks, cols).astype(x.dtype)
    y = dot("...si,sio->...so", _blocked(x, blocks), w)
    return jnp.einsum("...so,so->...o", y, q.scales.astype(jnp.float32)).astype(out_dtype)


def qlinears(x: jax.Array, ws: Sequence[Any], out_dtype: Any = BF16,
             kernel: str = "off") -> list[jax.Array]:
    """x [..., In] times several weights that share it ([In, Out_i] each), as `qlinear` gives
    them; LayerSlices of one layer that the kernel takes (decoding) go through one launch."""
    ys = _kernel_linears(x, ws, kernel) if len(ws) > 1 else None
    if ys is None:
        return [qlinear(x, w, out_dtype, kernel) for w in ws]
    return [y.astype(out_dtype) for y in ys]


def expert_qlinear(x: jax.Array, q: QuantizedWeight8bit | jax.Array,
                   out_dtype: Any = BF16) -> jax.Array:
    """Per-expert int8 matmul. x [N, In] (shared by all experts) or [N, E, In];
    weight [E, In, Out], scales [E, S, Out] -> [N, E, Out]. A float weight is used as it is."""
    if not is_quantized(q):
        spec = "ni,eio->neo" if x.ndim == 2 else "nei,eio->neo"
        return dot(spec, x, q.astype(x.dtype)).astype(out_dtype)
    if on_cpu():
        spec = "ni,eio->neo" if x.ndim == 2 else "nei,eio->neo"
        return dot(spec, x, _dequantize_f32(q)).astype(out_dtype)
    blocks = q.scale_blocks
    experts, rows, cols = q.weight.shape
    w = q.weight.reshape(experts, blocks, rows // blocks, cols).astype(x.dtype)
    spec = "nsi,esio->neso" if x.ndim == 2 else "nesi,esio->neso"
    y = dot(spec, _blocked(x, blocks), w)
    return jnp.einsum("neso,eso->neo", y, q.scales.astype(jnp.float32)).astype(out_dtype)
