"""The float64 oracle (tests/oracle.py) against the parity fixtures' float64 truth, plus its own
invariants (padding, batching, RoPE)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:   # no conftest/pyproject puts the repo root on the path for us
    sys.path.insert(0, str(_ROOT))

from grok.config import GrokConfig
from grok.leaves import random_flat
from tests.oracle import (greedy_gaps, oracle_forward, oracle_greedy, oracle_logits, rope,
                          weights64)
from tests.precision import F32_EPS, F64_EPS, f64_route_bound, record

SHARED = Path(__file__).resolve().parents[2] / "shared"
FIXTURES = SHARED / "fixtures"
FIXTURE_NAMES = ("grok-tiny-dense", "grok-tiny-top2")
PROMPTS = range(6)

# truth_i is stored as float32: each logit within F32_EPS of its own magnitude; float64 order
# differences are ~1e-6 of that. Measured <= 0.76 F32_EPS (elementwise, relative to row max).
TRUTH_RTOL = 2 * F32_EPS

_cache: dict[str, tuple] = {}


def load_fixture(name: str):
    """(float64 weights, config, expected.npz contents) of one fixture, read once per session."""
    directory = FIXTURES / name
    if not (directory / "ckpt-0").is_dir() or not (directory / "expected.npz").is_file():
        pytest.skip(f"parity fixture {directory} is absent (needs the shared/ checkout)")
    if name not in _cache:
        from grok.checkpoint import read_checkpoint
        config = GrokConfig.from_json(directory / "config.json")
        flat = read_checkpoint(directory, config, progress=False)
        with np.load(directory / "expected.npz") as npz:
            expected = {key: npz[key] for key in npz.files}
        _cache[name] = (weights64(flat), config, expected)
    return _cache[name]


def row_rel_err(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """Relative L2 error of each logits row [T, V] -> [T]."""
    return np.linalg.norm(got - want, axis=-1) / np.linalg.norm(want, axis=-1)


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_logits_match_truth(name):
    w, config, expected = load_fixture(name)
    worst = worst_el = 0.0
    for i in PROMPTS:
        prompt = expected[f"prompt_{i}"]
        truth = expected[f"truth_{i}"].astype(np.float64)
        logits = oracle_logits(w, config, prompt[None])
        assert logits.dtype == np.float64
        assert logits.shape == (1, len(prompt), config.vocab_size)
        rel = row_rel_err(logits[0], truth)
        worst = max(worst, float(rel.max()))
        assert rel.max() < TRUTH_RTOL, f"{name} prompt {i}: row relative error {rel.max():.3g}"
        # elementwise too, against each row's scale
        scale = np.abs(truth).max(axis=-1, keepdims=True)
        elementwise = float(np.max(np.abs(logits[0] - truth) / scale))
        worst_el = max(worst_el, elementwise)
        assert elementwise < TRUTH_RTOL, f"{name} prompt {i}: |error| / row max {elementwise:.3g}"
    record(f"oracle {name} vs truth (row)", worst / TRUTH_RTOL)
    record(f"oracle {name} vs truth (elementwise)", worst_el / TRUTH_RTOL)


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_greedy_matches_truth(name):
    w, config, expected = load_fixture(name)
    for i in PROMPTS:
        prompt = expected[f"prompt_{i}"]
        want = [int(t) for t in expected[f"tgreedy_{i}"]]
        tokens, gaps = greedy_gaps(w, config, prompt, len(want))
        assert tokens == want, f"{name} prompt {i}"
        # both float64: a gap is two logits, each within f64_route_bound of the other program's
        bound = 2 * f64_route_bound(config, np.abs(expected[f"truth_{i}"]).max())
        err = np.abs(np.asarray(gaps) - expected[f"tgaps_{i}"]).max()
        assert record(f"oracle {name} greedy gaps vs truth", err / bound) <= 1, (err, bound)
    # oracle_greedy is the same loop without the gaps
    assert oracle_greedy(w, config, expected["prompt_3"], 4) == \
        [int(t) for t in expected["tgreedy_3"][:4]]


def test_planted_bug_missing_logit_cap_is_caught():
    """TRUTH_RTOL fails an oracle whose attention scores skip the 30 tanh(a / 30) cap (scores
    of a few units: a relative change ~(a / 30)^2 / 3, far above float32 rounding)."""
    w, config, expected = load_fixture("grok-tiny-dense")
    truth = expected["truth_0"].astype(np.float64)
    uncapped = oracle_logits(w, config.replace(attn_logit_cap=1e12), expected["prompt_0"][None])
    rel = row_rel_err(uncapped[0], truth)
    assert record("oracle planted bug: no logit cap", rel.max() / TRUTH_RTOL) > 1


def _padding_and_batch_checks(w, config, prompt_a, prompt_b):
    pad = config.pad_token
    # right padding leaves the real positions alone
    alone_a = oracle_logits(w, config, prompt_a[None])[0]
    # masked weights are exactly 0: only float64 sums of other lengths (and orders) differ
    tol = f64_route_bound(config, np.abs(alone_a).max())
    padded = np.concatenate([prompt_a, np.full(5, pad, dtype=prompt_a.dtype)])
    got = oracle_logits(w, config, padded[None])[0]
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got[:len(prompt_a)], alone_a, rtol=0, atol=tol)

    # a batch of two prompts (the shorter right-padded) gives each prompt's rows
    alone_b = oracle_logits(w, config, prompt_b[None])[0]
    tol = max(tol, f64_route_bound(config, np.abs(alone_b).max()))
    t = max(len(prompt_a), len(prompt_b))
    batch = np.full((2, t), pad, dtype=np.int64)
    batch[0, :len(prompt_a)] = prompt_a
    batch[1, :len(prompt_b)] = prompt_b
    both = oracle_logits(w, config, batch)
    np.testing.assert_allclose(both[0, :len(prompt_a)], alone_a, rtol=0, atol=tol)
    np.testing.assert_allclose(both[1, :len(prompt_b)], alone_b, rtol=0, atol=tol)


def test_padding_and_batch_on_fixture():
    w, config, expected = load_fixture("grok-tiny-top2")
    prompt_a, prompt_b = expected["prompt_0"], expected["prompt_2"]   # lengths 5 and 16
    _, routing = oracle_forward(w, config, prompt_a[None])
    assert routing.chosen.shape == (config.num_layers, 1, len(prompt_a), 2)
    _padding_and_batch_checks(w, config, prompt_a, prompt_b)


def test_padding_and_batch_on_random_weights():
    config = GrokConfig(vocab_size=64, emb_size=32, key_size=8, num_q_heads=4, num_kv_heads=2,
                        num_layers=2, widening_factor=2.0, num_experts=4, num_selected_experts=2,
                        sequence_len=32, attn_output_multiplier=8 ** -0.5)
    w = weights64(random_flat(config, seed=1))
    rng = np.random.default_rng(0)
    prompt_a = rng.integers(config.pad_token + 1, config.vocab_size, size=6)
    prompt_b = rng.integers(config.pad_token + 1, config.vocab_size, size=9)
    _padding_and_batch_checks(w, config, prompt_a, prompt_b)


def test_rope_properties():
    rng = np.random.default_rng(0)
    k = 16
    u = rng.standard_normal((1, 4, 2, k))
    # position 0 is the identity; rotation keeps the norm
    np.testing.assert_allclose(rope(u, np.zeros((1, 4))), u, atol=0)
    pos = np.array([[0, 3, 7, 100]])
    # float64: cos and sin within an ulp, two products and a sum per element, a norm: <= 8 u
    np.testing.assert_allclose(np.linalg.norm(rope(u, pos), axis=-1),
                               np.linalg.norm(u, axis=-1), rtol=8 * F64_EPS)
    # q(p) . k(p') depends only on p - p'
    q = rng.standard_normal((1, 1, 1, k))
    kk = rng.standard_normal((1, 1, 1, k))
    dot = lambda p, r: float(np.sum(rope(q, np.array([[p]])) * rope(kk, np.array([[r]]))))
    # angles p * inv_freq round by <= u p: the dot moves by <= 2 u p |q| |k| (+ its own 2K u)
    tol = (2 * 103 + 2 * k) * F64_EPS * np.linalg.norm(q) * np.linalg.norm(kk)
    assert dot(5, 2) == pytest.approx(dot(103, 100), abs=tol, rel=0)
    # half split: pair (j, j + K/2) rotates by theta_j = p * base^(-2j/K)
    p, j = 3.0, 1
    e = np.zeros((1, 1, 1, k))
    e[..., j] = 1.0
    out = rope(e, np.array([[p]]))[0, 0, 0]
    theta = p * 10000.0 ** (-2 * j / k)
    # the same float64 formula: within the power's and the product's last-bit rounding
    assert out[j] == pytest.approx(np.cos(theta), rel=0, abs=4 * F64_EPS)
    assert out[j + k // 2] == pytest.approx(np.sin(theta), rel=0, abs=4 * F64_EPS)
