"""The derived error bounds of tests/precision.py: their premises hold, and they cover what they
claim to (float32 sums in any order, bfloat16 roundings that may flip)."""
from __future__ import annotations

import ml_dtypes
import numpy as np

from conftest import tiny_config
from grok.leaves import random_flat
from precision import (BF16_EPS, F32_EPS, bf16_spread, dot_bound, flat_route_bound, gamma,
                       greedy_gap, near_tie_rows, router_tie, to_bf16, trusted_steps)


def test_unit_roundoffs():
    """bfloat16 keeps 8 significant bits: rounding errs by <= 2^-8 relative, and that is
    reached; float32 keeps 24."""
    x = np.random.default_rng(0).standard_normal(100_000) * 10.0 ** np.arange(-5, 5).repeat(
        10_000)
    rel = np.abs(to_bf16(x.astype(np.float32)) - x.astype(np.float32)) / np.abs(x)
    assert rel.max() <= BF16_EPS and rel.max() > 0.99 * BF16_EPS
    assert ml_dtypes.finfo(ml_dtypes.bfloat16).eps == 2 * BF16_EPS
    assert np.finfo(np.float32).eps == 2 * F32_EPS


def test_float32_sums_in_any_order_stay_within_gamma():
    """The same dot in many orders (pairwise, blocked like vector lanes, split-K): every result
    within gamma_n sum |terms| of the exact one."""
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal(4096), rng.standard_normal(4096)
    exact = float(a @ b)
    bound = float(dot_bound(np.abs(a), np.abs(b), a.size))
    terms = (a.astype(np.float32) * b.astype(np.float32)).astype(np.float32)
    results = [float(np.sum(terms, dtype=np.float32))]
    for lanes in (4, 8, 16, 32):                      # SSE, AVX2, AVX-512 widths, split-K
        results.append(float(terms.reshape(-1, lanes).sum(axis=0, dtype=np.float32).sum(
            dtype=np.float32)))
    acc = np.float32(0)
    for t in terms:                                   # sequential
        acc = np.float32(acc + t)
    results.append(float(acc))
    # the products were rounded too: the exact dot of the float32 inputs moves by <= u sum |a b|
    slack = F32_EPS * float(np.abs(a) @ np.abs(b))
    assert all(abs(r - exact) <= bound + slack for r in results), results
    assert max(abs(r - exact) for r in results) > 0      # the orders did differ


def test_bf16_spread_is_zero_away_from_rounding_points_and_one_step_near_them():
    one = np.float64(1.0)
    step = 2 * BF16_EPS                               # bfloat16's spacing just above 1
    assert bf16_spread(one + 0.25 * step, 1e-6) == 0  # no rounding point within 1e-6
    assert bf16_spread(one + 0.5 * step, 1e-6) == step   # a midpoint: either neighbour
    x = np.random.default_rng(2).standard_normal(10_000)
    err = np.abs(x) * 1e-5
    spread = bf16_spread(x, err)
    # any two float32 values within err of x round at most `spread` apart
    lo, hi = to_bf16((x - err).astype(np.float32)), to_bf16((x + err).astype(np.float32))
    assert (np.abs(hi - lo) <= spread).all() and 0 < (spread > 0).sum() < 100


def test_gamma():
    assert gamma(1) == F32_EPS / (1 - F32_EPS) and gamma(1000) > 1000 * F32_EPS


def test_near_tie_rows_and_trusted_steps():
    margin = np.array([[0.5, 0.001], [0.5, 0.5], [router_tie(2) / 2, 0.5]])[:, :, None]
    assert near_tie_rows(margin)[:, 0].tolist() == [True, True]
    assert trusted_steps([3.0, 2.0, 0.1, 5.0], min_gap=1.0) == 2
    assert trusted_steps([3.0, 2.0], limit=1, min_gap=1.0) == 1


def test_route_bound_covers_the_reported_avx512_difference():
    """The issue's AVX-512 run of tests/test_moe_mesh.py: logits off by up to 5.8e-4; the route
    bound of that model is over 50x more (a dropped psum term, ~30x the bound, is not)."""
    config = tiny_config(emb_size=64, num_experts=8, widening_factor=4.0, scale_blocks=4)
    bound = flat_route_bound(random_flat(config, seed=1, weight_scale=1.5), config)
    assert 5.8e-4 < 0.03 * bound.min()
    assert greedy_gap(bound) == 2 * bound.max()
