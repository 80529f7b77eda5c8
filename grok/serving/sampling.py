"""Per-row token sampling: greedy, temperature, top-k and top-p (nucleus), with repetition,
presence and frequency penalties, in one jitted function.

Every row carries its own settings and its own random key, so a sequence's draws never depend
on what else shares the batch.

Penalties follow vLLM's (and OpenAI's) definitions, applied to the raw logits before temperature,
so they steer greedy decoding too:
- `repetition_penalty` r (CTRL, HF `generate`): a token seen in the prompt or the output so far
  has its logit divided by r when positive, multiplied by r when negative; 1 is off.
- `presence_penalty` p: minus p once for a token that occurs in the output so far; 0 is off.
- `frequency_penalty` f: minus f times the token's count in the output so far; 0 is off.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from grok.errors import ConfigError, RequestError


TOP_K_MAX = 2 ** 31 - 1      # fits the sampler's int32; beyond any vocabulary
MAX_LOGPROBS = 20            # the most top alternatives a request may ask for (OpenAI's limit)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token. temperature 0 is greedy; top_k 0 means no limit (and so
    does any k >= the vocabulary: a larger k is kept as TOP_K_MAX); the penalties (module
    docstring) are off at their defaults. Numbers may be Python or numpy scalars (kept as
    Python floats and ints); anything else, or a value out of range, is a RequestError."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def __post_init__(self) -> None:
        # Checked here and again at Engine.submit (`checked`); numbers are kept as plain Python
        # floats and ints, numpy scalars included.
        for name, value in self._checked().items():
            object.__setattr__(self, name, value)

    def checked(self) -> "SamplingParams":
        """A validated copy of these settings (with the plain SamplingParams type): what the
        engine runs with, whatever was done to this object after it was made."""
        return SamplingParams(**self._checked())

    def _checked(self) -> dict[str, float | int]:
        """Every field, validated and normalized; RequestError naming the first bad one."""
        temperature = _real(self.temperature)
        if temperature is None or temperature < 0:
            raise RequestError(f"temperature must be a finite number >= 0, got "
                               f"{describe(self.temperature)}")
        top_p = _real(self.top_p)
        if top_p is None or not 0 < top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {describe(self.top_p)}")
        if not is_int(self.top_k) or self.top_k < 0:
            raise RequestError(f"top_k must be an integer >= 0 (0: no limit), got "
                               f"{describe(self.top_k)}")
        repetition = _real(self.repetition_penalty)
        if repetition is None or not repetition > 0 or not float(np.float32(repetition)) > 0:
            raise RequestError(f"repetition_penalty must be a finite number > 0 (1 is off), got "
                               f"{describe(self.repetition_penalty)}")
        values = dict(temperature=temperature, top_p=top_p, top_k=min(int(self.top_k), TOP_K_MAX),
                      repetition_penalty=repetition)
        for name in ("presence_penalty", "frequency_penalty"):
            value = _real(getattr(self, name))
            if value is None or not -2 <= value <= 2:   # OpenAI's range
                raise RequestError(f"{name} must be a number in [-2, 2] (0 is off), got "
                                   f"{describe(getattr(self, name))}")
            values[name] = value
        return values

    @property
    def penalized(self) -> bool:
        """Whether any penalty is on (the engine then tracks this request's tokens)."""
        return (self.repetition_penalty != 1 or self.presence_penalty != 0
                or self.frequency_penalty != 0)


SAMPLING_FILE = "sampling.json"   # a model directory's recommended settings (like HF's
                                  # generation_config.json); run.py uses them for unset flags
_MAX_SAMPLING_FILE = 64 * 1024


def read_sampling_defaults(model_dir: str | os.PathLike) -> SamplingParams:
    """The `SamplingParams` of `model_dir/sampling.json` ({"temperature": 0.5, ...}, any of the
    fields), or the defaults when there is no such file. ConfigError names the file and field."""
    path = Path(model_dir) / SAMPLING_FILE
    if not path.is_file():
        return SamplingParams()
    if path.stat().st_size > _MAX_SAMPLING_FILE:
        raise ConfigError(f"{path}: larger than {_MAX_SAMPLING_FILE} bytes; not a sampling file")
    try:
        fields = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None
    known = {f.name for f in dataclasses.fields(SamplingParams)}
    if not isinstance(fields, dict) or set(fields) - known:
        unknown = sorted(set(fields) - known) if isinstance(fields, dict) else fields
        raise ConfigError(f"{path}: expected an object with fields among {sorted(known)}; got "
                         f"{str(unknown)[:80]}")
    try:
        return SamplingParams(**fields)
    except RequestError as err:
        raise ConfigError(f"{path}: {err}") from None


def is_int(value: object) -> bool:
    """Whether `value` is an integer: a Python int or a numpy integer scalar (not a bool)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _real(value: object) -> float | None:
    """`value` as a float when it is a real number (int, float or numpy scalar; not a bool) that
    stays finite in the sampler's float32; None otherwise (10**400 included)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer,
                                                                     np.floating)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) and abs(number) <= _FLOAT32_MAX else None


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def describe(value: object, limit: int = 40) -> str:
    """A short description of a user's value for an error message: a number or short string as
    itself (with its type when that is not plain), anything else by its type; never the repr of
    an arbitrary object (which may be huge, nested too deep, or fail)."""
    kind = type(value).__name__[:limit]
    if value is None or isinstance(value, (bool, np.bool_)):
        return f"{value} ({kind})" if isinstance(value, np.bool_) else repr(value)
    if is_int(value):
        number = int(value)
        text = (str(number) if abs(number) < 10 ** limit
                else f"an integer of {number.bit_length()} bits")
        return text if type(value) is int else f"{text} ({kind})"
    if isinstance(value, (float, np.floating)):
        return f"{float(value)!r} ({kind})"
    if isinstance(value, str):
        return repr(value) if len(value) <= limit \
            else f"{value[:limit]!r}... (a str of {len(value)} characters)"
    if isinstance(value, np.ndarray):
        return f"a numpy array of {value.dtype}, shape {value.shape}"
    if isinstance(value, (list, tuple, dict, set, frozenset, bytes, bytearray, range)):
        return f"a {kind} of {len(value)} items"
    return f"a value of type {kind}"


class Penalties(NamedTuple):
    """Per-row penalty inputs for `sample`: the distinct token ids each row has seen (prompt and
    output; padded with any id >= V, which is ignored) [B, N], how often each occurs in the
    output [B, N], and each row's three penalties [B]."""

    ids: jax.Array
    counts: jax.Array
    repetition: jax.Array
    presence: jax.Array
    frequency: jax.Array


def apply_penalties(logits: jax.Array, penalties: Penalties) -> jax.Array:
    """Float32 logits [B, V] with each row's penalties applied (see the module docstring)."""
    batch, vocab = logits.shape
    rows = jnp.arange(batch)[:, None]
    seen = jnp.zeros((batch, vocab), bool).at[rows, penalties.ids].set(True, mode="drop")
    counts = jnp.zeros((batch, vocab), jnp.float32).at[rows, penalties.ids].add(
        penalties.counts.astype(jnp.float32), mode="drop")
    logits = logits.astype(jnp.float32)
    rep = penalties.repetition[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    return (logits - penalties.frequency[:, None] * counts
            - penalties.presence[:, None] * (counts > 0))


def filter_logits(logits: jax.Array, temperature: jax.Array, top_p: jax.Array,
                  top_k: jax.Array) -> jax.Array:
    """Scaled float32 logits [B, V] with everything outside each row's top-k / top-p set at -inf."""
    logits = logits.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)[:, None]
    order = jnp.argsort(-logits, axis=-1)
    ranked = jnp.take_along_axis(logits, order, axis=-1)
    rank = jnp.arange(logits.shape[-1])[None, :]
    probs = jax.nn.softmax(ranked, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = (mass_before < top_p[:, None]) | (rank == 0)         # smallest set reaching top_p
    keep &= (top_k[:, None] <= 0) | (rank < top_k[:, None])
    ranked = jnp.where(keep, ranked, -jnp.inf)
    inverse = jnp.argsort(order, axis=-1)
    return jnp.take_along_axis(ranked, inverse, axis=-1)


def sample(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_p: jax.Array,
           top_k: jax.Array, penalties: Penalties | None = None) -> jax.Array:
    """Next token per row [B] from logits [B, V]; rows with temperature 0 take the argmax.
    `penalties` (None: none) are applied first, so they steer greedy rows too."""
    if penalties is not None:
        logits = apply_penalties(logits, penalties)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    filtered = filter_logits(logits, temperature, top_p, top_k)
    drawn = jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, filtered)
    return jnp.where(temperature > 0, drawn.astype(jnp.int32), greedy)


def token_logprobs(logits: jax.Array, tokens: jax.Array, top: int = MAX_LOGPROBS
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Log-probabilities under the float32 log-softmax of the raw logits [B, V] (before any
    penalty, temperature, top-k or top-p): of each row's chosen token `tokens` [B], and the `top`
    most likely per row, values [B, top] (descending) and token ids [B, top]. The sampler never
    sees these: a token drawn is the same whether or not they are computed."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(logp, tokens.astype(jnp.int32)[:, None], axis=-1)[:, 0]
    values, ids = jax.lax.top_k(logp, min(top, logp.shape[-1]))
    return chosen, values, ids.astype(jnp.int32)


def row_keys(seeds: jax.Array, steps: jax.Array) -> jax.Array:
    """One key per row from its own seed and the index of the token being drawn."""
    return jax.vmap(lambda s, t: jax.random.fold_in(jax.random.key(s), t))(seeds, steps)
