"""Grok-2 (xAI, 2025) as published: the release's config.json read into a GrokConfig, its
safetensors files (grok.checkpoint.grok2_release), its tiktoken tokenizer (`tokenizer.tok.json`)
and its chat format. Every constant comes from config.json; a value the model cannot run as
SGLang does is refused in one line."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from grok.checkpoint.directory import CONFIG_FILE, GROK2_TOKENIZER_FILE
from grok.checkpoint.grok2_release import is_release
from grok.config import MAX_CONFIG_BYTES, GrokConfig
from grok.errors import ConfigError, one_line
from grok.files import DuplicateKey, NotRegularFile, TooLarge, read_limited, unique_keys

log = logging.getLogger(__name__)

TOKENIZER_FILE = GROK2_TOKENIZER_FILE
ARCHITECTURE = "Grok1ForCausalLM"   # what the release's config.json names (Grok-2 included)
# release key -> GrokConfig field, for the keys that carry over as they are
RENAMED = {
    "vocab_size": "vocab_size", "hidden_size": "emb_size", "num_hidden_layers": "num_layers",
    "head_dim": "key_size", "num_attention_heads": "num_q_heads",
    "num_key_value_heads": "num_kv_heads", "moe_intermediate_size": "moe_ffn_size",
    "num_local_experts": "num_experts", "num_experts_per_tok": "num_selected_experts",
    "rms_norm_eps": "rms_norm_eps", "embedding_multiplier_scale": "embedding_multiplier_scale",
    "output_multiplier_scale": "output_multiplier_scale",
    "attn_logit_softcapping": "attn_logit_cap", "router_logit_softcapping": "router_logit_cap",
    "final_logit_softcapping": "final_logit_cap", "attn_temperature_len": "attn_temperature_len",
    "rope_theta": "rope_base", "max_position_embeddings": "sequence_len",
}
REQUIRED = tuple(RENAMED) + ("intermediate_size", "residual_moe")
# Keys whose release value is the only one this model runs (as SGLang reads them): another value
# would silently change the model, so it is refused.
ONLY = {"rope_type": ("original",), "sliding_window_size": (-1, None),
        "global_attn_every_n": (1, None), "tie_word_embeddings": (False, None)}
# Keys read and not needed ("original" RoPE applies none of the scaling fields, as SGLang).
IGNORED = ("architectures", "model_type", "torch_dtype", "original_max_position_embeddings",
           "scaling_factor", "extrapolation_factor", "attn_factor", "beta_fast", "beta_slow",
           "bos_token_id", "eos_token_id", "pad_token_id", "transformers_version",
           "initializer_range", "use_cache", "hidden_act", "max_attn_value", "num_experts")


def detect(path: Path) -> bool:
    return is_release(path)


def config_from_release(data: Any, source: str, eos_token: int = 0, pad_token: int = 0,
                        weight_bits: int = 16) -> GrokConfig:
    """The GrokConfig of a Grok-2 release config.json object (`source` names it in errors).
    `eos_token` / `pad_token`: the tokenizer's (the release's config.json has no token ids)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise ConfigError(f"{source}: Grok-2 config key {missing[0]} missing "
                          f"({len(missing)} of the release's keys missing)")
    archs = data.get("architectures", [ARCHITECTURE])
    if not isinstance(archs, list) or ARCHITECTURE not in archs:
        raise ConfigError(f"{source}: architectures {one_line(repr(archs), 80)} does not name "
                          f"{ARCHITECTURE}")
    for key, allowed in ONLY.items():
        if data.get(key) not in allowed:
            raise ConfigError(f"{source}: {key}={one_line(repr(data.get(key)), 60)} is not "
                              f"supported (only {allowed[0]!r}, as the release)")
    unknown = sorted(k for k in data if k not in RENAMED and k not in REQUIRED
                     and k not in ONLY and k not in IGNORED)
    if unknown:
        log.info("%s: keys not used: %s", source, ", ".join(map(repr, unknown[:10])))
    residual = data["residual_moe"]
    if not isinstance(residual, bool):
        raise ConfigError(f"{source}: residual_moe must be true or false, got "
                          f"{one_line(repr(residual), 40)}")
    fields = {field: data[key] for key, field in RENAMED.items()}
    head_dim = fields["key_size"]
    if not isinstance(head_dim, int) or isinstance(head_dim, bool) or head_dim < 1:
        raise ConfigError(f"{source}: head_dim must be a positive integer, got "
                          f"{one_line(repr(head_dim), 40)}")
    fields.update(
        dense_ffn_size=data["intermediate_size"] if residual else 0,
        attn_output_multiplier=1 / math.sqrt(head_dim),   # SGLang's scaling: head_dim ** -0.5
        tied_embedding=False, exact_gelu=True, weight_bits=weight_bits, group_size=0,
        scale_blocks=1, eos_token=eos_token, pad_token=pad_token, family="grok-2")
    if fields["moe_ffn_size"] == 0:   # 0 means "derived" in GrokConfig: not a release value
        raise ConfigError(f"{source}: moe_intermediate_size must be positive, got 0")
    try:
        return GrokConfig(**fields)
    except ConfigError as err:
        raise ConfigError(one_line(f"{source}: {err}", 1000)) from None
    except (ArithmeticError, TypeError, ValueError) as err:
        raise ConfigError(f"{source}: invalid config ({type(err).__name__}: "
                          f"{one_line(err, 100)})") from None


def read_release_json(path: Path) -> dict[str, Any]:
    """A release config.json's object: a bounded regular file of JSON without duplicate keys."""
    name = one_line(str(path), 300)
    try:
        raw = read_limited(path, MAX_CONFIG_BYTES)
        return json.loads(raw.decode("utf-8-sig"), object_pairs_hook=unique_keys)
    except FileNotFoundError:
        raise ConfigError(f"{name}: missing (a Grok-2 release has a config.json)") from None
    except (NotRegularFile, TooLarge, DuplicateKey) as err:
        raise ConfigError(f"{name}: {err}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ConfigError(f"{name}: not valid JSON ({one_line(err, 100)})") from None
    except OSError as err:
        raise ConfigError(f"{name}: cannot read ({err.strerror or err})") from None


def read_config(path: Path, eos_token: int = 0, pad_token: int = 0) -> GrokConfig:
    """The GrokConfig of the release directory `path` (its config.json)."""
    return config_from_release(read_release_json(path / CONFIG_FILE), str(path / CONFIG_FILE),
                               eos_token, pad_token)


def is_release_config(data: Any) -> bool:
    """Whether a config.json object is in the release's form (its keys), not grok's."""
    return isinstance(data, dict) and "hidden_size" in data and "emb_size" not in data
