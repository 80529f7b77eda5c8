"""Model configuration: the fields of a Grok-1 checkpoint's `config.json` (SPEC §1)."""
from __future__ import annotations

import dataclasses
import json
import os
import reprlib
from pathlib import Path
from typing import Any

from grok.errors import CheckpointError, ConfigError, one_line
from grok.files import DuplicateKey, NotRegularFile, TooLarge, read_limited, unique_keys


PAGE_SIZE = 16          # tokens a page of the engine's paged KV cache (vLLM's default; a power of
                        # two dividing every attention bucket)
MAX_KV_TOKENS = 1 << 28  # a pool's bound (16.7M pages of 16): its host bookkeeping stays small
PREFILL_TOKENS = 4096   # the engine's default budget of rows x padded length per prefill call
# From BENCHMARKS.md ("int4 weights: fidelity"): 32 had the lowest error of 32 / 64 / 128 on
# the demo's held-out perplexity and on both fixtures; its scales cost 0.5 bit a weight (Grok-1
# 179 GB, 10 GB more than 64) and it still fits 2 x 141 GB and 4 x 80 GB with 8 x 8192 tokens.
DEFAULT_GROUP_SIZE = 32
# The MoE evaluations an execution plan can take (grok.kernels.plan), named here so that the
# command lines can offer them without importing jax.
MOE_IMPLS = ("auto", "dense", "gather", "grouped", "pallas", "tokamax")


def prefill_chunk(prefill_tokens: int) -> int:
    """The chunk a longer prompt is prefilled in, one per engine step: the largest power of two
    <= `prefill_tokens` (a power of two, so that chunks share the prompt buckets' compiles)."""
    return 1 << (max(1, int(prefill_tokens)).bit_length() - 1)

# --- bounds on a config (every field is checked against these before any size is computed) ---
# Grok-1's values, for scale: vocab 2**17, context 8192, width 6144, 48 x 128 query heads,
# 64 layers, 8 experts of width 32768; 3.2e11 parameters, largest file 2**30.6 elements.
INT_BOUNDS = {
    # token ids stay exact in float32 and int32 up to 2**24; released vocabularies are <= 2**18
    "vocab_size": 2 ** 24,
    # sizes positions, RoPE tables and each sequence's KV cache: 128x Grok-1's context
    "sequence_len": 2 ** 20,
    # 10x Grok-1's width; keeps widening_factor * emb_size an exactly representable float
    "emb_size": 2 ** 16,
    # one head's width (Grok-1: 128; the widest in use: 256)
    "key_size": 2 ** 10,
    # heads per layer (Grok-1: 48 query, 8 key/value); q_size = heads * key_size <= 2**20
    "num_q_heads": 2 ** 10,
    "num_kv_heads": 2 ** 10,
    # the leaf table and the checkpoint hold 12 tensors (files) per layer: 16x Grok-1's 64
    "num_layers": 1024,
    # the router's top-k and the per-expert weights (Grok-1: 8)
    "num_experts": 1024,
    "num_selected_experts": 1024,
    # row blocks of a matrix's int8 scales; must divide the rows anyway (Grok-1: 8)
    "scale_blocks": 1024,
}
WEIGHT_BITS = (8, 4, 16)  # int8 (Grok-1's release), int4 (packed, per-group scales), bfloat16
WEIGHT_FORMATS = {8: "int8", 4: "int4", 16: "bf16"}
# The features' widths and the temperature's length: 2**26 (Grok-2: 32768 and 1024)
FEATURE_INT_MAX = 2 ** 26
MAX_GROUP_SIZE = 2 ** 16  # rows per int4 scale; Grok-1's widest input is 32768
# int(widening_factor * emb_size) <= 2**26: the expert width is computed exactly (Grok-1: 8.0)
MAX_WIDENING_FACTOR = 1024.0
# the multipliers, eps, RoPE base and logit cap are used in float32 (max 3.4e38): further from 1
# than this they round to 0 or overflow once multiplied with activations
FLOAT_RANGE = (1e-30, 1e30)
# any one tensor the loader reads or a sequence needs (a file: one layer's experts, the embedding;
# one sequence's keys over all layers): 1 TiB of int8, 2**7 x Grok-1's largest file (2**30.6)
MAX_TENSOR_ELEMENTS = 2 ** 40
# the whole model, and so any layer-stacked array of it: 30x Grok-1's 3.2e11 parameters
MAX_PARAMETERS = 10 ** 13
# a config.json is under 1 KB; refuse to read more than this
MAX_CONFIG_BYTES = 2 ** 20

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
    # The weights' storage: 8 (int8 with scale_blocks row blocks, the release's) or 4 (int4,
    # safetensors checkpoints only, one scale per group of rows: each matrix's group is the
    # largest divisor of its input width not above group_size; 0 with int8).
    weight_bits: int = 8
    group_size: int = 0
    # Features beyond Grok-1 (each default is Grok-1's behaviour; Grok-2 sets them from its
    # release config.json, grok.families.grok2): the experts' width when not derived from
    # widening_factor (0: derived); a dense MLP of this width beside the experts, combined as
    # (mlp + moe) / sqrt(2) (0: none); caps of the router's logits and of the final logits
    # (0: none); the attention temperature log2(p) / log2(L) for query positions p > L (0: none);
    # a separate output matrix (lm_head) instead of the tied embedding; exact (erf) GELU instead
    # of the tanh approximation.
    moe_ffn_size: int = 0
    dense_ffn_size: int = 0
    router_logit_cap: float = 0.0
    final_logit_cap: float = 0.0
    attn_temperature_len: int = 0
    tied_embedding: bool = True
    exact_gelu: bool = False
    # Which family's tokenizer and chat format go with the weights (grok.families; the model
    # itself never reads it): what a converted checkpoint's config.json says it came from.
    family: str = "grok-1"

    def __post_init__(self) -> None:
        self.validate()

    # --- derived sizes -------------------------------------------------------------------------
    @property
    def ffn_size(self) -> int:
        """Expert hidden width: moe_ffn_size where set, else int(wf * D) * 2 // 3 rounded up to a
        multiple of 8 (Grok-1's rule)."""
        if self.moe_ffn_size:
            return self.moe_ffn_size
        size = int(self.widening_factor * self.emb_size) * 2 // 3
        return size + (-size) % 8

    @property
    def weight_format(self) -> str:
        """The matrices' storage by name: "int8", "int4" or "bf16"."""
        return WEIGHT_FORMATS[self.weight_bits]

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
        """Raise a one-line ConfigError naming the first field that cannot work. Every field's type
        and range is checked before any derived size is computed, so no value (10**400, 1e308,
        NaN, a string) gets further than this."""
        for name, most in INT_BOUNDS.items():
            value = getattr(self, name)
            if not _is_int(value) or not 1 <= value <= most:
                raise ConfigError(f"config field {name} must be a positive integer <= {most}, "
                                  f"got {_show(value)}")
        value = self.widening_factor
        if not _is_number(value) or not 0 < value <= MAX_WIDENING_FACTOR:
            raise ConfigError(f"config field widening_factor must be a positive number "
                              f"<= {MAX_WIDENING_FACTOR:g}, got {_show(value)}")
        low, high = FLOAT_RANGE
        for name in ("attn_output_multiplier", "embedding_multiplier_scale",
                     "output_multiplier_scale", "rms_norm_eps", "rope_base", "attn_logit_cap"):
            value = getattr(self, name)
            if not _is_number(value) or not low <= value <= high:   # NaN fails the comparison
                raise ConfigError(f"config field {name} must be a positive number in "
                                  f"[{low:g}, {high:g}], got {_show(value)}")
        self._check_features()
        for name in ("pad_token", "eos_token"):
            value = getattr(self, name)
            if not _is_int(value) or not 0 <= value < self.vocab_size:
                raise ConfigError(f"config field {name}={_show(value)} is not a token id below "
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
        self._check_format()
        self._check_sizes()

    def _check_features(self) -> None:
        for name in ("moe_ffn_size", "dense_ffn_size", "attn_temperature_len"):
            value = getattr(self, name)
            if not _is_int(value) or not 0 <= value <= FEATURE_INT_MAX:
                raise ConfigError(f"config field {name} must be an integer in "
                                  f"[0, {FEATURE_INT_MAX}] (0: off), got {_show(value)}")
        low, high = FLOAT_RANGE
        for name in ("router_logit_cap", "final_logit_cap"):
            value = getattr(self, name)
            if not _is_number(value) or not (value == 0 or low <= value <= high):
                raise ConfigError(f"config field {name} must be 0 (off) or a positive number in "
                                  f"[{low:g}, {high:g}], got {_show(value)}")
        for name in ("tied_embedding", "exact_gelu"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"config field {name} must be true or false, got "
                                  f"{_show(getattr(self, name))}")
        if not isinstance(self.family, str) or not self.family.replace("-", "").isalnum() \
                or len(self.family) > 40:
            raise ConfigError(f"config field family must be a family's name (e.g. 'grok-2'), "
                              f"got {_show(self.family)}")
        if self.attn_temperature_len == 1:   # log2(1) = 0 would divide by zero
            raise ConfigError("config field attn_temperature_len must be 0 (off) or >= 2, got 1")

    def _check_format(self) -> None:
        if not _is_int(self.weight_bits) or self.weight_bits not in WEIGHT_BITS:
            raise ConfigError(f"config field weight_bits must be one of {WEIGHT_BITS}, got "
                              f"{_show(self.weight_bits)}")
        group = self.group_size
        if self.weight_bits in (8, 16):
            if group != 0 or not _is_int(group):
                raise ConfigError(f"config field group_size must be 0 with weight_bits=8 (int8 "
                                  f"weights use scale_blocks), got {_show(group)}")
            return
        if not _is_int(group) or not 1 <= group <= MAX_GROUP_SIZE:
            raise ConfigError(f"config field group_size must be a positive integer <= "
                              f"{MAX_GROUP_SIZE} with weight_bits=4, got {_show(group)}")
        if self.emb_size % 2 or self.ffn_size % 2 or self.dense_ffn_size % 2:
            # (int4 packs pairs of input rows)
            raise ConfigError(f"weight_bits=4 needs even emb_size, expert and dense widths, "
                              f"got {self.emb_size}, {self.ffn_size} and {self.dense_ffn_size}")

    def _check_sizes(self) -> None:
        """Bound each checkpoint tensor (one file: one layer's weights), one sequence's KV cache
        and the parameter count, which also bounds the layer-stacked arrays of the scanned model.
        Exact integer arithmetic: every field is bounded already. The shapes are grok.leaves'."""
        L, E, D, F = self.num_layers, self.num_experts, self.emb_size, self.ffn_size
        Q, KV = self.q_size, self.kv_size
        tensors = (
            ("the embedding (vocab_size x emb_size)", self.vocab_size * D),
            ("one layer's expert weights (experts x emb_size x ffn_size)", E * D * F),
            ("one layer's query weights (emb_size x q_heads*key_size)", D * Q),
            ("one sequence's keys (layers x sequence_len x kv_heads*key_size)",
             L * self.sequence_len * KV),
        )
        for what, elements in tensors:
            if elements >= MAX_TENSOR_ELEMENTS:
                raise ConfigError(f"config too large: {what} would hold {elements:.3g} elements "
                                  f"(fewer than 2**40 = {MAX_TENSOR_ELEMENTS:.3g} allowed)")
        dense = 3 * D * self.dense_ffn_size
        per_layer = 3 * E * D * F + dense + 2 * D * Q + 2 * D * KV + 4 * D + D * E
        heads = 1 if self.tied_embedding else 2   # the embedding, and a separate lm_head
        total = heads * self.vocab_size * D + D + L * per_layer
        if total > MAX_PARAMETERS:
            raise ConfigError(f"config too large: {total:.3g} parameters "
                              f"(at most {MAX_PARAMETERS:.0e})")

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
        """A config from `config.json`'s object; errors are one line naming `source` and the
        field (values shown cut short)."""
        source = one_line(source, 300)
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        keys = [key for key in data if not isinstance(key, str)]
        if keys:
            raise ConfigError(f"{source}: config keys must be strings, got {_show(keys[0])}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(key for key in data if key not in known)
        if unknown:
            names = ", ".join(key if key.isprintable() and len(key) <= 40 else _show(key)
                              for key in unknown[:5])
            more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            raise ConfigError(f"{source}: unknown config field(s) {names}{more}")
        try:
            return cls(**data)
        except ConfigError as err:
            raise ConfigError(one_line(f"{source}: {err}", 1000)) from None
        except (ArithmeticError, TypeError, ValueError, RecursionError) as err:  # a missed case
            raise ConfigError(f"{source}: invalid config "
                              f"({type(err).__name__}: {one_line(err, 100)})") from None

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "GrokConfig":
        """Read `config.json`: a regular file of at most MAX_CONFIG_BYTES of UTF-8 JSON. Every
        problem (missing, a directory or FIFO, too big, not UTF-8, not JSON, nested too deep,
        duplicate keys, a bad field) is a one-line ConfigError naming the file."""
        name = one_line(os.fspath(path), 300)
        try:
            text = _read_config_file(path, name).decode("utf-8-sig")
        except UnicodeDecodeError as err:
            raise ConfigError(f"{name}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at "
                              f"offset {err.start})") from None
        try:
            data = json.loads(text, parse_int=_parse_int, object_pairs_hook=unique_keys)
        except DuplicateKey as err:
            raise ConfigError(f"{name}: {err}") from None
        except json.JSONDecodeError as err:
            raise ConfigError(f"{name}: not valid JSON ({one_line(err.msg, 100)} at line "
                              f"{err.lineno} column {err.colno})") from None
        except RecursionError:
            raise ConfigError(f"{name}: not valid JSON (nested too deeply to parse)") from None
        except (ValueError, ArithmeticError) as err:
            raise ConfigError(f"{name}: not valid JSON ({one_line(err, 100)})") from None
        return cls.from_dict(data, source=name)

    def to_json(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
            f.write("\n")

    def replace(self, **changes: Any) -> "GrokConfig":
        return dataclasses.replace(self, **changes)


_EXTRA_FIELDS = ("rms_norm_eps", "rope_base", "attn_logit_cap", "scale_blocks", "weight_bits",
                 "group_size", "moe_ffn_size", "dense_ffn_size", "router_logit_cap",
                 "final_logit_cap", "attn_temperature_len", "tied_embedding", "exact_gelu",
                 "family")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class _LongInteger:
    """An integer literal of config.json too long to be a field's value: kept as its text (Python
    refuses to convert more than 4300 digits, and no bound here needs more than 40)."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return f"{self.text[:20]}... ({len(self.text.lstrip('-'))} digits)"


def _parse_int(text: str) -> int | _LongInteger:
    return _LongInteger(text) if len(text) > 40 else int(text)


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict = 2, 4, 4
_REPR.maxstring, _REPR.maxlong, _REPR.maxother = 40, 40, 40


def _show(value: Any, limit: int = 40) -> str:
    """A short repr of a value for an error message: never more than about `limit` characters,
    whatever the value (a 10**400 integer, a 10**6-character string, a deep list)."""
    if _is_int(value) and value.bit_length() > 128:
        digits = int(value.bit_length() * 0.30103) + 1
        return f"{'-' if value < 0 else ''}an integer of about {digits} digits"
    try:
        text = _REPR.repr(value)
    except Exception:   # e.g. an integer inside a list past Python's int-string limit
        text = f"<{type(value).__name__}>"
    return one_line(text, limit)


def _read_config_file(path: str | os.PathLike, name: str) -> bytes:
    """The bytes of `path` (a regular file of at most MAX_CONFIG_BYTES), else a ConfigError."""
    try:
        return read_limited(path, MAX_CONFIG_BYTES)
    except FileNotFoundError:
        if os.path.islink(path):
            raise ConfigError(f"{name}: a symbolic link to {one_line(os.readlink(path), 200)}, "
                              "which does not exist") from None
        raise ConfigError(f"{name}: no such file") from None
    except NotRegularFile as err:
        raise ConfigError(f"{name}: is {err.kind}, not a config file") from None
    except TooLarge as err:
        raise ConfigError(f"{name}: too large for a config ({err})") from None
    except (OSError, ValueError) as err:   # ValueError: a NUL byte in the path
        raise ConfigError(f"{name}: cannot read ({getattr(err, 'strerror', None) or err})") \
            from None


GROK1 = GrokConfig()
"""The released Grok-1 (SPEC §1)."""
