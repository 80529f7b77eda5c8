"""The tiny Grok-2 release writer (tests/grok2_release.py) and the float64 reference forward
(tests/oracle_grok2.py): the files are the release's layout exactly, and every feature of
SGLang's Grok-2 changes the reference's logits (so a model missing one cannot match it)."""
from __future__ import annotations

import dataclasses
import json
import re

import ml_dtypes
import numpy as np
import pytest

import oracle_grok2
from grok2_release import write_tiny_grok2

# The release's table (shared/grok2-release.md) at the tiny sizes: file number -> (name,
# [out, in] shape of the whole tensor, the axis the ranks split or None). hidden 64, q 4x20,
# kv 2x20, dense 96, experts 4 x 48, vocab 300, 2 layers.
LAYOUT = {
    0: ("model.embed_tokens.weight", (300, 64), None),
    1: ("lm_head.weight", (300, 64), None),
    2: ("model.norm.weight", (64,), None),
    3: ("model.layers.{l}.mlp.gate_proj.weight", (96, 64), None),
    4: ("model.layers.{l}.mlp.down_proj.weight", (64, 96), None),
    5: ("model.layers.{l}.mlp.up_proj.weight", (96, 64), None),
    6: ("model.layers.{l}.block_sparse_moe.experts.{e}.w1.weight", (48, 64), 0),
    7: ("model.layers.{l}.block_sparse_moe.experts.{e}.w2.weight", (64, 48), 1),
    8: ("model.layers.{l}.block_sparse_moe.experts.{e}.w3.weight", (48, 64), 0),
    9: ("model.layers.{l}.self_attn.k_proj.weight", (40, 64), None),
    10: ("model.layers.{l}.self_attn.o_proj.weight", (64, 80), None),
    11: ("model.layers.{l}.self_attn.q_proj.weight", (80, 64), None),
    12: ("model.layers.{l}.self_attn.v_proj.weight", (40, 64), None),
    13: ("model.layers.{l}.pre_attn_norm.weight", (64,), None),
    14: ("model.layers.{l}.post_attn_norm.weight", (64,), None),
    15: ("model.layers.{l}.pre_moe_norm.weight", (64,), None),
    16: ("model.layers.{l}.post_moe_norm.weight", (64,), None),
    17: ("model.layers.{l}.block_sparse_moe.gate.weight", (4, 64), None),
}
RELEASE_KEYS = {
    "architectures", "model_type", "torch_dtype", "vocab_size", "hidden_size",
    "num_hidden_layers", "head_dim", "num_attention_heads", "num_key_value_heads",
    "intermediate_size", "moe_intermediate_size", "num_local_experts", "num_experts_per_tok",
    "residual_moe", "rms_norm_eps", "embedding_multiplier_scale", "output_multiplier_scale",
    "attn_logit_softcapping", "router_logit_softcapping", "final_logit_softcapping",
    "attn_temperature_len", "rope_theta", "rope_type", "original_max_position_embeddings",
    "scaling_factor", "extrapolation_factor", "attn_factor", "beta_fast", "beta_slow",
    "max_position_embeddings", "sliding_window_size", "global_attn_every_n"}
RELEASE_CONSTANTS = {"rms_norm_eps": 1e-5, "embedding_multiplier_scale": 90.50966799187809,
                     "output_multiplier_scale": 0.5, "attn_logit_softcapping": 30.0,
                     "router_logit_softcapping": 30.0, "final_logit_softcapping": 50,
                     "attn_temperature_len": 1024, "rope_theta": 208533496}
# The reference runs in float64: its rounding is ~1e-15 of logits of a few units, so a change
# above 1e-6 comes from the feature, never from rounding.
CHANGED = 1e-6
TOKENS = [3, 17, 200, 45, 45, 9, 120, 250, 7, 88, 31, 64]   # 12 positions: 6 beyond L = 5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_grok2(tmp_path_factory.mktemp("grok2"), ranks=2)


def _header(path) -> dict:
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + size])


def _names(template: str) -> set[str]:
    return {template.format(l=l, e=e) for l in range(2) for e in range(4)}


@pytest.mark.parametrize("ranks", [2, 8])
def test_the_files_are_the_releases_layout(tmp_path, ranks):
    from safetensors import safe_open

    written = write_tiny_grok2(tmp_path, ranks=ranks)
    expected = {"config.json", "tokenizer.tok.json"}
    for number, (_, _, split) in LAYOUT.items():
        tags = ["common"] if split is None else [f"{r:03d}" for r in range(ranks)]
        expected |= {f"pytorch_model-{number:05d}-TP-{t}.safetensors" for t in tags}
    assert {p.name for p in tmp_path.iterdir()} == expected == set(written["files"])
    for path in sorted(tmp_path.glob("*.safetensors")):
        number, tag = re.fullmatch(r"pytorch_model-(\d{5})-TP-(\w+)\.safetensors",
                                   path.name).groups()
        template, shape, split = LAYOUT[int(number)]
        header = _header(path)
        header.pop("__metadata__", None)
        assert set(header) == _names(template), path.name
        piece = list(shape)
        if split is not None:
            piece[split] //= ranks
        for name, spec in header.items():
            assert (spec["dtype"], spec["shape"]) == ("BF16", piece), (path.name, name)
        with safe_open(str(path), "np") as f:     # the pieces are the returned tensor's
            for name in header:
                whole = written["weights"][name]
                part = f.get_tensor(name).view(ml_dtypes.bfloat16).astype(np.float64)
                if split is None:
                    np.testing.assert_array_equal(part, whole)
                else:
                    step = piece[split]
                    r = int(tag)
                    index = [slice(None)] * 2
                    index[split] = slice(r * step, (r + 1) * step)
                    np.testing.assert_array_equal(part, whole[tuple(index)])


def test_config_has_the_release_keys_and_no_release_constant(tmp_path):
    written = write_tiny_grok2(tmp_path, ranks=2, rope_theta=7000)
    on_disk = json.loads((tmp_path / "config.json").read_text())
    assert on_disk == written["config"] and set(on_disk) == RELEASE_KEYS
    assert on_disk["rope_theta"] == 7000                # overrides are written
    assert all(on_disk[k] != v for k, v in RELEASE_CONSTANTS.items())
    assert on_disk["num_attention_heads"] * on_disk["head_dim"] != on_disk["hidden_size"]


def test_the_same_seed_writes_the_same_weights_and_another_seed_others(tmp_path):
    a = write_tiny_grok2(tmp_path / "a", seed=1)["weights"]
    b = write_tiny_grok2(tmp_path / "b", seed=1)["weights"]
    c = write_tiny_grok2(tmp_path / "c", seed=2)["weights"]
    name = "model.layers.1.self_attn.q_proj.weight"
    np.testing.assert_array_equal(a[name], b[name])
    assert not np.array_equal(a[name], c[name])


@pytest.mark.parametrize("change", [f.name for f in dataclasses.fields(oracle_grok2.Variant)])
def test_every_feature_changes_the_logits(tiny, change):
    base, _ = oracle_grok2.forward(tiny["weights"], tiny["config"], TOKENS)
    default = getattr(oracle_grok2.Variant(), change)
    other, _ = oracle_grok2.forward(tiny["weights"], tiny["config"], TOKENS,
                                    **{change: not default})
    assert np.abs(other - base).max() > CHANGED, f"{change} does not matter"


def test_the_router_does_not_renormalise(tiny):
    _, route = oracle_grok2.forward(tiny["weights"], tiny["config"], TOKENS)
    chosen, weights, probs = route["experts"], route["weights"], route["probs"]
    assert chosen.shape == weights.shape == (2, len(TOKENS), 2)
    np.testing.assert_array_equal(weights, np.take_along_axis(probs, chosen, axis=-1))
    np.testing.assert_allclose(probs.sum(-1), 1, rtol=1e-12)   # float64 sums: exact to ~1e-15
    assert (weights.sum(-1) < 1 - 1e-3).all()   # the other two experts keep their share
    top2 = np.sort(np.argsort(-route["logits"], axis=-1)[..., :2], axis=-1)
    np.testing.assert_array_equal(np.sort(chosen, axis=-1), top2)
    assert (weights[..., 0] >= weights[..., 1]).all()           # by capped logit, descending
    _, renormed = oracle_grok2.forward(tiny["weights"], tiny["config"], TOKENS, renormalize=True)
    np.testing.assert_allclose(renormed["weights"].sum(-1), 1, rtol=1e-12)


def test_the_router_cap_changes_the_weights_not_the_choice(tiny):
    _, capped = oracle_grok2.forward(tiny["weights"], tiny["config"], TOKENS[:1])
    _, uncapped = oracle_grok2.forward(tiny["weights"], tiny["config"], TOKENS[:1],
                                       router_cap=False)
    # one token: the first layer sees the same input either way (tanh keeps the order)
    np.testing.assert_array_equal(capped["experts"][0], uncapped["experts"][0])
    assert np.abs(capped["weights"][0] - uncapped["weights"][0]).max() > CHANGED


@pytest.mark.parametrize("change", [{"temperature": False}, {"temperature_before_cap": True}])
def test_the_temperature_changes_only_positions_beyond_its_length(tiny, change):
    length = tiny["config"]["attn_temperature_len"]
    base, _ = oracle_grok2.forward(tiny["weights"], tiny["config"], TOKENS)
    other, _ = oracle_grok2.forward(tiny["weights"], tiny["config"], TOKENS, **change)
    # positions 0..L run the same operations (a factor of exactly 1): equal to the bit
    np.testing.assert_array_equal(other[:length + 1], base[:length + 1])
    assert (np.abs(other[length + 1:] - base[length + 1:]).max(axis=1) > CHANGED).all()


def test_one_token_attends_to_itself_whatever_the_attention_features(tiny):
    base, _ = oracle_grok2.forward(tiny["weights"], tiny["config"], TOKENS[:1])
    for change in ({"attn_cap": False}, {"temperature": False}, {"rope_interleaved": True}):
        other, _ = oracle_grok2.forward(tiny["weights"], tiny["config"], TOKENS[:1], **change)
        np.testing.assert_array_equal(other, base)   # softmax of one score is exactly 1


def test_greedy_appends_each_positions_argmax(tiny):
    prompt = TOKENS[:4]
    out = oracle_grok2.greedy(tiny["weights"], tiny["config"], prompt, 3)
    logits, _ = oracle_grok2.forward(tiny["weights"], tiny["config"], prompt + out)
    assert out == [int(np.argmax(logits[i])) for i in range(len(prompt) - 1, len(prompt) + 2)]
    assert all(0 <= t < tiny["config"]["vocab_size"] for t in out)
