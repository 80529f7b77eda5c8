"""Float64 numpy test oracle for the Grok-1 forward pass (SPEC §2).

Written directly from the equations, for clarity rather than speed: every activation stays in
float64 (no bfloat16 rounding anywhere), weights are dequantised to float64.

API
---
- ``oracle_logits(flat, config, tokens)`` -> float64 logits [B, T, V]
- ``oracle_forward(flat, config, tokens)`` -> (logits, routing) with per-layer router details
- ``oracle_greedy(flat, config, prompt, steps)`` -> list of ``steps`` greedy token ids
- helpers: ``weights64``, ``rms_norm``, ``rope``, ``gelu_tanh``, ``softmax``, ``key_mask``,
  ``attention``, ``moe``

``flat`` maps SPEC §3 paths to float arrays or ``grok.quant.QuantizedWeight8bit``; it may also be
the result of ``weights64(flat)`` (already float64), which saves re-dequantising in loops.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import numpy as np

from grok.config import GrokConfig
from grok.quant import dequantize, is_quantized

EMBED = "language_model/in_out_embed/embeddings"
FINAL_NORM = "language_model/rms_norm/scale"
MASK_VALUE = -1e30


# --------------------------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------------------------
class Weights64(dict):
    """{SPEC path: float64 ndarray}; marks a flat dict that has already been converted."""


def weights64(flat: Mapping[str, Any]) -> Weights64:
    """Every leaf as a float64 numpy array (int8 leaves dequantised with their row-block scales)."""
    if isinstance(flat, Weights64):
        return flat
    out = Weights64()
    for name, leaf in flat.items():
        if is_quantized(leaf):
            out[name] = dequantize(leaf, np.float64)
        else:
            out[name] = np.asarray(leaf).astype(np.float64)
    return out


def _layer(w: Mapping[str, np.ndarray], i: int, sub: str) -> np.ndarray:
    return w[f"transformer/decoder_layer_{i}/{sub}"]


# --------------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------------
def rms_norm(x: np.ndarray, scale: np.ndarray, eps: float) -> np.ndarray:
    """x / sqrt(mean(x^2, last axis) + eps) * scale."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def softmax(a: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(a - np.max(a, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """The tanh approximation of GELU (jax.nn.gelu's default, approximate=True)."""
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def rotate_half(u: np.ndarray) -> np.ndarray:
    """concat(-u[K/2:], u[:K/2]) along the last axis."""
    half = u.shape[-1] // 2
    return np.concatenate([-u[..., half:], u[..., :half]], axis=-1)


def rope(u: np.ndarray, positions: np.ndarray, base: float = 10000.0) -> np.ndarray:
    """Half-split rotary embedding of u [B, T, H, K] at integer positions [B, T] (or [T]).

    theta_j = p * base^(-2j/K) for j < K/2; c = cos([theta, theta]); s = sin([theta, theta]);
    u' = u * c + rotate_half(u) * s.
    """
    k = u.shape[-1]
    positions = np.broadcast_to(np.asarray(positions, dtype=np.float64), u.shape[:2])
    inv_freq = base ** (-2.0 * np.arange(k // 2, dtype=np.float64) / k)      # [K/2]
    theta = positions[..., None] * inv_freq                                   # [B, T, K/2]
    theta = np.concatenate([theta, theta], axis=-1)[:, :, None, :]            # [B, T, 1, K]
    return u * np.cos(theta) + rotate_half(u) * np.sin(theta)


def key_mask(tokens: np.ndarray, pad_token: int) -> np.ndarray:
    """[B, T(query i), T(key j)] bool: j attendable from i iff tokens[j] > pad_token and j <= i."""
    t = tokens.shape[1]
    real = tokens > pad_token                                                 # [B, T]
    causal = np.tril(np.ones((t, t), dtype=bool))                             # [i, j]: j <= i
    return causal[None, :, :] & real[:, None, :]


def attention(x: np.ndarray, w: Mapping[str, np.ndarray], layer: int, config: GrokConfig,
              mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Multi-head attention of the normed input x [B, T, D] -> o Wo [B, T, D]."""
    b, t, _ = x.shape
    hq, hkv, k = config.num_q_heads, config.num_kv_heads, config.key_size
    mha = "multi_head_attention"
    q = (x @ _layer(w, layer, f"{mha}/query/w")).reshape(b, t, hq, k)
    kk = (x @ _layer(w, layer, f"{mha}/key/w")).reshape(b, t, hkv, k)
    v = (x @ _layer(w, layer, f"{mha}/value/w")).reshape(b, t, hkv, k)
    q = rope(q, positions, config.rope_base)
    kk = rope(kk, positions, config.rope_base)

    # GQA: query head h reads kv head h // (Hq / Hkv).
    group = hq // hkv
    kv_head = np.arange(hq) // group
    k_per_q = kk[:, :, kv_head, :]                                            # [B, T, Hq, K]
    v_per_q = v[:, :, kv_head, :]

    a = np.einsum("bihd,bjhd->bhij", q, k_per_q) * config.attn_output_multiplier
    cap = config.attn_logit_cap
    a = cap * np.tanh(a / cap)
    a = np.where(mask[:, None, :, :], a, MASK_VALUE)
    weights = softmax(a, axis=-1)                                             # [B, Hq, Ti, Tj]
    o = np.einsum("bhij,bjhd->bihd", weights, v_per_q).reshape(b, t, hq * k)
    return o @ _layer(w, layer, f"{mha}/linear/w")


def top_k_experts(probs: np.ndarray, k: int) -> np.ndarray:
    """Indices [..., k] of the k largest probabilities, largest first (ties: lower index first,
    as jax.lax.top_k)."""
    return np.argsort(-probs, axis=-1, kind="stable")[..., :k]


def moe(x: np.ndarray, w: Mapping[str, np.ndarray], layer: int,
        config: GrokConfig) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Routed mixture of experts on the normed input x [B, T, D] -> (m [B, T, D], routing info)."""
    probs = softmax(x @ _layer(w, layer, "router/w"), axis=-1)               # [B, T, E]
    chosen = top_k_experts(probs, config.num_selected_experts)                # [B, T, k]
    gates = np.take_along_axis(probs, chosen, axis=-1)                        # not renormalised

    w1 = _layer(w, layer, "moe/linear/w")                                     # [E, D, F]
    wv = _layer(w, layer, "moe/linear_v/w")                                   # [E, D, F]
    w2 = _layer(w, layer, "moe/linear_1/w")                                   # [E, F, D]
    m = np.zeros_like(x)
    for e in range(config.num_experts):
        picked = chosen == e                                                  # [B, T, k]
        sel = picked.any(axis=-1)                                             # [B, T]
        if not sel.any():
            continue
        gate = np.sum(np.where(picked, gates, 0.0), axis=-1)[sel]            # [N] (e once/token)
        xe = x[sel]                                                           # [N, D]
        y = (gelu_tanh(xe @ w1[e]) * (xe @ wv[e])) @ w2[e]                    # [N, D]
        m[sel] += gate[:, None] * y

    ranked = -np.sort(-probs, axis=-1)
    k = config.num_selected_experts
    margin = (ranked[..., k - 1] - ranked[..., k]) if k < config.num_experts \
        else np.full(probs.shape[:-1], np.inf)
    return m, {"probs": probs, "chosen": chosen, "gates": gates, "margin": margin}


# --------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Routing:
    """Per-layer router results, each stacked on a leading [num_layers] axis."""

    probs: np.ndarray     # [L, B, T, E] router softmax
    chosen: np.ndarray    # [L, B, T, k] selected experts, most probable first
    gates: np.ndarray     # [L, B, T, k] their (unnormalised) probabilities
    margin: np.ndarray    # [L, B, T] p_(k) - p_(k+1): how far top-k selection is from a flip
                          # (inf when every expert is selected)

    def min_margin(self, tokens: np.ndarray | None = None, pad_token: int = 0) -> float:
        """Smallest selection margin over layers and (real, if tokens given) positions."""
        margin = self.margin
        if tokens is not None:
            margin = margin[:, np.asarray(tokens) > pad_token]
        return float(np.min(margin)) if margin.size else math.inf


def oracle_forward(flat: Mapping[str, Any], config: GrokConfig,
                   tokens: Any) -> tuple[np.ndarray, Routing]:
    """SPEC §2 in float64: tokens [B, T] -> (logits [B, T, V], per-layer routing)."""
    w = weights64(flat)
    tokens = np.asarray(tokens)
    if tokens.ndim == 1:
        raise ValueError("tokens must be [B, T]; wrap a single prompt as tokens[None]")
    b, t = tokens.shape
    eps = config.rms_norm_eps

    embeddings = w[EMBED]                                                     # [V, D]
    h = embeddings[tokens] * config.embedding_multiplier_scale               # [B, T, D]
    mask = key_mask(tokens, config.pad_token)
    positions = np.broadcast_to(np.arange(t), (b, t))

    routes = []
    for layer in range(config.num_layers):
        x = rms_norm(h, _layer(w, layer, "rms_norm/scale"), eps)
        o = attention(x, w, layer, config, mask, positions)
        h = h + rms_norm(o, _layer(w, layer, "rms_norm_1/scale"), eps)
        x = rms_norm(h, _layer(w, layer, "rms_norm_2/scale"), eps)
        m, route = moe(x, w, layer, config)
        h = h + rms_norm(m, _layer(w, layer, "rms_norm_3/scale"), eps)
        routes.append(route)

    h = rms_norm(h, w[FINAL_NORM], eps)
    logits = (h @ embeddings.T) * config.output_multiplier_scale
    routing = Routing(*(np.stack([r[key] for r in routes])
                        for key in ("probs", "chosen", "gates", "margin")))
    return logits, routing


def oracle_logits(flat: Mapping[str, Any], config: GrokConfig, tokens: Any) -> np.ndarray:
    """SPEC §2 in float64: tokens [B, T] (may be right-padded with pad_token) -> logits [B, T, V]."""
    return oracle_forward(flat, config, tokens)[0]


def oracle_router(flat: Mapping[str, Any], config: GrokConfig, tokens: Any) -> Routing:
    """Per-layer routing decisions (and their top-k selection margins) for tokens [B, T]."""
    return oracle_forward(flat, config, tokens)[1]


def oracle_greedy(flat: Mapping[str, Any], config: GrokConfig, prompt: Any,
                  steps: int) -> list[int]:
    """Greedy continuation of one prompt (1-D ids): full recompute at every step, never stopping
    (not even at eos). Ties go to the lowest id (np.argmax)."""
    w = weights64(flat)
    seq = [int(tok) for tok in np.asarray(prompt).reshape(-1)]
    out = []
    for _ in range(steps):
        logits = oracle_logits(w, config, np.asarray(seq)[None])
        tok = int(np.argmax(logits[0, -1]))
        out.append(tok)
        seq.append(tok)
    return out


def greedy_gaps(flat: Mapping[str, Any], config: GrokConfig, prompt: Any,
                steps: int) -> tuple[list[int], list[float]]:
    """Like oracle_greedy, also returning the margin between the top two logits at each step."""
    w = weights64(flat)
    seq = [int(tok) for tok in np.asarray(prompt).reshape(-1)]
    out, gaps = [], []
    for _ in range(steps):
        row = oracle_logits(w, config, np.asarray(seq)[None])[0, -1]
        top2 = np.sort(row)[-2:]
        tok = int(np.argmax(row))
        out.append(tok)
        gaps.append(float(top2[1] - top2[0]))
        seq.append(tok)
    return out, gaps
