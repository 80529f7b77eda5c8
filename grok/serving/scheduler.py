"""The scheduler: what each engine step runs, as one explicit `StepPlan`.

Policy (the prefill budget, `PREFILL_TOKENS`, is the one `grok.parallel.memory` sizes the
workspace by):
- Decode: every sequence that has its first token (drawn by an earlier step's prefill or this
  one's) decodes one more; one whose next slot starts a page gets a page first. With no page left the newest sequence is preempted: its pages go
  back (its full ones stay findable in the prefix cache) and it waits at the head of the queue,
  to be recomputed, its tokens so far kept.
- A prompt longer than the chunk (the largest power of two <= the budget) is prefilled a chunk
  per step, one such prompt at a time, so it never stalls the others' decoding.
- Admission, first in first out, while a slot, the budget and pages last (leaving a page of
  headroom for each running sequence, so that growth seldom preempts): the longest run of
  the prompt's full pages found in the prefix cache is shared, not prefilled (the last prompt
  token is always computed: its logits draw the first token); a prompt whose next page another
  request is computing this step waits one step to find it; requests with the same prompt
  (a server's `n`) share one prefill row, its pages shared and its last part-filled page copied.
  Prefills are grouped by padded length (powers of two, at least 16) in power-of-two row counts.
The scheduler owns the sequences' slots and block tables and the `KVManager`; the engine runs
the plan's calls and reports back (`prefilled`, `decoded`, `free`). No locking here: the
engine calls it under its lock.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Sequence

import numpy as np

from grok.serving.batching import MIN_ATTEND_BUCKET, bucket
from grok.serving.book import Book
from grok.serving.kv_manager import ROOT, KVManager, page_digests
from grok.serving.request import Result


@dataclasses.dataclass
class Seq:
    """A request holding a slot: its block table, how many of its tokens are in the cache, and
    how many of its leading full pages are findable (`digest`: the last one's)."""

    rid: int
    slot: int
    order: int                # admission order: the highest is the newest (preempted first)
    pages: list[int]
    computed: int = 0
    registered: int = 0
    digest: bytes = ROOT
    prefilling: bool = True   # its prompt is not all in the cache yet


@dataclasses.dataclass(frozen=True)
class Piece:
    """One prefill row: `tokens` from sequence position `start` of request `rid` (with the ids
    in `sharing` taking the same row's logits and pages); `draw`: its last piece, whose logits
    draw the first token (False while more chunks follow, or for a recomputed request)."""

    rid: int
    tokens: tuple[int, ...]
    start: int
    draw: bool
    sharing: tuple[int, ...] = ()

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)


@dataclasses.dataclass(frozen=True)
class PrefillCall:
    """Pieces of one padded `length`, attending over their first `attend` slots (0: fresh
    prompts, nothing to read); `copies` (source page, target page) run after it."""

    pieces: tuple[Piece, ...]
    length: int
    attend: int
    copies: tuple[tuple[int, int], ...] = ()


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """One step: its prefill calls, then one decode call over `decode` (slot, request id): the
    sequences past their prompt, and those whose prompt these prefills complete (each with a
    page for its next slot); `attend` its attention span; `preempted`: the requests sent back
    to the queue to make room."""

    prefills: tuple[PrefillCall, ...]
    decode: tuple[tuple[int, int], ...]
    attend: int
    preempted: tuple[int, ...]


class Scheduler:
    """Slots, block tables and the KV manager of one engine, and the step policy above."""

    def __init__(self, book: Book, max_batch: int, max_len: int, kv: KVManager,
                 prefill_tokens: int, chunk_len: int):
        self.book, self.kv = book, kv
        self.max_batch, self.max_len = max_batch, max_len
        self.prefill_tokens, self.chunk_len = prefill_tokens, chunk_len
        self.slots: list[int | None] = [None] * max_batch
        self.seqs: dict[int, Seq] = {}
        self.preemptions = 0
        self._order = itertools.count()
        self._long: set[int] = set()    # the long prompt being prefilled a chunk per step

    @property
    def chunking(self) -> Seq | None:
        """The long prompt being prefilled a chunk per step, if any."""
        return self.seqs[next(iter(self._long))] if self._long else None

    # --- the plan -------------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        """This step's plan; it takes the pages it needs (given back by `free`, or kept as the
        calls' results are reported)."""
        preempted: list[int] = []
        decode = self._decoders(preempted)
        calls: list[PrefillCall] = []
        spent = 0
        long = self.chunking
        if long is not None:
            n = min(self.chunk_len, len(self._tokens(long)) - long.computed)
            if self._grow(long, long.computed + n):
                piece = self._piece(long, n)
                spent = self.chunk_len
                calls.append(PrefillCall((piece,), bucket(n, self.chunk_len),
                                         self._attend(long.computed)))
        calls += self._admit(self.prefill_tokens - spent, first=not calls)
        ends = [self.seqs[rid].computed for _, rid in decode]
        for piece in (p for call in calls for p in call.pieces):
            if piece.end < len(self._tokens(self.seqs[piece.rid])):
                continue        # more chunks to come
            for rid in (piece.rid, *piece.sharing):    # prompt done: decode in this step too
                if self._grow(self.seqs[rid], piece.end + 1):
                    decode.append((self.seqs[rid].slot, rid))
                    ends.append(piece.end)
        attend = bucket(max(ends) + 1, self.max_len, MIN_ATTEND_BUCKET) if ends else 0
        return StepPlan(tuple(calls), tuple(decode), attend, tuple(preempted))

    def _decoders(self, preempted: list[int]) -> list[tuple[int, int]]:
        """The sequences decoding this step, each with a page for its next slot (the newest
        preempted while none is left)."""
        out = []
        for seq in sorted(self.seqs.values(), key=lambda s: s.order):
            if seq.rid not in self.seqs or seq.prefilling:
                continue
            while not self._grow(seq, seq.computed + 1):
                victim = max(self.seqs.values(), key=lambda s: s.order)
                self.preempt(victim.rid)
                preempted.append(victim.rid)
                if victim is seq:
                    break
            if seq.rid in self.seqs:
                out.append((seq.slot, seq.rid))
        return [(slot, rid) for slot, rid in out if rid in self.seqs]

    def _admit(self, budget: int, first: bool) -> list[PrefillCall]:
        """Admit waiting requests (see the module's docstring); their prefill calls."""
        fresh: dict[int, list[Piece]] = {}      # by padded length: no cache to read
        resumed: dict[int, list[Piece]] = {}    # by padded length: reading cached pages
        copies: dict[int, list[tuple[int, int]]] = {}
        same: dict[tuple[int, ...], tuple[Seq, list[int]]] = {}   # prompt -> (seq, sharers)
        pending: set[bytes] = set()              # digests of pages computed this step
        spent = 0
        calls: list[PrefillCall] = []
        waiting = self.book.waiting
        while waiting and None in self.slots:
            res = self.book.results[waiting[0]]
            tokens = self._prompt(res)
            draw = not res.tokens
            if draw and tuple(tokens) in same:      # the same prompt, admitted this step
                lead, sharers = same[tuple(tokens)]
                if not self._share(res, lead):
                    break
                sharers.append(waiting.popleft())
                continue
            digests: list[bytes] = []
            if self.kv.prefix_caching:
                usable = (len(tokens) - 1) // self.kv.page_size   # the last token is computed
                digests = page_digests(tokens[:usable * self.kv.page_size], self.kv.page_size)
            hit = self.kv.match(digests)
            if len(hit) < len(digests) and digests[len(hit)] in pending:
                break                       # another admission computes its next page now
            start = len(hit) * self.kv.page_size
            n = len(tokens) - start
            long = n > self.chunk_len
            cost = self.chunk_len if long else bucket(n, self.chunk_len)
            if (long and self.chunking is not None) or (
                    spent + cost > budget and not (first and spent == 0)):
                break
            self.kv.take(hit)
            need = self.kv.pages_for(start + min(n, self.chunk_len)) - len(hit)
            own = self.kv.allocate(need) if self._room(need) else None
            if own is None:
                self.kv.release(hit)
                break
            waiting.popleft()
            spent += cost
            seq = self._place(res, hit + own, start, digests[len(hit) - 1] if hit else ROOT)
            if draw:
                res.cached_tokens = start
                self.kv.stats.queried_tokens += len(tokens)
                self.kv.stats.hit_tokens += start
            pending.update(digests[len(hit):])
            if long:                        # a call of its own, its first chunk
                self._long.add(seq.rid)
                calls.append(PrefillCall((self._piece(seq, self.chunk_len),), self.chunk_len,
                                         self._attend(start) if start else 0))
                continue
            length = bucket(n, self.chunk_len)
            (resumed if start else fresh).setdefault(length, []).append(
                Piece(res.id, tuple(tokens[start:]), start, draw))
            if draw:
                same[tuple(tokens)] = (seq, [])
        shared = {lead.rid: (lead, tuple(sharers)) for lead, sharers in same.values() if sharers}
        for lead, sharers in shared.values():
            copies[lead.rid] = self._copies(lead, sharers)
        for groups, reading in ((fresh, False), (resumed, True)):
            for size, pieces in sorted(groups.items()):
                pieces = [dataclasses.replace(p, sharing=shared[p.rid][1]) if p.rid in shared
                          else p for p in pieces]
                most = max(1, self.prefill_tokens // size)
                for i in range(0, len(pieces), most):
                    part = tuple(pieces[i:i + most])
                    attend = self._attend(max(p.start for p in part)) if reading else 0
                    moved = tuple(c for p in part for c in copies.get(p.rid, ()))
                    calls.append(PrefillCall(part, size, attend, moved))
        return calls

    # --- reports from the engine ----------------------------------------------------------------
    def prefilled(self, piece: Piece) -> None:
        """A piece's keys and values are in the cache (for it and its sharers)."""
        for rid in (piece.rid, *piece.sharing):
            seq = self.seqs.get(rid)
            if seq is None:
                continue
            seq.computed = piece.end
            if piece.end == len(self._tokens(seq)):
                seq.prefilling = False
                self._long.discard(rid)
            self._register(seq)

    def decoded(self, rid: int) -> None:
        """A decode step wrote the sequence's next slot."""
        seq = self.seqs.get(rid)
        if seq is not None:
            seq.computed += 1
            self._register(seq)

    def free(self, rid: int) -> None:
        """The request ended (or left): its slot and pages go back (full pages stay cached)."""
        seq = self.seqs.pop(rid, None)
        if seq is not None:
            self.kv.release(seq.pages)
            self.slots[seq.slot] = None
            self._long.discard(rid)

    def preempt(self, rid: int) -> None:
        """Send a running request back to the head of the queue (recomputed when re-admitted)."""
        self.free(rid)
        res = self.book.results[rid]
        res.preemptions += 1
        self.preemptions += 1
        self.book.waiting.appendleft(rid)

    def reset(self, kv: KVManager) -> None:
        """A new, empty pool (the old one was lost): no sequence holds a page."""
        self.kv = kv
        self.seqs.clear()
        self._long.clear()
        self.slots = [None] * self.max_batch

    def table(self, rids: Sequence[int | None], width: int) -> np.ndarray:
        """Block tables [len(rids), width] of `rids` (None: a padding row): each sequence's
        first `width` pages, padded with the pool's page count (no page)."""
        out = np.full((len(rids), width), self.kv.pages, np.int32)
        for row, rid in enumerate(rids):
            if rid in self.seqs:
                pages = self.seqs[rid].pages[:width]
                out[row, :len(pages)] = pages
        return out

    # --- internals ------------------------------------------------------------------------------
    def _prompt(self, res: Result) -> list[int]:
        """The tokens to put in the cache at admission: the prompt, and for a recomputed
        request the tokens it drew, all but the last (which its next decode step feeds)."""
        return list(res.prompt) + list(res.tokens[:-1])

    def _tokens(self, seq: Seq) -> list[int]:
        return self._prompt(self.book.results[seq.rid])

    def _place(self, res: Result, pages: list[int], start: int, digest: bytes) -> Seq:
        slot = self.slots.index(None)
        seq = Seq(res.id, slot, next(self._order), pages, start, start // self.kv.page_size,
                  digest)
        self.slots[slot] = res.id
        self.seqs[res.id] = seq
        return seq

    def _room(self, need: int) -> bool:
        """Whether admitting a sequence that takes `need` pages now leaves a page for each
        sequence's next one (then, as vLLM's watermark, growth preempts rarely; with none
        running, any request the pool can hold is admitted)."""
        return not self.seqs or self.kv.available - need >= len(self.seqs) + 1

    def _share(self, res: Result, lead: Seq) -> bool:
        """Place `res` beside `lead` (the same prompt): its full pages shared, a page of its own
        for the part-filled last one. False (nothing taken) without a slot or page."""
        full = len(self._tokens(lead)) // self.kv.page_size
        shared = lead.pages[:full]
        need = self.kv.pages_for(len(res.prompt)) - full
        self.kv.take(shared)
        own = self.kv.allocate(need) if self._room(need) else None
        if own is None:
            self.kv.release(shared)
            return False
        self._place(res, shared + own, lead.computed, lead.digest)
        res.cached_tokens = lead.computed
        self.kv.stats.queried_tokens += len(res.prompt)
        self.kv.stats.hit_tokens += lead.computed
        return True

    def _copies(self, lead: Seq, sharers: Sequence[int]) -> list[tuple[int, int]]:
        full = len(self._tokens(lead)) // self.kv.page_size
        return [(lead.pages[full], self.seqs[rid].pages[full]) for rid in sharers
                if len(lead.pages) > full]

    def _piece(self, seq: Seq, n: int) -> Piece:
        tokens = self._tokens(seq)
        end = seq.computed + n
        draw = end == len(tokens) and not self.book.results[seq.rid].tokens
        return Piece(seq.rid, tuple(tokens[seq.computed:end]), seq.computed, draw)

    def _grow(self, seq: Seq, length: int) -> bool:
        """Give the sequence pages for its first `length` slots; False if the pool has none."""
        need = self.kv.pages_for(length) - len(seq.pages)
        if need <= 0:
            return True
        pages = self.kv.allocate(need)
        if pages is None:
            return False
        seq.pages += pages
        return True

    def _attend(self, start: int) -> int:
        """The cached slots a call reads: those before `start`, bucketed (powers of two from
        256: few compiles)."""
        return bucket(start, self.max_len, MIN_ATTEND_BUCKET)

    def _register(self, seq: Seq) -> None:
        """Make the sequence's newly completed full pages findable."""
        full = seq.computed // self.kv.page_size
        if full <= seq.registered or not self.kv.prefix_caching:
            seq.registered = max(seq.registered, full)
            return
        res = self.book.results[seq.rid]
        tokens = (list(res.prompt) + list(res.tokens))[:full * self.kv.page_size]
        for page, digest in zip(seq.pages[seq.registered:full],
                                page_digests(tokens, self.kv.page_size, seq.digest,
                                             seq.registered)):
            self.kv.register(page, digest)
            seq.digest = digest
        seq.registered = full
