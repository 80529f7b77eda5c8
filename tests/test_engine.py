"""Generation: cached decoding, batching, stopping and request validation."""
from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from conftest import tiny_config
from oracle_sampling import recompute_greedy
from grok.api import from_flat
from grok.serving.engine import Engine, Request, bucket
from grok.leaves import random_flat
from grok.serving.sampling import SamplingParams

CONFIG = tiny_config(num_layers=3, sequence_len=128)
PROMPTS = [[3, 17, 29, 4, 8, 11, 50, 6, 7, 9, 12, 40, 33][:n] for n in (1, 2, 3, 5, 7, 9, 11, 13)]


@pytest.fixture(scope="module")
def model():
    return from_flat(random_flat(CONFIG, seed=7, weight_scale=1.5), CONFIG, max_batch=8)


def test_cached_greedy_equals_full_recompute(model):
    outputs = model.generate(PROMPTS[::3], max_new_tokens=10)
    for prompt, out in zip(PROMPTS[::3], outputs):
        want = recompute_greedy(model, prompt, 10)
        assert len(want) >= 5 and out[:len(want)] == want
    assert len(set(map(tuple, outputs))) > 1, "degenerate model: outputs all equal"


@pytest.mark.parametrize("penalties", [(1.8, 0.0, 0.0), (1.0, 1.5, 0.0), (1.0, 0.0, 0.8),
                                       (0.7, -0.5, 0.3)])
def test_penalized_greedy_equals_the_numpy_reference(model, penalties):
    names = ("repetition_penalty", "presence_penalty", "frequency_penalty")
    kwargs = dict(zip(names, penalties))
    prompts = PROMPTS[4::3]
    plain = model.generate(prompts, max_new_tokens=12)
    outputs = model.generate(prompts, max_new_tokens=12, **kwargs)
    for prompt, out in zip(prompts, outputs):
        want = recompute_greedy(model, prompt, 12, penalties)
        assert len(want) >= 5 and out[:len(want)] == want
    assert outputs != plain, "the penalties changed nothing"
    # a penalized request beside a plain one leaves the plain one as it is alone
    engine = Engine(model.runner, batch_size=2, max_len=64)
    ids = [engine.submit(Request(prompts[0], 12, SamplingParams(**kwargs))),
           engine.submit(Request(prompts[1], 12))]
    list(engine.run())
    assert [engine.results[i].tokens for i in ids] == [outputs[0], plain[1]]


def test_batch_invariance_alone_batched_and_admitted_mid_flight(model):
    alone = [model.generate([p], max_new_tokens=8)[0] for p in PROMPTS]
    batched = model.generate(PROMPTS, max_new_tokens=8)
    assert batched == alone
    # Three slots for eight requests: five are prefilled while others are decoding.
    engine = Engine(model.runner, batch_size=3, max_len=64)
    ids = [engine.submit(Request(p, max_new_tokens=8)) for p in PROMPTS]
    list(engine.run())
    assert [engine.results[i].tokens for i in ids] == alone


def test_seeded_sampling_is_reproducible_and_batch_independent(model):
    kwargs = dict(max_new_tokens=8, temperature=1.0, top_k=20, top_p=0.95, seed=11)
    alone = model.generate([PROMPTS[4]], **kwargs)[0]
    assert model.generate([PROMPTS[4]], **kwargs)[0] == alone
    assert model.generate([PROMPTS[0], PROMPTS[4], PROMPTS[7]], **kwargs)[1] == alone
    others = {tuple(model.generate([PROMPTS[4]], **{**kwargs, "seed": s})[0]) for s in range(4)}
    assert len(others) > 1, "the seed changes nothing"


def test_generation_stops_at_eos_stop_ids_and_max_new_tokens(model):
    prompt = PROMPTS[5]
    free = model.generate([prompt], max_new_tokens=12)[0]
    assert len(free) == 12
    # stop id: ends right after the first occurrence of that token, which is kept
    stop = free[4]
    out = model.generate([prompt], max_new_tokens=12, stop_ids=[stop])[0]
    assert out == free[:free.index(stop) + 1]
    # eos: the same weights with eos_token set to a token the model produces
    eos_model = from_flat(random_flat(CONFIG, seed=7, weight_scale=1.5),
                          CONFIG.replace(eos_token=free[6]))
    out = eos_model.generate([prompt], max_new_tokens=12)[0]
    assert out == free[:free.index(free[6]) + 1]
    assert model.generate([prompt], max_new_tokens=3)[0] == free[:3]


class _CharTokenizer:
    """Token t decodes to chr(ord('a') + t % 26): enough to exercise stop strings."""

    def decode(self, ids):
        return "".join(chr(ord("a") + t % 26) for t in ids)


def test_stop_strings_cut_the_text(model):
    free = model.generate([PROMPTS[5]], max_new_tokens=12)[0]
    tok = _CharTokenizer()
    stop = tok.decode(free[5:7])
    engine = Engine(model.runner, batch_size=1, max_len=64, tokenizer=tok)
    rid = engine.submit(Request(PROMPTS[5], max_new_tokens=12, stop_strings=(stop,)))
    list(engine.run())
    result = engine.results[rid]
    assert result.finish_reason == "stop"
    text = tok.decode(free)
    assert result.text == text[:text.index(stop)]
    assert tok.decode(result.tokens).endswith(stop)


@pytest.mark.parametrize("kwargs, words", [
    (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
    (dict(temperature=-0.1), "temperature must be a finite number >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(top_k=-1), "top_k must be an integer >= 0"),
    (dict(max_new_tokens=100, prompts=[list(range(1, 40))]), "exceeds the context of 128"),
    (dict(prompts=[[]]), "token list 0 is empty"),
    (dict(prompts=[[1, 64]]), r"id 64 is outside \[0, 64\)"),
    (dict(truncate="right"), "truncate must be None or 'left'"),
])
def test_bad_requests_are_refused_with_clear_errors(model, kwargs, words):
    prompts = kwargs.pop("prompts", [PROMPTS[2]])
    with pytest.raises(ValueError, match=words):
        model.generate(prompts, **kwargs)


def test_left_truncation_keeps_the_prompt_end(model):
    long = [1 + i % 60 for i in range(120)]
    out = model.generate([long], max_new_tokens=16, truncate="left")[0]
    assert out == model.generate([long[-112:]], max_new_tokens=16)[0]


def test_hundreds_of_requests_drain_with_bounded_compiles(model):
    engine = Engine(model.runner, batch_size=8, max_len=64)
    rng = np.random.default_rng(0)
    before = dict(model.runner.compiles)
    ids = []
    for i in range(200):
        prompt = rng.integers(1, CONFIG.vocab_size, rng.integers(1, 40)).tolist()
        ids.append(engine.submit(Request(prompt, max_new_tokens=int(rng.integers(1, 6)),
                                         sampling=SamplingParams(temperature=0.8), seed=i)))
    list(engine.run())
    assert engine.idle and all(slot is None for slot in engine.slots)
    assert all(engine.results[i].done for i in ids)
    assert all(1 <= len(engine.results[i].tokens) <= engine.results[i].request.max_new_tokens
               for i in ids)
    buckets = int(math.log2(64 // 16)) + 1           # lengths 16, 32, 64
    row_buckets = int(math.log2(8)) + 1              # prefill rows 1, 2, 4, 8
    new = {k: v - before.get(k, 0) for k, v in model.runner.compiles.items()}
    assert new.get("prefill", 0) <= buckets * row_buckets and new.get("decode", 0) <= buckets
    assert set(engine.prefill_shapes) <= {(r, p) for r in (1, 2, 4, 8) for p in (16, 32, 64)}


def test_prompts_admitted_together_are_prefilled_together(model):
    """Eight prompts of two length buckets: one prefill call per bucket (rows padded to a power
    of two, pad rows writing nothing), and the same tokens as each prompt alone."""
    prompts = [p for p in PROMPTS if len(p) <= 13] + [list(range(3, 23)), list(range(5, 30))]
    alone = [model.generate([p], max_new_tokens=5)[0] for p in prompts]
    engine = Engine(model.runner, batch_size=16, max_len=64)
    ids = [engine.submit(Request(p, max_new_tokens=5)) for p in prompts]
    list(engine.run())
    assert [engine.results[i].tokens for i in ids] == alone
    assert engine.prefill_shapes == {(8, 16): 1, (2, 32): 1}
    # a token budget splits a bucket's group into several calls
    engine = Engine(model.runner, batch_size=16, max_len=64, prefill_tokens=64)
    ids = [engine.submit(Request(p, max_new_tokens=5)) for p in prompts[:8]]
    list(engine.run())
    assert [engine.results[i].tokens for i in ids] == alone[:8]
    assert engine.prefill_shapes == {(4, 16): 2}


def test_stream_yields_the_generated_tokens(model):
    streamed = [tok for tok, _ in model.stream(PROMPTS[3], max_new_tokens=6)]
    assert streamed == model.generate([PROMPTS[3]], max_new_tokens=6)[0]


def test_bucket_sizes():
    assert [bucket(n, 100) for n in (1, 16, 17, 33, 64, 65, 99)] == [16, 16, 32, 64, 64, 100, 100]


def test_streamed_text_never_shows_a_stop_string(model):
    from grok.api import Grok
    tok = _CharTokenizer()
    with_tok = Grok(model.params, CONFIG, tokenizer=tok)
    free = model.generate([PROMPTS[5]], max_new_tokens=12)[0]
    stop = tok.decode(free[5:8])
    pieces = [piece for _, piece in with_tok.stream(PROMPTS[5], 12, stop_strings=[stop])]
    full = tok.decode(free)
    assert "".join(pieces) == full[:full.index(stop)]
    assert "".join(p for _, p in with_tok.stream(PROMPTS[5], 12)) == full


def test_decode_attends_over_the_live_context_not_the_whole_cache(model):
    config = CONFIG.replace(sequence_len=1024)
    runner = from_flat(random_flat(config, seed=7, weight_scale=1.5), config).runner
    engine = Engine(runner, batch_size=2, max_len=1024)
    short = engine.submit(Request(PROMPTS[3], max_new_tokens=4))
    list(engine.run())
    assert set(engine.attend_spans) == {256}
    assert engine.results[short].tokens == model.generate([PROMPTS[3]], max_new_tokens=4)[0]
    engine.submit(Request([5] * 300, max_new_tokens=3))
    list(engine.run())
    assert set(engine.attend_spans) == {256, 512}


# --- the long-lived engine: reuse, threads, cancellation, events, failures ----------------------

def test_the_model_keeps_one_engine_and_its_cache_across_calls(model):
    engine = model.engine
    model.generate(PROMPTS[:2], max_new_tokens=4)
    made, shape = engine.cache_allocations, (engine.batch_size, engine.max_len)
    assert made >= 1
    model.generate([PROMPTS[2]], max_new_tokens=5)
    model.generate(PROMPTS[:2], max_new_tokens=3)
    list(model.stream(PROMPTS[1], max_new_tokens=3))
    assert model.engine is engine and engine.cache_allocations == made
    assert (engine.batch_size, engine.max_len) == shape
    _assert_forgotten(engine)


def _assert_forgotten(engine):
    """The engine keeps nothing for any request (a long-lived one must not grow)."""
    book = engine.book
    assert not engine.results, "finished results are kept"
    assert not (engine.waiting or book.seen or book._detok or book._events or engine._released)
    assert all(s is None for s in engine.slots)


def test_a_long_request_is_admitted_while_others_decode_and_the_pool_is_made_once(model):
    """No admission stall: the pool is not re-made for a longer request, which takes pages as
    soon as it arrives, in the same step as the others' decoding."""
    engine = Engine(model.runner, batch_size=5, max_len=128)
    assert engine.cache is None and engine.cache_allocations == 0
    shorts = [engine.submit(Request(p, 30)) for p in PROMPTS[:4]]
    engine.step()
    engine.step()
    long_prompt = np.random.default_rng(3).integers(3, CONFIG.vocab_size, 100).tolist()
    long = engine.submit(Request(long_prompt, 8))
    live = [r for r in shorts if not engine.results[r].done]
    before = [len(engine.results[r].tokens) for r in live]
    engine.step()
    assert long in engine.slots and len(engine.results[long].tokens) == 2   # drawn, decoded
    assert len(live) >= 2 and [len(engine.results[r].tokens) for r in live] == [
        n + 1 for n in before]
    list(engine.run())
    assert engine.cache_allocations == 1
    assert engine.results[long].tokens == _alone(model, long_prompt, 8)
    for rid, prompt in zip(shorts, PROMPTS):
        assert engine.results[rid].tokens == _alone(model, prompt, 30)


def _alone(model, prompt, new, **kwargs):
    return model.generate([prompt], max_new_tokens=new, **kwargs)[0]


def test_requests_submitted_from_several_threads_while_one_drives(model):
    import threading
    want = {i: _alone(model, PROMPTS[i], 6) for i in range(8)}
    engine = Engine(model.runner, batch_size=4, max_len=64)
    engine.start()
    got, errors = {}, []

    def client(indices):
        try:
            ids = {i: engine.submit(Request(PROMPTS[i], max_new_tokens=6)) for i in indices}
            for i, rid in ids.items():
                events = list(engine.events(rid))
                got[i] = [e.token for e in events]
                assert events[-1].finish_reason == engine.results[rid].finish_reason
        except Exception as err:      # reported by the main thread
            errors.append(err)

    threads = [threading.Thread(target=client, args=(range(k, 8, 4),)) for k in range(4)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    finally:
        engine.stop()
    assert not errors and got == want
    assert engine.idle and not engine.driving


def test_cancel_frees_the_slot_within_one_step_and_leaves_the_others_unchanged(model):
    engine = Engine(model.runner, batch_size=2, max_len=64)
    long = engine.submit(Request(PROMPTS[3], max_new_tokens=40))
    other = engine.submit(Request(PROMPTS[4], max_new_tokens=8))
    late = engine.submit(Request(PROMPTS[5], max_new_tokens=8))
    engine.step()
    assert engine.slots == [long, other] and list(engine.waiting) == [late]
    assert engine.cancel(long) and not engine.cancel(long)
    assert engine.results[long].finish_reason == "cancelled"
    assert engine.slots[0] is None
    engine.step()
    assert engine.slots[0] == late        # the freed slot took the waiting request at once
    list(engine.run())
    assert engine.results[other].tokens == _alone(model, PROMPTS[4], 8)
    assert engine.results[late].tokens == _alone(model, PROMPTS[5], 8)
    assert len(engine.results[long].tokens) == 2
    events = list(engine.events(long))
    assert events[-1].finish_reason == "cancelled" and events[-1].token is None


def test_cancel_from_another_thread_ends_a_driven_stream(model):
    engine = Engine(model.runner, batch_size=2, max_len=128, tokenizer=_CharTokenizer())
    engine.start()
    try:
        rid = engine.submit(Request(PROMPTS[3], max_new_tokens=100))
        events = engine.events(rid)
        first = [next(events), next(events)]
        assert engine.cancel(rid)
        rest = list(events)
        assert rest[-1].finish_reason == "cancelled"
        assert len(first) + len(rest) <= len(engine.results[rid].tokens) + 1 < 100
        assert "".join(e.text for e in first + rest) == engine.results[rid].text
    finally:
        engine.stop()


def test_the_event_stream_concatenates_to_the_final_text(model):
    tok = _CharTokenizer()
    free = _alone(model, PROMPTS[5], 12)
    stop = tok.decode(free[6:9])
    engine = Engine(model.runner, batch_size=2, max_len=64, tokenizer=tok)
    ids = [engine.submit(Request(PROMPTS[5], 12, stop_strings=(stop,))),
           engine.submit(Request(PROMPTS[5], 12))]
    streams = [list(engine.events(rid)) for rid in ids]     # no driver: the iterator steps
    for rid, events in zip(ids, streams):
        result = engine.results[rid]
        assert "".join(e.text for e in events) == result.text
        assert [e.token for e in events] == result.tokens
        assert [e.finish_reason for e in events[:-1]] == [None] * (len(events) - 1)
    assert streams[0][-1].finish_reason == "stop" and stop not in engine.results[ids[0]].text
    assert engine.results[ids[1]].text == tok.decode(free)
    assert engine.pop(ids[0]).id == ids[0] and ids[0] not in engine.results


@pytest.mark.parametrize("where", ["prefill", "sampler", "decode after the cache was donated"])
def test_a_failing_step_fails_its_requests_only_and_the_engine_goes_on(model, monkeypatch,
                                                                       where):
    engine = Engine(model.runner, batch_size=2, max_len=64)
    ids = [engine.submit(Request(p, max_new_tokens=5)) for p in PROMPTS[2:6]]
    calls = []
    if where == "prefill":           # the first call: the first two prompts' prefill
        real = model.runner.paged_prefill

        def failing(*args):
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("injected prefill failure")
            return real(*args)
        monkeypatch.setattr(model.runner, "paged_prefill", failing)
    elif where == "sampler":
        real = model.runner.sample

        def failing(*args):          # the 2nd call: the first step's decode
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("injected sampler failure")
            return real(*args)
        monkeypatch.setattr(model.runner, "sample", failing)
    else:
        real = model.runner.paged_decode

        def failing(*args):
            out = real(*args)        # the pool argument is donated: gone now
            calls.append(1)
            if len(calls) == 1:
                jax.block_until_ready(out)
                raise RuntimeError("injected decode failure")
            return out
        monkeypatch.setattr(model.runner, "paged_decode", failing)
    list(engine.run())               # never raises: the failure is the requests'
    results = [engine.results[i] for i in ids]
    assert [r.finish_reason for r in results[:2]] == ["error", "error"]
    assert all("injected" in r.error for r in results[:2])
    for prompt, result in zip(PROMPTS[4:6], results[2:]):
        assert result.finish_reason == "length" and result.tokens == _alone(model, prompt, 5)
    assert engine.idle and engine.slots == [None, None]
    rid = engine.submit(Request(PROMPTS[7], max_new_tokens=4))
    list(engine.run())
    assert engine.results[rid].tokens == _alone(model, PROMPTS[7], 4)


def test_dropping_a_stream_cancels_and_forgets_its_request(model):
    stream = model.stream(PROMPTS[3], max_new_tokens=50)
    next(stream)
    assert len(model.engine.results) == 1
    del stream
    model.generate([PROMPTS[2]], max_new_tokens=2)           # one more step, then all is gone
    _assert_forgotten(model.engine)
    never_read = model.stream(PROMPTS[3], max_new_tokens=50)
    del never_read
    _assert_forgotten(model.engine)


def test_any_top_k_past_the_vocabulary_and_the_largest_seed_run_as_no_limit(model):
    """top_k=10**400 once passed submit and overflowed at the step; the largest uint32 seed."""
    kwargs = dict(max_new_tokens=6, temperature=1.0, seed=2 ** 32 - 1,
                  presence_penalty=0.5)       # penalties too: all of the sampler's inputs
    free = model.generate(PROMPTS[:2], top_k=0, **kwargs)
    assert model.generate(PROMPTS[:2], top_k=10 ** 400, **kwargs) == free
    assert model.generate(PROMPTS[:2], top_k=np.int64(CONFIG.vocab_size), **kwargs) == free
    _assert_forgotten(model.engine)


@pytest.mark.parametrize("change, words", [
    (dict(seed=-1), r"seed must be an integer in \[0, 2\*\*32\)"),
    (dict(seed=2 ** 40), "seed must be"),
    (dict(sampling=None), "sampling must be a grok.SamplingParams"),
    (dict(stop_strings=(5,)), "stop_strings must be a sequence of strings"),
    (dict(stop_ids=None), "stop_ids must be a sequence of token ids"),
    (dict(prompt=[1.7, 2]), r"prompt holds 1.7 \(float\)"),
    (dict(prompt=[True]), "prompt holds True"),
    (dict(prompt="abc"), "prompt must be a sequence of token ids"),
])
def test_bad_request_fields_are_refused_at_submit_and_the_engine_still_runs(model, change,
                                                                             words):
    import dataclasses

    from grok.errors import RequestError
    engine = Engine(model.runner, batch_size=2, max_len=64)
    good = Request(PROMPTS[2], max_new_tokens=3)
    with pytest.raises(RequestError, match=words):
        engine.submit(dataclasses.replace(good, **change))
    rid = engine.submit(dataclasses.replace(good, prompt=np.array(PROMPTS[2])))
    list(engine.run())
    assert engine.results[rid].tokens == _alone(model, PROMPTS[2], 3)
