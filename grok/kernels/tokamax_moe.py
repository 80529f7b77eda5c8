"""The MoE's expert MLP and the decode-time projections through `tokamax.ragged_dot` (same API as
`jax.lax.ragged_dot`), with the weights handed over as qwix `QArray`s built from our
`QuantizedWeight`s: tokamax's Mosaic GPU kernels (sm90, sm100) and Mosaic TPU kernel read them
quantised; on CPU its XLA implementation dequantises them (tests).

- int8 [..., E, K, N] with scales [..., E, S, N] is a QArray as it stands: qwix scales with the
  same rank as the values, each covering a (1, K/S, 1) tile (the release's row blocks). A layer
  of a stacked [L, E, K, N] weight is read in place: the stack is seen as L*E groups and only
  the layer's E get rows (a slice would be copied before the kernel: every expert, every step).
- int4 (uint8 pairs along K) is unpacked to jax's int4 type with the same per-group scales; that
  conversion reads the experts that have rows this step (taken by index, at most min(E, rows)
  of them). It is not stored converted: jnp.int4 takes a byte a value on the CPU (measured) and,
  by qwix's report (google/qwix#328), on GB200 and TPU v7x: twice int4's packed size
  (benchmarks/gpu.sh prints the card's figure).
On CPU (the plan's `widen_dots`) x and the scales go in as float32, so the dequantised weight
and the dots are exact float32 like the reference paths. The reference is the XLA grouped path
of grok.model.moe; grok.kernels.plan decides when this runs. tokamax is imported on first use.
"""
from __future__ import annotations

import functools
import inspect
import warnings
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from grok.errors import GrokError
from grok.quant import BF16, INT8, LayerSlice, QuantizedWeight, unpack_int4

F32 = jnp.float32


@functools.cache
def load() -> Any:
    """The tokamax module, or a one-line GrokError naming the missing package."""
    try:   # (tokamax imports qwix: a missing qwix is named by the error too)
        import tokamax
    except ImportError as err:
        raise GrokError(f"moe_impl='tokamax' needs the {err.name or 'tokamax'} package: "
                        f"pip install 'grok[kernels]' ({err})") from None
    from absl import flags   # (a dependency of tokamax)
    if not flags.FLAGS.is_parsed():
        # tokamax reads its options from absl flags and would parse sys.argv (a pytest's, a
        # server's command line) on first use, failing on any flag it does not know: defaults.
        flags.FLAGS.mark_as_parsed()
    return tokamax


@functools.cache
def _device_check() -> dict[str, bool]:
    """Keyword arguments keeping tokamax's device check on: from 0.0.17 it skips the check when
    one implementation is named (for exporting from a CPU), and a kernel would then be built
    for a device it does not support instead of refusing."""
    params = inspect.signature(load().ragged_dot).parameters
    return {"bypass_device_check": False} if "bypass_device_check" in params else {}


def qarray(w: QuantizedWeight, widen: bool) -> Any:
    """`w` as a qwix QArray of the same logical shape: int8 values as stored, int4 unpacked to
    jax's int4 type; scales bfloat16 (float32 with `widen`: the CPU's exact dequantisation)."""
    import qwix
    values = w.weight if w.fmt is INT8 else unpack_int4(w.weight, jnp).astype(jnp.int4)
    scales = w.scales.astype(F32 if widen else BF16)
    return qwix.QArray(values, scales, qtype=values.dtype)


def _grouped(w: Any, counts: jax.Array, layer: Any, widen: bool, rows: int
             ) -> tuple[Any, jax.Array]:
    """(rhs [G, K, N], group sizes [G]) for counts [E] rows per expert (of `rows` in all) of
    layer `layer`."""
    if layer is not None and isinstance(w, QuantizedWeight) and w.fmt is INT8:
        lead, experts = w.weight.shape[0], counts.shape[0]
        flat = QuantizedWeight(w.weight.reshape(-1, *w.weight.shape[-2:]),
                               w.scales.reshape(-1, *w.scales.shape[-2:]))
        sizes = jax.lax.dynamic_update_slice(jnp.zeros((lead * experts,), jnp.int32),
                                             counts.astype(jnp.int32), (layer * experts,))
        return qarray(flat, widen), sizes
    if isinstance(w, QuantizedWeight) and w.fmt is not INT8:
        return _chosen_experts(w, counts, layer, widen, rows)
    if layer is not None:   # float weights: the layer's slice
        w = w[layer]
    if isinstance(w, QuantizedWeight):
        return qarray(w, widen), counts.astype(jnp.int32)
    return w.astype(F32 if widen else BF16), counts.astype(jnp.int32)


def _chosen_experts(w: QuantizedWeight, counts: jax.Array, layer: Any, widen: bool, rows: int
                    ) -> tuple[Any, jax.Array]:
    """An int4 weight's experts that have rows, taken (at most min(E, rows) of them, in expert
    order like the sorted rows) and converted to jax's int4 type: the conversion reads and
    writes only those, not the layer's every expert (a decode step of batch 1: 2 of 8)."""
    experts = counts.shape[0]
    ids = jnp.nonzero(counts, size=min(experts, rows), fill_value=experts)[0]
    sizes = jnp.where(ids < experts, counts[jnp.minimum(ids, experts - 1)], 0)
    ids = jnp.minimum(ids, experts - 1)   # (padding groups: no rows, any expert)
    taken = w[ids] if layer is None else w[layer, ids]
    return qarray(taken, widen), sizes.astype(jnp.int32)


def ragged_dot(x: jax.Array, w: Any, counts: jax.Array, layer: Any = None, *,
               implementation: Sequence[str], widen: bool) -> jax.Array:
    """x [A, K] (rows sorted by expert, counts [E] of them per expert) times each row's expert
    of `w` ([E, K, N], or [L, E, K, N] with `layer`) -> float32 [A, N]."""
    tokamax = load()
    rhs, sizes = _grouped(w, counts, layer, widen, x.shape[0])
    x = x.astype(F32 if widen else BF16)
    call = functools.partial(tokamax.ragged_dot, preferred_element_type=F32)
    try:
        return call(x, rhs, sizes, implementation=tuple(implementation), **_device_check())
    except (NotImplementedError, ValueError) as err:
        # A shape, card or device the kernel does not take (tokamax 0.0.12 says so with
        # NotImplementedError, later ones also with ValueError from their heuristics): XLA's.
        first = (str(err).strip().splitlines() or [""])[0][:200]
        warnings.warn(f"tokamax {'/'.join(implementation)} refused ({type(err).__name__}: "
                      f"{first}); its XLA path runs instead", RuntimeWarning)
        if layer is not None:
            rhs, sizes = _grouped(w[layer], counts, None, widen, x.shape[0])
        return call(x, rhs, sizes, implementation="xla")


def gated_mlp(xs: jax.Array, counts: jax.Array, w1: Any, wv: Any, w2: Any, layer: Any = None,
              *, implementation: Sequence[str], widen: bool, exact_gelu: bool = False
              ) -> jax.Array:
    """gelu(x w1) * (x wv) w2 for rows xs [A, D] sorted by expert (counts [E]) -> float32
    [A, D]; the hidden layer is rounded to bfloat16 between the matmuls, as in the reference."""
    dot = functools.partial(ragged_dot, counts=counts, layer=layer,
                            implementation=implementation, widen=widen)
    hidden = jax.nn.gelu(dot(xs, w1), approximate=not exact_gelu) * dot(xs, wv)
    return dot(hidden.astype(BF16), w2)


def stacked_linears(x: jax.Array, ws: Sequence[LayerSlice], out_dtype: Any, *,
                    implementation: Sequence[str], widen: bool) -> list[jax.Array] | None:
    """x [..., In] times layer `w.layer` of each int8 stack [L, In, Out] in `ws`, read in place
    as a ragged dot whose only non-empty group is the layer: [..., Out_i] each. None for other
    weights (int4, float: the caller's XLA path)."""
    if not all(isinstance(w, LayerSlice) and isinstance(w.stack, QuantizedWeight)
               and w.stack.fmt is INT8 and w.stack.weight.ndim == 3 for w in ws):
        return None
    *lead, rows = x.shape
    flat = x.reshape(-1, rows)
    out = []
    for w in ws:
        onehot = jax.nn.one_hot(w.layer, w.stack.weight.shape[0], dtype=jnp.int32)
        y = ragged_dot(flat, w.stack, onehot * flat.shape[0], implementation=implementation,
                       widen=widen)
        out.append(y.reshape(*lead, y.shape[-1]).astype(out_dtype))
    return out
