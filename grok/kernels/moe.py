"""Grouped int8 matmul over expert-sorted row blocks, reading each block's expert weights in place.

The MoE groups its (token, chosen expert) rows into G blocks of `bm` rows; every row of block g is
routed to expert `block_expert[g]`. `block_matmul` multiplies each block by that expert's int8
weight [In, Out] with per-row-block scales, without copying or dequantising the weight in memory:
the expert id is read inside the kernel and used as an offset into the stacked [E, In, Out] weight,
tiles of int8 are converted in registers, and blocks with no rows (`block_rows[g] == 0`) read
nothing. Decoding at batch 1 with top-2 routing therefore reads exactly two experts.

Grid: (splits, G, Out / bn). Each program accumulates x[g] [bm, In] @ w[e, :, n*bn:(n+1)*bn] in
float32 over its 1/splits of In in steps of `bk` (bk divides the scale row block, so each step has
one row of scales); the splits' partial sums are added after the kernel. Splitting In keeps the
chip busy when few blocks meet a narrow output (decoding through w2: 2 blocks x 6144 / 128 = 96
programs for 132 multiprocessors); `splits_for` picks it from the program count.

On GPU the kernel lowers through Pallas' Triton backend; `interpret=True` evaluates it with the
Pallas interpreter on any backend (slow: tests only). XLA paths in grok.moe are the fallback.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

F32 = jnp.float32
SHARED_BYTES = 160 * 1024   # of the 227 KB a Hopper block may use, leaving Triton its scratch


def _pow2_divisor(n: int, cap: int) -> int:
    """The largest power of two <= cap that divides n."""
    size = 1
    while size * 2 <= cap and n % (size * 2) == 0:
        size *= 2
    return size


def tiles(rows: int, cols: int, blocks: int, bn: int = 128, bk: int = 256) -> tuple[int, int]:
    """(bn, bk) for a weight [rows, cols] with `blocks` scale row blocks."""
    return _pow2_divisor(cols, bn), _pow2_divisor(rows // blocks, bk)


def fit_shared(bm: int, bn: int, bk: int, num_stages: int, x_bytes: int = 2) -> int:
    """bk halved until the pipeline's stages (an x tile and an int8 w tile each) fit in
    SHARED_BYTES (prefill blocks of 128 rows at bk=256 would need 288 KB)."""
    while num_stages * (bm * bk * x_bytes + bk * bn) > SHARED_BYTES and bk > 16:
        bk //= 2
    return bk


def pipeline_defaults(bm: int) -> tuple[int, int]:
    """(num_stages, num_warps) for blocks of `bm` rows, from a sweep on an H100: decoding blocks
    (bm <= 32) stream the weight 4 stages deep; 128-row prefill blocks take 8 warps."""
    return (4 if bm <= 32 else 3), (8 if bm >= 128 else 4)


def splits_for(groups: int, rows: int, cols: int, bn: int, bk: int,
               min_programs: int = 264, max_splits: int = 8) -> int:
    """Split In into the fewest parts (a power of two dividing the In steps) that give at least
    `min_programs` programs (two per multiprocessor of an H100)."""
    splits = 1
    while (groups * (cols // bn) * splits < min_programs and splits < max_splits
           and (rows // bk) % (splits * 2) == 0):
        splits *= 2
    return splits


def kernel_applies(rows: int, cols: int, blocks: int, bm: int, interpret: bool = False,
                   bn: int = 128, bk: int = 256, weight_bytes: int = 0) -> bool:
    """Whether the kernel handles this shape. Triton needs power-of-two tiles of at least 16 (its
    dot's minimum); the interpreter takes any tile that divides the weight. JAX's Triton lowering
    indexes an array of at most 2**32 bytes with 32-bit offsets, which go negative past 2**31:
    a stacked weight of that size is left to XLA."""
    if rows % blocks or 2**31 <= weight_bytes <= 2**32:
        return False
    tn, tk = tiles(rows, cols, blocks, bn, bk)
    if interpret:
        return True
    return tn >= 16 and tk >= 16 and bm >= 16 and bm & (bm - 1) == 0


def _kernel(expert_ref, rows_ref, x_ref, w_ref, s_ref, o_ref, *, bk, bn, rows_per_block,
            num_k, interpret):
    split, g = pl.program_id(0), pl.program_id(1)
    n0 = pl.multiple_of(pl.program_id(2) * bn, bn)
    e = expert_ref[g]

    @pl.when(rows_ref[g] == 0)
    def _():
        o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)

    @pl.when(rows_ref[g] > 0)
    def _():
        def body(i, acc):
            k0 = pl.multiple_of((split * num_k + i) * bk, bk)
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


@functools.partial(jax.jit, static_argnames=("bn", "bk", "splits", "interpret", "num_warps",
                                             "num_stages"))
def block_matmul(x: jax.Array, block_expert: jax.Array, block_rows: jax.Array, weight: jax.Array,
                 scales: jax.Array, *, bn: int = 128, bk: int = 128, splits: int | None = None,
                 interpret: bool = False, num_warps: int | None = None,
                 num_stages: int | None = None) -> jax.Array:
    """x [G, bm, In] (bfloat16), block_expert [G] int32, block_rows [G] int32 (0: skip the block),
    weight int8 [E, In, Out], scales [E, S, Out] -> float32 [G, bm, Out]. `splits` parts of In
    run as separate programs (default: `splits_for`). The default tiles, pipeline depth and warps
    (`pipeline_defaults`) are the best of a sweep on an H100 (BENCHMARKS.md)."""
    groups, bm, rows = x.shape
    default_stages, default_warps = pipeline_defaults(bm)
    num_stages, num_warps = num_stages or default_stages, num_warps or default_warps
    _, _, cols = weight.shape
    blocks = scales.shape[-2]
    bn, bk = tiles(rows, cols, blocks, bn, bk)
    if not interpret:
        bk = fit_shared(bm, bn, bk, num_stages, x.dtype.itemsize)
    if splits is None:
        splits = splits_for(groups, rows, cols, bn, bk)
    if (rows // bk) % splits:
        raise ValueError(f"splits={splits} must divide the {rows // bk} steps of {bk} rows")
    kernel = functools.partial(_kernel, bk=bk, bn=bn, rows_per_block=rows // blocks,
                               num_k=rows // bk // splits, interpret=interpret)
    params = {}
    if not interpret:   # name Triton: without it JAX picks its Mosaic GPU backend
        from jax.experimental.pallas import triton as pltriton
        params["compiler_params"] = pltriton.CompilerParams(num_warps=num_warps,
                                                            num_stages=num_stages)
    whole = pl.no_block_spec   # the whole array: the kernel indexes it (by expert id) itself
    parts = pl.pallas_call(
        kernel,
        grid=(splits, groups, cols // bn),
        in_specs=[whole, whole, whole, whole, whole],
        out_specs=pl.BlockSpec((None, None, bm, bn), lambda s, g, n: (s, g, 0, n)),
        out_shape=jax.ShapeDtypeStruct((splits, groups, bm, cols), F32),
        interpret=interpret,
        name="grok_moe_block_matmul",
        **params,
    )(block_expert.astype(jnp.int32), block_rows.astype(jnp.int32), x, weight, scales)
    return parts[0] if splits == 1 else parts.sum(axis=0)
