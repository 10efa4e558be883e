"""Deliberate metadata corruption: check() names it, malloc never hands out overlap.

Scudo's and mimalloc's secure-mode idea: a stray write into freed memory (or
into the heap's own metadata) must be detected, not turned into two owners of
one address.  Each test corrupts one thing with a raw write -- a free-list link
inside a freed object (``_native.write_word``: the public API cannot touch a
freed object), a span's state byte, a bitmap bit, a stats counter -- and then
asserts that ``check()`` raises HeapCorruption naming what broke.  The link
tests also run the allocation path: the C fast path validates every link
against the span bounds and the bitmap before trusting it, so malloc refuses
(HeapCorruption) instead of returning memory that overlaps a live object.
"""

from __future__ import annotations

import pytest

import goheap
from goheap import _native
from goheap.errors import HeapCorruption
from goheap.mspan import SpanState

SIZE = 48  # one small class


@pytest.fixture
def h():
    with goheap.Heap(arena_size=256 << 20) as heap:
        yield heap


def live_set(h, n=64, size=SIZE):
    vs = [h.malloc(size) for _ in range(n)]
    for v in vs:
        h.view(v)[:] = bytes([v >> 4 & 0xFF]) * h.usable_size(v)
    return vs


def assert_intact(h, vs):
    for v in vs:
        assert h.view(v).tobytes() == bytes([v >> 4 & 0xFF]) * h.usable_size(v)


def overlaps(v, n, vs, h):
    return any(v < w + h.usable_size(w) and w < v + n for w in vs)


@pytest.mark.parametrize(
    "target",
    ["other_span_live", "same_span_live", "outside_arena", "misaligned", "cycle_to_self"],
)
def test_corrupt_free_list_link_is_named_and_never_handed_out(h, target):
    vs = live_set(h)
    big = h.malloc(100_000)  # a live object in another span
    victim = vs.pop(10)
    h.free(victim)  # LIFO: the victim is now the head of its span's free list
    bad = {
        "other_span_live": big,
        "same_span_live": vs[3],
        "outside_arena": h.arena_start - 4096,
        "misaligned": victim + SIZE + 8,
        "cycle_to_self": victim,
    }[target]
    _native.write_word(victim, bad)
    with pytest.raises(HeapCorruption, match=r"free-list link|free list|cycle"):
        h.check()
    # The allocation path: victim itself may come back (it is a real free
    # object), but the corrupt link behind it must never be followed.
    got = []
    try:
        for _ in range(200):
            v = h.malloc(SIZE)
            got.append(v)
            assert v != bad or (target in ("cycle_to_self",) and v == victim and got.count(v) == 1)
            assert not overlaps(v, SIZE, [*vs, big], h), (
                f"malloc handed out {v:#x} over a live object"
            )
    except HeapCorruption as e:
        assert "links outside its span" in str(e) or "free list" in str(e)
    else:
        pytest.fail("200 mallocs never hit the corrupt link")
    assert len(set(got)) == len(got)
    assert_intact(h, vs)


def test_corrupt_span_state_is_named(h):
    vs = live_set(h)
    s = h._h.lookup(vs[0])
    s.handle().state = _native.MSPAN_DEAD
    with pytest.raises(HeapCorruption) as e:
        h.check()
    assert "DEAD" in str(e.value) or "state" in str(e.value) or "span" in str(e.value)
    s.handle().state = _native.MSPAN_IN_USE
    h.check()  # the repair is accepted: check() reads the real state each time


def test_corrupt_bitmap_bit_is_named(h):
    vs = live_set(h)
    v = vs[5]
    # Raw write into the bitmap word below arena_start (not the C helper).
    off = (v - h.arena_start) // 8
    word = h.arena_start - 8 * (off // 16 + 1)
    old = _native.read_word(word)
    _native.write_word(word, old & ~(1 << (off % 16)))  # clear "allocated"
    with pytest.raises(HeapCorruption, match=r"allocated bits|bitmap"):
        h.check()
    # free() of that object now sees a free-object boundary: refused, not done.
    with pytest.raises(goheap.InvalidFree):
        h.free(v)
    _native.write_word(word, old)
    h.check()
    h.free(v)


def test_corrupt_large_object_bitmap_is_named(h):
    v = h.malloc(1 << 20)
    off = (v - h.arena_start) // 8
    word = h.arena_start - 8 * (off // 16 + 1)
    old = _native.read_word(word)
    _native.write_word(word, old & ~(1 << (off % 16)))
    with pytest.raises(HeapCorruption, match="not marked allocated"):
        h.check()
    _native.write_word(word, old)
    h.check()


def test_corrupt_stats_counter_is_named(h):
    vs = live_set(h)
    cl = goheap.size_to_class(SIZE) if hasattr(goheap, "size_to_class") else None
    if cl is None:
        from goheap.sizeclasses import size_to_class

        cl = size_to_class(SIZE)
    h._c.nmalloc[cl] += 1
    with pytest.raises(HeapCorruption, match=f"class {cl}: stats say"):
        h.check()
    h._c.nmalloc[cl] -= 1
    h.check()
    assert_intact(h, vs)


def test_corrupt_spans_table_entry_is_named(h):
    v = h.malloc(3 * 8192 * 10)  # a multi-page large object
    s = h._h.lookup(v)
    slot = h.spans + ((v - h.arena_start) >> 13) * 8 + 8  # its second page
    old = _native.read_word(slot)
    _native.write_word(slot, 0)
    with pytest.raises(HeapCorruption, match="spans table"):
        h.check()
    _native.write_word(slot, old)
    h.check()
    assert s.state == SpanState.IN_USE
