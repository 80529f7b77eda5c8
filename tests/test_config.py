import json

import pytest

from grok.config import GROK1, ConfigError, GrokConfig

SPEC_KEYS = {"pad_token", "eos_token", "sequence_len", "emb_size", "key_size", "num_q_heads",
             "num_kv_heads", "num_layers", "widening_factor", "num_experts",
             "num_selected_experts", "attn_output_multiplier", "embedding_multiplier_scale",
             "output_multiplier_scale", "vocab_size"}


def test_grok1_preset_matches_the_release():
    assert (GROK1.vocab_size, GROK1.emb_size, GROK1.num_layers) == (131072, 6144, 64)
    assert (GROK1.num_q_heads, GROK1.num_kv_heads, GROK1.key_size) == (48, 8, 128)
    assert GROK1.ffn_size == 32768
    assert GROK1.attn_output_multiplier == pytest.approx(128 ** -0.5)
    assert GROK1.is_grok1 and not GROK1.replace(num_layers=2).is_grok1


def test_ffn_size_rounds_up_to_a_multiple_of_8():
    # int(2.0 * 128) * 2 // 3 = 170 -> 176, as in the fixtures
    assert GrokConfig(emb_size=128, widening_factor=2.0, num_q_heads=8, num_kv_heads=2,
                      key_size=16).ffn_size == 176


def test_json_round_trip_uses_exactly_the_spec_keys(tmp_path):
    config = GROK1.replace(num_layers=3, vocab_size=1000)
    path = tmp_path / "config.json"
    config.to_json(path)
    assert set(json.loads(path.read_text())) == SPEC_KEYS
    assert GrokConfig.from_json(path) == config


def test_non_default_architecture_constants_are_kept(tmp_path):
    config = GROK1.replace(scale_blocks=4)
    config.to_json(tmp_path / "c.json")
    assert GrokConfig.from_json(tmp_path / "c.json").scale_blocks == 4


@pytest.mark.parametrize("changes, words", [
    (dict(num_q_heads=48, num_kv_heads=7), "num_q_heads=48 is not a multiple of num_kv_heads=7"),
    (dict(scale_blocks=7), "scale_blocks=7 does not divide"),
    (dict(num_layers=0), "num_layers must be a positive integer"),
    (dict(num_selected_experts=9), "num_selected_experts=9 exceeds num_experts=8"),
    (dict(eos_token=131072), "eos_token=131072"),
    (dict(key_size=127, num_q_heads=1, num_kv_heads=1, scale_blocks=1), "key_size=127 must be even"),
    (dict(widening_factor=float("nan")), "widening_factor must be a positive number"),
    (dict(emb_size="6144"), "emb_size must be a positive integer"),
])
def test_invalid_configs_name_the_field(changes, words):
    with pytest.raises(ConfigError, match=words):
        GROK1.replace(**changes)


def test_bad_config_files_name_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        GrokConfig.from_json(path)
    path.write_text(json.dumps({"emb_size": 64, "hidden": 3}))
    with pytest.raises(ConfigError, match="unknown config field.*hidden"):
        GrokConfig.from_json(path)
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        GrokConfig.from_json(path)
