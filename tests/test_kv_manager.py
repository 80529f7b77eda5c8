"""The KV manager's bookkeeping (grok.serving.kv_manager): chained page digests, the prefix
cache's lookups, reference counts, allocation and LRU eviction. Host-side only: no model."""
from __future__ import annotations

import collections
import random

import pytest

from grok.serving.kv_manager import ROOT, KVManager, page_digests

PAGE = 4


def _filled(kv: KVManager, tokens: list[int]) -> tuple[list[int], list[bytes]]:
    """A sequence holding `tokens`' full pages, each registered under its digest (as the
    scheduler does once they are computed): its block table and the digests."""
    digests = page_digests(tokens, kv.page_size)
    pages = kv.allocate(len(digests))
    assert pages is not None
    for page, digest in zip(pages, digests):
        kv.register(page, digest)
    return pages, digests


# --- digests ------------------------------------------------------------------------------------

def test_digests_are_chained_over_full_pages():
    a = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    digests = page_digests(a, PAGE)
    assert len(digests) == 2                                  # the part-filled page has none
    assert len(set(digests)) == 2 and all(len(d) == 32 for d in digests)
    assert page_digests(a[:8], PAGE) == digests               # the partial tail changes nothing
    # the same content after another first page: another digest (it keys the whole prefix)
    other = page_digests([9, 9, 9, 9] + a[4:8], PAGE)
    assert other[1] != digests[1] and other[0] != digests[0]
    # equal prefixes give equal digests, up to the first page that differs
    forked = page_digests(a[:4] + [5, 6, 7, 0, 1, 2, 3, 4], PAGE)
    assert forked[0] == digests[0] and forked[1] != digests[1]
    # one page of a page-sized sequence and the same page of a longer one: the same digest
    assert page_digests(a[:4], PAGE) == digests[:1]
    # continuing from a parent: the same chain
    assert page_digests(a[:8], PAGE, parent=digests[0], first=1) == digests[1:]
    assert page_digests(a[:8], PAGE, parent=ROOT, first=1) != digests[1:]
    # the page size is part of what a digest covers
    assert page_digests(a[:8], 8)[0] not in digests
    assert page_digests([1, 2, 3], PAGE) == []


def test_digests_do_not_depend_on_the_token_container():
    import numpy as np
    tokens = [5, 63, 0, 17, 2 ** 31 - 1, 4, 4, 4]
    assert page_digests(tokens, PAGE) == page_digests(tuple(tokens), PAGE) == page_digests(
        np.array(tokens, np.int32), PAGE)
    # ids that would collide as bytes of a narrower type stay apart
    assert page_digests([256, 0, 0, 0], PAGE) != page_digests([0, 1, 0, 0], PAGE)


# --- the prefix cache ---------------------------------------------------------------------------

def test_match_stops_at_the_first_miss():
    kv = KVManager(8, PAGE)
    tokens = list(range(1, 17))
    digests = page_digests(tokens, PAGE)
    pages = kv.allocate(4)
    for i in (0, 2, 3):                    # page 1 never became findable
        kv.register(pages[i], digests[i])
    assert kv.match(digests) == [pages[0]]
    assert kv.match(digests[2:]) == [pages[2], pages[3]]      # (a lookup is by digest alone)
    assert kv.match([]) == [] and kv.match(page_digests([9] * 8, PAGE)) == []
    kv.register(pages[1], digests[1])
    assert kv.match(digests) == pages
    assert kv.cached == 4
    kv.check()


def test_a_second_page_with_cached_content_stays_private():
    kv = KVManager(4, PAGE)
    digest = page_digests([1, 2, 3, 4], PAGE)[0]
    first, second = kv.allocate(2)
    kv.register(first, digest)
    kv.register(second, digest)            # another sequence computed the same page
    assert kv.match([digest]) == [first] and kv.cached == 1
    kv.register(first, page_digests([7, 7, 7, 7], PAGE)[0])   # a page has one digest
    assert kv.cached == 1
    kv.release([first, second])
    # the private copy is free again, the cached one evictable, still findable
    assert kv.available == 4 and kv.used == 0 and kv.match([digest]) == [first]
    kv.check()


def test_forget_drops_a_page_from_the_cache():
    kv = KVManager(4, PAGE)
    pages, digests = _filled(kv, list(range(8)))
    kv.forget(pages[1])
    assert kv.match(digests) == [pages[0]]
    kv.release(pages)
    assert kv.cached == 1
    kv.check()


def test_without_prefix_caching_nothing_is_registered_or_found():
    kv = KVManager(4, PAGE, prefix_caching=False)
    pages, digests = _filled(kv, list(range(8)))
    assert kv.cached == 0 and kv.match(digests) == []
    kv.release(pages)
    assert kv.match(digests) == [] and kv.available == 4
    # released pages went to the free list: reusing them evicts nothing
    assert kv.allocate(4) is not None and kv.stats.evictions == 0
    kv.check()


# --- ownership ----------------------------------------------------------------------------------

def test_shared_pages_stay_held_until_their_last_holder_releases_them():
    kv = KVManager(6, PAGE)
    tokens = list(range(10, 22))
    a, digests = _filled(kv, tokens)                 # sequence a: 3 full pages
    hit = kv.match(digests[:2])
    assert hit == a[:2]
    kv.take(hit)
    b = hit + kv.allocate(1)                         # sequence b: a's first two, one of its own
    assert kv.refs[a[0]] == kv.refs[a[1]] == 2 and kv.refs[a[2]] == 1 and kv.used == 4
    kv.release(a)                                    # a ends: its shared pages stay b's
    assert kv.refs[a[0]] == kv.refs[a[1]] == 1 and kv.refs[a[2]] == 0
    assert kv.used == 3 and kv.available == 3
    # b's pages cannot be handed out: only the 2 free pages and a's evictable tail can
    got = kv.allocate(3)
    assert got is not None and not set(got) & set(b)
    assert a[2] in got and kv.stats.evictions == 1
    kv.release(got)
    kv.release(b)
    assert kv.used == 0 and all(r == 0 for r in kv.refs)
    assert kv.match(digests) == a[:2]                # b's pages of a's prefix are still cached
    kv.check()


def test_taking_a_cached_page_back_makes_it_unevictable():
    kv = KVManager(3, PAGE)
    pages, digests = _filled(kv, list(range(8)))
    kv.release(pages)
    assert kv.available == 3
    kv.take(kv.match(digests))                       # a new sequence finds both
    assert kv.available == 1 and kv.used == 2
    assert kv.allocate(2) is None                    # they are not the pool's to evict
    assert kv.allocate(1) not in ([pages[0]], [pages[1]])
    assert kv.stats.evictions == 0
    kv.check()


def test_allocate_takes_nothing_when_short():
    kv = KVManager(5, PAGE)
    cached, _ = _filled(kv, list(range(8)))
    kv.release(cached)                               # 3 free + 2 evictable
    held = kv.allocate(2)                            # the free ones first
    assert not set(held) & set(cached) and kv.stats.evictions == 0
    before = (list(kv.refs), kv.available, kv.cached)
    assert kv.allocate(4) is None
    assert (list(kv.refs), kv.available, kv.cached) == before and kv.stats.evictions == 0
    assert kv.allocate(3) is not None and kv.available == 0 and kv.stats.evictions == 2
    assert kv.allocate(1) is None
    assert kv.allocate(0) == []
    kv.check()


def test_releasing_more_often_than_taken_raises():
    kv = KVManager(2, PAGE)
    pages = kv.allocate(1)
    kv.release(pages)
    with pytest.raises(AssertionError, match="released more often"):
        kv.release(pages)


@pytest.mark.parametrize("pages, size", [(0, 4), (4, 0), (-1, 4)])
def test_an_empty_pool_is_refused(pages, size):
    with pytest.raises(ValueError, match="pages >= 1 and page_size >= 1"):
        KVManager(pages, size)


# --- eviction -----------------------------------------------------------------------------------

def test_eviction_is_least_recently_released_first_and_tail_before_head():
    kv = KVManager(6, PAGE)
    old, old_digests = _filled(kv, list(range(100, 112)))       # 3 pages
    new, new_digests = _filled(kv, list(range(200, 212)))       # 3 pages
    kv.release(old)            # released first: evicted first
    kv.release(new)
    assert kv.available == 6 and kv.cached == 6
    order = [kv.allocate(1)[0] for _ in range(6)]
    assert order == old[::-1] + new[::-1]
    assert kv.stats.evictions == 6 and kv.cached == 0
    kv.check()


def test_evicted_pages_are_no_longer_found():
    kv = KVManager(4, PAGE)
    pages, digests = _filled(kv, list(range(16)))
    kv.release(pages)
    got = kv.allocate(1)                              # the tail goes first
    assert got == [pages[3]] and kv.stats.evictions == 1
    assert kv.match(digests) == pages[:3]             # the head still matches
    got += kv.allocate(2)
    assert got == [pages[3], pages[2], pages[1]] and kv.stats.evictions == 3
    assert kv.match(digests) == pages[:1]
    # an evicted page registered under new content is found by that, not by the old
    other = page_digests(list(range(50, 58)), PAGE)
    kv.register(got[0], other[0])
    assert kv.match(other) == [got[0]] and kv.match(digests) == pages[:1]
    kv.release(got)
    kv.check()


def test_a_page_released_again_becomes_the_most_recently_used():
    kv = KVManager(4, PAGE)
    a, a_digests = _filled(kv, list(range(4)))
    b, b_digests = _filled(kv, list(range(10, 14)))
    kv.release(a)
    kv.release(b)                                     # LRU order: a, b
    kv.take(kv.match(a_digests))                      # a is found and used again
    kv.release(a)                                     # LRU order: b, a
    assert kv.allocate(3) is not None                 # 2 free pages, then b
    assert kv.match(b_digests) == [] and kv.match(a_digests) == a
    kv.check()


# --- a property test ----------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(6))
def test_random_operations_keep_the_invariants(seed):
    """Sequences start (sharing what the cache has of their prefix), grow, register their full
    pages and end, at random; after each operation the manager's own invariants hold, and against
    a model of the pages' contents: reference counts equal the block tables holding each page,
    `used` counts the held pages, allocation never hands out a held page, and whatever `match`
    finds holds the tokens its digests name."""
    rng = random.Random(seed)
    kv = KVManager(rng.choice([6, 12, 24]), PAGE, prefix_caching=seed != 0)
    vocab = rng.choice([2, 3, 50])
    history: list[list[int]] = []
    content: dict[int, tuple[int, ...]] = {}        # page -> the tokens written there
    seqs: list[dict] = []                            # {"tokens", "pages", "registered"}
    evictions = 0

    def check():
        kv.check()
        held = collections.Counter(p for s in seqs for p in s["pages"])
        assert [kv.refs[p] for p in range(kv.pages)] == [held[p] for p in range(kv.pages)]
        assert kv.used == len(held) and kv.available == kv.pages - len(held)
        assert kv.stats.evictions == evictions

    def fresh(n: int) -> list[int] | None:
        nonlocal evictions
        before = kv.available, set(kv._free), kv.cached
        pages = kv.allocate(n)
        if pages is None:
            assert n > before[0] and (kv.available, set(kv._free), kv.cached) == before
            return None
        assert len(pages) == len(set(pages)) == n
        assert all(kv.refs[p] == 1 for p in pages)
        assert not any(p in s["pages"] for s in seqs for p in pages), "a held page handed out"
        evictions += sum(p not in before[1] for p in pages)
        return pages

    hits = 0
    for _ in range(300):
        op = rng.random()
        if op < 0.35 or not seqs:                     # a new sequence
            tokens = [rng.randrange(vocab) for _ in range(rng.randrange(1, 5 * PAGE))]
            if history and rng.random() < 0.6:         # often another's start, then its own
                tokens = rng.choice(history)[:rng.randrange(3 * PAGE)] + tokens[:PAGE]
            history.append(tokens)                    # (grown with the sequence)
            digests = page_digests(tokens, PAGE)
            hit = kv.match(digests)
            if not kv.prefix_caching:
                assert hit == []
            for i, page in enumerate(hit):            # what is found is what was written
                assert content[page] == tuple(tokens[i * PAGE:(i + 1) * PAGE])
            hits += len(hit)
            kv.take(hit)
            own = fresh(kv.pages_for(len(tokens)) - len(hit))
            if own is None:
                kv.release(hit)
            else:
                for i, page in enumerate(own, start=len(hit)):
                    content[page] = tuple(tokens[i * PAGE:(i + 1) * PAGE])
                seqs.append({"tokens": tokens, "pages": hit + own, "registered": len(hit)})
        elif op < 0.6:                                # a sequence grows by a token
            seq = rng.choice(seqs)
            if len(seq["tokens"]) % PAGE == 0:
                page = fresh(1)
                if page is None:
                    continue
                seq["pages"] += page
                content[page[0]] = ()
            seq["tokens"].append(rng.randrange(vocab))
            last = seq["pages"][-1]
            content[last] = tuple(seq["tokens"][(len(seq["pages"]) - 1) * PAGE:])
        elif op < 0.8:                                # its full pages become findable
            seq = rng.choice(seqs)
            digests = page_digests(seq["tokens"], PAGE)
            for page, digest in list(zip(seq["pages"], digests))[seq["registered"]:]:
                kv.register(page, digest)
            seq["registered"] = len(digests)
        else:                                         # a sequence ends
            seq = seqs.pop(rng.randrange(len(seqs)))
            kv.release(seq["pages"])
        check()
    for seq in seqs:
        kv.release(seq["pages"])
    seqs.clear()
    check()
    assert kv.used == 0 and kv.available == kv.pages
    # both paths were exercised (without the cache, nothing is found, so nothing is evicted)
    assert (hits > 0) == (evictions > 0) == kv.prefix_caching
