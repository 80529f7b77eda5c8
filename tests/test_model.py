"""The haiku model against the float64 oracle of SPEC §2 on random tiny configs."""
from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from conftest import tiny_config
from grok.api import from_flat
from grok.leaves import (abstract_flat, checkpoint_entries, from_model_params, random_flat,
                         to_model_params)
import oracle
from oracle import oracle_forward
from precision import (assert_rows_within, flat_route_bound, model_rel_error, near_tie_rows,
                       rel_rows)

CONFIGS = {
    "1-layer": tiny_config(num_layers=1),
    "11-layers": tiny_config(num_layers=11),
    "6q-3kv-heads": tiny_config(num_q_heads=6, num_kv_heads=3, key_size=6, scale_blocks=2),
    "mha-8-blocks": tiny_config(num_q_heads=4, num_kv_heads=4, scale_blocks=8),
    "top1-of-8": tiny_config(num_experts=8, num_selected_experts=1),
    "all-experts": tiny_config(num_experts=4, num_selected_experts=4, scale_blocks=1),
}


def _tokens(config, batch: int = 3, length: int = 9, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(config.pad_token + 1, config.vocab_size, (batch, length))
    tokens[1, 6:] = config.pad_token          # ragged rows, right-padded
    tokens[2, 3:] = config.pad_token
    return tokens


@functools.lru_cache(maxsize=None)
def _ours_and_oracle(name: str, scan: bool = True):
    """(our logits, oracle logits, oracle routing, real-token mask) of a config's random model."""
    config = CONFIGS[name]
    flat = random_flat(config, seed=1, weight_scale=1.5)
    tokens = _tokens(config)
    truth, routing = oracle_forward(flat, config, tokens)
    model = from_flat(flat, config, scan=scan)
    ours = model.logits([row[row > 0].tolist() for row in tokens])
    return ours, truth, routing, tokens > config.pad_token


def _check_against_oracle(name, ours, truth, routing, real, what):
    """Each logits row within the bfloat16 model's error bound of the exact evaluation, except
    rows whose routing is near a tie (the other expert may be taken: the row moves as a whole)."""
    bound = model_rel_error(CONFIGS[name].num_layers)
    return assert_rows_within(rel_rows(ours, truth)[real], bound,
                              near_tie_rows(routing.margin)[real], what)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unrolled"])
def test_logits_match_float64_oracle(name, scan):
    ours, truth, routing, real = _ours_and_oracle(name, scan)
    _check_against_oracle(name, ours, truth, routing, real, f"model {name} scan={scan} vs oracle")


def test_planted_bug_rope_position_offset_is_caught(monkeypatch):
    """The same check fails against an evaluation whose queries are rotated one position ahead
    of their keys (a RoPE offset bug, as a wrong cache offset gives)."""
    ours, _, routing, real = _ours_and_oracle("1-layer")
    calls, rope = [], oracle.rope

    def shifted(u, positions, base=10000.0):      # attention() rotates q first, then k
        calls.append(1)
        return rope(u, np.asarray(positions) + len(calls) % 2, base)
    monkeypatch.setitem(oracle_forward.__globals__, "rope", shifted)
    config = CONFIGS["1-layer"]
    bug, _ = oracle_forward(random_flat(config, seed=1, weight_scale=1.5), config,
                            _tokens(config))
    with pytest.raises(AssertionError):
        _check_against_oracle("1-layer", ours, bug, routing, real, "model planted bug: rope")


def _route_check(got, want, flat, config, tokens, what):
    """Two correct evaluations of one model (another layer loop, batch, padding): logits within
    precision.logits_route_bound, rows with a routing near-tie (oracle) excepted."""
    tokens = np.asarray(tokens)
    _, routing = oracle_forward(flat, config, tokens)
    real = tokens > config.pad_token
    rows = np.max(np.abs(np.asarray(got) - np.asarray(want)) / flat_route_bound(flat, config),
                  axis=-1)[real]                              # per row, in bounds
    assert_rows_within(rows, 1.0, near_tie_rows(routing.margin)[real], what)


def test_scan_and_unrolled_agree():
    config = CONFIGS["11-layers"]
    flat = random_flat(config, seed=2)
    tokens = _tokens(config)[:1]
    _route_check(from_flat(flat, config, scan=True).logits(tokens.tolist()),
                 from_flat(flat, config, scan=False).logits(tokens.tolist()), flat, config,
                 tokens, "model scan vs unrolled")


@pytest.mark.parametrize("unroll", [True, 4])
def test_unrolled_layer_loop_agrees(unroll):
    """The scanned model with its layer loop unrolled (wholly, or 4 of 11 layers per step)."""
    from grok.kernels.plan import resolve_plan
    from grok.serving.runner import ModelRunner
    config = CONFIGS["11-layers"]
    flat = random_flat(config, seed=3)
    model = from_flat(flat, config, scan=True)
    tokens = np.asarray(_tokens(config)[:2])
    unrolled = ModelRunner(model.runner.params, config, plan=resolve_plan(unroll=unroll))
    _route_check(unrolled.logits(tokens), model.runner.logits(tokens), flat, config, tokens,
                 f"model unroll={unroll} vs scan")
    for bad in (0, -2, False, 1.5):
        with pytest.raises(ValueError, match="unroll must be"):
            resolve_plan(unroll=bad)


def test_padding_does_not_leak_into_real_positions():
    config = CONFIGS["1-layer"]
    flat = random_flat(config, seed=3)
    model = from_flat(flat, config)
    prompt = [5, 9, 14, 3]
    alone = model.logits([prompt])[0]
    padded = model.logits([prompt, list(range(1, 30))])[0, :len(prompt)]
    # a padded batch is another evaluation of the same rows: the route bound
    _route_check(padded[None], alone[None], flat, config, [prompt], "model padded vs alone")


def test_param_tree_round_trip_and_layer_order():
    config = CONFIGS["11-layers"]
    flat = random_flat(config, seed=4)
    for scan in (True, False):
        back = from_model_params(to_model_params(flat, config, scan=scan), config)
        assert set(back) == set(flat)
        for name, leaf in flat.items():
            for a, b in zip(jax.tree.leaves(leaf), jax.tree.leaves(back[name])):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    names = [e.name for e in checkpoint_entries(config)]
    assert names.index("transformer/decoder_layer_10/router/w") < \
        names.index("transformer/decoder_layer_2/moe/linear/w")
    stacked = to_model_params(flat, config)["layers"]["decoder_layer/router"]["w"]
    np.testing.assert_array_equal(stacked[2], flat["transformer/decoder_layer_2/router/w"])


def test_grok1_has_770_leaves_of_the_released_shapes():
    entries = checkpoint_entries(_grok1())
    assert len(entries) == 770
    by_name = {e.name: e for e in entries}
    expert = by_name["transformer/decoder_layer_0/moe/linear_1/w"]
    assert expert.shape == (8, 32768, 6144) and expert.scales_shape == (8, 8, 6144)
    assert by_name["transformer/decoder_layer_63/multi_head_attention/linear/w"].scales_shape \
        == (8, 6144)
    flat = abstract_flat(_grok1())
    assert flat["language_model/in_out_embed/embeddings"].shape == (131072, 6144)


def _grok1():
    from grok.config import GROK1
    return GROK1
