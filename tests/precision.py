"""Error bounds for the tests' numeric comparisons, derived once from the precision of what they
compare, so that no tolerance depends on the machine the tests run on.

Two evaluations of the same math differ only by rounding. float32 sums taken in another order
(vector widths of AVX2 vs AVX-512, split-K, partial sums added by a psum) differ by at most
Higham's gamma_n * sum |terms|, whatever the order. A value rounded to bfloat16 after such a sum
rounds the same way in both unless a bfloat16 rounding point lies within that float32
difference; then the two differ by one bfloat16 step. Those two facts, the unit roundoffs below
and the magnitudes involved give the bounds here, whatever the instruction set. Where a bound
needs how errors grow through the layers (model_rel_error, router_tie, logits_route_bound's
sqrt(L)), its docstring states the derivation, what was measured and the margin kept.

Set GROK_PRECISION_LOG=path to append each checked comparison's max error / bound to that file.
"""
from __future__ import annotations

import json
import math
import os

import ml_dtypes
import numpy as np

BF16_EPS = 2.0 ** -8    # bfloat16 unit roundoff (8 significant bits): |bf16(x) - x| <= 2^-8 |x|
F32_EPS = 2.0 ** -24    # float32 unit roundoff
F64_EPS = 2.0 ** -53    # float64 unit roundoff
GELU_SLOPE = 1.13       # max |d gelu(a) / da| of the tanh approximation (1.129 at a = 2.4)
# bfloat16 roundings a decoder layer puts on the path to the logits: its normed input; q, k, v;
# the attention weights and output; the outputs of rms_norm_1, 2 and 3; the MoE hidden layer.
ROUNDINGS_PER_LAYER = 10


def gamma(n: int, u: float = F32_EPS) -> float:
    """Higham's gamma_n: a sum of n terms (or a dot of length n) in any order errs by at most
    gamma_n * sum |terms|."""
    return n * u / (1.0 - n * u)


def to_bf16(x) -> np.ndarray:
    """x rounded to bfloat16 as XLA rounds a float32 (nearest, ties to even), as float64."""
    return np.asarray(np.asarray(x, np.float32).astype(ml_dtypes.bfloat16), np.float64)


def bf16_spread(exact, err) -> np.ndarray:
    """The most two bfloat16 roundings of any float32 values within `err` of `exact` can differ:
    0 where no bfloat16 rounding point lies in [exact - err, exact + err], else about one step.
    (Rounding is monotone, so every value in between rounds between the ends' roundings.)"""
    exact, err = np.asarray(exact, np.float64), np.asarray(err, np.float64)
    return to_bf16(exact + err) - to_bf16(exact - err)


def dot_bound(a_abs, b_abs, n: int, routes: int = 1) -> np.ndarray:
    """|float32 a @ b - exact| <= gamma_n |a| @ |b| in any summation order (routes=2: the gap
    between two float32 evaluations). Pass |a| and |b| (float64)."""
    return routes * gamma(n) * (np.asarray(a_abs, np.float64) @ np.asarray(b_abs, np.float64))


def gelu_tanh(a: np.ndarray) -> np.ndarray:
    return 0.5 * a * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (a + 0.044715 * a ** 3)))


def gated_hidden(x, w1, wv, blocks: int = 1):
    """gelu(x w1) * (x wv) exactly (float64) and `err`, a bound on how far a float32 evaluation
    (sums in any order, each row block's product scaled after the dot, gelu's float32 tanh) can
    be from it: (hidden, err). x [..., D], w1/wv [D, F] (float64: dequantised, or rounded)."""
    x, w1, wv = (np.asarray(t, np.float64) for t in (x, w1, wv))
    n = x.shape[-1] + 2 * blocks              # In sums, and a scaling and an add per block
    a, b = x @ w1, x @ wv
    err_a, err_b = dot_bound(np.abs(x), np.abs(w1), n), dot_bound(np.abs(x), np.abs(wv), n)
    g = gelu_tanh(a)
    # gelu's slope carries a's error; 0.5 a (1 + tanh(c (a + k a^3))) in float32 rounds a few
    # times, each <= u of a term <= |a| (1 + |c (a + k a^3)|), and XLA's tanh errs <= 16 ulp.
    inner = math.sqrt(2.0 / math.pi) * np.abs(a + 0.044715 * a ** 3)
    err_g = GELU_SLOPE * err_a + 32 * F32_EPS * np.abs(a) * (1.0 + inner)
    h = g * b
    err_h = np.abs(g) * err_b + (np.abs(b) + err_b) * err_g + F32_EPS * np.abs(h)
    return h, err_h


def moe_route_bound(x, gates, chosen, w1, wv, w2, blocks: int = 1) -> np.ndarray:
    """Elementwise bound on the gap between two evaluations of the MoE block (grok.model.moe.moe: x
    [N, D] bfloat16 values, gates/chosen [N, k], weights [E, D, F], [E, F, D] as float64) that
    differ only in float32 summation order (another path, block layout, kernel or ISA): the
    hidden layer's float32 values lie within err of exact, so its bfloat16 rounding may differ
    only where a rounding point is that close (bf16_spread); then w2 and the gated sum in float32.
    `blocks`: w2's scale row blocks."""
    x, gates = np.asarray(x, np.float64), np.asarray(gates, np.float64)
    chosen = np.asarray(chosen)
    out = np.zeros(x.shape, np.float64)
    for j in range(chosen.shape[1]):
        for e in np.unique(chosen[:, j]):
            rows = chosen[:, j] == e
            h, err = gated_hidden(x[rows], w1[e], wv[e])
            spread = bf16_spread(h, err)
            w2_abs = np.abs(np.asarray(w2[e], np.float64))
            f = h.shape[-1]
            y_gap = spread @ w2_abs + dot_bound(np.abs(to_bf16(h)) + spread, w2_abs,
                                                f + 2 * blocks, routes=2)
            y_abs = np.abs(to_bf16(h)) @ w2_abs
            out[rows] += np.abs(gates[rows, j])[:, None] * (y_gap + 2 * gamma(
                chosen.shape[1] + 1) * y_abs)
    return out


def logits_route_bound(embeddings, final_scale, config) -> np.ndarray:
    """[V]: how far two correct evaluations of the model (another MoE path, mesh, layer loop,
    batch padding or ISA) may put logit v apart. They differ only where a float32 sum rounds to
    bfloat16 the other way, by one step. At the last rounding, the final norm's output x, one
    step of all of x moves logit v by <= u ||x|| ||E_v|| * output scale (||x|| <= sqrt(D)
    max|scale|); each layer's flips reach x renormalised, as at most about that, and layers add
    in quadrature: sqrt(L) x. Measured <= 0.14 of it (12 layers, padded batch), <= 0.02 (the
    AVX-512 moe_mesh failure); a psum term dropped is ~30x it."""
    e = np.asarray(embeddings, np.float64)
    x_norm = math.sqrt(config.emb_size) * float(np.abs(np.asarray(final_scale)).max())
    unit = BF16_EPS + 2 * gamma(config.emb_size)          # + the final float32 dot's order
    layers = math.sqrt(config.num_layers)
    return layers * unit * x_norm * np.linalg.norm(e, axis=-1) * config.output_multiplier_scale


def flat_route_bound(flat, config) -> np.ndarray:
    """logits_route_bound from a flat SPEC §3 parameter dict."""
    return logits_route_bound(flat["language_model/in_out_embed/embeddings"],
                              flat["language_model/rms_norm/scale"], config)


def params_route_bound(params, config) -> np.ndarray:
    """logits_route_bound from a model's params tree ({"embed": ..., "layers": ...})."""
    embed = params["embed"]
    return logits_route_bound(np.asarray(embed["language_model/in_out_embed"]["embeddings"],
                                         np.float32),
                              np.asarray(embed["language_model/rms_norm"]["scale"]), config)


def f64_route_bound(config, scale: float) -> float:
    """How far two float64 evaluations of the model (the oracle on a padded or batched input, or
    another program) may put a logit of magnitude <= `scale` apart: each of the N = 10 L + 1
    sites sums at most D + F terms, each sum within gamma_n of its terms; sites in quadrature."""
    n = config.emb_size + config.ffn_size
    return math.sqrt(ROUNDINGS_PER_LAYER * config.num_layers + 1) * gamma(n, F64_EPS) * scale


def rounding_rms(num_layers: int) -> float:
    """RMS relative error of a logits row of the bfloat16 model against an exact evaluation:
    each bfloat16 rounding adds an independent relative error of RMS <= u / sqrt(3), and the
    N = 10 L + 1 roundings on the path add in quadrature."""
    return BF16_EPS * math.sqrt((ROUNDINGS_PER_LAYER * num_layers + 1) / 3)


def model_rel_error(num_layers: int) -> float:
    """Bound on the relative L2 error of a logits row of the bfloat16 model against an exact
    (float64) evaluation: 6 rounding_rms. The worst row, amplified through later layers, measured
    <= 1.8 rounding_rms on the tiny and fixture models; ISA changes move only rare roundings."""
    return 6 * rounding_rms(num_layers)


def greedy_tie_gap(row_norm: float, vocab: int, num_layers: int) -> float:
    """Top-2 logit gap below which two bfloat16 evaluations (ours, the release's), or one and an
    exact one, may pick different greedy tokens: a row's error (rounding_rms of its norm) spreads
    over V logits, ~rounding_rms ||row|| / sqrt(V) each; the difference of two models' top-2 gaps
    has twice that RMS; 3.5 sigma of it (a legit flip in ~1 of 2000 steps)."""
    return 7 * rounding_rms(num_layers) * row_norm / math.sqrt(vocab)


def fixture_greedy_steps(expected, i: int, num_layers: int, limit: int | None = None) -> int:
    """Greedy steps of a parity fixture's prompt i before the first where the release's or the
    exact evaluation's top-2 gap is within greedy_tie_gap, or they disagree (fixtures README)."""
    truth = np.asarray(expected[f"truth_{i}"], np.float64)
    min_gap = greedy_tie_gap(float(np.linalg.norm(truth, axis=-1).max()), truth.shape[-1],
                             num_layers)
    greedy, tgreedy = expected[f"greedy_{i}"], expected[f"tgreedy_{i}"]
    gaps = np.minimum(expected[f"gaps_{i}"], expected[f"tgaps_{i}"])
    steps = trusted_steps(gaps, limit, min_gap)
    agree = np.flatnonzero(greedy[:steps] != tgreedy[:steps])
    return int(agree[0]) if agree.size else steps


def router_tie(layer: int) -> float:
    """A top-k routing margin (p_k - p_k+1) below which the bfloat16 model may pick another expert
    than an exact evaluation at decoder layer `layer` (0-based): each layer above the router adds
    ~u of relative error to its input, so its probabilities move by <= 2 u (layer + 1) (measured
    <= 1.15 u (layer + 1)); the margin, a difference of two, by twice that."""
    return 4 * BF16_EPS * (layer + 1)


def near_tie_rows(margin: np.ndarray) -> np.ndarray:
    """margin [L, ...] (oracle Routing.margin) -> [...] bool: rows with a near-tied choice in any
    layer, whose logits may legitimately move as a whole (the other expert taken)."""
    tol = np.array([router_tie(layer) for layer in range(margin.shape[0])])
    return (margin < tol.reshape(-1, *([1] * (margin.ndim - 1)))).any(axis=0)


def greedy_gap(bound) -> float:
    """Top-2 logit gap above which every evaluation within `bound` of a reference picks the
    reference's argmax: each of the two logits may move by `bound`."""
    return 2.0 * float(np.max(bound))


def trusted_steps(gaps, limit: int | None = None, min_gap: float = 0.0) -> int:
    """Greedy steps before the first whose reference top-2 gap is below min_gap (the token there
    may legitimately differ; after it the sequences do)."""
    steps, limit = 0, len(gaps) if limit is None else min(limit, len(gaps))
    while steps < limit and gaps[steps] >= min_gap:
        steps += 1
    return steps


def top2_gaps(logits: np.ndarray) -> np.ndarray:
    """[..., V] -> [...]: largest minus second largest logit."""
    top = np.sort(np.asarray(logits, np.float64), axis=-1)
    return top[..., -1] - top[..., -2]


def record(what: str, ratio: float) -> float:
    """Log a comparison's max error / bound when GROK_PRECISION_LOG names a file."""
    path = os.environ.get("GROK_PRECISION_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"check": what, "ratio": float(ratio),
                                "xla_flags": os.environ.get("XLA_FLAGS", "")}) + "\n")
    return float(ratio)


def error_ratio(got, want, bound) -> float:
    """max |got - want| / bound (elementwise; bound broadcasts; 0 / 0 counts as 0)."""
    err = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))
    bound = np.broadcast_to(np.asarray(bound, np.float64), err.shape)
    ratio = np.divide(err, bound, out=np.where(err > 0, np.inf, 0.0), where=bound > 0)
    return float(ratio.max()) if err.size else 0.0


def assert_within(got, want, bound, what: str) -> float:
    """|got - want| <= bound elementwise; returns (and logs) the max error / bound."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    ratio = record(what, error_ratio(got, want, bound))
    assert ratio <= 1.0, f"{what}: max |error| / bound = {ratio:.3g}"
    return ratio


def rel_rows(got, want) -> np.ndarray:
    """Relative L2 error of each row (last axis)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.linalg.norm(got - want, axis=-1) / np.linalg.norm(want, axis=-1)


def assert_rows_within(errors, bound: float, near_tie, what: str) -> float:
    """Per-row errors <= bound, except rows whose routing is near a tie (a whole row may move
    when bfloat16 rounding picks the other expert), and those at most a third of the rows: a
    bug moves every row. Returns (and logs) the max error / bound over the other rows."""
    errors, near_tie = np.asarray(errors), np.asarray(near_tie, bool)
    over = errors > bound
    exempt = over & near_tie                       # rows that took the other expert, likely
    held = errors[~exempt]
    ratio = record(what + (f" ({exempt.sum()} near-tie rows of {len(errors)} over, exempt)"
                           if exempt.any() else ""), held.max() / bound if held.size else 0.0)
    assert not (over & ~near_tie).any(), \
        f"{what}: rows without a routing near-tie over {bound:.3g}: {errors[over & ~near_tie]}"
    assert over.sum() <= len(errors) // 3, \
        f"{what}: {over.sum()} of {len(errors)} rows over {bound:.3g}: {np.sort(errors)[-5:]}"
    return ratio
