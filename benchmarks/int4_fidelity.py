"""int4 fidelity: what 4-bit weights cost against int8 and float, to choose the group size.

    python benchmarks/int4_fidelity.py [--groups 32,64,128] [--fixtures ../shared/fixtures]

1. The demo model (checkpoints/demo, trained): perplexity of `heldout.txt` (the shipped held-out
   sample, windows of 256 tokens as train_demo evaluates it) with float weights (the int8 ones
   dequantised: what int4 is made from), int8 (the checkpoint as shipped) and int4 at each group
   size, each converted by `grok.checkpoint.convert` and loaded with `grok.load`.
2. The shared parity fixtures (random weights, float64 truth in expected.npz): per position,
   the max |logit - truth| and the relative L2 error of the row, int8 beside int4, over all six
   prompts (median and max over positions).

Prints markdown tables (BENCHMARKS.md, "int4 weights: fidelity").
"""
from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

import grok
from grok.checkpoint import read_checkpoint, read_config
from grok.checkpoint.convert import convert
from grok.config import DEMO_DIR
from grok.quant import dequantize, is_quantized
from grok.tools.train_demo import encode_stream, windows

ROOT = Path(__file__).resolve().parents[1]


def perplexity(model: grok.Grok, rows: np.ndarray) -> float:
    """exp(mean NLL) of every token of `rows` [N, T] but each row's first."""
    logits = np.asarray(model.logits(rows.tolist()), np.float64)[:, :-1]
    logits -= logits.max(axis=-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    nll = -np.take_along_axis(logp, rows[:, 1:, None], axis=-1).mean()
    return float(np.exp(nll))


def float_model(path: Path) -> grok.Grok:
    """The checkpoint's int8 weights dequantised to float32 (the model's float path)."""
    config = read_config(path)
    flat = read_checkpoint(path, config, progress=False)
    flat = {k: dequantize(v) if is_quantized(v) else v for k, v in flat.items()}
    model = grok.from_flat(flat, config)
    return model


def converted(src: Path, tmp: Path, bits: int, group: int | None) -> Path:
    dst = tmp / f"{src.name}-int{bits}-{group or 0}"
    convert(src, dst, bits, group, progress=False)
    return dst


def demo_table(groups: list[int], tmp: Path) -> list[str]:
    model = grok.load(DEMO_DIR, progress=False)
    text = (DEMO_DIR / "heldout.txt").read_text(encoding="utf-8")
    config = model.config
    rows = windows(encode_stream(model.tokenizer, [text], config.eos_token)[:-1],
                   config.sequence_len, 4)
    int8 = perplexity(model, rows)
    lines = [f"Demo model, `heldout.txt` ({rows.size - len(rows)} tokens predicted):", "",
             "| weights | group size (per tensor: D=128 / F=176 / HK=256) | perplexity | vs int8 |",
             "|---|---|---|---|",
             f"| float (int8 dequantised) | - | {perplexity(float_model(DEMO_DIR), rows):.3f} "
             "| - |",
             f"| int8 | release row blocks | {int8:.3f} | 1.000 |"]
    for group in groups:
        path = converted(DEMO_DIR, tmp, 4, group)
        ppl = perplexity(grok.load(path, progress=False), rows)
        sizes = "/".join(str(e.group_size) for e in _matrices(read_config(path)))
        lines.append(f"| int4 | {group} ({sizes}) | {ppl:.3f} | {ppl / int8:.3f} |")
    return lines


def _matrices(config):
    """One entry per input width: D (moe/linear), F (moe/linear_1), H*K (attention output)."""
    from grok.leaves import checkpoint_entries
    want = ("moe/linear/w", "moe/linear_1/w", "multi_head_attention/linear/w")
    entries = {e.name.split("decoder_layer_0/")[-1]: e for e in checkpoint_entries(config)
               if "decoder_layer_0/" in e.name}
    return [entries[w] for w in want]


def fixture_table(fixtures: Path, groups: list[int], tmp: Path) -> list[str]:
    lines = ["Parity fixtures (random weights, 12 layers), per position over 6 prompts against "
             "the float64 truth of the int8 weights: max |logit error| and relative L2 error of "
             "the logits row (median / max over positions):", "",
             "| fixture | weights | max abs error, median | max abs error, max "
             "| rel. L2, median | rel. L2, max |", "|---|---|---|---|---|---|"]
    for name in ("grok-tiny-dense", "grok-tiny-top2"):
        src = fixtures / name
        expected = np.load(src / "expected.npz")
        prompts = [expected[f"prompt_{i}"].tolist() for i in range(6)]
        variants = [("int8", src)] + [(f"int4 g{g}", converted(src, tmp, 4, g)) for g in groups]
        for label, path in variants:
            logits = grok.load(path, progress=False).logits(prompts)
            abs_err, rel_err = [], []
            for i, prompt in enumerate(prompts):
                ours, truth = logits[i, :len(prompt)], expected[f"truth_{i}"]
                abs_err.append(np.abs(ours - truth).max(axis=-1))
                rel_err.append(np.linalg.norm(ours - truth, axis=-1)
                               / np.linalg.norm(truth, axis=-1))
            a, r = np.concatenate(abs_err), np.concatenate(rel_err)
            lines.append(f"| {name} | {label} | {np.median(a):.3f} | {a.max():.3f} "
                         f"| {np.median(r):.3f} | {r.max():.3f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", default="32,64,128")
    parser.add_argument("--fixtures", default=str(ROOT.parent / "shared" / "fixtures"))
    args = parser.parse_args()
    groups = [int(g) for g in args.groups.split(",")]
    start = time.time()
    print(f"{platform.node()} {platform.processor() or platform.machine()}, "
          f"jax {__import__('jax').__version__}, {time.strftime('%Y-%m-%d', time.gmtime())}\n")
    with tempfile.TemporaryDirectory() as tmp:
        print("\n".join(demo_table(groups, Path(tmp))) + "\n")
        fixtures = Path(args.fixtures)
        if (fixtures / "grok-tiny-top2").is_dir():
            print("\n".join(fixture_table(fixtures, groups, Path(tmp))) + "\n")
    print(f"({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
