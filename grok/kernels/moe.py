"""Grouped int8 matmul over expert-sorted row blocks, reading each block's expert weights in place.

The MoE groups its (token, chosen expert) rows into G blocks of `bm` rows; every row of block g is
routed to expert `block_expert[g]`. `block_matmul` multiplies each block by that expert's int8
weight [In, Out] with per-row-block scales, without copying or dequantising the weight in memory:
the expert id is read inside the kernel and used as an offset into the stacked [E, In, Out] weight,
tiles of int8 are converted in registers, and blocks with no rows (`block_rows[g] == 0`) read
nothing. Decoding at batch 1 with top-2 routing therefore reads exactly two experts.

Grid: (G, Out / bn). Each program accumulates x[g] [bm, In] @ w[e, :, n*bn:(n+1)*bn] in float32
over In in steps of `bk` (bk divides the scale row block, so each step has one row of scales).

On GPU the kernel lowers through Pallas' Triton backend; `interpret=True` evaluates it with the
Pallas interpreter on any backend (slow: tests only). XLA paths in grok.moe are the fallback.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

F32 = jnp.float32


def _pow2_divisor(n: int, cap: int) -> int:
    """The largest power of two <= cap that divides n."""
    size = 1
    while size * 2 <= cap and n % (size * 2) == 0:
        size *= 2
    return size


def tiles(rows: int, cols: int, blocks: int, bn: int = 128, bk: int = 256) -> tuple[int, int]:
    """(bn, bk) for a weight [rows, cols] with `blocks` scale row blocks."""
    return _pow2_divisor(cols, bn), _pow2_divisor(rows // blocks, bk)


def kernel_applies(rows: int, cols: int, blocks: int, bm: int, interpret: bool = False,
                   bn: int = 128, bk: int = 256) -> bool:
    """Whether the kernel handles this shape. Triton needs power-of-two tiles of at least 16 (its
    dot's minimum); the interpreter takes any tile that divides the weight."""
    if rows % blocks:
        return False
    tn, tk = tiles(rows, cols, blocks, bn, bk)
    if interpret:
        return True
    return tn >= 16 and tk >= 16 and bm >= 16 and bm & (bm - 1) == 0


def _kernel(expert_ref, rows_ref, x_ref, w_ref, s_ref, o_ref, *, bk, bn, rows_per_block,
            num_k, interpret):
    g = pl.program_id(0)
    n0 = pl.multiple_of(pl.program_id(1) * bn, bn)
    e = expert_ref[g]

    @pl.when(rows_ref[g] == 0)
    def _():
        o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)

    @pl.when(rows_ref[g] > 0)
    def _():
        def body(i, acc):
            k0 = pl.multiple_of(i * bk, bk)
            x = x_ref[g, :, pl.ds(k0, bk)]                        # [bm, bk] bf16
            w = w_ref[e, pl.ds(k0, bk), pl.ds(n0, bn)]            # [bk, bn] int8, in place
            s = s_ref[e, k0 // rows_per_block, pl.ds(n0, bn)]     # [bn] scales of this row block
            if interpret:   # CPU XLA lacks bf16 x bf16 -> f32 dots: widen (exact)
                part = jnp.dot(x.astype(F32), w.astype(F32), preferred_element_type=F32)
            else:
                part = jnp.dot(x, w.astype(x.dtype), preferred_element_type=F32)
            return acc + part * s.astype(F32)[None, :]

        acc = jax.lax.fori_loop(0, num_k, body, jnp.zeros((x_ref.shape[1], bn), F32))
        o_ref[...] = acc.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("bn", "bk", "interpret", "num_warps", "num_stages",
                                             "out_dtype"))
def block_matmul(x: jax.Array, block_expert: jax.Array, block_rows: jax.Array, weight: jax.Array,
                 scales: jax.Array, *, bn: int = 128, bk: int = 256, interpret: bool = False,
                 num_warps: int = 4, num_stages: int = 3, out_dtype=F32) -> jax.Array:
    """x [G, bm, In] (bfloat16), block_expert [G] int32, block_rows [G] int32 (0: skip the block),
    weight int8 [E, In, Out], scales [E, S, Out] -> [G, bm, Out] (float32 by default)."""
    groups, bm, rows = x.shape
    _, _, cols = weight.shape
    blocks = scales.shape[-2]
    bn, bk = tiles(rows, cols, blocks, bn, bk)
    kernel = functools.partial(_kernel, bk=bk, bn=bn, rows_per_block=rows // blocks,
                               num_k=rows // bk, interpret=interpret)
    params = {}
    if not interpret and jax.default_backend() == "gpu":
        from jax.experimental.pallas import triton as pltriton
        params["compiler_params"] = pltriton.CompilerParams(num_warps=num_warps,
                                                            num_stages=num_stages)
    whole = pl.no_block_spec   # the whole array: the kernel indexes it (by expert id) itself
    return pl.pallas_call(
        kernel,
        grid=(groups, cols // bn),
        in_specs=[whole, whole, whole, whole, whole],
        out_specs=pl.BlockSpec((None, bm, bn), lambda g, n: (g, 0, n)),
        out_shape=jax.ShapeDtypeStruct((groups, bm, cols), out_dtype),
        interpret=interpret,
        name="grok_moe_block_matmul",
        **params,
    )(block_expert.astype(jnp.int32), block_rows.astype(jnp.int32), x, weight, scales)
