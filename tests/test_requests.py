"""An engine no bad request can wedge: every request field is checked at submit (RequestError,
one line, naming the value), and a step that still fails ends only its own requests.

These tests compile nothing: the engine runs on `FakeRunner`, which answers every device call
at once (or fails when told to); the model-backed checks live in test_engine.py."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from conftest import tiny_config, tokenizer_path
from grok.api import Grok, from_flat
from grok.errors import GrokError, RequestError
from grok.leaves import random_flat
from grok.serving import batching
from grok.serving.engine import Engine, Request
from grok.serving.request import SEED_LIMIT
from grok.serving.sampling import TOP_K_MAX, SamplingParams

CONFIG = tiny_config(num_layers=1, sequence_len=64)
TOKEN = 5          # what FakeRunner draws for every row (not eos, which is 2)


class FakeRunner:
    """What the engine uses of a ModelRunner, without a model: each call answers at once,
    drawing TOKEN for every row; `fail[name] = n` makes the next n calls of `name` raise."""

    def __init__(self, config=CONFIG):
        self.config, self.params = config, None
        self.fail: dict[str, int] = {}

    def _maybe_fail(self, name):
        if self.fail.get(name):
            self.fail[name] -= 1
            raise RuntimeError(f"injected {name} failure")

    def new_pool(self, pages, page_size):
        self._maybe_fail("new_pool")
        return {}

    def paged_prefill(self, params, pool, tokens, table, starts, lengths, attend):
        self._maybe_fail("chunk" if attend else "prefill")
        return np.zeros((len(tokens), self.config.vocab_size), np.float32), pool

    def copy_pages(self, pool, sources, targets):
        self._maybe_fail("copy_pages")
        return pool

    def take_rows(self, logits, rows):
        return np.asarray(logits)[np.asarray(rows)]

    def paged_decode(self, params, pool, tokens, table, positions, attend):
        self._maybe_fail("decode")
        return np.zeros((len(tokens), self.config.vocab_size), np.float32), pool

    def sample(self, logits, keys, temperature, top_p, top_k, penalties=None):
        self._maybe_fail("sample")
        return np.full(len(logits), TOKEN, np.int32)


class CharTokenizer:
    """Token t decodes to chr(ord('a') + t % 26)."""

    def decode(self, ids):
        return "".join(chr(ord("a") + t % 26) for t in ids)


class Unprintable:
    """A value whose repr must never be taken (an error message describes it by its type)."""

    def __repr__(self):
        raise AssertionError("repr of a user object was taken")

    __str__ = __repr__


def _engine(**kwargs):
    return Engine(FakeRunner(), **{"batch_size": 2, "max_len": 64, **kwargs})


def _forgotten(engine):
    """Whether the engine keeps nothing for any request."""
    book = engine.book
    return (not engine.results and not engine.waiting and not book.seen and not book._detok
            and not book._events and not engine._released
            and all(s is None for s in engine.slots))


GOOD = Request([1, 2, 3], max_new_tokens=3)
NESTED: list = []
for _ in range(10_000):     # repr() of this raises RecursionError
    NESTED = [NESTED]


def _bypassed(**fields):
    """SamplingParams changed after its check (a frozen dataclass can still be written)."""
    params = SamplingParams()
    for name, value in fields.items():
        object.__setattr__(params, name, value)
    return params


@pytest.mark.parametrize("change, words", [
    (dict(seed=-1), r"seed must be an integer in \[0, 2\*\*32\), got -1"),
    (dict(seed=2 ** 40), "seed must be an integer"),
    (dict(seed=SEED_LIMIT), "seed must be an integer"),
    (dict(seed=1.0), r"got 1.0 \(float\)"),
    (dict(seed=np.uint64(2 ** 63)), r"got 9223372036854775808 \(uint64\)"),
    (dict(sampling=None), "sampling must be a grok.SamplingParams, got None"),
    (dict(sampling=dict(temperature=1)), "sampling must be a grok.SamplingParams, got a dict"),
    (dict(sampling=_bypassed(top_k=-1)), "top_k must be an integer >= 0"),
    (dict(sampling=_bypassed(temperature=10 ** 400)), "temperature must be a finite number"),
    (dict(sampling=_bypassed(top_p=float("nan"))), r"top_p must be in \(0, 1\]"),
    (dict(stop_strings=(5,)), "stop_strings must be a sequence of strings; it holds 5"),
    (dict(stop_strings="\n"), "stop_strings must be a sequence of strings"),
    (dict(stop_ids=None), "stop_ids must be a sequence of token ids, got None"),
    (dict(stop_ids=(64,)), r"stop_ids: id 64 is outside \[0, 64\)"),
    (dict(stop_ids=(-1,)), r"stop_ids: id -1 is outside"),
    (dict(stop_ids=(2.0,)), r"stop_ids holds 2.0 \(float\)"),
    # None is a bad value like any other, not "no bad value found"
    (dict(stop_ids=(1, None)), "stop_ids holds None; token ids are ints"),
    (dict(stop_strings=("x", None)), "stop_strings must be a sequence of strings; it holds None"),
    (dict(prompt=[1, None]), "prompt holds None; token ids are ints"),
    (dict(prompt=[1.7, 2]), r"prompt holds 1.7 \(float\); token ids are ints"),
    (dict(prompt=[float("inf")]), r"prompt holds inf \(float\)"),
    (dict(prompt=[True]), "prompt holds True"),
    (dict(prompt=["1"]), "prompt holds '1'"),
    (dict(prompt="abc"), "prompt must be a sequence of token ids, got 'abc'"),
    (dict(prompt=b"abc"), "prompt must be a sequence of token ids, got a bytes"),
    (dict(prompt=None), "prompt must be a sequence of token ids, got None"),
    (dict(prompt=np.array([1, 2], np.float32)), "a numpy array of float32"),
    (dict(prompt=np.array(5)), r"1-D array of integer token ids, got .* shape \(\)"),
    (dict(prompt=np.array([[1, 2]])), r"shape \(1, 2\)"),
    (dict(prompt=[1, 10 ** 5000]), r"an id of 16610 bits is outside \[0, 64\)"),
    (dict(prompt=[1, NESTED]), "prompt holds a list of 1 items"),
    (dict(prompt=[Unprintable()]), "prompt holds a value of type Unprintable"),
    (dict(prompt=range(10 ** 12)), "prompt of 1000000000000 tokens"),
    (dict(prompt=range(10 ** 12), truncate="left"), "prompt has 1000000000000 tokens"),
    (dict(max_new_tokens=1.5), "max_new_tokens must be an integer >= 1"),
    (dict(max_new_tokens=10 ** 400), "max_new_tokens=an integer of 1329 bits leaves no room"),
    (dict(truncate=np.array([1, 2])), "truncate must be None or 'left'"),
    (dict(truncate=Unprintable()), "truncate must be None or 'left', got a value of type"),
])
def test_every_request_field_is_checked_at_submit(change, words):
    engine = _engine()
    first = engine.submit(GOOD)
    with pytest.raises(RequestError, match=words) as err:
        engine.submit(dataclasses.replace(GOOD, **change))
    message = str(err.value)
    assert "\n" not in message and len(message) < 200
    assert list(engine.waiting) == [first]           # nothing of the bad request was kept
    last = engine.submit(GOOD)
    list(engine.run())
    assert [engine.pop(r).tokens for r in (first, last)] == [[TOKEN] * 3] * 2
    assert _forgotten(engine)


@pytest.mark.parametrize("kwargs, words", [
    (dict(temperature=10 ** 400), "temperature must be a finite number >= 0, got an integer"),
    (dict(temperature=1e300), "temperature"),        # infinite in the sampler's float32
    (dict(temperature=Unprintable()), "got a value of type Unprintable"),
    (dict(top_p=10 ** 400), "top_p"),
    (dict(top_k=2.0), "top_k must be an integer"),
    (dict(top_k=True), "top_k must be an integer"),
    (dict(repetition_penalty=1e-300), "repetition_penalty"),   # 0 in float32
    (dict(presence_penalty=-(10 ** 400)), "presence_penalty"),
])
def test_sampling_settings_raise_only_request_errors(kwargs, words):
    with pytest.raises(RequestError, match=words):
        SamplingParams(**kwargs)


def test_numpy_integers_are_accepted_and_every_field_is_normalized():
    engine = _engine()
    sampling = SamplingParams(temperature=np.float32(0.5), top_k=10 ** 400,
                              frequency_penalty=np.float64(0.25))
    assert sampling.top_k == TOP_K_MAX and type(sampling.temperature) is float
    rid = engine.submit(Request(np.array([3, 4], np.int16), np.int64(3), sampling,
                                np.uint32(SEED_LIMIT - 1), [np.int8(7)]))
    result = engine.results[rid]
    request = result.request
    assert result.prompt == [3, 4] and all(type(t) is int for t in result.prompt)
    assert type(request.max_new_tokens) is int and type(request.seed) is int
    assert request.stop_ids == (7,) and type(request.stop_ids[0]) is int
    assert request.sampling == sampling
    # any top_k >= the vocabulary keeps every token, as a float32 the sampler can take
    draw = batching.draw_inputs([(0, result)], 1, CONFIG, {})
    assert draw.settings[:, 0].tolist() == [0.5, 1.0, CONFIG.vocab_size]
    assert draw.seeds.tolist() == [SEED_LIMIT - 1]
    list(engine.run())
    assert engine.pop(rid).tokens == [TOKEN] * 3


@pytest.mark.parametrize("kwargs", [dict(batch_size=0), dict(batch_size=-1),
                                    dict(batch_size=True), dict(batch_size=1.5),
                                    dict(max_len=1), dict(max_len=64.0),
                                    dict(prefill_tokens=0), dict(prefill_tokens=1.5)])
def test_engine_settings_are_checked(kwargs):
    with pytest.raises(RequestError, match=next(iter(kwargs))):
        _engine(**kwargs)


def test_submit_all_takes_a_list_and_queues_none_when_one_is_bad():
    engine = _engine()
    for bad in (GOOD, (r for r in [GOOD]), None):
        with pytest.raises(RequestError, match="submit_all takes a list"):
            engine.submit_all(bad)
    with pytest.raises(RequestError, match="seed"):
        engine.submit_all([GOOD, dataclasses.replace(GOOD, seed=-1)])
    assert not engine.results and not engine.waiting
    for call in (engine.events, engine.cancel, engine.pop, engine.wait, engine.release,
                 engine.next_event):
        with pytest.raises(RequestError, match="request ids are ints"):
            call([1])
    with pytest.raises(RequestError, match="unknown"):
        engine.wait(12345)


@pytest.mark.parametrize("where, failed", [
    ("prefill", {0, 1}),                 # the device calls: the requests in that call
    ("decode", {0, 1}),
    ("sample", {0, 1}),
    ("new_pool", {0, 1}),                # the requests the pool was being made for
    ("piece_inputs", {0, 1}),            # host-side bugs in the step: the step's requests
    ("_decode_inputs", {0, 1}),          # (the executor's)
    ("token", {1}),                      # recording one request's token: that request
])
def test_a_failing_step_ends_only_its_requests_and_the_engine_goes_on(monkeypatch, where,
                                                                      failed):
    engine = _engine(tokenizer=CharTokenizer())
    ids = [engine.submit(dataclasses.replace(GOOD, prompt=[1 + i])) for i in range(5)]
    if where in ("piece_inputs", "_decode_inputs"):
        owner = batching if where == "piece_inputs" else engine.executor
        real = getattr(owner, where)
        calls = []

        def once(*args):
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError(f"injected {where} failure")
            return real(*args)
        monkeypatch.setattr(owner, where, once)
    elif where == "token":
        real_append = engine.book.append

        def append(rid, token, *scores):
            if rid == ids[1]:
                raise RuntimeError("injected token failure")
            real_append(rid, token, *scores)
        monkeypatch.setattr(engine.book, "append", append)
    else:
        engine.runner.fail[where] = 1
    produced = list(engine.run())                  # never raises
    assert engine.idle and engine.slots == [None, None]
    for i, rid in enumerate(ids):
        result = engine.results[rid]
        if i in failed:
            assert result.finish_reason == "error" and f"injected {where}" in result.error
            assert "\n" not in result.error
            events = list(engine.events(rid))
            assert events[-1].finish_reason == "error" and events[-1].error == result.error
        else:
            assert result.finish_reason == "length" and result.tokens == [TOKEN] * 3
            assert result.text == "fff"
    assert sum(1 for rid, _ in produced if rid in ids[2:]) == 9
    later = engine.submit(GOOD)
    list(engine.run())
    assert engine.results[later].tokens == [TOKEN] * 3
    for rid in ids + [later]:
        engine.pop(rid)
    assert _forgotten(engine)


def test_finished_requests_are_forgotten_once_popped_or_released():
    engine = _engine(batch_size=4, tokenizer=CharTokenizer())
    ids, released = [], set()
    for i in range(300):
        sampling = SamplingParams(repetition_penalty=1.2) if i % 3 == 0 else SamplingParams()
        stops = ("ff",) if i % 5 == 0 else ()
        ids.append(engine.submit(Request([1 + i % 60] * (1 + i % 7), 1 + i % 4, sampling,
                                         seed=i, stop_strings=stops)))
        if i % 7 == 0:
            engine.cancel(ids[-1])           # while it waits
        if i % 11 == 0:
            engine.step()
            engine.release(ids[-1])          # waiting, running or done
            released.add(ids[-1])
    list(engine.run())
    assert engine.book.seen == {} and engine.book._detok == {}   # dropped as requests end
    first = engine.events(ids[1])
    assert [e.token for e in first] == [TOKEN] * 2
    with pytest.raises(RequestError, match="has ended"):   # read past its end: no spinning
        engine.next_event(ids[1])
    for rid in ids:
        if rid in released:
            with pytest.raises(RequestError, match="unknown"):
                engine.pop(rid)
        else:
            result = engine.pop(rid)
            assert result.finish_reason in ("length", "stop", "cancelled")
    assert _forgotten(engine)


def test_a_request_the_engine_lost_ends_with_an_error_instead_of_a_hang():
    engine = _engine()
    rid = engine.submit(GOOD)
    engine.waiting.clear()                  # a bug: neither waiting nor in a slot
    result = engine.wait(rid)
    assert result.finish_reason == "error" and "lost" in result.error


# --- the model object: every entry point refuses bad input with one RequestError ---------------

@pytest.fixture(scope="module")
def model():
    return from_flat(random_flat(CONFIG, seed=3), CONFIG, max_batch=2)


@pytest.mark.parametrize("call, words", [
    (lambda m: m.complete(b"abc"), "complete takes a string, got bytes"),
    (lambda m: m.complete(None), "complete takes a string, got NoneType"),
    (lambda m: m.complete("hi"), "no tokenizer"),
    (lambda m: m.generate([[1.7, 2]]), r"token list 0 holds 1.7 \(float\)"),
    (lambda m: m.generate([np.array([1.0])]), "float64"),
    (lambda m: m.generate([[True]]), "token list 0 holds True"),
    (lambda m: m.generate([[None]]), "token list 0 holds None; token ids are ints"),
    (lambda m: m.generate([[1]], 8, stop_ids=(None,)), "stop_ids holds None"),
    (lambda m: m.generate([[1]], 8, stop_strings=(None,)), "stop_strings .* it holds None"),
    (lambda m: m.stream([1, None]), "holds None; token ids are ints"),
    (lambda m: m.generate("abc"), "expected a non-empty list of token lists"),
    (lambda m: m.generate([[1]], 8, stop_ids=None), "stop_ids must be a sequence"),
    (lambda m: m.generate([[1]], 8, stop_ids=[99]), r"stop_ids: id 99 is outside"),
    (lambda m: m.generate([[1]], 8, seed=-1), "seed must be"),
    (lambda m: m.generate([[1]], 8, temperature=10 ** 400), "temperature must be"),
    (lambda m: m.generate([[1]], 8, top_k=10 ** 400, stop_strings=["x"]), "need a tokenizer"),
    (lambda m: m.stream(np.array(5)), "1-D array"),
    (lambda m: m.stream(b"ab"), "a prompt is a string or a list of token ids, got a bytes"),
    (lambda m: m.logits([np.array(5)]), "1-D array"),
    (lambda m: m.routing(np.array(5)), "list of token lists"),
    (lambda m: m.routing([[1.5]]), r"holds 1.5 \(float\)"),
    (lambda m: m.run(GOOD), "non-empty list of grok.Request"),
])
def test_the_model_refuses_bad_input_with_one_request_error(model, call, words):
    with pytest.raises(RequestError, match=words) as err:
        call(model)
    assert "\n" not in str(err.value)
    assert _forgotten(model.engine)


def test_text_the_tokenizer_cannot_take_is_a_request_error(model):
    from grok.serving.tokenizer import Tokenizer
    tok = Tokenizer(tokenizer_path())
    with_tok = Grok(model.params, CONFIG, tokenizer=tok)
    for text, words in [("\x00\udcff", r"surrogates not allowed at index 1 \('\\udcff'\)"),
                        ("", "empty")]:
        with pytest.raises(RequestError, match=words):
            with_tok.complete(text)
    with pytest.raises(GrokError, match="only text"):
        tok.encode(b"abc")
    # an id past the tokenizer's pieces (a model vocabulary may be larger) is its unknown piece
    unknown = tok.decode([tok._sp.unk_id()])
    assert tok.decode([tok.vocab_size]) == tok.decode([-1]) == unknown
    assert _forgotten(with_tok.engine)


@pytest.mark.parametrize("where", ["chunk", "copy_pages"])
def test_a_failing_chunk_or_page_copy_ends_only_its_requests(where):
    engine = _engine(prefill_tokens=16)
    if where == "chunk":      # a 40-token prompt, prefilled in chunks of 16, beside a short one
        requests, failed = [Request(list(range(1, 41)), 3), Request([9], 3)], {0}
    else:                     # two requests sharing one prefill row (its last page copied)
        requests, failed = [Request([7, 8], 3), Request([7, 8], 3)], {0, 1}
    engine.runner.fail[where] = 1
    ids = engine.submit_all(requests)
    list(engine.run())
    assert engine.idle and engine.slots == [None, None] and engine.scheduler.chunking is None
    for i, rid in enumerate(ids):
        result = engine.pop(rid)
        if i in failed:
            assert result.finish_reason == "error" and f"injected {where}" in result.error
        else:
            assert result.finish_reason == "length" and result.tokens == [TOKEN] * 3
    again = engine.submit_all(requests)
    list(engine.run())
    assert [engine.pop(r).tokens for r in again] == [[TOKEN] * 3] * 2


def test_a_listener_gets_every_event_in_order_and_a_failing_one_is_dropped():
    engine = _engine(tokenizer=CharTokenizer())
    first, second = engine.submit_all([GOOD, GOOD])
    engine.step()                      # first's opening events are buffered before it listens
    heard = []
    engine.listen(first, heard.append)

    def failing(event):
        raise RuntimeError("listener bug")
    engine.listen(second, failing)
    list(engine.run())
    assert [e.token for e in heard] == [TOKEN] * 3 and heard[-1].finish_reason == "length"
    assert "".join(e.text for e in heard) == engine.results[first].text
    assert engine.results[second].finish_reason == "length"     # it ran on, unheard
    with pytest.raises(RequestError, match="unknown"):
        engine.release(first) or engine.listen(first, heard.append)
