"""What int8 and int4 cost on Grok-2-shaped weights, against the bfloat16 release format.

    python benchmarks/grok2_quant.py [--layers 4] [--width 512] [--groups 32,64] [--tokens 256]

No trained Grok-2 weights can be had here, so this measures what can be: a random model of
Grok-2's architecture and constants (the release's config.json, narrowed: D, the dense and
expert widths, heads and vocabulary scaled down together; every cap, the temperature, the
scales and the RoPE base as released), bfloat16 weights with fan-in scaled normal values, then
each matrix quantised as `convert` does (int8: one scale per output column; int4: groups of
G rows). Per position of random token sequences, against the bfloat16 model: the relative L2
error of the logits row, top-1 agreement, and the KL divergence of the next-token distribution.
Random weights have no outliers and no structure: trained weights may fare otherwise.

Prints a markdown table (BENCHMARKS.md, "Grok-2: int8 and int4 on Grok-2-shaped weights").
"""
from __future__ import annotations

import argparse
import platform
import time

import jax
import numpy as np

import grok
from grok.families.grok2 import config_from_release
from grok.leaves import checkpoint_entries, random_flat
from grok.quant import quantize, quantize_int4

RELEASE = {   # xai-org/grok-2's config.json (shared/grok2-release.md)
    "architectures": ["Grok1ForCausalLM"], "vocab_size": 131072, "hidden_size": 8192,
    "num_hidden_layers": 64, "head_dim": 128, "num_attention_heads": 64,
    "num_key_value_heads": 8, "intermediate_size": 32768, "moe_intermediate_size": 16384,
    "num_local_experts": 8, "num_experts_per_tok": 2, "residual_moe": True,
    "rms_norm_eps": 1e-05, "embedding_multiplier_scale": 90.50966799187809,
    "output_multiplier_scale": 0.5, "attn_logit_softcapping": 30.0,
    "router_logit_softcapping": 30.0, "final_logit_softcapping": 50,
    "attn_temperature_len": 1024, "rope_theta": 208533496, "rope_type": "original",
    "max_position_embeddings": 131072, "sliding_window_size": -1, "global_attn_every_n": 1,
}


def narrowed(layers: int, width: int, context: int) -> dict:
    """The release's config with its sizes scaled by width / 8192 (heads of 128 kept)."""
    k = width / RELEASE["hidden_size"]
    return {**RELEASE, "num_hidden_layers": layers, "hidden_size": width,
            "num_attention_heads": max(1, int(64 * k)), "num_key_value_heads": max(1, int(8 * k)),
            "intermediate_size": int(32768 * k), "moe_intermediate_size": int(16384 * k),
            "vocab_size": 8192, "max_position_embeddings": context,
            "attn_temperature_len": min(1024, context // 4)}


def quantized(flat: dict, config: grok.GrokConfig, bits: int, group: int) -> tuple[dict, object]:
    """The bf16 leaves with every matrix quantised as convert does, and the new config."""
    out_config = config.replace(weight_bits=bits, group_size=group if bits == 4 else 0)
    out = {}
    for entry in checkpoint_entries(out_config):
        w = flat[entry.name]
        if entry.quantized:
            w = np.asarray(w, np.float32)
            out[entry.name] = quantize_int4(w, entry.group_size) if bits == 4 \
                else quantize(w, entry.scale_blocks)
        else:
            out[entry.name] = w
    return out, out_config


def compare(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    ref, got = ref.astype(np.float64), got.astype(np.float64)
    rel = np.linalg.norm(got - ref, axis=-1) / np.linalg.norm(ref, axis=-1)
    logp = lambda x: x - x.max(-1, keepdims=True) - np.log(
        np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))
    p, q = logp(ref), logp(got)
    kl = (np.exp(p) * (p - q)).sum(-1)
    return dict(rel_median=float(np.median(rel)), rel_max=float(rel.max()),
                top1=float((ref.argmax(-1) == got.argmax(-1)).mean()),
                kl_median=float(np.median(kl)), kl_max=float(kl.max()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--groups", default="32,64")
    ap.add_argument("--tokens", type=int, default=256, help="positions per sequence")
    ap.add_argument("--sequences", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    start = time.perf_counter()
    config = config_from_release(narrowed(args.layers, args.width, 2 * args.tokens), "narrowed",
                                 eos_token=2, pad_token=0)
    flat = random_flat(config, seed=args.seed)
    rows = np.random.default_rng(args.seed + 1).integers(3, config.vocab_size,
                                                         (args.sequences, args.tokens))
    ref = np.asarray(grok.from_flat(flat, config).logits(rows.tolist()))
    print(f"# {platform.node()} {platform.machine()}, jax {jax.__version__}: Grok-2 narrowed to "
          f"D={config.emb_size}, {config.num_layers} layers, {config.num_q_heads}/"
          f"{config.num_kv_heads} heads, dense {config.dense_ffn_size}, experts "
          f"{config.num_experts} x {config.ffn_size}, vocab {config.vocab_size}; "
          f"{args.sequences} x {args.tokens} positions\n")
    print("| weights | rel. L2 error median / max | top-1 agreement | KL median / max |")
    print("|---|---|---|---|")
    for bits, group in [(8, 0)] + [(4, int(g)) for g in args.groups.split(",")]:
        q, qconfig = quantized(flat, config, bits, group)
        got = np.asarray(grok.from_flat(q, qconfig).logits(rows.tolist()))
        m = compare(ref, got)
        name = "int8 (per column)" if bits == 8 else f"int4, groups of {group}"
        print(f"| {name} | {m['rel_median']:.4f} / {m['rel_max']:.4f} | {m['top1']:.3f} | "
              f"{m['kl_median']:.2e} / {m['kl_max']:.2e} |", flush=True)
    print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
