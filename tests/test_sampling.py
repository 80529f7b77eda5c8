"""Sampling draws from the right distribution (chi-square over many seeded draws)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oracle_sampling import penalized

from grok.serving.sampling import (Penalties, SamplingParams, apply_penalties, filter_logits,
                           read_sampling_defaults, row_keys, sample)

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


# --- penalties ------------------------------------------------------------------------------------
def _penalties_for(rows, vocab, width=16):
    """Penalties inputs for rows given as (prompt ids, output ids, r, p, f)."""
    ids = np.full((len(rows), width), vocab, np.int32)    # pad id V: dropped
    counts = np.zeros((len(rows), width), np.int32)
    for i, (prompt, output, *_) in enumerate(rows):
        seen = dict.fromkeys(prompt, 0)
        for t in output:
            seen[t] = seen.get(t, 0) + 1
        ids[i, :len(seen)], counts[i, :len(seen)] = list(seen), list(seen.values())
    factors = np.array([row[2:] for row in rows], np.float32).T
    return Penalties(jnp.asarray(ids), jnp.asarray(counts), *map(jnp.asarray, factors))


def test_penalties_equal_the_numpy_reference():
    rng = np.random.default_rng(0)
    vocab = 50
    logits = rng.normal(0, 3, (4, vocab)).astype(np.float32)   # both signs: r divides or multiplies
    rows = [([1, 2, 3], [3, 3, 7], 1.3, 0.5, 0.25),
            ([4], [], 0.7, -0.4, 1.5),                          # r < 1 and a negative presence
            ([], [9, 9, 9, 9, 2], 1.0, 0.0, -2.0),
            ([5, 6], [6, 8], 1.0, 0.0, 0.0)]                     # all off: logits unchanged
    got = np.asarray(apply_penalties(jnp.asarray(logits), _penalties_for(rows, vocab)))
    for row, (prompt, output, r, p, f) in enumerate(rows):
        want = penalized(logits[row], prompt, output, r, p, f)
        # One float32 division or product and two subtractions of float32 inputs: a few float32
        # roundings of values below ~20, so 1e-5 absolute (~2^-17) is loose yet far below the
        # smallest penalty term (0.25).
        np.testing.assert_allclose(got[row], want, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(got[3], logits[3])


def test_penalties_steer_greedy_rows_and_keep_the_sampler_plain_without_them():
    logits = jnp.asarray([[2.0, 1.9, 0.0, -1.0]])
    keys = row_keys(jnp.array([0], jnp.uint32), jnp.array([0], jnp.int32))
    greedy = (jnp.array([0.0]), jnp.array([1.0]), jnp.array([0], jnp.int32))
    assert int(sample(logits, keys, *greedy)[0]) == 0
    # token 0 seen once in the output: 2.0 - 0.5 < 1.9
    pen = _penalties_for([([], [0], 1.0, 0.5, 0.0)], 4)
    assert int(sample(logits, keys, *greedy, pen)[0]) == 1
    # repetition 1.1 on token 0 (seen in the prompt): 2.0 / 1.1 = 1.82 < 1.9
    assert int(sample(logits, keys, *greedy, _penalties_for([([0], [], 1.1, 0, 0)], 4))[0]) == 1


@pytest.mark.parametrize("kwargs", [dict(repetition_penalty=0), dict(repetition_penalty=-1),
                                    dict(repetition_penalty=float("nan")),
                                    dict(presence_penalty=2.5), dict(frequency_penalty=-3),
                                    dict(frequency_penalty=float("inf")),
                                    dict(presence_penalty=True)])
def test_invalid_penalties_are_refused(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SamplingParams(**kwargs)


def test_sampling_json_gives_a_models_defaults(tmp_path):
    assert read_sampling_defaults(tmp_path) == SamplingParams()
    (tmp_path / "sampling.json").write_text('{"temperature": 0.5, "repetition_penalty": 1.2}')
    assert read_sampling_defaults(tmp_path) == SamplingParams(temperature=0.5,
                                                              repetition_penalty=1.2)
    for bad, words in [('{"temprature": 1}', "temprature"), ('[1]', "expected an object"),
                       ('{"top_p": 7}', "top_p"), ('{"top_p": ', "not valid JSON")]:
        (tmp_path / "sampling.json").write_text(bad)
        with pytest.raises(ValueError, match=words) as err:
            read_sampling_defaults(tmp_path)
        assert "sampling.json" in str(err.value)
