"""The engine over its paged KV cache (grok.serving.engine, scheduler, kv_manager): prefix-cache
hits, prompts shared by several requests, preemption when the pool runs out, eviction and
cancellation give the tokens of a cold run, with the pages accounted for after every step."""
from __future__ import annotations

import collections

import numpy as np
import pytest

from conftest import tiny_config
from grok.api import from_flat
from grok.errors import RequestError
from grok.leaves import random_flat
from grok.serving.engine import Engine, Request, Result
from grok.serving.sampling import SamplingParams

CONFIG = tiny_config(num_layers=3, sequence_len=256)
PAGE = 4                                     # small pages: a prompt spans several
# One pool shape for every engine here (each new shape of a device call is a compile, most of
# the time these tests take): 4 slots, 32 pages, which also cap a request's context at 128
# tokens.
POOL = 128
RNG = np.random.default_rng(0)


def _ids(n: int) -> list[int]:
    return RNG.integers(3, CONFIG.vocab_size, n).tolist()   # no pad (0), no eos (2)


PREFIX = _ids(13)                            # 3 full pages and one token
A = PREFIX + [5, 6, 7]                       # 16 tokens: 4 full pages
B = PREFIX + [8, 9]                          # 15: shares A's first 3 pages
C = PREFIX + [10] + _ids(6)                  # 20: shares A's first 3 pages, not its 4th
Z = _ids(11)                                 # shares nothing
SAMPLED = SamplingParams(temperature=1.0)
GREEDY = SamplingParams()


@pytest.fixture(scope="module")
def model():
    return from_flat(random_flat(CONFIG, seed=7, weight_scale=1.5), CONFIG, max_batch=8)


def _engine(model, **kwargs) -> Engine:
    return Engine(model.runner, **{"batch_size": 4, "page_size": PAGE, "kv_cache_tokens": POOL,
                                   **kwargs})


def _check(engine: Engine) -> None:
    """The pool's bookkeeping: the manager's invariants, and each page's reference count equal
    to the number of block tables holding it."""
    kv, seqs = engine.scheduler.kv, engine.scheduler.seqs.values()
    kv.check()
    held = collections.Counter(p for seq in seqs for p in seq.pages)
    assert [kv.refs[p] for p in range(kv.pages)] == [held[p] for p in range(kv.pages)]
    for seq in seqs:
        assert len(set(seq.pages)) == len(seq.pages), f"a page twice in a table: {seq}"
        assert len(seq.pages) >= kv.pages_for(seq.computed)


def _run(engine: Engine, requests: list[Request]) -> list[Result]:
    """Run requests to completion, checking the pool after every step."""
    ids = engine.submit_all(requests)
    while not engine.idle:
        engine.step()
        _check(engine)
    results = [engine.results[i] for i in ids]
    assert all(r.finish_reason in ("length", "eos") for r in results), [
        (r.finish_reason, r.error) for r in results]
    assert engine.kv_stats()["pages_used"] == 0
    return results


@pytest.fixture(scope="module")
def cold(model):
    """A request's result alone on a fresh engine without the prefix cache (memoized)."""
    memo: dict[str, Result] = {}

    def run(request: Request) -> Result:
        key = repr(request)
        if key not in memo:
            engine = _engine(model, prefix_cache=False)
            memo[key], = _run(engine, [request])
            assert memo[key].cached_tokens == 0
            assert engine.kv_stats()["prompt_tokens_cached"] == 0
        return memo[key]
    return run


def _request(prompt, sampling, seed=0, new=10, **kwargs) -> Request:
    return Request(list(prompt), new, sampling, seed=seed, **kwargs)


def _same_as_cold(results: list[Result], cold) -> None:
    for res in results:
        # whole pages only, and never the last prompt token (its logits draw the first token)
        assert res.cached_tokens % PAGE == 0 and res.cached_tokens < len(res.prompt)
        want = cold(res.request)
        assert res.tokens == want.tokens, f"request {res.id} (cached {res.cached_tokens})"
        assert res.finish_reason == want.finish_reason


# --- prefix hits --------------------------------------------------------------------------------

@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_requests_one_after_another_hit_the_cache_with_the_tokens_of_a_cold_run(
        model, cold, sampling):
    engine = _engine(model)
    first, = _run(engine, [_request(A, sampling, seed=1)])
    assert first.cached_tokens == 0 and len(first.tokens) >= 5
    # Everything before a prompt's last token that earlier requests wrote as whole pages
    # (prompts and generated tokens) is found; the last token is always computed.
    followers = [
        (_request(B, sampling, seed=2), 12),          # A's first 3 pages
        (_request(C, sampling, seed=3), 12),          # the same 3: its 4th differs from A's
        (_request(A, sampling, seed=4), 12),          # all 4 pages cached, 3 usable
        (_request(Z, sampling, seed=5), 0),
    ]
    # A's first request wrote its prompt and all but its last generated token: whole pages
    # of those, A's continuation starts with them
    turn = A + first.tokens[:-1] + [11]
    written = len(A) + len(first.tokens) - 1
    followers.append((_request(turn, sampling, seed=6), written // PAGE * PAGE))
    results = [first]
    for request, cached in followers:
        res, = _run(engine, [request])
        assert res.cached_tokens == cached, (request.prompt, res.cached_tokens)
        results.append(res)
    _same_as_cold(results, cold)
    if sampling is SAMPLED:
        assert len({tuple(r.tokens) for r in results}) == len(results), "degenerate samples"
    stats = engine.kv_stats()
    assert stats["prompt_tokens_queried"] == sum(len(r.prompt) for r in results)
    assert stats["prompt_tokens_cached"] == sum(r.cached_tokens for r in results) == \
        36 + written // PAGE * PAGE
    assert stats["hit_rate"] == pytest.approx(stats["prompt_tokens_cached"] /
                                              stats["prompt_tokens_queried"])
    assert stats["evictions"] == stats["preemptions"] == 0
    # resumed prompts ran as chunks after their cached pages; only A and Z from the start
    assert sum(engine.prefill_shapes.values()) == 2
    assert sum(engine.chunk_shapes.values()) == 4


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_requests_arriving_together_wait_a_step_for_the_pages_another_computes(
        model, cold, sampling):
    engine = _engine(model)
    requests = [_request(A, sampling, seed=1), _request(B, sampling, seed=2),
                _request(C, sampling, seed=3), _request(Z, sampling, seed=4)]
    ids = engine.submit_all(requests)
    engine.step()
    _check(engine)
    # A computes the pages B and C start with: they wait for them rather than compute them too
    assert len(engine.results[ids[0]].tokens) == 2 and ids[1] in engine.waiting
    assert not engine.results[ids[1]].tokens and not engine.results[ids[2]].tokens
    while not engine.idle:
        engine.step()
        _check(engine)
    results = [engine.results[i] for i in ids]
    assert [r.cached_tokens for r in results] == [0, 12, 12, 0]
    _same_as_cold(results, cold)
    stats = engine.kv_stats()
    assert stats["prompt_tokens_cached"] == 24
    assert stats["prompt_tokens_queried"] == len(A) + len(B) + len(C) + len(Z)


def test_without_the_prefix_cache_nothing_is_found_and_the_tokens_are_the_same(model, cold):
    engine = _engine(model, prefix_cache=False)
    first = _run(engine, [_request(A, SAMPLED, seed=1), _request(B, SAMPLED, seed=2)])
    later = _run(engine, [_request(A, SAMPLED, seed=3), _request(C, GREEDY)])
    results = first + later
    assert [r.cached_tokens for r in results] == [0] * 4
    _same_as_cold(results, cold)
    stats = engine.kv_stats()
    assert stats["prompt_tokens_cached"] == 0 and stats["hit_rate"] == 0
    assert stats["pages_cached"] == 0 and stats["evictions"] == 0
    assert sum(engine.chunk_shapes.values()) == 0      # every prompt prefilled from its start


def test_without_the_prefix_cache_no_request_waits_for_pages_another_computes(model):
    """Pages are never shared without the cache: a prompt starting as another admitted in the
    same step has nothing to wait for, and is prefilled beside it."""
    engine = _engine(model, prefix_cache=False)
    ids = engine.submit_all([_request(A, GREEDY), _request(B, GREEDY), _request(Z, GREEDY)])
    engine.step()
    _check(engine)
    assert [len(engine.results[i].tokens) for i in ids] == [2, 2, 2] and not engine.waiting
    assert engine.prefill_shapes == {(4, 16): 1}


# --- one prompt, several requests (a server's n) ------------------------------------------------

def test_identical_prompts_share_one_prefill_row(model, cold):
    x, y = A, Z + [4, 5, 6]                  # 16 tokens (whole pages), 14 (a part-filled page)
    requests = [_request(x, SAMPLED, seed=1), _request(y, SAMPLED, seed=2),
                _request(x, SAMPLED, seed=3), _request(y, GREEDY)]
    engine = _engine(model)
    results = _run(engine, requests)
    assert engine.prefill_shapes == {(2, 16): 1}          # two distinct prompts: two rows
    assert not engine.chunk_shapes
    _same_as_cold(results, cold)
    assert len({tuple(r.tokens) for r in results}) == len(results), "the seeds changed nothing"
    # Later, on a prefix hit: requests with the same prompt share the row of its suffix after
    # the cached pages (z's part-filled last page is copied; x's last page, recomputed, shared)
    z = y[:12] + [9]
    again = _run(engine, [_request(z, SAMPLED, seed=6), _request(x, SAMPLED, seed=7),
                          _request(z, SAMPLED, seed=8), _request(x, SAMPLED, seed=9)])
    assert engine.prefill_shapes == {(2, 16): 1} and engine.chunk_shapes == {(2, 16): 1}
    assert [r.cached_tokens for r in again] == [12] * 4
    _same_as_cold(again, cold)
    assert len({tuple(r.tokens) for r in again}) == 4
    assert engine.kv_stats()["prompt_tokens_queried"] == sum(
        len(r.prompt) for r in results + again)


# --- a pool smaller than the work -----------------------------------------------------------------

def test_preempted_requests_finish_with_the_tokens_of_a_roomy_engine(model, cold):
    """32 pages of 4 for 4 slots of requests that each grow to 10 pages: the newest are
    preempted (their pages given back) and recomputed later, their drawn tokens kept. (The cold
    runs, one at a time, have the same pool: room for any one request.)"""
    requests = [_request(_ids(n), SAMPLED if i % 2 else GREEDY, seed=i, new=30)
                for i, n in enumerate((5, 6, 7, 8, 9, 5, 6, 7))]
    engine = _engine(model)
    assert engine.kv_stats()["pages"] == 32
    results = _run(engine, requests)
    assert all(len(r.tokens) > 8 for r in results), "too short to need many pages"
    _same_as_cold(results, cold)
    assert sum(r.preemptions for r in results) == engine.kv_stats()["preemptions"] > 0
    engine.scheduler.kv.check()
    assert engine.kv_stats()["pages_used"] == 0 and all(s is None for s in engine.slots)


def test_a_request_larger_than_the_pool_is_refused_or_truncated(model, cold):
    engine = _engine(model)             # 32 pages: 128 tokens, less than the model's context
    assert CONFIG.sequence_len > POOL and engine.max_context == POOL
    prompt = _ids(POOL + 2)
    with pytest.raises(RequestError, match=f"exceeds the context of {POOL} tokens") as err:
        engine.submit(_request(prompt, GREEDY, new=8))
    assert "\n" not in str(err.value)
    with pytest.raises(RequestError, match="leaves no room for a prompt"):
        engine.submit(_request(prompt[:2], GREEDY, new=POOL))
    assert not engine.waiting
    # truncated to its last 120 tokens: with its 8 new ones, the whole pool; two such requests
    # take turns
    room = POOL - 8
    cut = _run(engine, [_request(prompt, GREEDY, new=8, truncate="left"),
                        _request(prompt[::-1], SAMPLED, seed=3, new=8, truncate="left")])
    assert [r.prompt for r in cut] == [prompt[-room:], prompt[::-1][-room:]]
    for res, whole in zip(cut, (prompt, prompt[::-1])):
        want = cold(_request(whole[-room:], res.request.sampling, seed=res.request.seed, new=8))
        assert res.tokens == want.tokens and len(res.tokens) == 8


# --- eviction -----------------------------------------------------------------------------------

def test_old_prefixes_are_evicted_and_a_repeated_prompt_still_runs_right(model, cold):
    engine = _engine(model)                           # 32 pages
    prompts = [_ids(29) for _ in range(5)]            # each leaves 8 whole pages cached (32 slots)
    results = [_run(engine, [_request(p, SAMPLED, seed=i, new=4)])[0]
               for i, p in enumerate(prompts)]
    stats = engine.kv_stats()
    assert stats["evictions"] == 5 * 8 - 32 and stats["pages_cached"] == 32
    newest, oldest = _run(engine, [_request(prompts[-1], SAMPLED, seed=20, new=4),
                                   _request(prompts[0], SAMPLED, seed=21, new=4)])
    assert newest.cached_tokens == 28                 # its 7 usable pages: still there
    assert oldest.cached_tokens == 0                  # least recently used: gone
    _same_as_cold(results + [newest, oldest], cold)


# --- cancellation -------------------------------------------------------------------------------

def test_cancelling_mid_decode_frees_the_pages_and_keeps_the_written_ones_cached(model, cold):
    engine = _engine(model)
    rid = engine.submit(_request(A, SAMPLED, seed=1, new=30))
    for _ in range(8):
        engine.step()
        _check(engine)
    drawn = list(engine.results[rid].tokens)
    # 9 drawn, all but the last written: 24 slots, 6 pages held
    assert len(drawn) == 9 and engine.kv_stats()["pages_used"] == 6
    assert engine.cancel(rid)
    _check(engine)
    assert engine.idle and engine.kv_stats()["pages_used"] == 0
    # its prompt and the 8 tokens it wrote, 6 whole pages, are found by a continuation
    turn, = _run(engine, [_request(A + drawn + [11], SAMPLED, seed=2)])
    assert turn.cached_tokens == 24
    _same_as_cold([turn], cold)
    assert cold(_request(A, SAMPLED, seed=1, new=30)).tokens[:9] == drawn


def test_cancelling_a_chunked_prompt_keeps_its_computed_chunks_cached(model, cold):
    engine = _engine(model, prefill_tokens=16)        # prompts of more than 16: a chunk a step
    long = _ids(40)
    rid = engine.submit(_request(long, GREEDY, new=6))
    engine.step()
    _check(engine)
    assert not engine.results[rid].tokens and engine.kv_stats()["pages_used"] == 4
    assert engine.cancel(rid)
    assert engine.kv_stats()["pages_used"] == 0 and engine.kv_stats()["pages_cached"] == 4
    again, = _run(engine, [_request(long, GREEDY, new=6)])
    assert again.cached_tokens == 16
    _same_as_cold([again], cold)


# --- log-probabilities on a hit -----------------------------------------------------------------

# The cache holds bfloat16 keys and values, the same numbers on a hit as on a cold run, but a hit
# computes its suffix as a chunk attending to the cached pages, summing the attention over other
# shapes in another order: a bfloat16 activation may land one ulp (2^-8 relative) apart, moving
# a logit by about an ulp of the logits' scale, eps = 2^-8 * max|logit|, and the log-softmax's
# normalizer by at most as much: a log-probability by at most 2 eps. (Here max|logit| is about 3:
# a tolerance near 0.02, where one wrong token in the cached prefix moves them by over 1.)
BF16_ULP = 2.0 ** -8


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_logprobs_on_a_hit_are_those_of_a_cold_run(model, cold, sampling):
    engine = _engine(model)
    _run(engine, [_request(A, sampling, seed=1)])
    asks = [_request(p, sampling, seed=s, logprobs=3, prompt_logprobs=True)
            for p, s in ((B, 2), (PREFIX + [3, 4, 5], 3))]
    results = [_run(engine, [ask])[0] for ask in asks]     # (one prompt-logprobs shape)
    assert [r.cached_tokens for r in results] == [12, 12]
    for res in results:
        want = cold(res.request)
        assert res.tokens == want.tokens
        # the prompt's scores come from a full forward over it, hit or not: the same numbers
        assert res.prompt_logprobs == want.prompt_logprobs and res.prompt_logprobs[0] is None
        assert len(res.prompt_logprobs) == len(res.prompt)
        assert res.prompt_top_logprobs == want.prompt_top_logprobs
        assert len(res.logprobs) == len(res.tokens) == len(res.top_logprobs)
        scale = np.abs(model.logits([res.prompt + res.tokens])).max()
        tolerance = 2 * BF16_ULP * scale
        np.testing.assert_allclose(res.logprobs, want.logprobs, rtol=0, atol=tolerance)
        for got, expected in zip(res.top_logprobs, want.top_logprobs):   # (order: near-ties)
            got, expected = dict(got), dict(expected)
            assert got.keys() == expected.keys()
            np.testing.assert_allclose([got[t] for t in expected], list(expected.values()),
                                       rtol=0, atol=tolerance)
        if sampling is GREEDY:      # the drawn token is the most likely one
            assert [top[0][0] for top in res.top_logprobs] == res.tokens
