"""The host-side inputs of the engine's device calls: padded token arrays, positions, per-row
sampling settings and penalties, built from the requests' state (pure functions: no engine state
changes here)."""
from __future__ import annotations

from typing import Mapping, NamedTuple, Sequence

import numpy as np

from grok.config import GrokConfig
from grok.serving.request import Result, top_k_setting
from grok.serving.sampling import Penalties

MIN_BUCKET = 16          # prompt lengths
MIN_ATTEND_BUCKET = 256  # decode attention spans: below this a wider span costs less than a compile


def bucket(n: int, limit: int, minimum: int = MIN_BUCKET) -> int:
    """The smallest power of two >= n (at least `minimum`), capped at `limit`."""
    size = minimum
    while size < n:
        size *= 2
    return min(size, limit)


class Draw(NamedTuple):
    """What the sampler needs per row: seeds, token indices, (temperature, top_p, top_k)
    settings [3, R], and the penalties (None: no row has any); `logprobs`: whether any row asks
    for its tokens' log-probabilities (else they are not computed)."""

    seeds: np.ndarray
    steps: np.ndarray
    settings: np.ndarray
    penalties: Penalties | None
    logprobs: bool = False


def draw_inputs(rows: Sequence[tuple[int, Result]], batch: int, config: GrokConfig,
                seen: Mapping[int, dict[int, int]]) -> Draw:
    """Sampling inputs for the (row, result) pairs of a call whose logits have `batch` rows."""
    seeds = np.zeros(batch, np.uint32)
    steps = np.zeros(batch, np.int32)
    settings = np.zeros((3, batch), np.float32)
    for row, res in rows:
        s = res.request.sampling
        seeds[row], steps[row] = res.request.seed, len(res.tokens)
        settings[:, row] = (s.temperature, s.top_p, top_k_setting(s.top_k, config.vocab_size))
    return Draw(seeds, steps, settings, _penalties(rows, batch, config, seen),
                any(res.request.logprobs for _, res in rows))


def _penalties(rows: Sequence[tuple[int, Result]], batch: int, config: GrokConfig,
               seen: Mapping[int, dict[int, int]]) -> Penalties | None:
    """Penalty inputs; `seen` maps a penalized request's id to every token id it has seen
    (prompt and output) -> its count in the output."""
    used = [(row, res) for row, res in rows if res.id in seen]
    if not used:
        return None
    # Ids padded to a power of two (few compiles); the pad id, V, is dropped by the scatter.
    width = bucket(max(len(seen[res.id]) for _, res in used), 1 << 30, minimum=64)
    ids = np.full((batch, width), config.vocab_size, np.int32)
    counts = np.zeros((batch, width), np.int32)
    factors = np.zeros((3, batch), np.float32)
    factors[0] = 1.0
    for row, res in used:
        ids[row, :len(seen[res.id])] = list(seen[res.id])
        counts[row, :len(seen[res.id])] = list(seen[res.id].values())
        s = res.request.sampling
        factors[:, row] = (s.repetition_penalty, s.presence_penalty, s.frequency_penalty)
    return Penalties(ids, counts, *factors)   # host arrays: the jitted sampler takes them as they are


class PrefillCall(NamedTuple):
    """A group's prefill: the distinct prompts `tokens` [R, P] (R a power of two: pad rows
    repeat the first prompt and write nothing, their cache row past the cache), their cache
    `rows` [R] and `lengths` [R]; `take` [G]: the logits row of each request of the group (None:
    row i, all prompts distinct), G its size padded to a power of two (`draw_rows`); `sources`,
    `targets` [M]: cache rows copied after the prefill to requests sharing a prompt (or None)."""

    tokens: np.ndarray
    rows: np.ndarray
    lengths: np.ndarray
    take: np.ndarray | None
    sources: np.ndarray | None
    targets: np.ndarray | None

    @property
    def draw_rows(self) -> int:
        return len(self.tokens) if self.take is None else len(self.take)

    def member_tokens(self) -> np.ndarray:
        """Each request's (padded) prompt row, in group order."""
        return self.tokens if self.take is None else self.tokens[self.take]


def prefill_inputs(group: Sequence[tuple[int, Result]], length: int, slots: int,
                   config: GrokConfig) -> PrefillCall:
    """The prefill of the (slot, result) pairs of `group`, all of them prompts of bucket
    `length`: one row per distinct prompt."""
    first: dict[tuple[int, ...], int] = {}      # prompt -> its row
    distinct: list[tuple[int, Result]] = []
    take, sources, targets = [], [], []
    for slot, res in group:
        row = first.setdefault(tuple(res.prompt), len(distinct))
        if row == len(distinct):
            distinct.append((slot, res))
        else:
            sources.append(distinct[row][0])
            targets.append(slot)
        take.append(row)
    rows = min(bucket(len(distinct), slots, minimum=1), slots)
    tokens = np.full((rows, length), config.pad_token, np.int32)
    cache_rows = np.full(rows, slots, np.int32)
    lengths = np.ones(rows, np.int32)
    for i, (slot, res) in enumerate(distinct):
        tokens[i, :len(res.prompt)] = res.prompt
        cache_rows[i], lengths[i] = slot, len(res.prompt)
    tokens[len(distinct):], lengths[len(distinct):] = tokens[0], lengths[0]
    if not sources:
        return PrefillCall(tokens, cache_rows, lengths, None, None, None)
    draws = min(bucket(len(group), slots, minimum=1), slots)
    copies = bucket(len(sources), slots, minimum=1)
    return PrefillCall(tokens, cache_rows, lengths,
                       np.array(take + [0] * (draws - len(take)), np.int32),
                       np.array(sources + [0] * (copies - len(sources)), np.int32),
                       np.array(targets + [slots] * (copies - len(targets)), np.int32))


def prompt_logprob_rows(group: Sequence[tuple[int, Result]], tokens: np.ndarray
                        ) -> tuple[list[int], np.ndarray | None]:
    """The indices in a prefill `group` of the requests that ask for their prompt's
    log-probabilities, and those rows of its prefill `tokens` [R, length] (padded, repeating the
    first, to a power of two for few compiles); None when no request asks."""
    asking = [i for i, (_, res) in enumerate(group) if res.request.prompt_logprobs]
    if not asking:
        return asking, None
    rows = bucket(len(asking), len(tokens), minimum=1)
    return asking, tokens[(asking + [asking[0]] * rows)[:rows]]


def decode_inputs(live: Sequence[tuple[int, Result]], slots: int, max_len: int
                  ) -> tuple[np.ndarray, np.ndarray, int]:
    """Last tokens [B] and their positions [B] of the live (slot, result) pairs (idle slots sit
    at `max_len`: they write nothing), and the attention span: the longest live sequence,
    bucketed."""
    tokens = np.zeros(slots, np.int32)
    positions = np.full(slots, max_len, np.int32)
    for slot, res in live:
        tokens[slot] = res.tokens[-1]
        positions[slot] = len(res.prompt) + len(res.tokens) - 1
    attend = bucket(int(max(positions[s] for s, _ in live)) + 1, max_len, MIN_ATTEND_BUCKET)
    return tokens, positions, attend
