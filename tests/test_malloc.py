"""Objects and the public API: classes, the C fast path, the bitmap as the truth,
large objects, zeroing, stats, bad input."""

from __future__ import annotations

import threading

import pytest

import goheap
from goheap import _native
from goheap.errors import DoubleFree, HeapClosed, HeapCorruption, InvalidFree, OutOfMemory

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


@pytest.fixture
def h():
    heap = goheap.Heap(arena_size=1 * GiB)
    yield heap
    if not heap._closed:
        heap.check()
        heap.close()


def test_malloc_alignment_and_usable_size_for_every_class(h):
    for cl in range(1, goheap.NUM_SIZE_CLASSES):
        size = goheap.class_to_size[cl]
        for n in {max(size - 1, 0), size}:
            p = h.malloc(n)
            assert p % (16 if n >= 16 else 8) == 0
            assert h.usable_size(p) == goheap.roundupsize(n) == size or n == 0
            assert h.lookup(p + max(size - 1, 0)) == (p, size)
            h.free(p)
    h.check()


def test_malloc_zero_gives_distinct_freeable_addresses(h):
    ps = {h.malloc(0) for _ in range(1000)}
    assert len(ps) == 1000
    assert all(h.usable_size(p) == 8 for p in ps)
    for p in ps:
        h.free(p)
    assert h.stats().heap_objects == 0


def test_malloc_fast_path_objects_come_in_address_order_from_one_span(h):
    ps = [h.malloc(64) for _ in range(128)]  # one 8 KiB span of class 5
    assert ps == sorted(ps) and ps[-1] - ps[0] == 127 * 64
    span_entry = {_native.spans_get(h._c, p) for p in ps}
    assert len(span_entry) == 1
    for p in ps:
        h.free(p)


def test_malloc_bitmap_marks_exactly_the_live_object_starts(h):
    ps = [h.malloc(48) for _ in range(10)]
    for p in ps:
        assert _native.bitmap_get(h._c, p) & _native.BIT_ALLOCATED
        assert _native.bitmap_get(h._c, p + 8) == 0  # interior word: nothing
    h.free(ps[3])
    bits = _native.bitmap_get(h._c, ps[3])
    assert bits & _native.BIT_BOUNDARY and not bits & _native.BIT_ALLOCATED
    for p in ps[:3] + ps[4:]:
        h.free(p)


def test_malloc_span_with_all_objects_free_goes_back_to_the_heap(h):
    ps = [h.malloc(2048) for _ in range(8)]  # fills one span (4 objects) and a second
    before = h.stats().heap_inuse
    for p in ps[:4]:
        h.free(p)
    # the first span is not the cached one: it waits on its mcentral, whole ...
    assert h.stats().heap_inuse == before
    again = [h.malloc(2048) for _ in range(4)]
    assert sorted(again) == sorted(ps[4:4] + again) and h.stats().heap_inuse == before
    for p in again:
        h.free(p)
    # ... until the heap needs pages: reclaimed before the arena grows
    used = h.arena_used
    big = h.malloc(h.arena_used - h.arena_start + 64 * KiB)
    assert h.explain(ps[0]).startswith(f"{ps[0]:#x} is in")
    h.free(big)
    h.scavenge()  # and by the scavenger
    assert h.explain(ps[0]).startswith(f"{ps[0]:#x} is in free span")
    assert h.arena_used >= used
    for p in ps[4:]:
        h.free(p)


@pytest.mark.parametrize("npages", [127, 128, 129])
def test_malloc_large_objects_get_their_own_span(h, npages):
    for n in (npages * 8192 - 1, npages * 8192, npages * 8192 + 1):
        p = h.malloc(n)
        assert p % 8192 == 0
        assert h.usable_size(p) == -(-n // 8192) * 8192
        assert h.lookup(p + n - 1) == (p, h.usable_size(p))
        h.view(p)[n - 1] = 0xEE
        h.free(p)
        assert h.lookup(p) is None
    h.check()


def test_malloc_memory_asked_zeroed_is_zero_after_reuse(h):
    sizes = [8, 16, 24, 48, 100, 1024, 4000, 32768, 40000, 300000]
    for i in range(10_000):
        n = sizes[i % len(sizes)]
        p = h.malloc(n)
        v = h.view(p)
        assert v.tobytes() == bytes(len(v)), (i, n)
        v[:] = b"\xff" * len(v)
        h.free(p)
    h.check()


def test_malloc_zero_false_may_return_dirty_memory_but_never_the_link(h):
    p = h.malloc(100)
    h.view(p)[:] = b"\xab" * 112
    h.free(p)
    q = h.malloc(100, zero=False)
    assert q == p
    v = h.view(q).tobytes()
    assert v[:8] == bytes(8)  # the free-list link is not leaked to the caller
    h.free(q)


def test_malloc_gcsys_one_million_small_objects_grow_sys_by_less_than_16mib(h):
    sys0 = h.stats().sys
    m, f = h.malloc, h.free
    for _ in range(1_000_000):
        f(m(1029))
    assert h.stats().sys - sys0 < 16 * MiB
    assert h.stats().by_size[goheap.size_to_class(1029)].mallocs == 1_000_000


def test_malloc_stats_by_size_are_exact_at_every_moment(h):
    live = []
    for i in range(1, 3000, 7):
        live.append(h.malloc(i))
        if i % 3 == 0:
            h.free(live.pop(0))
        st = h.stats()
        assert st.heap_objects == len(live)
        assert st.heap_alloc == sum(h.usable_size(p) for p in live)
    by = h.stats().by_size
    assert sum(b.mallocs - b.frees for b in by) == len(live)
    for p in live:
        h.free(p)


# ---- bad input: the documented exception, and the heap unchanged ----------------------


def snapshot(heap):
    st = heap.stats()
    return (st.heap_objects, st.heap_alloc, st.heap_inuse, st.mallocs, st.frees)


@pytest.mark.parametrize(
    "addr, exc",
    [
        (lambda p: 0, InvalidFree),
        (lambda p: 8, InvalidFree),
        (lambda p: p + 1, InvalidFree),
        (lambda p: p + 8, InvalidFree),
        (lambda p: p + 16, InvalidFree),
        (lambda p: p - 1, InvalidFree),
        (lambda p: -5, InvalidFree),
        (lambda p: 1 << 70, InvalidFree),
        (lambda p: "x", TypeError),
        (lambda p: 1.5, TypeError),
    ],
    ids=["Zero", "Low", "Plus1", "Plus8", "Plus16", "Minus1", "Negative", "Huge", "Str", "Float"],
)
def test_malloc_free_of_a_non_object_raises_and_changes_nothing(h, addr, exc):
    p = h.malloc(100)
    q = h.malloc(40000)
    before = snapshot(h)
    with pytest.raises(exc):
        h.free(addr(p))
    with pytest.raises(exc):
        h.free(addr(q) if not isinstance(addr(q), int) or addr(q) not in (p, q) else "x")
    assert snapshot(h) == before
    h.check()
    h.free(p)
    h.free(q)


@pytest.mark.parametrize("size", [100, 40000])
def test_malloc_double_free_is_refused(h, size):
    # A small object's slot stays an object start after free, so the bitmap says
    # DoubleFree; a large object's span goes back to the heap and is no object at
    # all any more, so its second free is an InvalidFree (DoubleFree's parent).
    keep = h.malloc(size)  # keeps the span alive so the freed slot stays an object start
    p = h.malloc(size)
    h.free(p)
    before = snapshot(h)
    with pytest.raises(DoubleFree if size <= goheap.MAX_SMALL_SIZE else InvalidFree):
        h.free(p)
    assert snapshot(h) == before
    h.check()
    h.free(keep)


def test_malloc_stale_free_after_reuse_frees_the_new_object(h):
    # Documented: the heap cannot tell a stale owner from the new one.
    p = h.malloc(64)
    h.free(p)
    q = h.malloc(64)
    assert q == p
    h.free(p)
    assert h.lookup(q) is None


@pytest.mark.parametrize(
    "size, exc",
    [
        (-1, ValueError),
        ("10", TypeError),
        (1.0, TypeError),
        (None, TypeError),
        (2**63, OutOfMemory),
        (2**64 + 5, OutOfMemory),
        (2 * GiB, OutOfMemory),
    ],
)
def test_malloc_bad_sizes(h, size, exc):
    before = snapshot(h)
    with pytest.raises(exc):
        h.malloc(size)
    assert snapshot(h) == before
    h.check()


def test_malloc_view_is_bounds_checked(h):
    p = h.malloc(100)
    assert len(h.view(p)) == 112
    assert len(h.view(p + 12, 100)) == 100
    with pytest.raises(ValueError):
        h.view(p, 113)
    with pytest.raises(ValueError):
        h.view(p + 100, 13)
    with pytest.raises(ValueError):
        h.view(p, -1)
    h.free(p)
    with pytest.raises(ValueError):
        h.view(p)


def test_malloc_closed_heap_refuses_everything():
    h = goheap.Heap(arena_size=64 * MiB)
    p = h.malloc(10)
    start = h.arena_start
    h.close()
    h.close()  # twice is fine
    for call in (
        lambda: h.malloc(10),
        lambda: h.malloc(100000),
        lambda: h.free(p),
        h.stats,
        h.check,
        h.scavenge,
        lambda: h.lookup(p),
        lambda: h.explain(p),
    ):
        with pytest.raises(HeapClosed):
            call()
    from osview import perms_over

    assert perms_over(start, 64 * MiB) == {""}


def test_malloc_context_manager_closes():
    with goheap.Heap(arena_size=64 * MiB) as h:
        h.malloc(1)
    with pytest.raises(HeapClosed):
        h.malloc(1)


def test_malloc_corrupted_free_list_link_is_never_followed(h):
    ps = [h.malloc(32) for _ in range(8)]
    for p in ps[2:6]:
        h.free(p)
    # a write into freed memory: the link of the list head now points at a live object
    head = ps[5]
    _native.write_word(head, ps[0])
    # The head's link is checked before the head is handed out: refused.
    with pytest.raises(HeapCorruption, match="links outside its span"):
        h.malloc(32)
    with pytest.raises(HeapCorruption, match="free-list link"):
        h.check()
    assert _native.bitmap_get(h._c, ps[0]) & _native.BIT_ALLOCATED  # untouched live object
    assert h.lookup(ps[0]) == (ps[0], 32)
    h.close()


def test_malloc_threads_hammering_one_heap_stay_consistent(h):
    errors = []

    def work(seed):
        try:
            live = []
            for i in range(3000):
                n = (seed * 131 + i * 17) % 5000
                p = h.malloc(n)
                h.view(p, 1)[0] = seed
                live.append(p)
                if len(live) > 20:
                    q = live.pop(i % len(live))
                    assert h.view(q, 1)[0] == seed
                    h.free(q)
            for q in live:
                h.free(q)
        except Exception as e:
            errors.append(e)

    ts = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors
    assert h.stats().heap_objects == 0
    h.check()


# ---- pool statistics: peak and total (issue 16) ------------------------------------------


def test_malloc_peak_alloc_follows_heap_alloc_and_resets(h):
    base = h.stats()
    assert base.peak_alloc == base.heap_alloc
    h.reset_peak()
    a = [h.malloc(1000) for _ in range(3)]  # class 1024
    assert h.stats().peak_alloc == base.heap_alloc + 3 * 1024
    for v in a[:2]:
        h.free(v)
    st = h.stats()
    assert st.heap_alloc == base.heap_alloc + 1024 and st.peak_alloc == base.heap_alloc + 3072
    assert h.reset_peak() == base.heap_alloc + 3072  # the peak it replaced
    assert h.stats().peak_alloc == base.heap_alloc + 1024
    big = h.malloc(1 << 20)  # Python's large path
    assert h.stats().peak_alloc == base.heap_alloc + 1024 + (1 << 20)
    h.free(big)
    h.free(a[2])
    assert h.stats().heap_alloc == base.heap_alloc
    assert h.stats().peak_alloc == base.heap_alloc + 1024 + (1 << 20)
    h.check()


def test_malloc_total_alloc_counts_every_path_large_cache_hits_included(h):
    def total():
        return h.stats().total_alloc

    t = total()
    v = h.malloc(100)  # small
    assert total() == t + 112
    big = h.malloc(100_000)  # large, from the page heap (Python)
    assert total() == t + 112 + 13 * 8192
    h.free(big)
    assert h._c.lcache_nspans == 1  # C kept the span ...
    big = h.malloc(100_000)
    assert h._c.lcache_nspans == 0  # ... and handed it out again without Python
    assert total() == t + 112 + 2 * 13 * 8192
    w = h.realloc(v, 5000)  # a move is a malloc
    assert total() == t + 112 + 2 * 13 * 8192 + 5376
    st = h.stats()
    assert st.peak_alloc >= st.heap_alloc and st.total_alloc >= st.peak_alloc
    h.free(w)
    h.free(big)
    h.check()


def test_malloc_peak_is_exact_under_threads(h):
    h.reset_peak()
    start = h.stats().heap_alloc
    barrier = threading.Barrier(4)

    def work():
        barrier.wait()
        for _ in range(2000):
            h.free(h.malloc(64))

    ts = [threading.Thread(target=work) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    st = h.stats()
    assert st.heap_alloc == start and start + 64 <= st.peak_alloc <= start + 4 * 64
    h.check()


def test_malloc_peak_counts_efence_objects():
    with goheap.Heap(arena_size=1 << 30, efence=True) as e:
        v = e.malloc(100)
        assert e.stats().peak_alloc == e.usable_size(v) == 112
        e.free(v)
        st = e.stats()
        assert st.heap_alloc == 0 and st.peak_alloc == 112
        e.check()
