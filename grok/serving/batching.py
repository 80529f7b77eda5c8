"""The host-side inputs of the engine's device calls: padded token arrays, positions, per-row
sampling settings and penalties, built from the requests' state (pure functions: no engine state
changes here)."""
from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Sequence

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


class PieceInputs(NamedTuple):
    """A prefill call's inputs: its pieces `tokens` [R, C] (R a power of two: padding rows
    repeat nothing and write nothing, their table empty), block tables `table` [R, n], `starts`
    and `lengths` [R]; `members`: the request id of each draw row (a piece's request, then those
    sharing its row), `take` [G] the logits row of each draw row (None: row i; G padded to a
    power of two, `draw_rows`); `copies` (sources, targets) [M] pages copied after it, or None."""

    tokens: np.ndarray
    table: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray
    members: list[int]
    take: np.ndarray | None
    copies: tuple[np.ndarray, np.ndarray] | None

    @property
    def draw_rows(self) -> int:
        return len(self.tokens) if self.take is None else len(self.take)


def piece_inputs(call: Any, tables: Sequence[Sequence[int]], pad_token: int, max_rows: int,
                 no_page: int) -> PieceInputs:
    """The inputs of a `grok.serving.scheduler.PrefillCall` whose pieces have block tables
    `tables`; `no_page` (the pool's page count) pads tables and copy targets."""
    pieces = call.pieces
    rows = bucket(len(pieces), max(max_rows, len(pieces)), minimum=1)
    tokens = np.full((rows, call.length), pad_token, np.int32)
    table = np.full((rows, len(tables[0])), no_page, np.int32)
    starts = np.zeros(rows, np.int32)
    lengths = np.ones(rows, np.int32)
    members, take = [], []
    for i, piece in enumerate(pieces):
        tokens[i, :len(piece.tokens)] = piece.tokens
        table[i], starts[i], lengths[i] = tables[i], piece.start, len(piece.tokens)
        if piece.draw:
            members += [piece.rid, *piece.sharing]
            take += [i] * (1 + len(piece.sharing))
    copies = None
    if call.copies:
        size = bucket(len(call.copies), 1 << 30, minimum=1)
        sources = np.zeros(size, np.int32)
        targets = np.full(size, no_page, np.int32)
        sources[:len(call.copies)], targets[:len(call.copies)] = zip(*call.copies)
        copies = (sources, targets)
    if take == list(range(len(take))):      # no row shared: row i draws for member i
        return PieceInputs(tokens, table, starts, lengths, members, None, copies)
    draws = bucket(len(take), 1 << 30, minimum=1)
    return PieceInputs(tokens, table, starts, lengths, members,
                       np.array(take + [0] * (draws - len(take)), np.int32), copies)


def prompt_rows(prompts: Sequence[Sequence[int]], max_len: int, pad_token: int) -> np.ndarray:
    """Whole prompts [R, P] for their log-probabilities' full forward: rows padded to a power of
    two (repeating the first), length to its bucket."""
    rows = bucket(len(prompts), 1 << 30, minimum=1)
    out = np.full((rows, bucket(max(map(len, prompts)), max_len)), pad_token, np.int32)
    for i in range(rows):
        prompt = prompts[i] if i < len(prompts) else prompts[0]
        out[i, :len(prompt)] = prompt
    return out
