"""Log-probabilities: each generated token's (and its top alternatives'), and the prompt's, against
numpy's log-softmax of the full forward's logits; they never change a token, and are refused at
submit when malformed."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from conftest import tiny_config
from precision import F32_EPS, assert_within, gamma, params_route_bound
from grok.api import from_flat
from grok.errors import RequestError
from grok.leaves import random_flat
from grok.serving.engine import Engine, Request
from grok.serving.sampling import MAX_LOGPROBS, SamplingParams, token_logprobs

CONFIG = tiny_config(sequence_len=64)
PROMPTS = [[3, 17, 29, 4, 8, 11, 50, 6, 7][:n] for n in (1, 3, 6, 9)]
SAMPLED = SamplingParams(temperature=1.0)


@pytest.fixture(scope="module")
def model():
    return from_flat(random_flat(CONFIG, seed=7, weight_scale=1.5), CONFIG, max_batch=4)


@pytest.fixture(scope="module")
def bound(model):
    """How far a log-probability of the engine (a cached decode, or a padded, batched full
    forward) may be from numpy's log-softmax of an unpadded full forward. The two evaluations
    differ only where a float32 sum rounds to bfloat16 the other way: logit v moves by at most
    b_v = precision.logits_route_bound. log p_v = z_v - logsumexp(z) then moves by at most
    b_v + max_u b_u (the logsumexp moves by no more than the largest logit does). The engine's
    float32 log-softmax adds a few float32 ulps of the logits' scale (2^-24 relative against the
    bound's 2^-8): no margin is kept for it."""
    b = params_route_bound(model.runner.params, CONFIG)
    return b + b.max()


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _reference(model, sequences) -> list[np.ndarray]:
    """numpy's log-softmax of each sequence's full-forward logits [T, V], in one forward of a
    fixed shape (one compile): the sequences padded at the end (causal: the positions before a
    pad are unchanged), the batch to 4 rows."""
    tokens = np.zeros((4, 32), np.int32)
    for i, seq in enumerate(sequences):
        tokens[i, :len(seq)] = seq
    logits = model.runner.logits(tokens)
    return [_log_softmax(logits[i, :len(seq)]) for i, seq in enumerate(sequences)]


def _run(model, requests):
    engine = Engine(model.runner, batch_size=4, max_len=64)
    ids = [engine.submit(r) for r in requests]
    events = {rid: list(engine.events(rid)) for rid in ids}
    return [engine.results[rid] for rid in ids], [events[rid] for rid in ids]


def _check_generated(model, results, k, bound, what):
    """Each result's logprobs and top_logprobs against a full forward over prompt + tokens."""
    wants = _reference(model, [r.prompt + r.tokens for r in results])
    for result, want, k in zip(results, wants, k):
        _check_one(result, want[len(result.prompt) - 1:], k, bound, what)


def _check_one(result, want, k, bound, what):
    tokens = result.tokens
    assert len(result.logprobs) == len(result.top_logprobs) == len(tokens)
    steps = np.arange(len(tokens))
    assert_within(result.logprobs, want[steps, tokens], bound[tokens], f"{what}: logprobs")
    for i, (token, chosen, top) in enumerate(zip(tokens, result.logprobs, result.top_logprobs)):
        ids = [t for t, _ in top]
        values = np.array([v for _, v in top])
        assert len(top) == k and len(set(ids)) == k
        assert all(type(t) is int for t in ids) and type(chosen) is float
        assert (np.diff(values) <= 0).all(), "top_logprobs not in descending order"
        assert_within(values, want[i, ids], bound[ids], f"{what}: top_logprobs")
        # the k most likely, but for near-ties at the k-th place
        kth = np.sort(want[i])[-k]
        assert (want[i, ids] >= kth - 2 * bound.max()).all()
        if token in ids:        # one device computation: the same float
            assert chosen == values[ids.index(token)]
        else:
            assert chosen <= values[-1]


def test_token_logprobs_are_the_float32_log_softmax_of_the_logits():
    """On given logits the only error is float32 rounding: s = z - max z rounds by u |s|, the sum
    of V exponentials by gamma_V (relative, so absolute in its log), the log and the final
    difference by u each, times |s - lse|; a bfloat16 evaluation would miss by 2^-8 |z|."""
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((3, 1000)) * 30).astype(np.float32)
    tokens = np.array([5, 999, int(np.argmax(logits[2]))], np.int32)
    chosen, values, ids = (np.asarray(a) for a in token_logprobs(logits, tokens))
    want = _log_softmax(logits)
    z = np.abs(logits).max()
    bound = gamma(1000) + 8 * F32_EPS * (2 * z + np.log(1000) + 1)
    assert_within(chosen, want[np.arange(3), tokens], bound, "token_logprobs: chosen")
    assert ids.shape == values.shape == (3, MAX_LOGPROBS)
    assert (ids == np.argsort(-want, axis=-1)[:, :MAX_LOGPROBS]).all()
    assert_within(values, np.take_along_axis(want, ids, axis=-1), bound, "token_logprobs: top")
    assert chosen[2] == values[2, 0]


def test_greedy_logprobs_equal_the_full_forwards_log_softmax(model, bound):
    requests = [Request(p, 8, logprobs=k) for p, k in zip(PROMPTS, (5, 1, MAX_LOGPROBS, 3))]
    results, events = _run(model, requests)
    _check_generated(model, results, [r.logprobs for r in requests], bound, "greedy")
    for request, result, stream in zip(requests, results, events):
        assert len(result.tokens) == 8 or result.tokens[-1] == CONFIG.eos_token
        # greedy: the most likely token is the one taken
        assert [top[0][0] for top in result.top_logprobs] == result.tokens
        assert [top[0][1] for top in result.top_logprobs] == result.logprobs
        # every event, the last included, carries its token's
        assert [e.logprob for e in stream] == result.logprobs
        assert [e.top_logprobs for e in stream] == result.top_logprobs
        assert result.prompt_logprobs == []


def test_sampled_tokens_logprobs_are_those_of_the_raw_logits(model, bound):
    """Temperature, top-k and penalties change what is drawn, not the log-probabilities: those of
    the model's raw logits."""
    sampling = [SAMPLED, SamplingParams(temperature=0.7, top_k=5, presence_penalty=1.0),
                SamplingParams(repetition_penalty=1.8)]
    requests = [Request(PROMPTS[2], 10, s, seed=3, logprobs=2) for s in sampling]
    results, _ = _run(model, requests)
    _check_generated(model, results, [2] * 3, bound, "sampled")
    assert any(t not in [i for i, _ in top] for r in results
               for t, top in zip(r.tokens, r.top_logprobs)), "every sampled token was in the top 2"


def test_prompt_logprobs_equal_the_full_forwards_log_softmax(model, bound):
    requests = [Request(PROMPTS[3], 4, prompt_logprobs=True), Request(PROMPTS[2], 4),
                Request(PROMPTS[0], 4, prompt_logprobs=True),
                Request(PROMPTS[1], 4, prompt_logprobs=True, logprobs=2)]
    engine = Engine(model.runner, batch_size=4, max_len=64)
    ids = [engine.submit(r) for r in requests]
    engine.next_event(ids[0])          # one step: filled before the first event
    results = [engine.results[rid] for rid in ids]
    assert results[1].prompt_logprobs == []
    assert results[2].prompt_logprobs == [None]         # a one-token prompt: nothing to score
    for result, want in zip((results[0], results[3]),
                            _reference(model, [results[0].prompt, results[3].prompt])):
        prompt = result.prompt
        scored = result.prompt_logprobs
        assert len(scored) == len(prompt) and scored[0] is None
        assert all(type(v) is float for v in scored[1:])
        steps = np.arange(len(prompt) - 1)
        targets = np.array(prompt[1:])
        assert_within(scored[1:], want[steps, targets], bound[targets], "prompt logprobs")
    list(engine.run())
    _check_generated(model, results[3:], [2], bound, "with prompt logprobs")


def test_logprobs_change_no_token_and_cost_nothing_when_off(model, monkeypatch):
    requests = [Request(PROMPTS[1], 8), Request(PROMPTS[3], 8, SAMPLED, seed=5),
                Request(PROMPTS[2], 8), Request(PROMPTS[0], 8, SAMPLED, seed=6)]
    runner = model.runner
    calls = []
    for name in ("logprobs", "prompt_logprobs"):
        real = getattr(runner, name)
        monkeypatch.setattr(runner, name,
                            lambda *a, real=real, name=name: calls.append(name) or real(*a))
    plain, _ = _run(model, requests)
    assert calls == [], "log-probabilities computed with no request asking"
    asking = [requests[0]] + [dataclasses.replace(r, logprobs=k, prompt_logprobs=True)
                              for r, k in zip(requests[1:], (MAX_LOGPROBS, 1, 0))]
    scored, _ = _run(model, asking)
    assert set(calls) == {"logprobs", "prompt_logprobs"}
    assert [r.tokens for r in scored] == [r.tokens for r in plain]
    assert scored[0].logprobs == scored[0].top_logprobs == scored[0].prompt_logprobs == []
    assert scored[3].logprobs == [] and len(scored[3].prompt_logprobs) == len(PROMPTS[0])
    assert len(scored[1].top_logprobs[0]) == MAX_LOGPROBS and len(scored[2].top_logprobs[0]) == 1


def test_a_failing_prompt_forward_ends_only_its_request(model, monkeypatch):
    def failing(*args):
        raise RuntimeError("injected prompt forward failure")
    monkeypatch.setattr(model.runner, "prompt_logprobs", failing)
    results, _ = _run(model, [Request(PROMPTS[2], 3, prompt_logprobs=True)]
                      + [Request(PROMPTS[2], 3)] * 3)
    assert results[0].finish_reason == "error" and "injected" in results[0].error
    assert results[0].tokens == [] and results[0].prompt_logprobs == []
    assert all(r.finish_reason == "length" and len(r.tokens) == 3 for r in results[1:])


@pytest.mark.parametrize("change, words", [
    (dict(logprobs=-1), r"logprobs must be an integer in \[0, 20\].*got -1"),
    (dict(logprobs=21), "logprobs must be .* got 21"),
    (dict(logprobs=1.5), r"logprobs must be .* got 1.5 \(float\)"),
    (dict(logprobs=True), "logprobs must be .* got True"),
    (dict(logprobs="3"), "logprobs must be .* got '3'"),
    (dict(prompt_logprobs=1), "prompt_logprobs must be True or False, got 1"),
    (dict(prompt_logprobs="yes"), "prompt_logprobs must be True or False"),
    (dict(prompt_logprobs=None), "prompt_logprobs must be True or False, got None"),
])
def test_bad_logprobs_settings_are_refused_at_submit(model, change, words):
    engine = Engine(model.runner, batch_size=4, max_len=64)
    with pytest.raises(RequestError, match=words):
        engine.submit(dataclasses.replace(Request(PROMPTS[1], 2), **change))
    assert not engine.waiting
    for logprobs, prompt_logprobs, want in ((None, False, (0, False)),
                                            (np.int64(3), np.True_, (3, True))):
        rid = engine.submit(Request(PROMPTS[1], 2, logprobs=logprobs,
                                    prompt_logprobs=prompt_logprobs))
        request = engine.results[rid].request
        assert (request.logprobs, request.prompt_logprobs) == want
        assert type(request.logprobs) is int and type(request.prompt_logprobs) is bool
