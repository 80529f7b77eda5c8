"""The int8 block-matmul kernels applied to the model's weights: the MoE's expert MLP over
expert-sorted row blocks, and decode-time projections of a layer read out of its stack in place.
grok.kernels.plan decides when these run; the XLA reference paths live in grok.model and grok.quant.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from grok.kernels.pallas_int8 import (block_matmul, gated_block_matmul, kernel_applies,
                                       multi_block_matmul)
from grok.quant import BF16


def gated_mlp(xb: jax.Array, block_expert: jax.Array, block_rows: jax.Array, w1: Any, wv: Any,
              w2: Any, layer: Any = None, *, interpret: bool) -> jax.Array:
    """The MoE's matmuls as two kernels reading the int8 experts in place: gelu(x w1) * (x wv)
    in one, w2 in the other. xb [G, bm, D] -> float32 [G, bm, D]. With `layer` the weights are
    stacked [L, E, In, Out] and layer `layer`'s experts are read."""
    if layer is not None:   # [L, E, In, Out] -> [L*E, In, Out] (free) and ids offset to the layer
        block_expert = block_expert + layer * w1.shape[-3]

    def flat(a):
        return a.reshape(-1, *a.shape[-2:])

    hidden = gated_block_matmul(xb, block_expert, block_rows, flat(w1.weight), flat(w1.scales),
                                flat(wv.weight), flat(wv.scales), interpret=interpret)
    return block_matmul(hidden, block_expert, block_rows, flat(w2.weight), flat(w2.scales),
                        interpret=interpret)


def stacked_linears(x: jax.Array, ws: Sequence[Any], out_dtype: Any, *, interpret: bool
                    ) -> list[jax.Array] | None:
    """x [..., In] times layer `w.layer` of each int8 stack in `ws` (LayerSlices of one layer),
    in one kernel launch: [..., Out_i] each in `out_dtype`. None when a shape does not suit the
    kernel (the caller then runs the XLA path)."""
    *lead, rows = x.shape
    n = math.prod(lead)
    bm = max(16, 1 << (n - 1).bit_length())
    if any(w.shape[-2] != rows or not kernel_applies(
            rows, w.shape[-1], w.stack.scale_blocks, bm, interpret,
            weight_bytes=math.prod(w.stack.shape)) for w in ws):
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
    return [y[0, :n].reshape(*lead, y.shape[-1]).astype(out_dtype) for y in ys]
