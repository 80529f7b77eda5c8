"""Model configuration: the fields of a Grok-1 checkpoint's `config.json` (SPEC §1)."""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

from grok.errors import CheckpointError, ConfigError


PREFILL_TOKENS = 4096   # the engine's default budget of rows x padded length per prefill call

DEMO = "demo"   # how `grok.load` and run.py name the small model a source checkout ships
DEMO_DIR = Path(__file__).resolve().parent.parent / "checkpoints" / DEMO


def model_dir(path: str | os.PathLike) -> Path:
    """The model directory `path` names: the literal "demo" is the shipped demo model (write
    "./demo" for a directory of that name); anything else is a directory path."""
    if isinstance(path, str) and path == DEMO:
        if not (DEMO_DIR / "ckpt-0").is_dir():
            raise CheckpointError(f"the demo model ships with a source checkout, in {DEMO_DIR}, "
                                    "and this install has none: pip install -e . from a clone")
        return DEMO_DIR
    return Path(path)


@dataclasses.dataclass(frozen=True)
class GrokConfig:
    """Architecture hyper-parameters; field names are exactly the keys of `config.json`."""

    vocab_size: int = 131072
    pad_token: int = 0
    eos_token: int = 2
    sequence_len: int = 8192
    emb_size: int = 6144
    key_size: int = 128
    num_q_heads: int = 48
    num_kv_heads: int = 8
    num_layers: int = 64
    widening_factor: float = 8.0
    num_experts: int = 8
    num_selected_experts: int = 2
    attn_output_multiplier: float = 0.08838834764831845
    embedding_multiplier_scale: float = 78.38367176906169
    output_multiplier_scale: float = 0.5773502691896257
    # Not in config.json: fixed by the architecture, kept here so tests can vary them.
    rms_norm_eps: float = 1e-5
    rope_base: float = 10000.0
    attn_logit_cap: float = 30.0
    # Row blocks of the row-parallel matrices' scales (SPEC §3); 1 for all others.
    scale_blocks: int = 8

    def __post_init__(self) -> None:
        self.validate()

    # --- derived sizes -------------------------------------------------------------------------
    @property
    def ffn_size(self) -> int:
        """Expert hidden width: int(wf * D) * 2 // 3, rounded up to a multiple of 8."""
        size = int(self.widening_factor * self.emb_size) * 2 // 3
        return size + (-size) % 8

    @property
    def q_size(self) -> int:
        return self.num_q_heads * self.key_size

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.key_size

    @property
    def is_grok1(self) -> bool:
        return self == GrokConfig()

    # --- checks ----------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ConfigError naming the first field that cannot work."""
        positive = ("vocab_size", "sequence_len", "emb_size", "key_size", "num_q_heads",
                    "num_kv_heads", "num_layers", "num_experts", "num_selected_experts",
                    "scale_blocks")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"config field {name} must be a positive integer, got {value!r}")
        for name in ("widening_factor", "attn_output_multiplier", "embedding_multiplier_scale",
                     "output_multiplier_scale", "rms_norm_eps", "rope_base", "attn_logit_cap"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"config field {name} must be a positive number, got {value!r}")
        for name in ("pad_token", "eos_token"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) \
                    or not 0 <= value < self.vocab_size:
                raise ConfigError(f"config field {name}={value!r} is not a token id below "
                                  f"vocab_size={self.vocab_size}")
        if self.num_q_heads % self.num_kv_heads:
            raise ConfigError(f"num_q_heads={self.num_q_heads} is not a multiple of "
                              f"num_kv_heads={self.num_kv_heads}")
        if self.key_size % 2:
            raise ConfigError(f"key_size={self.key_size} must be even for RoPE")
        if self.num_selected_experts > self.num_experts:
            raise ConfigError(f"num_selected_experts={self.num_selected_experts} exceeds "
                              f"num_experts={self.num_experts}")
        if self.ffn_size < 1:
            raise ConfigError(f"widening_factor={self.widening_factor} gives no expert width")
        for rows, what in ((self.q_size, "num_q_heads * key_size"),
                           (self.ffn_size, "the expert width (ffn_size)")):
            if rows % self.scale_blocks:
                raise ConfigError(f"scale_blocks={self.scale_blocks} does not divide {what}={rows}")

    # --- (de)serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The keys of `config.json` (architecture constants are left out when at their default)."""
        out = {}
        defaults = GrokConfig()
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name in _EXTRA_FIELDS and value == getattr(defaults, field.name):
                continue
            out[field.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "GrokConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown config field(s) {', '.join(unknown)}")
        try:
            return cls(**data)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "GrokConfig":
        """Read `config.json`; errors name the file."""
        try:
            with open(path) as f:
                data = json.load(f)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON ({err})") from None
        return cls.from_dict(data, source=str(path))

    def to_json(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
            f.write("\n")

    def replace(self, **changes: Any) -> "GrokConfig":
        return dataclasses.replace(self, **changes)


_EXTRA_FIELDS = ("rms_norm_eps", "rope_base", "attn_logit_cap", "scale_blocks")

GROK1 = GrokConfig()
"""The released Grok-1 (SPEC §1)."""
