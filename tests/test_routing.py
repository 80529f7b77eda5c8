"""`Grok.routing`: the experts each layer picks, against the float64 oracle and against what the
MoE blocks actually used."""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest

import grok
from conftest import tiny_config
from grok import checkpoint
from grok.api import device_params
from grok.leaves import random_flat
from grok.quant import QuantizedWeight8bit
from grok.serving.tokenizer import Tokenizer
from oracle import oracle_forward
from precision import BF16_EPS

DEMO = Path(__file__).resolve().parents[1] / "checkpoints" / "demo"

# Tolerance on router probabilities (and so on the gate weights, which are some of them).
# bfloat16's unit roundoff is u = 2^-9. The router itself runs in float32 (error ~1e-7), but its
# input, the normed residual stream, is rounded to bfloat16 (relative error <= u), and so is
# every matmul input before it: q/k/v, the attention weights, each layer's expert inputs. Each
# layer of depth adds a few u of relative error to the router's logits, and the softmax's
# Jacobian diag(p) - p p^T has infinity-norm <= 1/2, so the probabilities of layer l (0-based)
# move by at most a few u * (l + 1) (measured on these models: <= 1 u in layer 0, <= 2.75 u in
# any layer up to the 9th). We allow 2 u * (l + 1).
# A selection within rounding of a tie may flip (allowed only there); then that token's MoE
# output differs by a whole expert, and every later layer's routing at that position and those
# attending to it may differ by far more: positions downstream of a flip are not compared.
U = BF16_EPS     # bfloat16 unit roundoff, 2^-8


def prob_tol(layer: int) -> float:
    return 2 * U * (layer + 1)


@functools.lru_cache(maxsize=None)
def _demo():
    config = checkpoint.read_config(DEMO)
    flat = checkpoint.read_checkpoint(DEMO, config, progress=False)
    tok = Tokenizer(DEMO / "tokenizer.model")
    return flat, config, tok


def _case(name: str):
    """(flat, config, tokens, tokenizer or None) of a test model."""
    if name == "demo":
        flat, config, tok = _demo()
        return flat, config, tok.encode("The quick brown fox jumps over the lazy dog. "
                                        "def f(x):\n    return x * 2\n"), tok
    config = {"tiny-3-layers-8-experts": tiny_config(num_layers=3, num_experts=8),
              "tiny-9-layers": tiny_config(num_layers=9),
              "tiny-top1-of-8": tiny_config(num_experts=8, num_selected_experts=1)}[name]
    flat = random_flat(config, seed=3, weight_scale=1.5)
    rng = np.random.default_rng(0)
    return flat, config, rng.integers(1, config.vocab_size, 21).tolist(), None


CASES = [("demo", True), ("demo", False), ("tiny-3-layers-8-experts", False),
         ("tiny-9-layers", True), ("tiny-top1-of-8", True)]


@pytest.mark.parametrize("name,scan", CASES,
                         ids=[f"{n}-{'scan' if s else 'unrolled'}" for n, s in CASES])
def test_routing_matches_float64_oracle(name, scan):
    flat, config, tokens, tok = _case(name)
    model = grok.from_flat(flat, config, tok, scan=scan)
    r = model.routing(tokens)
    L, T, k, E = config.num_layers, len(tokens), config.num_selected_experts, config.num_experts
    assert r.experts.shape == r.weights.shape == (L, T, k)
    assert r.probs.shape == (L, T, E)
    assert r.experts.dtype == np.int32 and r.weights.dtype == r.probs.dtype == np.float32
    np.testing.assert_array_equal(r.tokens, tokens)

    # Self-consistency: the weights are the chosen experts' probabilities, most probable first.
    np.testing.assert_array_equal(r.weights, np.take_along_axis(r.probs, r.experts, axis=-1))
    assert (np.diff(r.weights, axis=-1) <= 0).all()
    np.testing.assert_allclose(r.probs.sum(-1), 1.0, atol=1e-5)
    assert (r.weights.sum(-1) <= 1 + 1e-6).all()     # not renormalised (SPEC §2)

    _, truth = oracle_forward(flat, config, np.asarray(tokens)[None])
    probs = truth.probs[:, 0]                                                 # [L, T, E]
    ranked = -np.sort(-probs, axis=-1)
    tol = np.array([prob_tol(layer) for layer in range(L)])[:, None]         # [L, 1]
    # The chosen set is determined where the gap between the k-th and (k+1)-th probabilities
    # exceeds 2 tol (each side may move by tol); its order, where every gap among the top k does.
    gaps = -np.diff(ranked[..., :min(k + 1, E)], axis=-1)                     # [L, T, k or k-1]
    set_clear = gaps[..., k - 1] > 2 * tol if k < E else np.ones((L, T), bool)
    order_clear = (gaps[..., :k - 1] > 2 * tol[..., None]).all(axis=-1)      # [L, T]
    # Where the chosen sets differ, the MoE outputs differ by whole experts, and so may every
    # later layer's routing at that position and those after it: those are not compared. A
    # difference is allowed only where the oracle's choice is within rounding of a tie.
    same_set = (np.sort(r.experts, axis=-1) == np.sort(truth.chosen[:, 0], axis=-1)).all(-1)
    tainted = np.logical_or.accumulate(np.logical_or.accumulate(~same_set, axis=1), axis=0)
    trusted = np.concatenate([np.ones((1, T), bool), ~tainted[:-1]])          # [L, T]
    err = np.abs(r.probs - probs).max(axis=-1)                                # [L, T]
    bad = trusted & (err > tol)
    assert not bad.any(), f"router probs off by {err[bad].max():.2e} at (layer, position) " \
        f"{np.argwhere(bad)[0].tolist()}, tolerance {tol[np.argwhere(bad)[0][0], 0]:.2e}"
    flipped = trusted & set_clear & ~same_set
    assert not flipped.any(), f"chosen experts differ at {np.argwhere(flipped).tolist()}"
    sure = trusted & set_clear
    ordered = sure & order_clear
    np.testing.assert_array_equal(r.experts[ordered], truth.chosen[:, 0][ordered])
    # Gate weights: within the tolerance of the oracle's gates (the same probabilities).
    np.testing.assert_array_less(np.abs(r.weights - truth.gates[:, 0])[ordered],
                                 np.broadcast_to(tol[..., None], r.weights.shape)[ordered])
    print(f"{name}: {sure.sum()} of {L * T} choices checked ({ordered.sum()} in order)")
    assert sure.sum() >= L * T // 3, f"only {sure.sum()} of {L * T} choices clear of a tie"


def _zero_expert(flat, layer: int, expert: int):
    """A copy of `flat` with expert `expert` of layer `layer` zeroed (its three weight tensors)."""
    out = dict(flat)
    for sub in ("linear", "linear_v", "linear_1"):
        name = f"transformer/decoder_layer_{layer}/moe/{sub}/w"
        w = np.array(out[name].weight)
        w[expert] = 0
        out[name] = QuantizedWeight8bit(w, out[name].scales)
    return out


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unrolled"])
def test_routing_is_what_the_moe_used(scan):
    """Zeroing an expert no token was routed to (in some layer) leaves the logits unchanged;
    zeroing one that was routed to changes them."""
    flat, config, _, _ = _case("tiny-3-layers-8-experts")
    tokens = [5, 9, 3]       # 6 choices of 8 experts per layer: some unused in every layer
    model = grok.from_flat(flat, config, scan=scan)
    r = model.routing(tokens)
    ref = model.logits([tokens])
    counts = r.expert_counts()                                                # [L, E]
    assert counts.sum() == config.num_layers * len(tokens) * config.num_selected_experts
    original = model.runner.params

    def logits_with(changed_flat):
        # The same compiled forward, other expert weights (the layers' tree swapped in).
        layers = device_params(changed_flat, config, scan=scan)["layers"]
        model.runner.params = {**original, "layers": layers}
        try:
            return model.logits([tokens])
        finally:
            model.runner.params = original

    for layer in range(config.num_layers):
        unused = np.flatnonzero(counts[layer] == 0)
        used = int(np.argmax(counts[layer]))
        assert len(unused), "every expert was used: pick a shorter prompt"
        np.testing.assert_array_equal(logits_with(_zero_expert(flat, layer, int(unused[0]))), ref)
        assert np.abs(logits_with(_zero_expert(flat, layer, used)) - ref).max() > 1e-3


def test_inputs_batches_and_padding():
    flat, config, tok = _demo()
    model = grok.from_flat(flat, config, tok)
    text = "Once upon a time"
    ids = tok.encode(text)
    one = model.routing(ids)
    for same in (model.routing(text), model.routing(np.asarray(ids)), model.routing(tuple(ids))):
        np.testing.assert_array_equal(same.experts, one.experts)
        np.testing.assert_array_equal(same.weights, one.weights)
    short = ids[:2]
    batch = model.routing([ids, short])
    L, T, k = one.experts.shape
    assert batch.experts.shape == (2, L, T, k) and batch.probs.shape == (2, L, T, 8)
    np.testing.assert_array_equal(batch.experts[0], one.experts)
    alone = model.routing(short)
    np.testing.assert_array_equal(batch.experts[1, :, :2], alone.experts)
    np.testing.assert_allclose(batch.weights[1, :, :2], alone.weights, atol=1e-6)
    assert (batch.experts[1, :, 2:] == -1).all() and (batch.weights[1, :, 2:] == 0).all()
    assert (batch.probs[1, :, 2:] == 0).all() and (batch.tokens[1, 2:] == -1).all()
    assert batch.expert_counts().shape == (2, L, 8)
    np.testing.assert_array_equal(batch.expert_counts()[1], alone.expert_counts())
    assert one.num_layers == L and one.num_experts == 8
    with pytest.raises(ValueError):
        model.routing([])
    with pytest.raises(ValueError):
        model.routing([[1, 2], []])
    with pytest.raises(ValueError):
        model.routing([config.vocab_size])
