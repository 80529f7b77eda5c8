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
