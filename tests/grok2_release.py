"""A tiny Grok-2 checkpoint in the exact layout of the `xai-org/grok-2` release (see
shared/grok2-release.md): its config.json keys, `pytorch_model-000NN-TP-common.safetensors`
and `pytorch_model-000NN-TP-{rank:03d}.safetensors` files of bfloat16 tensors in PyTorch's
[out, in] layout, and a `tokenizer.tok.json` in the release's schema.

Every constant is away from the release's value (caps, scales, RoPE base, temperature length,
eps; q heads x head_dim != hidden_size; special ids not where the release puts them), so code
that hard-codes one of them, or swaps [out, in], fails on it.
"""
from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from grok.serving.tiktoken_tokenizer import V1_PATTERN

CONFIG = {
    "architectures": ["Grok1ForCausalLM"], "model_type": "git", "torch_dtype": "bfloat16",
    "vocab_size": 300, "hidden_size": 64, "num_hidden_layers": 2, "head_dim": 20,
    "num_attention_heads": 4, "num_key_value_heads": 2,
    "intermediate_size": 96, "moe_intermediate_size": 48,    # 48: split by 1, 2, 3, 4, 6, 8 ranks
    "num_local_experts": 4, "num_experts_per_tok": 2, "residual_moe": True, "rms_norm_eps": 1e-6,
    "embedding_multiplier_scale": 3.3, "output_multiplier_scale": 0.7,
    "attn_logit_softcapping": 7.0, "router_logit_softcapping": 9.0,
    "final_logit_softcapping": 11.0, "attn_temperature_len": 5,
    "rope_theta": 5000, "rope_type": "original", "original_max_position_embeddings": 64,
    "scaling_factor": 4.0, "extrapolation_factor": 1.0, "attn_factor": 1.0, "beta_fast": 16,
    "beta_slow": 2, "max_position_embeddings": 128, "sliding_window_size": -1,
    "global_attn_every_n": 1,
}
# (file number, tensor name, shape from the config, the axis ranks split or None), as released.
LAYER = "model.layers.{layer}."
EXPERT = LAYER + "block_sparse_moe.experts.{expert}."
TENSORS = [
    (0, "model.embed_tokens.weight", lambda c: (c["vocab_size"], c["hidden_size"]), None),
    (1, "lm_head.weight", lambda c: (c["vocab_size"], c["hidden_size"]), None),
    (2, "model.norm.weight", lambda c: (c["hidden_size"],), None),
    (3, LAYER + "mlp.gate_proj.weight", lambda c: (c["intermediate_size"], c["hidden_size"]), None),
    (4, LAYER + "mlp.down_proj.weight", lambda c: (c["hidden_size"], c["intermediate_size"]), None),
    (5, LAYER + "mlp.up_proj.weight", lambda c: (c["intermediate_size"], c["hidden_size"]), None),
    (6, EXPERT + "w1.weight", lambda c: (c["moe_intermediate_size"], c["hidden_size"]), 0),
    (7, EXPERT + "w2.weight", lambda c: (c["hidden_size"], c["moe_intermediate_size"]), 1),
    (8, EXPERT + "w3.weight", lambda c: (c["moe_intermediate_size"], c["hidden_size"]), 0),
    (9, LAYER + "self_attn.k_proj.weight",
     lambda c: (c["num_key_value_heads"] * c["head_dim"], c["hidden_size"]), None),
    (10, LAYER + "self_attn.o_proj.weight",
     lambda c: (c["hidden_size"], c["num_attention_heads"] * c["head_dim"]), None),
    (11, LAYER + "self_attn.q_proj.weight",
     lambda c: (c["num_attention_heads"] * c["head_dim"], c["hidden_size"]), None),
    (12, LAYER + "self_attn.v_proj.weight",
     lambda c: (c["num_key_value_heads"] * c["head_dim"], c["hidden_size"]), None),
    (13, LAYER + "pre_attn_norm.weight", lambda c: (c["hidden_size"],), None),
    (14, LAYER + "post_attn_norm.weight", lambda c: (c["hidden_size"],), None),
    (15, LAYER + "pre_moe_norm.weight", lambda c: (c["hidden_size"],), None),
    (16, LAYER + "post_moe_norm.weight", lambda c: (c["hidden_size"],), None),
    (17, LAYER + "block_sparse_moe.gate.weight",
     lambda c: (c["num_local_experts"], c["hidden_size"]), None),
]
# The tokenizer: specials before and after the regular tokens (the release's order is
# unconfirmed); <|mask|> is a special SGLang does not read from text.
SPECIALS_FIRST = ["<|control1|>", "<|reserved_3|>"]
SPECIALS_LAST = ["<|separator|>", "<|mask|>", "<|eos|>", "<|pad|>", "<|reserved_4|>"]
MERGES = 32
CORPUS = ("the cat sat on the mat. the hat is on the cat! 日本語 日本語 日本語 日本 😀😀😀 "
          "naïve café, naïve café. there they then these 1234 the end\n\n" * 3)


def _byte_id(b: int) -> int:
    """Single bytes take ids after the leading specials, scrambled (167 is odd: a bijection)."""
    return len(SPECIALS_FIRST) + (b * 167) % 256


def learn_merges(text: str, count: int) -> list[bytes]:
    """`count` BPE merges learned from `text` split by the V1 pattern (most frequent pair first,
    ties to the larger pair, so the result is the same every time)."""
    import regex

    words = collections.Counter(tuple(bytes([b]) for b in piece.encode("utf-8"))
                                for piece in regex.findall(V1_PATTERN, text))
    merges: list[bytes] = []
    known = {bytes([b]) for b in range(256)}
    while len(merges) < count:
        pairs: collections.Counter = collections.Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:]):
                if pair[0] + pair[1] not in known:
                    pairs[pair] += n
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best[0] + best[1])
        known.add(merges[-1])
        words = collections.Counter({_merge(w, best): n for w, n in words.items()})
    return merges


def _merge(word: tuple[bytes, ...], pair: tuple[bytes, bytes]) -> tuple[bytes, ...]:
    out, i = [], 0
    while i < len(word):
        if word[i:i + 2] == pair:
            out.append(pair[0] + pair[1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def tokenizer_json(merges: int = MERGES) -> dict[str, Any]:
    """A tokenizer.tok.json object: the 256 bytes, `merges` merges learned from CORPUS, and
    the specials; ids dense from 0 (vocab_size says how many)."""
    learned = learn_merges(CORPUS, merges)
    regular = [{"bytes": [b], "token": _byte_id(b)} for b in range(256)]
    first = len(SPECIALS_FIRST) + 256
    regular += [{"bytes": list(m), "token": first + i} for i, m in enumerate(learned)]
    after = first + len(learned)
    special = [{"bytes": list(t.encode()), "token": i} for i, t in enumerate(SPECIALS_FIRST)]
    special += [{"bytes": list(t.encode()), "token": after + i}
                for i, t in enumerate(SPECIALS_LAST)]
    return {"regular_tokens": regular, "special_tokens": special, "word_split": "V1",
            "vocab_size": after + len(SPECIALS_LAST)}


def _file_name(number: int, rank: int | None) -> str:
    tag = "common" if rank is None else f"{rank:03d}"
    return f"pytorch_model-{number:05d}-TP-{tag}.safetensors"


def _random_weights(config: dict[str, Any], seed: int) -> dict[str, np.ndarray]:
    """Full tensors by release name, rounded to bfloat16; scaled so that every cap and the
    temperature change the outputs visibly (scores of a few units, caps of 7 to 11)."""
    rng = np.random.default_rng(seed)
    gain = {"embed_tokens": 1.0, "lm_head": 4.0, "q_proj": 1.5, "k_proj": 1.5, "gate.": 2.0}
    out = {}
    for _, template, shape_of, _ in TENSORS:
        for name in _names(template, config):
            shape = shape_of(config)
            if name.endswith("norm.weight"):
                values = 1.0 + 0.2 * rng.standard_normal(shape)
            else:
                scale = next((g for key, g in gain.items() if key in name), 1.0)
                fan_in = 1 if "embed_tokens" in name else shape[1]
                values = rng.standard_normal(shape) * scale / np.sqrt(fan_in)
            out[name] = values.astype(ml_dtypes.bfloat16)
    return out


def _names(template: str, config: dict[str, Any]) -> list[str]:
    layers = range(config["num_hidden_layers"])
    if "{expert}" in template:
        return [template.format(layer=l, expert=e) for l in layers
                for e in range(config["num_local_experts"])]
    if "{layer}" in template:
        return [template.format(layer=l) for l in layers]
    return [template]


def write_tiny_grok2(directory: str | Path, *, ranks: int = 2, seed: int = 0,
                     **config_overrides: Any) -> dict[str, Any]:
    """Write config.json, the release's safetensors files (experts split over `ranks`) and
    tokenizer.tok.json into `directory`. Returns {"config": the config.json object,
    "weights": {release name: float64 full tensor, the bfloat16 values written},
    "files": the file names written}."""
    from safetensors.numpy import save_file

    config = {**CONFIG, **config_overrides}
    if config["moe_intermediate_size"] % ranks:
        raise ValueError(f"{ranks} ranks do not divide moe_intermediate_size "
                         f"{config['moe_intermediate_size']}")
    tokens = tokenizer_json()
    if tokens["vocab_size"] > config["vocab_size"]:
        raise ValueError(f"vocab_size {config['vocab_size']} < the tokenizer's "
                         f"{tokens['vocab_size']} ids")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = _random_weights(config, seed)
    files = []
    for number, template, _, split in TENSORS:
        names = _names(template, config)
        for rank in (range(ranks) if split is not None else [None]):
            if rank is None:
                tensors = {n: weights[n] for n in names}
            else:
                tensors = {n: np.ascontiguousarray(np.split(weights[n], ranks, axis=split)[rank])
                           for n in names}
            files.append(_file_name(number, rank))
            # the metadata transformers writes (the release's own is unconfirmed)
            save_file(tensors, str(directory / files[-1]), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    (directory / "tokenizer.tok.json").write_text(json.dumps(tokens))
    return {"config": config, "files": files + ["config.json", "tokenizer.tok.json"],
            "weights": {n: w.astype(np.float64) for n, w in weights.items()}}
