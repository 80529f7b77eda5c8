"""Sampling draws from the right distribution (chi-square over many seeded draws)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grok.sampling import SamplingParams, filter_logits, row_keys, sample

LOGITS = np.log(np.array([0.30, 0.25, 0.15, 0.12, 0.08, 0.05, 0.03, 0.02]))
DRAWS = 4000
# chi-square critical value at p = 0.001 for 1..7 degrees of freedom
CRITICAL = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}


def _draw(temperature=1.0, top_p=1.0, top_k=0, seed=0):
    n = DRAWS
    logits = jnp.broadcast_to(jnp.asarray(LOGITS, jnp.float32), (n, len(LOGITS)))
    keys = row_keys(jnp.full((n,), seed, jnp.uint32), jnp.arange(n, dtype=jnp.int32))
    full = lambda v, dt: jnp.full((n,), v, dt)
    tokens = jax.jit(sample)(logits, keys, full(temperature, jnp.float32),
                             full(top_p, jnp.float32), full(top_k, jnp.int32))
    return np.bincount(np.asarray(tokens), minlength=len(LOGITS))


def _expected(temperature=1.0, keep=None):
    p = np.exp(LOGITS / temperature)
    if keep is not None:
        p[keep:] = 0
    return p / p.sum()


def _chi2_ok(counts, probs):
    support = probs > 0
    assert counts[~support].sum() == 0, f"drew excluded tokens: {counts}"
    expected = probs[support] * counts.sum()
    stat = ((counts[support] - expected) ** 2 / expected).sum()
    dof = int(support.sum()) - 1
    return dof == 0 or stat < CRITICAL[dof]


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_temperature_scales_the_distribution(temperature):
    assert _chi2_ok(_draw(temperature=temperature), _expected(temperature))


def test_top_k_keeps_the_k_likeliest():
    assert _chi2_ok(_draw(top_k=3), _expected(keep=3))


def test_top_p_keeps_the_smallest_set_reaching_p():
    # cumulative: .30 .55 .70 .82 ...: top_p=0.6 keeps the first three tokens
    assert _chi2_ok(_draw(top_p=0.6), _expected(keep=3))
    assert _chi2_ok(_draw(top_p=0.2), _expected(keep=1))


def test_top_k_and_top_p_together_take_the_smaller_set():
    assert _chi2_ok(_draw(top_k=2, top_p=0.9), _expected(keep=2))


def test_the_chi_square_check_can_fail():
    assert not _chi2_ok(_draw(temperature=1.0), _expected(temperature=0.5))


def test_greedy_rows_ignore_the_key_and_mixed_rows_keep_their_settings():
    logits = jnp.asarray(np.stack([LOGITS, LOGITS[::-1]]), jnp.float32)
    keys = row_keys(jnp.array([1, 2], jnp.uint32), jnp.array([0, 0], jnp.int32))
    tokens = jax.jit(sample)(logits, keys, jnp.array([0.0, 0.0]), jnp.array([1.0, 1.0]),
                             jnp.array([0, 0], jnp.int32))
    assert tokens.tolist() == [0, 7]
    filtered = filter_logits(logits, jnp.array([1.0, 1.0]), jnp.array([1.0, 0.2]),
                             jnp.array([2, 0], jnp.int32))
    assert np.isfinite(np.asarray(filtered)).sum(axis=1).tolist() == [2, 1]


def test_seeds_differ_and_repeat():
    assert (_draw(seed=3) == _draw(seed=3)).all()
    assert (_draw(seed=3) != _draw(seed=4)).any()


@pytest.mark.parametrize("kwargs", [dict(temperature=-1), dict(temperature=float("inf")),
                                    dict(top_p=0), dict(top_p=1.01), dict(top_k=-2),
                                    dict(top_k=1.5)])
def test_invalid_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)
