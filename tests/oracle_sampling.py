"""Float64 numpy statement of the sampling penalties (vLLM / OpenAI definitions): the test oracle
for grok.serving.sampling.apply_penalties and the engine's penalized decoding."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def penalized(logits: np.ndarray, prompt: Sequence[int], output: Sequence[int],
              repetition: float = 1.0, presence: float = 0.0,
              frequency: float = 0.0) -> np.ndarray:
    """One row of logits [V] after the penalties: tokens seen in the prompt or the output are
    divided (positive) or multiplied (negative) by `repetition`; tokens of the output lose
    `presence` once and `frequency` per occurrence."""
    out = np.asarray(logits, np.float64).copy()
    counts = np.bincount(np.asarray(output, int), minlength=len(out)).astype(np.float64)
    seen = counts > 0
    seen[list(prompt)] = True
    out[seen] = np.where(out[seen] > 0, out[seen] / repetition, out[seen] * repetition)
    return out - frequency * counts - presence * (counts > 0)


# The cached decode and the full forward compute the same sums in other shapes and orders, so the
# bfloat16 activation feeding the output projection can land one ulp (2^-8 relative) apart,
# moving a logit by about an ulp of the logits' scale; a top-2 gap under two such ulps may flip
# on another CPU, so the greedy comparisons stop there (a real bug moves the argmax outright).
NEAR_TIE = 2 * 2.0 ** -8


def recompute_greedy(model, prompt, steps, penalties=(1.0, 0.0, 0.0)):
    """Greedy tokens from full forwards (no cache) with the penalties applied by the float64
    oracle, up to `steps` or the first near-tie."""
    seq, out = list(prompt), []
    for _ in range(steps):
        logits = penalized(model.logits([seq])[0, -1], prompt, out, *penalties)
        second, first = np.sort(logits)[-2:]
        if first - second < NEAR_TIE * np.abs(logits).max():
            break
        token = int(np.argmax(logits))
        out.append(token)
        seq.append(token)
        if token == model.config.eos_token:
            break
    return out
