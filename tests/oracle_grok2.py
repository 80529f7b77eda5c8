"""Grok-2's forward pass in float64 numpy, with SGLang's semantics (shared/grok2-release.md):
the reference the JAX model is compared with. Weights by release name in PyTorch's [out, in]
layout (tests/grok2_release.py's), every constant from the config.json object.

`forward(..., **changes)` drops or changes one feature at a time (`Variant`'s fields), so a test
can show that each one matters, and name the other servers' readings of the model.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

_erf = np.frompyfunc(math.erf, 1, 1)


@dataclasses.dataclass(frozen=True)
class Variant:
    """The model as SGLang runs it (the defaults), or with one feature dropped or changed."""

    temperature: bool = True              # attention temperature for positions > L
    temperature_before_cap: bool = False  # sglang-jax's TPU kernel order
    attn_cap: bool = True
    router_cap: bool = True
    final_cap: bool = True
    final_cap_before_scale: bool = False  # vLLM's order: cap, then output_multiplier_scale
    dense_mlp: bool = True                # False: the experts alone, as Grok-1
    renormalize: bool = False             # llama.cpp's: top-k weights divided by their sum
    tanh_gelu: bool = False               # sglang-jax's and Grok-1's GELU
    rope_interleaved: bool = False        # GPT-J pairs (0,1),(2,3).. instead of NeoX halves
    embedding_scale: bool = True


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def softcap(x: np.ndarray, cap: float) -> np.ndarray:
    return cap * np.tanh(x / cap)


def gelu(x: np.ndarray, tanh: bool) -> np.ndarray:
    if tanh:
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    return 0.5 * x * (1 + _erf(x / math.sqrt(2)).astype(np.float64))


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def rope(x: np.ndarray, positions: np.ndarray, base: float, interleaved: bool) -> np.ndarray:
    """RoPE over the whole head of x [T, heads, d]: NeoX pairs dimension i with i + d/2."""
    d = x.shape[-1]
    inv_freq = base ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    angle = positions[:, None, None] * inv_freq          # [T, 1, d/2]
    cos, sin = np.cos(angle), np.sin(angle)
    first, second = (x[..., 0::2], x[..., 1::2]) if interleaved else (x[..., :d // 2],
                                                                       x[..., d // 2:])
    a, b = first * cos - second * sin, second * cos + first * sin
    if interleaved:
        return np.stack([a, b], axis=-1).reshape(x.shape)
    return np.concatenate([a, b], axis=-1)


def attention(w: dict, c: dict, layer: int, h: np.ndarray, v: Variant) -> np.ndarray:
    p = f"model.layers.{layer}.self_attn."
    t, d = h.shape[0], c["head_dim"]
    heads, kv_heads = c["num_attention_heads"], c["num_key_value_heads"]
    positions = np.arange(t, dtype=np.float64)
    q = rope((h @ w[p + "q_proj.weight"].T).reshape(t, heads, d), positions, c["rope_theta"],
             v.rope_interleaved)
    k = rope((h @ w[p + "k_proj.weight"].T).reshape(t, kv_heads, d), positions, c["rope_theta"],
             v.rope_interleaved)
    val = (h @ w[p + "v_proj.weight"].T).reshape(t, kv_heads, d)
    group = heads // kv_heads                                  # q head i reads kv head i // group
    k, val = np.repeat(k, group, axis=1), np.repeat(val, group, axis=1)
    scores = np.einsum("qhd,khd->hqk", q, k) / math.sqrt(d)
    length = c["attn_temperature_len"]
    factor = np.ones(t)
    if v.temperature and length > 0:
        late = positions > length
        factor[late] = np.log2(positions[late]) / math.log2(length)
    if v.temperature_before_cap:
        scores = scores * factor[None, :, None]
    if v.attn_cap:
        scores = softcap(scores, c["attn_logit_softcapping"])
    if not v.temperature_before_cap:
        scores = scores * factor[None, :, None]
    scores = np.where(np.tril(np.ones((t, t), bool))[None], scores, -np.inf)
    out = np.einsum("hqk,khd->qhd", softmax(scores), val).reshape(t, heads * d)
    return out @ w[p + "o_proj.weight"].T


def experts(w: dict, c: dict, layer: int, h: np.ndarray, v: Variant) -> tuple[np.ndarray, dict]:
    """The MoE: router (float64) -> cap -> softmax over all experts -> top-k by capped logit."""
    p = f"model.layers.{layer}.block_sparse_moe."
    logits = h @ w[p + "gate.weight"].T
    if v.router_cap:
        logits = softcap(logits, c["router_logit_softcapping"])
    probs = softmax(logits)
    chosen = np.argsort(-logits, axis=-1, kind="stable")[:, :c["num_experts_per_tok"]]
    weights = np.take_along_axis(probs, chosen, axis=-1)
    if v.renormalize:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    out = np.zeros_like(h)
    for e in range(c["num_local_experts"]):
        tokens, slot = np.nonzero(chosen == e)
        if tokens.size == 0:
            continue
        x = h[tokens]
        f = f"{p}experts.{e}."
        y = (gelu(x @ w[f + "w1.weight"].T, v.tanh_gelu) * (x @ w[f + "w3.weight"].T)) \
            @ w[f + "w2.weight"].T
        out[tokens] += weights[tokens, slot][:, None] * y
    return out, {"experts": chosen, "weights": weights, "probs": probs, "logits": logits}


def dense_mlp(w: dict, layer: int, h: np.ndarray, v: Variant) -> np.ndarray:
    p = f"model.layers.{layer}.mlp."
    gated = gelu(h @ w[p + "gate_proj.weight"].T, v.tanh_gelu) * (h @ w[p + "up_proj.weight"].T)
    return gated @ w[p + "down_proj.weight"].T


def forward(weights: dict[str, np.ndarray], config: dict[str, Any], tokens: Any,
            **changes: Any) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(logits [T, V], routing): routing's "experts" [L, T, k] (chosen, by capped logit
    descending), "weights" [L, T, k] (their softmax probabilities), "probs" and "logits"
    [L, T, E] (the capped router logits). `changes`: Variant fields."""
    v = Variant(**changes)
    w = {n: np.asarray(a, np.float64) for n, a in weights.items()}
    c, eps = config, config["rms_norm_eps"]
    x = w["model.embed_tokens.weight"][np.asarray(tokens)]
    if v.embedding_scale:
        x = x * c["embedding_multiplier_scale"]
    routing = []
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        h = rms_norm(x, w[p + "pre_attn_norm.weight"], eps)
        x = x + rms_norm(attention(w, c, layer, h, v), w[p + "post_attn_norm.weight"], eps)
        h = rms_norm(x, w[p + "pre_moe_norm.weight"], eps)
        ffn, route = experts(w, c, layer, h, v)
        if v.dense_mlp:
            ffn = (dense_mlp(w, layer, h, v) + ffn) / math.sqrt(2)
        x = x + rms_norm(ffn, w[p + "post_moe_norm.weight"], eps)
        routing.append(route)
    x = rms_norm(x, w["model.norm.weight"], eps)
    scale, cap = c["output_multiplier_scale"], c["final_logit_softcapping"]
    if v.final_cap_before_scale:
        logits = x @ w["lm_head.weight"].T
        logits = (softcap(logits, cap) if v.final_cap else logits) * scale
    else:
        logits = x @ (w["lm_head.weight"] * scale).T
        logits = softcap(logits, cap) if v.final_cap else logits
    return logits, {k: np.stack([r[k] for r in routing]) for k in routing[0]}


def greedy(weights: dict[str, np.ndarray], config: dict[str, Any], prompt: Any, n: int,
           **changes: Any) -> list[int]:
    """The `n` tokens greedy decoding appends to `prompt` (the whole sequence re-run each
    step: the reference has no cache to get wrong)."""
    tokens = list(prompt)
    for _ in range(n):
        logits, _ = forward(weights, config, tokens, **changes)
        tokens.append(int(np.argmax(logits[-1])))
    return tokens[len(prompt):]
