"""The large cache: freed large spans that C keeps, so a large malloc/free
round trip never enters Python (issue 13).

What it must be, beside fast: invisible to correctness.  A cached span is idle
memory in stats(), a second free of its object is a DoubleFree while the span
is whole (an InvalidFree once it coalesced into a neighbour), check() walks it
in C memory and catches it broken, it goes back to the page heap before the
heap grows, on the scavenger's tick and on scavenge(), and efence has none.
Freed spans coalesce with cached neighbours and a size no bin holds is cut
from a longer span, so distinct sizes keep reusing the same memory.
"""

from __future__ import annotations

import threading
import time

import pytest
from osview import resident
from pycalls import goheap_python_calls

import goheap
from goheap import PAGE_SIZE, _native

KiB, MiB = 1 << 10, 1 << 20
LARGE_SIZES = [40 * KiB, 64 * KiB, 256 * KiB, 1 * MiB, 4 * MiB]


@pytest.fixture
def h():
    with goheap.Heap(arena_size=1 << 30) as heap:
        yield heap


def goheap_python_calls_in(fn) -> int:
    """How many Python functions of the goheap package run during fn()."""
    with goheap_python_calls() as called:
        fn()
    return len(called)


@pytest.mark.parametrize("n", LARGE_SIZES, ids=lambda n: f"{n // KiB}k")
def test_a_large_round_trip_stays_in_c_and_reuses_the_span(h, n):
    p = h.malloc(n)
    h.free(p)

    def loop():
        for _ in range(200):
            q = h.malloc(n)
            assert q == p
            h.free(q)
            h.free(h.malloc(n, zero=False))

    assert goheap_python_calls_in(loop) == 0
    st = h.stats()
    assert st.mallocs == st.frees == 401
    assert st.heap_alloc == 0 and st.heap_objects == 0
    h.check()


def test_cached_spans_are_idle_memory_not_in_use(h):
    ps = [h.malloc(1 * MiB) for _ in range(8)]
    inuse = h.stats().heap_inuse
    for p in ps:
        h.free(p)
    st = h.stats()
    assert h._c.lcache_bytes == 8 * MiB
    assert st.heap_inuse == inuse - 8 * MiB
    assert st.heap_idle >= 8 * MiB
    assert st.heap_alloc == 0 and st.heap_sys == st.heap_idle + st.heap_inuse
    h.check()


def test_a_second_free_of_a_cached_object_is_a_double_free(h):
    p = h.malloc(100 * KiB)
    h.free(p)
    with pytest.raises(goheap.DoubleFree):
        h.free(p)
    for bad in (p + 8, p + PAGE_SIZE):
        with pytest.raises(goheap.InvalidFree):
            h.free(bad)
    assert h.lookup(p) is None
    assert "cache" in h.explain(p + 100)
    h.check()


def test_zeroed_reuse_is_zero_and_a_close_fit_reports_its_size(h):
    p = h.malloc(72 * KiB)  # 9 pages
    h.view(p)[:] = b"\xee" * h.usable_size(p)
    h.free(p)
    q = h.malloc(64 * KiB + 1)  # 9 pages too
    assert q == p and h.view(q).tobytes() == bytes(h.usable_size(q))
    h.free(q)
    r = h.malloc(64 * KiB)  # 8 pages: the 9-page span is within 1/8, usable_size says so
    assert r == p and h.usable_size(r) == 72 * KiB
    assert h.lookup(r + 70 * KiB) == (r, 72 * KiB)
    h.free(r)
    s = h.malloc(40 * KiB)  # 5 pages: too loose a fit, a span of its own
    assert s != p and h.usable_size(s) == 40 * KiB
    h.free(s)
    h.check()


def test_scavenge_empties_the_cache_and_gives_its_pages_back(h):
    ps = [h.malloc(1 * MiB) for _ in range(16)]
    for p in ps:
        h.view(p)[:] = b"\x01" * MiB
    assert all(resident(p, MiB) == MiB for p in ps)
    for p in ps:
        h.free(p)
    assert h._c.lcache_bytes == 16 * MiB
    assert h._c.lcache_nspans == 1  # adjacent: coalesced into one oversize span
    released = h.scavenge()
    assert h._c.lcache_nspans == 0 and h._c.lcache_bytes == 0
    assert h._c.lcache_nspare == 0  # the spare structs went back with the cache
    assert released >= 16 * MiB
    assert sum(resident(p, MiB) for p in ps) == 0
    st = h.stats()
    assert st.heap_released >= 16 * MiB
    h.check()


def test_a_cache_past_half_its_cap_goes_back_to_the_page_heap_before_the_heap_grows():
    with goheap.Heap(arena_size=64 * MiB) as h:
        assert 16 * MiB <= h._c.lcache_limit < 17 * MiB  # a quarter of the reservation
        ps = [h.malloc(1 * MiB) for _ in range(12)]
        for p in ps:
            h.free(p)
        used = h.arena_used
        cached = h._c.lcache_nspans
        assert cached >= 1
        big = h.malloc(8 * MiB)  # fits only in the spans the cache held, coalesced
        assert h.arena_used == used, "grew instead of taking the cached spans back"
        assert h._c.lcache_nspans == 0
        h.free(big)
        h.check()


def test_a_cache_under_half_its_cap_keeps_serving_while_the_heap_grows():
    with goheap.Heap(arena_size=64 * MiB) as h:
        ps = [h.malloc(1 * MiB) for _ in range(4)]
        for p in ps:
            h.free(p)  # 4 MiB cached, under half of the 16 MiB cap
        used = h.arena_used
        big = h.malloc(8 * MiB)
        assert h.arena_used > used  # the heap grew beside the cache
        assert h._c.lcache_bytes == 4 * MiB and h._c.lcache_nspans == 1  # coalesced
        q = h.malloc(1 * MiB)
        assert q == min(ps)  # and the cache still serves from C, cut from its front
        h.free(q)
        h.free(big)
        h.check()


def test_the_cache_stays_under_its_cap():
    with goheap.Heap(arena_size=64 * MiB) as h:
        cap = h._c.lcache_limit
        assert 0 < cap < 64 * MiB
        ps = [h.malloc(1 * MiB) for _ in range(40)]
        for p in ps:
            h.free(p)
        assert h._c.lcache_bytes <= cap
        assert h.stats().heap_objects == 0
        h.check()


def test_efence_heaps_have_no_large_cache():
    with goheap.Heap(arena_size=256 * MiB, efence=True) as h:
        assert h._c.lcache_limit == 0
        p = h.malloc(100 * KiB)
        h.free(p)
        assert h._c.lcache_nspans == 0
        with pytest.raises(goheap.DoubleFree):
            h.free(p)
        h.check()


def test_check_catches_a_broken_cache_in_c_memory(h):
    p = h.malloc(100 * KiB)
    h.free(p)
    s = h._h.span_of(_native.spans_get(h._c, p))
    assert s.state == _native.MSPAN_CACHED
    s.ref = 3  # as a stray write into the span struct would
    with pytest.raises(goheap.HeapCorruption, match="large cache"):
        h.check()
    s.ref = 0
    h.check()
    _native.bitmap_set(h._c, p, 0, _native.BIT_BOUNDARY)  # the freed start forgotten
    with pytest.raises(goheap.HeapCorruption):
        h.check()
    _native.bitmap_set(h._c, p, _native.BIT_BOUNDARY, 0)
    h._c.lcache_bytes += PAGE_SIZE  # the total disagrees with the lists
    with pytest.raises(goheap.HeapCorruption, match="large cache"):
        h.check()
    h._c.lcache_bytes -= PAGE_SIZE
    h.check()


def test_the_scavenger_tick_runs_though_every_call_stays_in_c():
    with goheap.Heap(arena_size=256 * MiB, scavenge_after=0.05) as h:
        p = h.malloc(2 * MiB)
        q = h.malloc(64 * KiB)  # live: p's span never coalesces with what comes after
        h.free(p)  # cached
        deadline = h._h.next_scavenge + 0.2
        while time.monotonic() < deadline:
            h.free(h.malloc(2 * MiB))  # a cache hit, until the tick is due
        # A tick gives the cache back to the page heap, where a span starts its
        # idle time; the next tick releases what stayed idle long enough.
        for _ in range(2):
            time.sleep(0.12)
            h.free(h.malloc(64 * KiB))
        assert h.stats().heap_released >= 2 * MiB
        h.free(q)
        h.check()


def test_threads_share_the_cache(h):
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        try:
            for i in range(2000):
                n = LARGE_SIZES[(seed + i) % len(LARGE_SIZES)]
                p = h.malloc(n, zero=bool(i & 1))
                h.view(p, 8)[:] = seed.to_bytes(8, "little")
                assert h.view(p, 8).tobytes() == seed.to_bytes(8, "little")
                h.free(p)
        except BaseException as e:
            errors.append(e)

    ts = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors
    st = h.stats()
    assert st.mallocs == st.frees == 8000
    h.check()


def test_a_freed_span_coalesces_with_cached_neighbours_on_both_sides(h):
    a, b, c = (h.malloc(64 * KiB) for _ in range(3))  # 8 pages each, adjacent
    guard = h.malloc(64 * KiB)  # live: nothing after c coalesces
    assert b == a + 64 * KiB and c == b + 64 * KiB
    h.free(a)
    h.free(c)
    assert h._c.lcache_nspans == 2
    h.check()
    h.free(b)  # joins a before it and c after it
    assert h._c.lcache_nspans == 1 and h._c.lcache_bytes == 3 * 64 * KiB
    h.check()
    with pytest.raises(goheap.DoubleFree):
        h.free(a)  # still the start of a cached span
    for gone in (b, c):  # starts coalesced away: no object, as in the page heap
        with pytest.raises(goheap.InvalidFree):
            h.free(gone)
        assert "cache" in h.explain(gone)
    h.check()
    h.free(guard)
    h.check()


def test_distinct_sizes_are_cut_from_the_memory_the_last_free_gave_back(h):
    p = h.malloc(4 * MiB)
    h.free(p)  # the cache holds 512 pages
    npages = [5, 400, 17, 128, 9, 250, 64, 6, 333, 40]

    got = []

    def cycle():
        for n in npages:
            q = h.malloc(n * PAGE_SIZE - 100)
            got.append(q)
            h.free(q)

    assert goheap_python_calls_in(cycle) == 0
    assert got == [p] * len(npages)  # cut from the front of the same span, every time
    for n in npages:
        q = h.malloc(n * PAGE_SIZE - 100, zero=False)
        assert q == p and h.usable_size(q) == n * PAGE_SIZE
        h.view(q)[:8] = b"dirtydir"
        h.free(q)
    assert h._c.lcache_nspans == 1 and h._c.lcache_bytes == 4 * MiB
    for n in npages:  # zeroed reuse clears what the last user wrote
        q = h.malloc(n * PAGE_SIZE)
        assert h.view(q).tobytes() == bytes(n * PAGE_SIZE)
        h.view(q)[:] = b"\xaa" * (n * PAGE_SIZE)
        h.free(q)
    h.check()
    st = h.stats()
    assert st.heap_alloc == 0 and st.heap_objects == 0


def test_a_cut_leaves_a_cacheable_rest_or_misses(h):
    p = h.malloc(72 * KiB)  # 9 pages
    h.free(p)
    q = h.malloc(40 * KiB)  # 5 pages would leave 4, too few for the cache: not cut
    assert q != p and h.usable_size(q) == 40 * KiB
    r = h.malloc(32 * KiB + 1)  # 5 pages again, now from the page heap too
    assert r not in (p, q)
    h.free(q)
    h.free(r)
    h.check()


def test_every_page_of_a_cut_or_coalesced_span_maps_to_it(h):
    ps = [h.malloc(n * PAGE_SIZE) for n in (7, 13, 5)]
    guard = h.malloc(40 * KiB)
    for p in ps:
        h.free(p)
    (block,) = _native.lcache_list(h._c)
    s = h._h.span_of(block)
    assert s.state == _native.MSPAN_CACHED and s.npages == 25
    assert _native.spans_mismatch(h._c, s.start, s.npages, s.handle()) == 0
    q = h.malloc(6 * PAGE_SIZE)  # a cut: 6 pages out, 19 stay cached
    assert q == ps[0]
    t = h._h.lookup(q)
    assert t.npages == 6 and _native.spans_mismatch(h._c, q, 6, t.handle()) == 0
    (rest,) = (h._h.span_of(a) for a in _native.lcache_list(h._c))
    assert rest.start == q + 6 * PAGE_SIZE and rest.npages == 19
    assert _native.spans_mismatch(h._c, rest.start, 19, rest.handle()) == 0
    h.check()
    h.free(q)
    h.free(guard)
    h.check()


def test_spare_structs_are_lent_and_taken_back(h):
    h.free(h.malloc(1 * MiB))
    lent = h._c.lcache_nspare
    assert lent > 0
    live = h._h.spanalloc.inuse
    h.scavenge()
    assert h._c.lcache_nspare == 0
    assert h._h.spanalloc.inuse < live  # the structs went back to the span allocator
    h.check()


def test_check_catches_a_broken_spare_list(h):
    h.free(h.malloc(1 * MiB))
    assert h._c.lcache_nspare > 0
    h._c.lcache_nspare += 1  # the count disagrees with the list (and the struct count)
    with pytest.raises(goheap.HeapCorruption, match=r"large cache|spares"):
        h.check()
    h._c.lcache_nspare -= 1
    h.check()


# Simulated pages only above the real one (the OS layer refuses smaller).
SIMULATED = [p for p in (16 * KiB, 64 * KiB) if p > _native.os_page_size()]


@pytest.mark.parametrize("page", [None, *SIMULATED], ids=lambda p: f"os{p // KiB}k" if p else "os")
@pytest.mark.parametrize("seed", range(3))
def test_random_large_sizes_cut_and_coalesce_keep_every_invariant(page, seed):
    import random

    from goheap import mem

    rng = random.Random(seed)
    sysmem = mem.SysMemory(page_size=page) if page else None
    with goheap.Heap(arena_size=1 << 30, sysmem=sysmem) as h:
        live: dict[int, int] = {}
        for _ in range(300):
            r = rng.random()
            if r < 0.5 or not live:
                n = rng.choice(
                    [rng.randint(32 * KiB + 1, 5 * MiB), rng.randint(5, 600) * PAGE_SIZE - 7]
                )
                zero = rng.random() < 0.5
                p = h.malloc(n, zero=zero)
                if zero:  # what earlier objects wrote here (see below) is gone
                    assert h.view(p, n).tobytes() == bytes(n)
                fill = rng.randint(1, 255)
                h.view(p)[:] = bytes([fill]) * h.usable_size(p)  # all of it dirty
                live[p] = fill
            elif r < 0.9:
                p = rng.choice(list(live))
                assert h.view(p, 16).tobytes() == bytes([live.pop(p)]) * 16
                h.free(p)
                with pytest.raises(goheap.InvalidFree):
                    h.free(p)  # DoubleFree while its span is whole, else InvalidFree
            else:
                h.scavenge()
            h.check()
        for p in live:
            h.free(p)
        h.scavenge()
        h.check()
        assert h._h.spanalloc.inuse == 1  # the one free span's struct is all that is left
