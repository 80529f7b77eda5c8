import json
import os

import pytest

from grok.checkpoint.directory import read_config
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


# --- hostile config.json files: every one a one-line ConfigError naming the file and field ------

def _error(path) -> str:
    with pytest.raises(ConfigError) as info:
        GrokConfig.from_json(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message and len(message) < 400, message
    return message


@pytest.mark.parametrize("text, words", [
    ('{"widening_factor": 1e308}', "widening_factor must be a positive number <= 1024, got 1e+308"),
    ('{"emb_size": %d}' % 10 ** 400, "emb_size must be a positive integer <= 65536, got 1000"),
    ('{"widening_factor": %d}' % 10 ** 400, "widening_factor must be a positive number"),
    ('{"widening_factor": 1e999}', "widening_factor must be a positive number <= 1024, got inf"),
    ('{"rope_base": NaN}', "rope_base must be a positive number in [1e-30, 1e+30], got nan"),
    ('{"embedding_multiplier_scale": -Infinity}', "embedding_multiplier_scale must be a positive"),
    ('{"num_layers": %s}' % ("9" * 10 ** 6), "num_layers must be a positive integer <= 1024, "
                                              "got 99999999999999999999... (1000000 digits)"),
    ('{"sequence_len": 1000000000000}', "sequence_len must be a positive integer <= 1048576"),
    ('{"num_layers": 10000000}', "num_layers must be a positive integer <= 1024, got 10000000"),
    ('{"vocab_size": 16777217}', "vocab_size must be a positive integer <= 16777216"),
    ('{"emb_size": "6144"}', "emb_size must be a positive integer <= 65536, got '6144'"),
    ('{"emb_size": [1, 2, 3, 4, 5, 6]}', "emb_size must be a positive integer <= 65536, got [1, 2"),
    ('{"emb_size": null}', "emb_size must be a positive integer <= 65536, got None"),
    ('{"emb_size": true}', "emb_size must be a positive integer <= 65536, got True"),
    ('{"emb_size": 6144.0}', "emb_size must be a positive integer <= 65536, got 6144.0"),
    ('{"pad_token": -1}', "pad_token=-1 is not a token id below vocab_size=131072"),
    ('{"emb_size": 64, "emb_size": 128}', "duplicate key 'emb_size'"),
    ("[" * 100_000 + "]" * 100_000, "not valid JSON (nested too deeply to parse)"),
    ('{"emb_size": %s}' % ("[" * 100_000 + "]" * 100_000), "nested too deeply"),
    ("", "not valid JSON (Expecting value at line 1 column 1)"),
])
def test_hostile_config_json_is_one_line_naming_file_and_field(tmp_path, text, words):
    path = tmp_path / "config.json"
    path.write_text(text)
    message = _error(path)
    assert words in message, message


def test_long_values_are_cut_short_in_messages(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"emb_size": "x" * 100_000}))
    assert "emb_size must be a positive integer" in _error(path)
    path.write_text(json.dumps({f"field{i}\n": 1 for i in range(100)} | {"y" * 10_000: 2}))
    message = _error(path)
    assert "unknown config field(s) 'field0\\n'" in message and "and 96 more" in message
    with pytest.raises(ConfigError, match="emb_size .* got an integer of about 401 digits") as info:
        GrokConfig(emb_size=10 ** 400)
    assert len(str(info.value)) < 120
    with pytest.raises(ConfigError, match="keys must be strings, got 1"):
        GrokConfig.from_dict({1: 2, "emb_size": 3}, source="mine")


def test_invalid_utf8_names_the_file_and_byte(tmp_path):
    path = tmp_path / "config.json"
    path.write_bytes(b'{"emb_size": "\xff"}')
    assert "not UTF-8 text (byte 0xff at offset 14)" in _error(path)
    path.write_bytes(b'\xef\xbb\xbf{"num_layers": 3}')     # a BOM is fine
    assert GrokConfig.from_json(path).num_layers == 3


def test_config_files_over_a_megabyte_are_refused_unread(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(" " * (1 << 20) + "{}")
    assert "too large for a config" in _error(path) and "1048576" in _error(path)


def test_a_config_json_that_is_no_regular_file_is_named(tmp_path):
    path = tmp_path / "config.json"
    path.mkdir()
    assert "is a directory, not a config file" in _error(path)
    with pytest.raises(ConfigError, match="config.json: is a directory"):
        read_config(tmp_path)     # not Grok-1, as it was before
    path.rmdir()
    path.symlink_to(tmp_path / "gone.json")
    assert "a symbolic link to" in _error(path) and "which does not exist" in _error(path)
    with pytest.raises(ConfigError, match="config.json: a symbolic link"):
        read_config(tmp_path / "ckpt-0")                     # the parent's config.json
    path.unlink()
    if hasattr(os, "mkfifo"):     # opened non-blocking: a FIFO with no writer must not hang
        os.mkfifo(path)
        assert "is a FIFO, not a config file" in _error(path)
        path.unlink()
    assert read_config(tmp_path) is GROK1                    # none at all: Grok-1


@pytest.mark.parametrize("changes, words", [
    (dict(num_layers=1024, emb_size=65536), "config too large: 5.64e+14 parameters"),
    (dict(vocab_size=2 ** 24, emb_size=2 ** 16), "the embedding (vocab_size x emb_size) would hold"),
    (dict(num_experts=1024, emb_size=2 ** 16, widening_factor=1024.0),
     "one layer's expert weights"),
    (dict(sequence_len=2 ** 20, num_layers=1024, num_q_heads=64, num_kv_heads=64),
     "one sequence's keys"),
    (dict(rms_norm_eps=0.0), "rms_norm_eps must be a positive number in [1e-30, 1e+30]"),
    (dict(attn_logit_cap=1e31), "attn_logit_cap must be a positive number"),
    (dict(key_size=2048), "key_size must be a positive integer <= 1024"),
])
def test_sizes_are_bounded_before_use(changes, words):
    with pytest.raises(ConfigError) as info:
        GROK1.replace(**changes)
    assert words in str(info.value)


def test_the_bounds_leave_room_above_grok1():
    assert GROK1.replace(num_layers=1024).num_layers == 1024     # 5e12 parameters
    assert GROK1.replace(sequence_len=2 ** 20, vocab_size=2 ** 24 - 1).sequence_len == 2 ** 20
    assert GROK1.replace(num_layers=2, widening_factor=1024.0, attn_logit_cap=1e12).ffn_size \
        == 4194304
