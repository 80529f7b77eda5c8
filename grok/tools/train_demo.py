"""Train the demo model: a small Grok-architecture model of Python's standard library.

    python -m grok.tools.train_demo [--out checkpoints/demo] [--minutes N] [--seed S] [--steps N]

Steps (all seeded, files listed in sorted order):
1. list the standard library's `.py` files (`sysconfig.get_paths()["stdlib"]`, without tests,
   site-packages, codec tables and pydoc's topic dump) and hold out every file whose path hashes
   (crc32) to 0 mod 20;
2. train a SentencePiece tokenizer on the training files (pad 0, bos 1, eos 2, unk 3 as Grok's;
   identity normalisation and byte fallback, so any source text round-trips);
3. train a small `GrokConfig` through the library's own `grok.model.forward` (float weights in
   place of int8, the dense MoE path) with AdamW written here (no extra dependency);
4. quantise every matrix with `grok.quant.quantize` as the release does and write the checkpoint
   with `grok.checkpoint.write_checkpoint`, plus `tokenizer.model`, `heldout.txt` (held-out code
   for the tests) and `metrics.json`: the held-out perplexity of the shipped model, loaded back with
   `grok.load`, next to a unigram baseline fitted on the training split.

Without `--steps` the run calibrates its step count to `--minutes` from the speed of its first
steps (logged); give `--steps` to repeat a run exactly.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import math
import sysconfig
import time
import zlib
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from grok.config import GrokConfig
from grok.kernels.plan import resolve_plan
from grok.model import forward, init_cache
from grok.leaves import checkpoint_entries, from_model_params, map_entries, to_model_params
from grok.quant import quantize

log = logging.getLogger("grok.tools.train_demo")

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "checkpoints" / "demo"
EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "encodings",
                 "pydoc_data"}
HELDOUT_MOD = 20            # a file is held out when crc32(relative path) % 20 == 0
HELDOUT_TXT_CHARS = 48_000  # size of the shipped held-out sample
VOCAB_SIZE = 4096
DENSE = resolve_plan("dense")   # training evaluates every expert: gradients reach all of them


def demo_config(vocab_size: int = VOCAB_SIZE) -> GrokConfig:
    """The demo architecture: Grok-1's shape (GQA, RoPE, logit cap, 8 experts top-2, sandwich
    norms, tied embeddings) at a size that trains on two CPU cores."""
    d, k = 128, 32
    return GrokConfig(vocab_size=vocab_size, sequence_len=256, emb_size=d, key_size=k,
                      num_q_heads=8, num_kv_heads=2, num_layers=4, widening_factor=2.0,
                      num_experts=8, num_selected_experts=2, attn_output_multiplier=k ** -0.5,
                      embedding_multiplier_scale=float(math.sqrt(d)),
                      output_multiplier_scale=1.0)


# --- data -----------------------------------------------------------------------------------------

def stdlib_files(root: Path | None = None) -> tuple[Path, list[str]]:
    """The standard library's root and its `.py` files (relative POSIX paths, sorted)."""
    root = Path(sysconfig.get_paths()["stdlib"] if root is None else root)
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if EXCLUDED_DIRS & set(rel.parts[:-1]) or not path.is_file():
            continue
        files.append(rel.as_posix())
    return root, sorted(files)


def is_heldout(rel: str) -> bool:
    return zlib.crc32(rel.encode()) % HELDOUT_MOD == 0


def read_sources(root: Path, files: list[str]) -> list[tuple[str, str]]:
    """(path, text) of the files that decode as UTF-8 (a handful of stdlib files do not)."""
    out = []
    for rel in files:
        try:
            text = (root / rel).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            out.append((rel, text))
    return out


def _line_chunks(texts: list[str], lines: int = 20) -> Iterator[str]:
    for text in texts:
        rows = text.split("\n")
        for i in range(0, len(rows), lines):
            yield "\n".join(rows[i:i + lines]) + "\n"


def train_tokenizer(texts: list[str], path: Path, vocab_size: int, seed: int) -> None:
    """A SentencePiece unigram model over `texts` that keeps code verbatim: identity
    normalisation, whitespace kept, newline a piece of its own, byte fallback for the rest."""
    import sentencepiece as spm

    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_line_chunks(texts), model_writer=model, vocab_size=vocab_size,
        model_type="unigram", normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=False, byte_fallback=True,
        allow_whitespace_only_pieces=True, split_digits=True, user_defined_symbols=["\n"],
        max_sentence_length=1 << 16, character_coverage=0.9999, input_sentence_size=0,
        pad_id=0, bos_id=1, eos_id=2, unk_id=3, num_threads=2, minloglevel=2)
    path.write_bytes(model.getvalue())


def encode_stream(tokenizer: Any, texts: list[str], eos: int) -> np.ndarray:
    """All texts as one token stream, each file followed by eos."""
    parts = []
    for text in texts:
        parts.append(np.asarray(tokenizer.encode(text), np.int32))
        parts.append(np.asarray([eos], np.int32))
    return np.concatenate(parts)


def windows(stream: np.ndarray, length: int, count: int) -> np.ndarray:
    """Up to `count` consecutive non-overlapping windows [count, length] from the stream's start."""
    count = min(count, len(stream) // length)
    return stream[:count * length].reshape(count, length)


# --- model ----------------------------------------------------------------------------------------

def init_flat(config: GrokConfig, seed: int) -> dict[str, np.ndarray]:
    """Float32 weights in the checkpoint's shapes: fan-in scaled normals, unit norm scales,
    a small router, and an embedding whose rows have RMS 1 / sqrt(D) (times the embedding
    multiplier sqrt(D), the residual stream starts at RMS 1)."""
    rng = np.random.default_rng(seed)

    def make(entry):
        if entry.param == "scale":
            return np.ones(entry.shape, np.float32)
        if entry.param == "embeddings":
            std = 1.0 / math.sqrt(config.emb_size)
        elif entry.module.endswith("router"):
            std = 0.1 / math.sqrt(entry.fan_in)
        else:
            std = 1.0 / math.sqrt(entry.fan_in)
        return (std * rng.standard_normal(entry.shape)).astype(np.float32)
    return map_entries(config, make)


def loss_fn(params: Any, batch: jax.Array, config: GrokConfig) -> jax.Array:
    """Mean next-token cross-entropy of batch [B, T+1] through grok.model.forward."""
    tokens, targets = batch[:, :-1], batch[:, 1:]
    b, t = tokens.shape
    logits, _ = forward(params, tokens, init_cache(config, b, t), jnp.zeros((b,), jnp.int32),
                        config=config, plan=DENSE)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    real = (targets > config.pad_token).astype(jnp.float32)
    return jnp.sum(nll * real) / jnp.maximum(jnp.sum(real), 1.0)


def _decayed(path: tuple, leaf: Any) -> bool:
    """Weight decay on the matrices and the embedding, not on norm scales or the router."""
    names = [str(getattr(p, "key", p)) for p in path]
    return (names[-1] in ("w", "embeddings")) and not any("router" in n for n in names)


def make_train_step(config: GrokConfig, params: Any, *, lr: float, warmup: int, steps: int,
                    weight_decay: float = 0.1, b1: float = 0.9, b2: float = 0.95,
                    eps: float = 1e-8, clip: float = 1.0):
    """A jitted AdamW step (cosine schedule to lr/10 after a linear warmup, global-norm clip)."""
    decay_mask = jax.tree_util.tree_map_with_path(_decayed, params)

    def schedule(step):
        step = step.astype(jnp.float32)
        warm = (step + 1.0) / warmup
        progress = jnp.clip((step - warmup) / max(steps - warmup, 1), 0.0, 1.0)
        cosine = 0.1 + 0.9 * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        return lr * jnp.where(step < warmup, warm, cosine)

    def step_fn(params, opt, batch):
        step, mu, nu = opt
        loss, grads = jax.value_and_grad(loss_fn)(params, batch, config)
        gnorm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32)))
                             for g in jax.tree.leaves(grads)))
        factor = jnp.minimum(1.0, clip / (gnorm + 1e-6))
        grads = jax.tree.map(lambda g: g.astype(jnp.float32) * factor, grads)
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, mu, grads)
        nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, nu, grads)
        t = step.astype(jnp.float32) + 1.0
        rate = schedule(step)

        def update(p, m, v, decay):
            m_hat = m / (1 - b1 ** t)
            v_hat = v / (1 - b2 ** t)
            delta = m_hat / (jnp.sqrt(v_hat) + eps) + (weight_decay * p if decay else 0.0)
            return p - rate * delta
        params = jax.tree.map(update, params, mu, nu, decay_mask)
        return params, (step + 1, mu, nu), loss, gnorm

    def init_opt(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return jnp.zeros((), jnp.int32), zeros, jax.tree.map(jnp.zeros_like, params)

    return jax.jit(step_fn, donate_argnums=(0, 1)), init_opt


def quantized_flat(params: Any, config: GrokConfig) -> dict[str, Any]:
    """The trained float tree -> checkpoint leaves: int8 + bf16 scales where the release has
    QuantizedWeight8bit, float32 elsewhere."""
    flat = from_model_params(params, config)
    out = {}
    for entry in checkpoint_entries(config):
        w = np.asarray(flat[entry.name], np.float32)
        out[entry.name] = quantize(w, entry.scale_blocks) if entry.quantized else w
    return out


# --- evaluation -----------------------------------------------------------------------------------

def unigram_logprobs(stream: np.ndarray, vocab_size: int) -> np.ndarray:
    """Add-one smoothed unigram log-probabilities of the stream's tokens (pad never predicted)."""
    counts = np.bincount(stream, minlength=vocab_size).astype(np.float64) + 1.0
    counts[0] = 0.0
    return np.log(counts / counts.sum(), where=counts > 0, out=np.full(vocab_size, -np.inf))


def perplexities(logits_fn, rows: np.ndarray, unigram: np.ndarray, batch: int = 8
                 ) -> dict[str, float]:
    """Perplexity of the model (`logits_fn(rows) -> [B, T, V]`) and of the unigram over every
    token of `rows` [N, T] but the first of each row (the same tokens for both)."""
    nll, uni, count = 0.0, 0.0, 0
    for i in range(0, len(rows), batch):
        chunk = rows[i:i + batch]
        logits = np.asarray(logits_fn(chunk.tolist()), np.float64)[:, :-1]
        logits -= logits.max(axis=-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
        targets = chunk[:, 1:]
        nll -= np.take_along_axis(logp, targets[..., None], axis=-1).sum()
        uni -= unigram[targets].sum()
        count += targets.size
    return {"model_ppl": float(np.exp(nll / count)), "unigram_ppl": float(np.exp(uni / count)),
            "tokens": int(count)}


# --- main -----------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m grok.tools.train_demo", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default: %(default)s)")
    p.add_argument("--minutes", type=float, default=25.0,
                   help="training time budget, compile included (default: %(default)s)")
    p.add_argument("--steps", type=int, default=None,
                   help="optimizer steps (default: as many as --minutes allows, measured)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    p.add_argument("--eval-windows", type=int, default=64,
                   help="held-out windows of sequence_len tokens for the reported perplexity")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import grok
    from grok.checkpoint import write_checkpoint
    from grok.serving.tokenizer import Tokenizer

    started = time.time()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    root, files = stdlib_files()
    sources = read_sources(root, files)
    train = [(f, t) for f, t in sources if not is_heldout(f)]
    heldout = [(f, t) for f, t in sources if is_heldout(f)]
    log.info("%s: %d files (%.1f MB), %d held out", root, len(sources),
             sum(len(t) for _, t in sources) / 1e6, len(heldout))

    tok_path = out / "tokenizer.model"
    train_tokenizer([t for _, t in train], tok_path, args.vocab_size, args.seed)
    tokenizer = Tokenizer(tok_path)
    config = demo_config(tokenizer.vocab_size)
    train_stream = encode_stream(tokenizer, [t for _, t in train], config.eos_token)
    held_stream = encode_stream(tokenizer, [t for _, t in heldout], config.eos_token)
    log.info("tokenizer: %d pieces (%.1fs); %d training tokens, %d held-out tokens",
             tokenizer.vocab_size, time.time() - started, len(train_stream), len(held_stream))

    # The shipped held-out sample: whole held-out files, in order, up to HELDOUT_TXT_CHARS.
    sample = ""
    for _, text in heldout:
        if sample and len(sample) + len(text) > HELDOUT_TXT_CHARS:
            continue
        sample += text
    (out / "heldout.txt").write_text(sample, encoding="utf-8")

    seq = config.sequence_len
    params = jax.tree.map(jnp.asarray, to_model_params(init_flat(config, args.seed), config))
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    log.info("config %s: %.2fM parameters", config.to_dict(), n_params / 1e6)

    rng = np.random.default_rng(args.seed)

    def next_batch() -> jax.Array:
        starts = rng.integers(0, len(train_stream) - seq - 1, args.batch)
        return jnp.asarray(np.stack([train_stream[s:s + seq + 1] for s in starts]))

    eval_rows = jnp.asarray(windows(held_stream, seq + 1, 8))
    eval_loss = jax.jit(lambda p, b: loss_fn(p, b, config))
    budget = args.minutes * 60.0
    train_start = time.time()
    steps = args.steps
    if steps is None:
        # Calibrate: time a few steps of a throw-away copy of the optimizer (same shapes).
        probe, probe_init = make_train_step(config, params, lr=0.0, warmup=1, steps=1)
        p = jax.tree.map(jnp.copy, params)
        opt = probe_init(p)
        p, opt, loss, _ = probe(p, opt, next_batch())
        loss.block_until_ready()
        t0 = time.time()
        for _ in range(4):
            p, opt, loss, _ = probe(p, opt, next_batch())
        loss.block_until_ready()
        per_step = (time.time() - t0) / 4
        remaining = budget - (time.time() - train_start) - 30.0   # leave room for the compile
        steps = max(50, int(remaining / (per_step * 1.08)))
        log.info("%.2fs per step: %d steps fit in %.0f minutes (pass --steps %d to repeat)",
                 per_step, steps, args.minutes, steps)
        del p, opt
        rng = np.random.default_rng(args.seed)   # the run itself starts from the seed's data
    step_fn, init_opt = make_train_step(config, params, lr=args.lr, warmup=min(200, steps // 10),
                                        steps=steps)
    opt = init_opt(params)
    done, losses = 0, []
    for step in range(steps):
        params, opt, loss, gnorm = step_fn(params, opt, next_batch())
        losses.append(loss)
        done = step + 1
        if done % 50 == 0 or done == steps:
            train_loss = float(np.mean([float(x) for x in losses]))
            losses = []
            msg = f"step {done}/{steps} loss {train_loss:.3f} gnorm {float(gnorm):.2f}"
            if done % 250 == 0 or done == steps:
                msg += f" held-out {float(eval_loss(params, eval_rows)):.3f}"
            log.info("%s (%.0fs)", msg, time.time() - train_start)
        if time.time() - train_start > budget and done < steps:
            log.warning("time budget of %.0f minutes spent: stopping at step %d of %d",
                        args.minutes, done, steps)
            break
    train_seconds = time.time() - train_start

    write_checkpoint(out, quantized_flat(params, config), config, overwrite=True, progress=False)

    # Evaluate what ships: the int8 checkpoint read back through grok.load.
    unigram = unigram_logprobs(train_stream, config.vocab_size)
    rows = windows(held_stream, seq, args.eval_windows)
    model = grok.load(out)
    shipped = perplexities(model.logits, rows, unigram)
    float_logits = jax.jit(lambda p, t: forward(p, t, init_cache(config, t.shape[0], t.shape[1]),
                                                jnp.zeros((t.shape[0],), jnp.int32),
                                                config=config, plan=DENSE)[0])
    float_eval = perplexities(lambda r: float_logits(params, jnp.asarray(r, jnp.int32)),
                              rows, unigram)
    sample_rows = windows(encode_stream(tokenizer, [sample], config.eos_token)[:-1], seq, 4)
    sample_eval = perplexities(model.logits, sample_rows, unigram)
    metrics = {
        "heldout_ppl": shipped["model_ppl"],
        "unigram_ppl": shipped["unigram_ppl"],
        "ratio": shipped["model_ppl"] / shipped["unigram_ppl"],
        "heldout_tokens": shipped["tokens"],
        "float_heldout_ppl": float_eval["model_ppl"],
        "heldout_txt": {"windows": int(len(sample_rows)), "tokens": sample_eval["tokens"],
                        "model_ppl": sample_eval["model_ppl"],
                        "unigram_ppl": sample_eval["unigram_ppl"]},
        "train_files": len(train), "heldout_files": len(heldout),
        "train_tokens": int(len(train_stream)), "heldout_split_tokens": int(len(held_stream)),
        "parameters": n_params, "steps": done, "batch": args.batch, "lr": args.lr,
        "seed": args.seed, "train_seconds": round(train_seconds, 1),
        "tokens_seen": done * args.batch * seq,
        "python": ".".join(map(str, __import__("sys").version_info[:3])),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    log.info("held-out perplexity %.2f (float %.2f) vs unigram %.2f over %d tokens; %s: %.1f MB",
             metrics["heldout_ppl"], metrics["float_heldout_ppl"], metrics["unigram_ppl"],
             metrics["heldout_tokens"], out, size / 1e6)
    print(json.dumps(metrics, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
