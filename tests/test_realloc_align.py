"""Heap.realloc and malloc(align=) (issue 16 items 1 and 2)."""

from __future__ import annotations

import ctypes

import pytest
from pycalls import goheap_python_calls

import goheap
from goheap import _native
from goheap.sizeclasses import MAX_SMALL_SIZE, PAGE_SIZE, class_to_size

OS_PAGE = _native.os_page_size()
ALIGNS = [1 << k for k in range(3, (OS_PAGE * 4).bit_length())]  # 8 .. 4 OS pages
SIZES = [0, 1, 7, 8, 9, 15, 16, 17, 48, 100, 1000, 1024, 4000, 4096, 5000, 8192, 10000,
         20000, 32768, 32769, 40000, 100_000, 300_000]  # fmt: skip


@pytest.fixture
def heap():
    with goheap.Heap(arena_size=1 << 30) as h:
        yield h
        h.check()


def fill(v: int, n: int, seed: int) -> bytes:
    data = bytes((seed + i * 7) & 0xFF for i in range(n))
    ctypes.memmove(v, data, n)
    return data


def read(v: int, n: int) -> bytes:
    return ctypes.string_at(v, n)


# ---- realloc --------------------------------------------------------------------------


def test_realloc_within_the_size_class_stays_in_place(heap):
    v = heap.malloc(20)  # class 32
    data = fill(v, 32, 1)
    before = heap.stats()
    assert heap.realloc(v, 32) == v and heap.realloc(v, 17) == v
    assert read(v, 32) == data and heap.usable_size(v) == 32
    after = heap.stats()
    assert (after.mallocs, after.frees, after.heap_alloc) == (
        before.mallocs,
        before.frees,
        before.heap_alloc,
    )
    heap.check()


@pytest.mark.parametrize("old,new", [(20, 1000), (1000, 20), (100, 32768), (32768, 9)])
def test_realloc_across_classes_moves_and_keeps_the_contents(heap, old, new):
    v = heap.malloc(old)
    usable = heap.usable_size(v)
    data = fill(v, usable, 3)
    w = heap.realloc(v, new)
    assert w != v and heap.lookup(v) is None
    with pytest.raises(goheap.DoubleFree):
        heap.free(v)  # the old object was freed by realloc
    keep = min(usable, new)
    assert read(w, keep) == data[:keep]
    assert read(w, heap.usable_size(w))[keep:] == bytes(heap.usable_size(w) - keep)
    assert heap.usable_size(w) >= new
    heap.check()
    heap.free(w)
    heap.check()


def test_realloc_large_in_place_while_its_span_holds_the_size(heap):
    v = heap.malloc(40_000)  # 5 pages
    assert heap.usable_size(v) == 5 * PAGE_SIZE
    data = fill(v, 5 * PAGE_SIZE, 5)
    assert heap.realloc(v, 5 * PAGE_SIZE) == v  # grows into its span
    assert heap.realloc(v, 3 * PAGE_SIZE - 1) == v  # still needs more than half of it
    assert read(v, 5 * PAGE_SIZE) == data
    heap.check()
    w = heap.realloc(v, 5 * PAGE_SIZE + 1)  # beyond the span: moves
    assert w != v and heap.usable_size(w) == 6 * PAGE_SIZE
    assert read(w, 5 * PAGE_SIZE) == data and read(w + 5 * PAGE_SIZE, PAGE_SIZE) == bytes(PAGE_SIZE)
    heap.check()
    big = heap.realloc(w, 1 << 20)
    before = heap.stats().heap_alloc
    small = heap.realloc(big, 100_000)  # would keep 1 MiB for 100 KB: moves, the span goes back
    assert small != big and heap.stats().heap_alloc == before - (1 << 20) + 13 * PAGE_SIZE
    assert read(small, 5 * PAGE_SIZE) == data
    heap.check()
    tiny = heap.realloc(small, 10)  # large to small
    assert heap.usable_size(tiny) == 16 and read(tiny, 10) == data[:10]
    heap.free(tiny)
    heap.check()


def test_realloc_in_place_is_served_in_c(heap):
    """The in-place cases never enter Python: the builtin realloc asks C, which
    decides as Heap.realloc documents; a move goes to the Python method."""

    small, large = heap.malloc(100), heap.malloc(100_000)
    with goheap_python_calls() as calls:
        for _ in range(100):
            assert heap.realloc(small, 97) == small  # the same 112-byte class
            assert heap.realloc(large, 70_000) == large  # 9 of its 13 pages
    assert calls == []
    moved = heap.realloc(small, 200)  # another class: Python moves it
    assert moved != small and heap.usable_size(moved) == 208
    assert heap.realloc(v=moved, size=205) == moved  # keywords: Python, same verdict
    heap.free(moved)
    heap.free(large)
    heap.check()


def test_realloc_refuses_bad_addresses_and_sizes_like_free(heap):
    v = heap.malloc(100)
    big = heap.malloc(100_000)
    dead = heap.malloc(64)
    heap.free(dead)
    before = heap.stats()
    cases = [
        (v + 16, 10, goheap.InvalidFree),  # interior pointer
        (big + 8, 10, goheap.InvalidFree),
        (dead, 10, goheap.DoubleFree),
        (heap.arena_start - 8, 10, goheap.InvalidFree),
        (-1, 10, goheap.InvalidFree),
        (1 << 70, 10, goheap.InvalidFree),
        ("x", 10, TypeError),
        (v, -1, ValueError),
        (v, 1.5, TypeError),
        (v, 1 << 40, goheap.OutOfMemory),
    ]
    for addr, size, exc in cases:
        with pytest.raises(exc):
            heap.realloc(addr, size)
        heap.check()
    after = heap.stats()
    assert (after.mallocs, after.frees, after.heap_alloc) == (
        before.mallocs,
        before.frees,
        before.heap_alloc,
    )
    assert heap.lookup(v) == (v, 112) and heap.lookup(big)[0] == big


def test_realloc_on_a_closed_heap_says_closed():
    h = goheap.Heap(arena_size=1 << 30)
    v = h.malloc(8)
    h.close()
    with pytest.raises(goheap.HeapClosed):
        h.realloc(v, 16)


@pytest.mark.parametrize("guard", [False, "after", "before"])
@pytest.mark.parametrize("align", [1, 16])
def test_realloc_of_an_efence_object_moves_it_and_faults_the_old_one(guard, align):
    with goheap.Heap(arena_size=1 << 30, efence=True, guard=guard, align=align) as h:
        v = h.malloc(13)
        usable = h.usable_size(v)
        data = fill(v, usable, 7)
        w = h.realloc(v, 13)  # even the same size: a new efence object
        assert w != v and read(w, 13) == data[:13]
        assert "freed efence object" in h.explain(v)
        with pytest.raises(goheap.DoubleFree):
            h.realloc(v, 5)
        h.check()
        x = h.realloc(w, 20_000)
        assert read(x, 13) == data[:13] and "freed efence object" in h.explain(w)
        h.check()
        h.free(x)
        h.check()
        assert h.stats().efence_faulted >= 3 * OS_PAGE


def test_realloc_is_traced_once(heap):
    t = goheap.Heap(arena_size=1 << 30, trace=True)
    try:
        v = t.malloc(10)
        w = t.realloc(v, 500)
        assert t._trace_live == {w}
        assert t.realloc(w, 490) == w and t._trace_live == {w}  # class 512 still
        t.free(w)
        a = t.malloc(100, align=256)  # through the traced malloc, counted once
        assert a % 256 == 0 and t._trace_live == {a}
        t.free(a)
        assert t._trace_live == set()
    finally:
        t.close()


# ---- malloc(align=) -------------------------------------------------------------------


def test_aligned_malloc_over_every_alignment_and_a_spread_of_sizes(heap):
    live = []
    for a in ALIGNS:
        for n in SIZES:
            v = heap.malloc(n, align=a)
            assert v % a == 0, (a, n, hex(v))
            u = heap.usable_size(v)
            assert u >= n
            assert heap.lookup(v) == (v, u) and heap.lookup(v + u - 1) == (v, u)
            r = heap.lookup(v + u)
            assert r is None or r[0] == v + u
            if a <= PAGE_SIZE and n <= MAX_SMALL_SIZE:
                # a size class whose size is a multiple of a: the C fast path serves it
                assert u in class_to_size and u % a == 0, (a, n, u)
            fill(v, u, a + n)
            live.append((v, u, a + n))
    heap.check()
    for v, u, seed in live:  # no object overlapped another
        assert read(v, u) == bytes((seed + i * 7) & 0xFF for i in range(u))
        heap.free(v)
    heap.check()
    assert heap.stats().heap_alloc == 0


def test_aligned_malloc_beyond_the_os_page_for_large_objects(heap):
    for a in (1 << 20, 4 << 20):
        v = heap.malloc(100_000, align=a)
        assert v % a == 0 and heap.usable_size(v) == 13 * PAGE_SIZE
        heap.check()
        heap.free(v)
    heap.check()


@pytest.mark.parametrize("zero", [True, False])
def test_aligned_malloc_keeps_zeroing_and_the_keywords(heap, zero):
    v = heap.malloc(200)
    fill(v, 200, 9)
    heap.free(v)
    w = heap.malloc(190, zero, align=16)  # the builtin takes align by keyword
    assert w % 16 == 0
    if zero:
        assert read(w, 190) == bytes(190)
    x = heap.malloc(size=100, zero=zero, align=None)  # None: the plain fast path
    y = heap.malloc(100, align=64)
    assert y % 64 == 0 and heap.usable_size(y) == 128
    for p in (w, x, y):
        heap.free(p)


@pytest.mark.parametrize("align,exc", [(0, ValueError), (3, ValueError), (-8, ValueError),
                                       (1 << 31, ValueError), ("64", TypeError),
                                       (True, TypeError), (64.0, TypeError)])  # fmt: skip
def test_aligned_malloc_refuses_bad_alignments(heap, align, exc):
    before = heap.stats()
    with pytest.raises(exc, match="align"):
        heap.malloc(10, align=align)
    assert heap.stats().mallocs == before.mallocs


def test_alloc_takes_align(heap):
    b = heap.alloc(100, align=4096)
    assert b.addr % 4096 == 0 and b.size == 100 and heap.usable_size(b.addr) == 4096
    b.free()


def test_aligned_malloc_in_efence_mode_up_to_the_unit():
    with goheap.Heap(arena_size=1 << 30, efence=True, guard="after") as h:
        unit = max(OS_PAGE, PAGE_SIZE)
        for a in (8, 64, 4096, unit):
            v = h.malloc(100, align=a)
            u = h.usable_size(v)
            assert v % a == 0 and u == max(a, 16) * -(-100 // max(a, 16))
            assert "guard page" in h.explain(v + u)  # still right against its guard
            h.free(v)
        with pytest.raises(ValueError, match="efence unit"):
            h.malloc(100, align=unit * 2)
        h.check()
