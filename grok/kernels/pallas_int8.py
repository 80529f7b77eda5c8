"""Grouped int8 matmul over expert-sorted row blocks, reading each block's expert weights in place.

The MoE groups its (token, chosen expert) rows into G blocks of `bm` rows; every row of block g is
routed to expert `block_expert[g]`. `block_matmul` multiplies each block by that expert's int8
weight [In, Out] with per-row-block scales, without copying or dequantising the weight in memory:
the expert id is read inside the kernel and used as an offset into the stacked [E, In, Out] weight,
tiles of int8 are converted in registers, and blocks with no rows (`block_rows[g] == 0`) read
nothing. Decoding at batch 1 with top-2 routing therefore reads exactly two experts.

Grid: (splits, G, Out / bn). Each program accumulates x[g] [bm, In] @ w[e, :, n*bn:(n+1)*bn] in
float32 over its 1/splits of In in steps of `bk`. Steps within one scale row block add plain dot
products (Triton folds the add into the tensor-core accumulator) and their sum is scaled once per
block; the splits' partial sums are added after the kernel. Splitting In keeps the chip busy when
few blocks meet a narrow output (decoding through w2: 2 blocks x 6144 / 128 = 96 programs for 132
multiprocessors); `splits_for` picks it from the program count.

`gated_block_matmul` runs the MoE's first two matmuls as one kernel: each program reads its x tile
once for w1 and wv, keeps both products in registers and writes gelu(x w1) * (x wv) in bfloat16
(one launch and no float32 [G, bm, F] pair written and read back: 400 MB a layer in a prefill).
`multi_block_matmul` runs several weights that share x side by side in one launch (each output
column tile belongs to one weight): the attention's query, key and value projections at decode.

On GPU the kernel lowers through Pallas' Triton backend; `interpret=True` evaluates it with the
Pallas interpreter on any backend (slow: tests only). XLA paths in grok.model.moe are the fallback.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
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


def fit_shared(bm: int, bn: int, bk: int, num_stages: int, x_bytes: int = 2,
               weights: int = 1) -> int:
    """bk halved until the pipeline's stages (an x tile and `weights` int8 w tiles each) fit in
    SHARED_BYTES (prefill blocks of 128 rows at bk=256 would need 288 KB)."""
    while num_stages * (bm * bk * x_bytes + weights * bk * bn) > SHARED_BYTES and bk > 16:
        bk //= 2
    return bk


def pipeline_defaults(bm: int, accumulators: int = 1) -> tuple[int, int]:
    """(num_stages, num_warps) for blocks of `bm` rows, from a sweep on an H100: decoding blocks
    (bm <= 32) stream the weight 4 stages deep; 128-row prefill blocks took 8 warps. The gated
    kernel's two accumulators count double: 8 warps keep them at 64 registers a thread."""
    return (4 if bm <= 32 else 3), (8 if bm * accumulators >= 128 else 4)


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


def chunking(num_k: int, steps_per_block: int) -> tuple[int, int]:
    """(chunks, steps per chunk) of a program's `num_k` In steps: a chunk lies within one scale
    row block, so its steps accumulate pure dots (Triton folds each add into the MMA accumulator)
    and the chunk's sum is scaled once. One scale block (w1, wv, q, k, v): one chunk."""
    steps = math.gcd(num_k, steps_per_block)
    return num_k // steps, steps


def _accumulate(x_ref, pairs, g, e, split, n0, *, bk, bn, num_k, steps_per_block, interpret,
                swap_ab):
    """This program's sums over its In steps of x[g] @ w[e][:, n0:n0+bn], one float32 [bm, bn]
    ([bn, bm] with swap_ab) per (weight, scales) pair; the pairs share their scale row blocks."""
    chunks, chunk_steps = chunking(num_k, steps_per_block)
    acc_shape = (bn, x_ref.shape[1]) if swap_ab else (x_ref.shape[1], bn)
    zeros = lambda: tuple(jnp.zeros(acc_shape, F32) for _ in pairs)

    def chunk(c, accs):
        first = split * num_k + c * chunk_steps          # this chunk's first In step

        def step(i, parts):
            k0 = pl.multiple_of((first + i) * bk, bk)
            x = x_ref[g, :, pl.ds(k0, bk)]                      # [bm, bk] bf16
            if interpret:   # CPU XLA lacks bf16 x bf16 -> f32 dots: widen (exact)
                x = x.astype(F32)
            out = []
            for part, (w_ref, _) in zip(parts, pairs):
                w = w_ref[e, pl.ds(k0, bk), pl.ds(n0, bn)].astype(x.dtype)   # int8, in place
                if swap_ab:
                    out.append(part + jnp.dot(w.T, x.T, preferred_element_type=F32))
                else:
                    out.append(part + jnp.dot(x, w, preferred_element_type=F32))
            return tuple(out)

        parts = jax.lax.fori_loop(0, chunk_steps, step, zeros())
        block = first // steps_per_block
        scales = [s_ref[e, block, pl.ds(n0, bn)].astype(F32) for _, s_ref in pairs]
        return tuple(acc + part * (s[:, None] if swap_ab else s[None, :])
                     for acc, part, s in zip(accs, parts, scales))

    return chunk(0, zeros()) if chunks == 1 else jax.lax.fori_loop(0, chunks, chunk, zeros())


def _kernel(expert_ref, rows_ref, x_ref, *refs, gated, tile_starts, steps_per_block, swap_ab,
            **kw):
    """refs: (weight, scales) per weight, then the output. Gated (two weights): gelu(x w1) *
    (x wv) in x's dtype. Otherwise the weights' products side by side: output column tile n
    belongs to the weight whose tiles [tile_starts[i], tile_starts[i + 1]) hold it."""
    o_ref, pairs = refs[-1], list(zip(refs[:-1:2], refs[1:-1:2]))
    split, g, n = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    e = expert_ref[g]
    bn = kw["bn"]

    def store(out):
        o_ref[...] = (out.T if swap_ab else out).astype(o_ref.dtype)

    @pl.when(rows_ref[g] == 0)
    def _():
        o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)

    @pl.when(rows_ref[g] > 0)
    def _():
        if gated:
            a, b = _accumulate(x_ref, pairs, g, e, split, pl.multiple_of(n * bn, bn),
                               steps_per_block=steps_per_block[0], swap_ab=swap_ab, **kw)
            store(jax.nn.gelu(a) * b)
            return
        for i, pair in enumerate(pairs):
            lo, hi = tile_starts[i], tile_starts[i + 1]

            def one(pair=pair, lo=lo, i=i):
                n0 = pl.multiple_of((n - lo) * bn, bn)
                store(_accumulate(x_ref, [pair], g, e, split, n0, swap_ab=swap_ab,
                                  steps_per_block=steps_per_block[i], **kw)[0])
            if len(pairs) == 1:
                one()
            else:
                pl.when((n >= lo) & (n < hi))(one)


def _launch(x, block_expert, block_rows, pairs, *, gated, bn, bk, splits, interpret, num_warps,
            num_stages, swap_ab):
    groups, bm, rows = x.shape
    default_stages, default_warps = pipeline_defaults(bm, 2 if gated else 1)
    num_stages, num_warps = num_stages or default_stages, num_warps or default_warps
    for w, s in pairs:
        if w.shape[-2] != rows or w.shape[:-2] != pairs[0][0].shape[:-2] or \
                (gated and (w.shape, s.shape) != (pairs[0][0].shape, pairs[0][1].shape)):
            raise ValueError(f"weight {w.shape} (scales {s.shape}) does not fit x {x.shape} "
                             f"beside weight {pairs[0][0].shape}")
    # Powers of two: the smallest tile fitting any weight divides every weight's tiles.
    fits = [tiles(rows, w.shape[-1], s.shape[-2], bn, bk) for w, s in pairs]
    bn, bk = min(f[0] for f in fits), min(f[1] for f in fits)
    if not interpret:
        bk = fit_shared(bm, bn, bk, num_stages, x.dtype.itemsize, len(pairs) if gated else 1)
    col_tiles = [w.shape[-1] // bn for w, _ in pairs]
    tile_starts = tuple(int(t) for t in np.cumsum([0] + col_tiles))
    total_tiles = col_tiles[0] if gated else tile_starts[-1]
    if splits is None:
        splits = 1 if gated else splits_for(groups, rows, total_tiles * bn, bn, bk)
    if gated and splits != 1:
        raise ValueError(f"the gated product needs whole sums (splits=1), got splits={splits}")
    if (rows // bk) % splits:
        raise ValueError(f"splits={splits} must divide the {rows // bk} steps of {bk} rows")
    kernel = functools.partial(
        _kernel, gated=gated, tile_starts=tile_starts, swap_ab=swap_ab, bk=bk, bn=bn,
        steps_per_block=tuple(rows // s.shape[-2] // bk for _, s in pairs),
        num_k=rows // bk // splits, interpret=interpret)
    params = {}
    if not interpret:   # name Triton: without it JAX picks its Mosaic GPU backend
        from jax.experimental.pallas import triton as pltriton
        params["compiler_params"] = pltriton.CompilerParams(num_warps=num_warps,
                                                            num_stages=num_stages)
    whole = pl.no_block_spec   # the whole array: the kernel indexes it (by expert id) itself
    out_dtype = x.dtype if gated else F32
    operands = [a for pair in pairs for a in pair]
    parts = pl.pallas_call(
        kernel,
        grid=(splits, groups, total_tiles),
        in_specs=[whole] * (3 + len(operands)),
        out_specs=pl.BlockSpec((None, None, bm, bn), lambda s, g, n: (s, g, 0, n)),
        out_shape=jax.ShapeDtypeStruct((splits, groups, bm, total_tiles * bn), out_dtype),
        interpret=interpret,
        name="grok_moe_gated_matmul" if gated else "grok_moe_block_matmul",
        **params,
    )(block_expert.astype(jnp.int32), block_rows.astype(jnp.int32), x, *operands)
    return parts[0] if splits == 1 else parts.sum(axis=0)


_STATIC = ("bn", "bk", "splits", "interpret", "num_warps", "num_stages")


@functools.partial(jax.jit, static_argnames=_STATIC)
def block_matmul(x: jax.Array, block_expert: jax.Array, block_rows: jax.Array, weight: jax.Array,
                 scales: jax.Array, *, bn: int = 128, bk: int = 128, splits: int | None = None,
                 interpret: bool = False, num_warps: int | None = None,
                 num_stages: int | None = None) -> jax.Array:
    """x [G, bm, In] (bfloat16), block_expert [G] int32, block_rows [G] int32 (0: skip the block),
    weight int8 [E, In, Out], scales [E, S, Out] -> float32 [G, bm, Out]. `splits` parts of In
    run as separate programs (default: `splits_for`). The default tiles, pipeline depth and warps
    (`pipeline_defaults`) are the best of a sweep on an H100 (BENCHMARKS.md)."""
    return _launch(x, block_expert, block_rows, [(weight, scales)], gated=False, bn=bn, bk=bk,
                   splits=splits, interpret=interpret, num_warps=num_warps,
                   num_stages=num_stages, swap_ab=False)


@functools.partial(jax.jit, static_argnames=_STATIC)
def multi_block_matmul(x: jax.Array, block_expert: jax.Array, block_rows: jax.Array,
                       weights: tuple[tuple[jax.Array, jax.Array], ...], *, bn: int = 128,
                       bk: int = 128, splits: int | None = None, interpret: bool = False,
                       num_warps: int | None = None, num_stages: int | None = None
                       ) -> list[jax.Array]:
    """Several weights that share x and In, in one launch: (weight [E, In, Out_i], scales
    [E, S_i, Out_i]) pairs -> float32 [G, bm, Out_i] each, as `block_matmul` gives them (the
    attention's query, key and value projections while decoding: one launch, not three)."""
    out = _launch(x, block_expert, block_rows, list(weights), gated=False, bn=bn, bk=bk,
                  splits=splits, interpret=interpret, num_warps=num_warps,
                  num_stages=num_stages, swap_ab=False)
    ends = np.cumsum([w.shape[-1] for w, _ in weights])
    return [out[..., end - w.shape[-1]:end] for end, (w, _) in zip(ends, weights)]


@functools.partial(jax.jit, static_argnames=_STATIC)
def gated_block_matmul(x: jax.Array, block_expert: jax.Array, block_rows: jax.Array,
                       w1: jax.Array, s1: jax.Array, wv: jax.Array, sv: jax.Array, *,
                       bn: int = 128, bk: int = 128, splits: int | None = None,
                       interpret: bool = False, num_warps: int | None = None,
                       num_stages: int | None = None) -> jax.Array:
    """The MoE's hidden layer in one kernel: gelu(x w1) * (x wv) [G, bm, F] in x's dtype, each
    program reading its x tile once for both weights (int8 [E, D, F], scales [E, S, F]) and never
    writing the two float32 products. Arguments as in `block_matmul` (splits must be 1)."""
    return _launch(x, block_expert, block_rows, [(w1, s1), (wv, sv)], gated=True, bn=bn, bk=bk,
                   splits=splits, interpret=interpret, num_warps=num_warps,
                   num_stages=num_stages, swap_ab=False)


@functools.partial(jax.jit, static_argnames=("gated", "swap_ab", *_STATIC))
def sweep_launch(x: jax.Array, block_expert: jax.Array, block_rows: jax.Array,
                 pairs: tuple[tuple[jax.Array, jax.Array], ...], *, gated: bool,
                 swap_ab: bool = False, bn: int = 128, bk: int = 128, splits: int | None = None,
                 interpret: bool = False, num_warps: int | None = None,
                 num_stages: int | None = None) -> jax.Array:
    """For tile sweeps (benchmarks/moe_layer.py) and their tests: the kernel with every knob,
    including `swap_ab` (the transposed product, int8 tile first), which the library never uses.
    One pair is `block_matmul`; two with `gated` are `gated_block_matmul`."""
    return _launch(x, block_expert, block_rows, list(pairs), gated=gated, bn=bn, bk=bk,
                   splits=splits, interpret=interpret, num_warps=num_warps,
                   num_stages=num_stages, swap_ab=swap_ab)
