"""The engine's prefill: long prompts a chunk per step beside the others' decoding, and requests
sharing a prompt sharing its prefill row (grok.serving.engine, grok.serving.batching)."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import tiny_config
from oracle_sampling import recompute_greedy
from grok.api import from_flat
from grok.leaves import random_flat
from grok.serving.batching import piece_inputs
from grok.serving.engine import Engine, Request, Result
from grok.serving.sampling import SamplingParams
from grok.serving.scheduler import Piece, PrefillCall

CONFIG = tiny_config(sequence_len=128)
RNG = np.random.default_rng(5)
LONG = RNG.integers(1, CONFIG.vocab_size, 100).tolist()      # 7 chunks of 16 (the last of 4)
SHORT = [3, 17, 29, 4, 8]


@pytest.fixture(scope="module")
def model():
    return from_flat(random_flat(CONFIG, seed=11, weight_scale=1.5), CONFIG, max_batch=4)


def _run(engine: Engine, requests: list[Request]) -> list[Result]:
    ids = engine.submit_all(requests)
    list(engine.run())
    return [engine.results[i] for i in ids]


def test_a_chunked_prompt_decodes_as_the_full_recompute(model):
    engine = Engine(model.runner, batch_size=4, max_len=128, prefill_tokens=16)
    asked = Request(LONG, max_new_tokens=8, logprobs=2, prompt_logprobs=True)
    result, = _run(engine, [asked])
    want = recompute_greedy(model, LONG, 8)
    assert len(want) >= 4 and result.tokens[:len(want)] == want
    # the prompt's scores come from one full forward, chunked or not: the same numbers
    whole, = _run(Engine(model.runner, batch_size=4, max_len=128), [asked])
    assert result.prompt_logprobs == whole.prompt_logprobs and len(whole.prompt_logprobs) == 100
    assert result.prompt_top_logprobs == whole.prompt_top_logprobs
    assert len(result.logprobs) == 8 and all(len(t) == 2 for t in result.top_logprobs)
    # the first chunk a fresh prefill of 16, then six chunks, each no wider than 16 tokens
    assert engine.prefill_shapes == {(1, 16): 1}
    assert sum(engine.chunk_shapes.values()) == 6 and {c for _, c in engine.chunk_shapes} <= {16}


def test_a_long_prompt_does_not_stall_the_decoding_slots(model):
    engine = Engine(model.runner, batch_size=4, max_len=128, prefill_tokens=16)
    short = engine.submit(Request(SHORT, max_new_tokens=40))
    engine.step()
    long = engine.submit(Request(LONG, max_new_tokens=3))
    steps_to_first_token = 0
    while not engine.results[long].tokens:
        before = len(engine.results[short].tokens)
        engine.step()
        steps_to_first_token += 1
        assert len(engine.results[short].tokens) == before + 1, "a chunk stalled the decode"
    assert steps_to_first_token == 7               # ceil(100 / 16) chunks, one per step
    list(engine.run())
    alone = _run(Engine(model.runner, batch_size=4, max_len=128), [Request(LONG, 3)])[0]
    assert engine.results[long].tokens == alone.tokens
    assert engine.results[short].tokens == _run(Engine(model.runner, batch_size=4, max_len=128),
                                                [Request(SHORT, 40)])[0].tokens


def test_each_step_prefills_within_its_token_budget(model):
    engine = Engine(model.runner, batch_size=4, max_len=128, prefill_tokens=16)
    for prompt in (LONG, SHORT, SHORT[:3], SHORT[:4]):
        engine.submit(Request(prompt, max_new_tokens=2))
    while not engine.idle:
        prefills = sum(engine.prefill_shapes.values()), sum(engine.chunk_shapes.values())
        shapes = dict(engine.prefill_shapes), dict(engine.chunk_shapes)
        engine.step()
        new = [(r * p) for (r, p), n in engine.prefill_shapes.items()
               for _ in range(n - shapes[0].get((r, p), 0))]
        new += [(r * c) for (r, c), n in engine.chunk_shapes.items()
                for _ in range(n - shapes[1].get((r, c), 0))]
        assert sum(new) <= 16, f"one step prefilled {sum(new)} tokens: {new} after {prefills}"


def test_cancelling_a_chunked_prompt_frees_its_slot(model):
    engine = Engine(model.runner, batch_size=4, max_len=128, prefill_tokens=16)
    long = engine.submit(Request(LONG, max_new_tokens=3))
    engine.step()
    engine.step()
    assert long in engine.slots and not engine.results[long].tokens
    assert engine.cancel(long)
    assert engine.slots == [None] * 4
    after, = _run(engine, [Request(SHORT, max_new_tokens=6)])
    alone, = _run(Engine(model.runner, batch_size=4, max_len=128), [Request(SHORT, 6)])
    assert after.tokens == alone.tokens and after.finish_reason == alone.finish_reason


def test_requests_with_one_prompt_share_its_prefill_row(model):
    sampled = SamplingParams(temperature=1.0)
    requests = [Request(SHORT, 6, sampled, seed=s) for s in (1, 2, 3)] + \
        [Request(SHORT[:3], 6, sampled, seed=4)]
    engine = Engine(model.runner, batch_size=4, max_len=128)
    shared = _run(engine, requests)
    assert engine.prefill_shapes == {(2, 16): 1}          # two distinct prompts, one call
    for request, got in zip(requests, shared):
        alone, = _run(Engine(model.runner, batch_size=4, max_len=128), [request])
        assert got.tokens == alone.tokens
    assert len({tuple(r.tokens) for r in shared}) > 1, "the seeds made no difference"


def test_piece_inputs_pad_rows_to_powers_of_two_and_share_draw_rows():
    pieces = (Piece(7, (5, 6, 9), 0, True, sharing=(8, 9)), Piece(3, (4,), 32, True),
              Piece(5, (1, 2), 16, False))
    call = PrefillCall(pieces, 16, 256, copies=((2, 11), (2, 12)))
    tables = [[1, 2], [3, 4], [5, 6]]
    got = piece_inputs(call, tables, pad_token=0, max_rows=8, no_page=40)
    assert got.tokens.shape == (4, 16) and got.tokens[:3, :3].tolist() == [
        [5, 6, 9], [4, 0, 0], [1, 2, 0]] and not got.tokens[3].any()
    assert got.table.tolist() == tables + [[40, 40]]          # the padding row has no page
    assert got.starts.tolist() == [0, 32, 16, 0] and got.lengths.tolist() == [3, 1, 2, 1]
    # draw rows: request 7 and its two sharers all from row 0, then request 3 from row 1; the
    # non-drawing piece (5, more to come) draws nothing
    assert got.members == [7, 8, 9, 3] and got.take.tolist() == [0, 0, 0, 1]
    assert got.copies[0].tolist() == [2, 2] and got.copies[1].tolist() == [11, 12]
    plain = piece_inputs(PrefillCall(pieces[1:2], 16, 256), tables[1:2], 0, 8, 40)
    assert plain.take is None and plain.members == [3] and plain.copies is None
