"""The KV manager: who owns which pages of the paged KV cache, and the prefix cache over them.

The device pool holds `pages` pages of `page_size` token slots each (`grok.model.paged`). A
sequence holds a list of pages, its block table: slot p of the sequence is slot p % page_size of
page table[p // page_size]. Pages are reference counted: a full page whose tokens a later prompt
starts with is shared, not recomputed.

Prefix caching (as vLLM's): a full page is known by a digest chained from the start of its
sequence, sha256(parent digest | its token ids), so equal digests mean equal token prefixes (and
so equal keys and values: they depend on nothing else). A page stays findable after its last
holder ends, at reference count zero, until the pool needs it: such pages are evicted least
recently used first, the tail of a sequence before its head. Host-side bookkeeping only (no
locking: the engine calls it under its lock).
"""
from __future__ import annotations

import collections
import hashlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np

ROOT = b"grok-prefix"        # the parent digest of a sequence's first page


def page_digests(tokens: Sequence[int], page_size: int, parent: bytes = ROOT,
                 first: int = 0) -> list[bytes]:
    """The chained digest of each full page of `tokens` from page `first` (whose parent's digest
    is `parent`)."""
    out = []
    ids = np.asarray(tokens, np.int64)
    for p in range(first, len(ids) // page_size):
        parent = hashlib.sha256(parent + ids[p * page_size:(p + 1) * page_size].tobytes()).digest()
        out.append(parent)
    return out


@dataclass
class CacheStats:
    """Prefix-cache counters since the manager was made."""

    queried_tokens: int = 0      # prompt tokens looked up at admission
    hit_tokens: int = 0          # of those, found in the cache (their prefill skipped)
    evictions: int = 0           # cached pages reused for other content

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


class KVManager:
    """Pages of one pool: free, held (reference counted) or cached (reference count zero,
    findable by digest, evictable)."""

    def __init__(self, pages: int, page_size: int, prefix_caching: bool = True):
        if pages < 1 or page_size < 1:
            raise ValueError(f"a KV pool needs pages >= 1 and page_size >= 1, got {pages}, "
                             f"{page_size}")
        self.pages, self.page_size, self.prefix_caching = pages, page_size, prefix_caching
        self.refs = [0] * pages
        self._free: collections.deque[int] = collections.deque(range(pages))
        self._by_digest: dict[bytes, int] = {}
        self._digest: dict[int, bytes] = {}
        # Cached pages at reference count zero, least recently released first.
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.stats = CacheStats()

    # --- counts ---------------------------------------------------------------------------------
    @property
    def available(self) -> int:
        """Pages that can be handed out now: free ones and evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def used(self) -> int:
        """Pages held by at least one sequence."""
        return self.pages - self.available

    @property
    def cached(self) -> int:
        """Pages findable by digest (held or not)."""
        return len(self._by_digest)

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    # --- prefix cache ---------------------------------------------------------------------------
    def match(self, digests: Sequence[bytes]) -> list[int]:
        """The cached pages of the longest run of `digests` from the first (not yet held)."""
        if not self.prefix_caching:
            return []
        out = []
        for digest in digests:
            page = self._by_digest.get(digest)
            if page is None:
                break
            out.append(page)
        return out

    def register(self, page: int, digest: bytes) -> None:
        """Make a held, full `page` findable by `digest` (a page whose content another page
        already caches stays private: the first one is the one found)."""
        if self.prefix_caching and digest not in self._by_digest and page not in self._digest:
            self._by_digest[digest] = page
            self._digest[page] = digest

    def forget(self, page: int) -> None:
        """Drop a page's digest (its content is not what the digest says: a failed write)."""
        digest = self._digest.pop(page, None)
        if digest is not None:
            del self._by_digest[digest]

    # --- ownership ------------------------------------------------------------------------------
    def take(self, pages: Sequence[int]) -> None:
        """Hold pages found by `match` (one more reference each)."""
        for page in pages:
            if self.refs[page] == 0:
                self._evictable.pop(page, None)
            self.refs[page] += 1

    def allocate(self, n: int) -> list[int] | None:
        """`n` pages for new content, held once each: free ones first, then cached ones least
        recently used (their digests forgotten); None, taking none, if fewer are available."""
        if n > self.available:
            return None
        out = []
        for _ in range(n):
            if self._free:
                page = self._free.popleft()
            else:
                page, _ = self._evictable.popitem(last=False)
                self.forget(page)
                self.stats.evictions += 1
            self.refs[page] = 1
            out.append(page)
        return out

    def release(self, pages: Sequence[int]) -> None:
        """Drop one reference to each page of a block table. Pages no one holds become free,
        or, if cached, evictable: the table's tail first, so that a shared head outlives it."""
        for page in reversed(pages):
            self.refs[page] -= 1
            if self.refs[page] < 0:
                raise AssertionError(f"page {page} released more often than taken")
            if self.refs[page] == 0:
                if page in self._digest:
                    self._evictable[page] = None
                else:
                    self._free.append(page)

    def check(self) -> None:
        """Assert the bookkeeping's invariants (tests)."""
        free, evictable = set(self._free), set(self._evictable)
        assert len(free) == len(self._free) and not free & evictable
        for page in range(self.pages):
            held = self.refs[page] > 0
            assert held + (page in free) + (page in evictable) == 1, page
            assert page not in evictable or page in self._digest, page
        assert all(self._by_digest[d] == p for p, d in self._digest.items())
