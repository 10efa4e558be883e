"""The page heap on real memory: mallocinit, the seed's realignment fixes, growth,
spans, coalescing, scavenging, stats and check()."""

from __future__ import annotations

import errno
import itertools
import time

import pytest
from osview import heap_resident, is_mapped, perms_over, real_accounting, resident

import goheap
from goheap import _native, mem
from goheap.errors import HeapCorruption, OutOfMemory
from goheap.mheap import (
    ARENA32_GROW,
    MAX_ARENA32,
    MAX_MHEAP_LIST,
    PAGE_SHIFT,
    PAGE_SIZE,
    MHeap,
    round_up,
)
from goheap.mspan import SpanState

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
REAL_PAGE = _native.os_page_size()
# One write per 4 KiB faults in every page on any kernel, including a
# simulated big-page one whose real pages are smaller than it says.
TOUCH = 4096
PAGE_SIZES = [p for p in (REAL_PAGE, 16384, 65536) if p >= REAL_PAGE]
PAGE_SIZES = sorted(set(PAGE_SIZES))

pytestmark = pytest.mark.pagesize


@pytest.fixture(params=PAGE_SIZES, ids=lambda p: f"os{p // 1024}k")
def os_page(request):
    return request.param


@pytest.fixture
def heap(os_page):
    h = MHeap(mem.SysMemory(page_size=os_page), arena_size=256 * MiB)
    yield h
    if not h.closed:
        with h.lock:
            h.check_locked()
            h.close_locked()


def spans_entry(h: MHeap, v: int) -> int:
    """Read the spans table straight from memory: what C sees."""
    return _native.read_word(h.spans + ((v - h.arena_start) >> PAGE_SHIFT) * 8)


# ---- mallocinit ------------------------------------------------------------------------


def test_mheap_mallocinit_64bit_layout(os_page):
    m = mem.SysMemory(page_size=os_page)
    m.trace = []
    h = MHeap(m, arena_size=1 * GiB)
    try:
        reserves = [t for t in m.trace if t[0] == "reserve"]
        hint = reserves[-1][1]
        assert hint & ((1 << 40) - 1) == 0x00C0 << 32  # one of Go's hints
        p = h.reservations[0][0]
        p_size = h.reservations[0][1]
        unit = max(PAGE_SIZE, os_page)
        assert p_size == 1 * GiB + GiB // 16 + GiB // PAGE_SIZE * 8 + unit
        assert h.spans == round_up(p, unit)
        assert h.bitmap == h.spans + GiB // PAGE_SIZE * 8
        assert h.arena_start == h.bitmap + GiB // 16
        assert h.arena_used == h.arena_start
        assert h.arena_end == p + p_size  # the reservation's true end (the seed's fix)
        assert h.arena_start % PAGE_SIZE == 0 and h.arena_start % os_page == 0
        assert perms_over(p, p_size) == {"---p"}
    finally:
        with h.lock:
            h.close_locked()
    assert perms_over(p, p_size) == {""}


@real_accounting
def test_mheap_default_reservation_is_128gib_and_costs_no_rss():
    h = goheap.Heap()
    try:
        assert h.arena_end - h.arena_start >= 128 * GiB
        assert (h.arena_start >> 40) & 0xFF == 0 or h.arena_start >= 0x00C0 << 32
        # Only what mallocinit mapped is resident: nothing of the arena yet.
        assert heap_resident(h) < 8 * MiB
        assert resident(h.arena_start, h.arena_end - h.arena_start) == 0
    finally:
        h.close()


def test_mheap_several_heaps_get_disjoint_reservations():
    hs = [goheap.Heap(arena_size=64 * MiB) for _ in range(4)]
    try:
        ranges = sorted((h.spans, h.arena_end) for h in hs)
        for (_, a1), (b0, _) in itertools.pairwise(ranges):
            assert a1 <= b0
        for h in hs:
            p = h.malloc(1000)
            h.view(p)[:4] = b"heap"
            h.check()
    finally:
        for h in hs:
            h.close()


class MisalignedReserve(mem.SysMemory):
    """An OS whose reservations are OS-page aligned but never heap-page aligned,
    as a 4 KiB-page kernel may place them (the seed's bug).  Real mappings: each
    region is carved out of a real reservation, the excess given back."""

    def sys_reserve(self, hint: int, n: int, exact: bool = False) -> int:
        if exact:
            raise FileExistsError(errno.EEXIST, "hints refused: force the anywhere path")
        return self.misaligned(n)

    def misaligned(self, n: int, inside: tuple[int, int] | None = None) -> int:
        ps = self.page_size
        step = max(PAGE_SIZE, ps) * 2
        v = super().sys_reserve(0, n + step)
        # the first address at an odd multiple of ps that is not 8 KiB aligned
        w = v + ps if (v + ps) % PAGE_SIZE else v + 2 * ps
        if w % PAGE_SIZE == 0:
            w += ps
        assert w % ps == 0 and w % PAGE_SIZE != 0
        if w > v:
            super().sys_free(v, w - v, None)
        super().sys_free(w + n, v + n + step - (w + n), None)
        return w


@pytest.mark.skipif(REAL_PAGE >= PAGE_SIZE, reason="needs an OS page smaller than the heap page")
def test_mheap_mallocinit_realigns_a_misaligned_reservation():
    m = MisalignedReserve()
    h = MHeap(m, arena_size=64 * MiB)
    try:
        p, p_size = h.reservations[0]
        assert p % PAGE_SIZE != 0
        assert h.spans == p + (PAGE_SIZE - p % PAGE_SIZE)
        assert h.arena_start % PAGE_SIZE == 0
        assert h.arena_end == p + p_size  # not arena_start + arena_size
        assert h.arena_end - h.arena_start == 64 * MiB + (p + PAGE_SIZE - h.spans)
        with h.lock:
            # fill the arena to its very end: the last page must be usable memory
            spans = []
            while True:
                try:
                    spans.append(h.alloc_span_locked(128))
                except OutOfMemory:
                    break
            last = max(spans, key=lambda s: s.start)
            assert last.end <= h.arena_end
            _native.view(last.end - 8, 8)[:] = b"lastbyte"
            h.check_locked()
    finally:
        with h.lock:
            h.close_locked()


def test_mheap_mallocinit_refuses_a_misrounded_arena(monkeypatch):
    # If the rounding were ever lost, mallocinit must throw, not run misaligned.
    import goheap.mheap as mh

    if REAL_PAGE >= PAGE_SIZE:
        pytest.skip("needs an OS page smaller than the heap page")
    monkeypatch.setattr(mh, "round_up", lambda n, a: n)  # the seed's p1 rounding, undone
    with pytest.raises(HeapCorruption, match="misrounded allocation in mallocinit"):
        MHeap(MisalignedReserve(), arena_size=64 * MiB)


@real_accounting
def test_mheap_64bit_falls_back_to_32bit_under_ulimit_v():
    from osview import run_child

    proc = run_child(
        """
        import resource, psutil, goheap
        vms = psutil.Process().memory_info().vms
        lim = vms + (3 << 30)   # room for a 2 GiB window, not for 136 GiB
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
        h = goheap.Heap()
        print("mode", h.mode)
        ps = [h.malloc(n) for n in (8, 5000, 100000, 3 << 20)]
        h.check()
        for p in ps:
            h.free(p)
        h.check()
        h.close()
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert "mode 32bit" in proc.stdout


# ---- 32-bit mode and MHeap_SysAlloc --------------------------------------------------------


def test_mheap_32bit_layout_and_growth_at_arena_end(os_page):
    h = MHeap(mem.SysMemory(page_size=os_page), mode="32bit", arena_size=16 * MiB)
    try:
        assert h.bitmap_size == round_up(MAX_ARENA32 // 16, h.align)
        assert h.spans_size == round_up(MAX_ARENA32 // PAGE_SIZE * 8, h.align)
        assert h.arena_end == h.arena_start + 16 * MiB
        # the rest of the 2 GiB window was given back, so it is free address space
        assert perms_over(h.arena_end, 64 * MiB) == {""}
        end0 = h.arena_end
        with h.lock:
            s = h.alloc_span_locked((32 * MiB) >> PAGE_SHIFT)
            assert h.arena_end == end0 + round_up(32 * MiB + h.align, ARENA32_GROW)
            assert s.start >= h.arena_start and s.end <= h.arena_end
            assert h.arena_end - h.arena_start <= MAX_ARENA32
            h.check_locked()
    finally:
        with h.lock:
            h.close_locked()


class Window32(mem.SysMemory):
    """Make 32-bit growth find arena_end taken, and place the region where a
    test says (a real mapping there), 4 KiB-but-not-8 KiB aligned if asked."""

    place: int | None = None  # where a non-exact reservation lands
    alloc_at: int | None = None  # where sys_alloc lands
    misalign = True

    def sys_reserve(self, hint: int, n: int, exact: bool = False) -> int:
        if self.place is None or hint == 0:
            return super().sys_reserve(hint, n, exact)
        if exact:
            raise FileExistsError(errno.EEXIST, "arena_end is taken")
        if self.place < 0:  # somewhere free above arena_start + 2 GiB: outside the window
            above = -self.place
            self.place = None
            for k in range(64):
                try:
                    v = super().sys_reserve(above + k * GiB, n, exact=True)
                except FileExistsError:
                    continue
                self.placed = (v, n)
                return v
            raise FileExistsError(errno.EEXIST, "no free range above the window")
        off = self.page_size if self.misalign and self.page_size < PAGE_SIZE else 0
        v = super().sys_reserve(self.place + off, n, exact=True)
        self.place = None
        self.placed = (v, n)
        return v

    def sys_alloc(self, n: int, stat: str | None) -> int:
        if self.alloc_at is None:
            return super().sys_alloc(n, stat)
        off = self.page_size if self.misalign and self.page_size < PAGE_SIZE else 0
        v = super().sys_reserve(self.alloc_at + off, n, exact=True)
        super().sys_map(v, n, stat)
        self.alloc_at = None
        self.alloc_at_placed, self.alloc_n = v, n
        return v


@pytest.fixture
def window32():
    """A 32-bit heap over Window32 with its first span allocated, lock held."""
    m = Window32()
    h = MHeap(m, mode="32bit", arena_size=8 * MiB)
    try:
        with h.lock:
            h.alloc_span_locked(4)
            yield m, h
    finally:
        with h.lock:
            h.close_locked()


def test_mheap_32bit_growth_elsewhere_inside_window_is_realigned(window32):
    m, h = window32
    used0, end0 = h.arena_used, h.arena_end
    m.place = end0 + 64 * MiB
    s = h.alloc_span_locked((12 * MiB) >> PAGE_SHIFT)
    assert h.arena_used > end0  # moved to the new region
    assert s.start % PAGE_SIZE == 0 and s.start % h.os_page_size == 0
    assert s.start >= end0 + 64 * MiB
    assert h.holes and h.holes[0][0] == used0
    v, n = m.placed
    if h.os_page_size < PAGE_SIZE:
        assert v % PAGE_SIZE != 0  # the OS gave a misaligned region ...
    assert h.arena_end == v + n  # ... whose true end becomes arena_end
    h.check_locked()
    # the hole is no heap: coalescing stays out of it
    t = h.alloc_span_locked(1)
    h.free_span_locked(t)
    h.check_locked()


def test_mheap_32bit_growth_outside_window_is_freed_then_sys_alloc_realigned(window32):
    m, h = window32
    end0, used0 = h.arena_end, h.arena_used
    m.place = -(h.arena_start + MAX_ARENA32)  # lands outside [arena_start, +2 GiB)
    m.alloc_at = end0 + 32 * MiB  # the last resort lands inside, misaligned
    s = h.alloc_span_locked((12 * MiB) >> PAGE_SHIFT)
    v, n = m.placed
    assert v + n <= h.arena_start or v >= h.arena_start + MAX_ARENA32
    assert perms_over(v, n) == {""}  # the stray reservation was freed
    assert s.start % PAGE_SIZE == 0
    assert s.start >= end0 + 32 * MiB
    assert h.arena_used >= s.end and h.arena_used > used0
    h.check_locked()


def test_mheap_32bit_failed_reservation_changes_nothing(window32):
    m, h = window32
    fields = (h.arena_start, h.arena_used, h.arena_end, list(h.holes))
    m.inject("reserve", probability=1.0)
    m.inject("alloc", probability=1.0)
    with pytest.raises(OutOfMemory, match="out of memory"):
        h.alloc_span_locked((64 * MiB) >> PAGE_SHIFT)
    assert (h.arena_start, h.arena_used, h.arena_end, list(h.holes)) == fields
    h.check_locked()
    m.clear_injections()
    s = h.alloc_span_locked((64 * MiB) >> PAGE_SHIFT)
    assert s.npages == (64 * MiB) >> PAGE_SHIFT
    h.check_locked()


@pytest.mark.parametrize("give_back_fails", [False, True])
def test_mheap_32bit_anywhere_with_a_failed_metadata_map_changes_no_books(
    window32, give_back_fails
):
    """The last resort's region is mapped, then its bitmap map fails: heap_sys,
    the holes and arena_used stay as they were (CI found heap_sys 64 KiB ahead
    of heap_idle + heap_inuse after such a failure).  The region goes back to
    the OS, or stays a reservation of the heap's if that fails too."""
    m, h = window32
    end0 = h.arena_end
    books = (h.heap_sys, h.mem.stats["heap_sys"], h.arena_used, list(h.holes))
    m.place = -(h.arena_start + MAX_ARENA32)  # the reservation lands outside: freed
    m.alloc_at = end0 + 32 * MiB  # the last resort lands inside the window
    m.inject("map", nth=2)  # 1: Window32's own map of the region; 2: its bitmap
    if give_back_fails:
        m.inject("free", nth=2)  # 1: the stray reservation; 2: the region
    nres = len(h.reservations)
    with pytest.raises(OutOfMemory):
        h.alloc_span_locked((12 * MiB) >> PAGE_SHIFT)
    m.clear_injections()
    assert len(h.reservations) == nres + give_back_fails
    region = (m.alloc_at_placed, m.alloc_n)
    assert is_mapped(*region) == give_back_fails
    assert (h.heap_sys, h.mem.stats["heap_sys"], h.arena_used, list(h.holes)) == books
    h.check_locked()
    if give_back_fails:
        return  # the kept region now sits where growth at arena_end would go
    s = h.alloc_span_locked((12 * MiB) >> PAGE_SHIFT)
    h.check_locked()
    h.free_span_locked(s)
    h.check_locked()


# ---- lazy metadata --------------------------------------------------------------------


def test_mheap_bitmap_and_spans_are_mapped_lazily_in_os_pages(heap):
    h = heap
    assert h.bitmap_mapped == 0 and h.spans_mapped == 0
    with h.lock:
        h.alloc_span_locked(1)
    used = h.arena_used - h.arena_start
    assert used >= 1 * MiB
    assert h.bitmap_mapped == round_up(used // 16, h.os_page_size)
    assert h.spans_mapped == round_up(used // PAGE_SIZE * 8, h.os_page_size)
    assert perms_over(h.arena_start - h.bitmap_mapped, h.bitmap_mapped) == {"rw-p"}
    assert perms_over(h.bitmap, h.arena_start - h.bitmap_mapped - h.bitmap) == {"---p"}
    assert perms_over(h.spans, h.spans_mapped) == {"rw-p"}
    assert h.mem.stats["gc_sys"] == h.bitmap_mapped
    assert h.mem.stats["other_sys"] == h.spans_mapped


# ---- the span allocator -----------------------------------------------------------------


def test_mheap_alloc_splits_and_free_coalesces_with_both_neighbours(heap):
    h = heap
    with h.lock:
        a = h.alloc_span_locked(3)
        b = h.alloc_span_locked(5)
        c = h.alloc_span_locked(7)
        assert (b.start, c.start) == (a.end, b.end)  # carved in address order
        for s in (a, b, c):
            assert s.state == SpanState.IN_USE
            for v in range(s.start, s.end, PAGE_SIZE):
                assert spans_entry(h, v) == s.addr  # in-use: every page
        h.free_span_locked(a)
        h.free_span_locked(c)
        h.check_locked()
        idle_before = h.heap_idle
        h.free_span_locked(b)  # merges with a on the left and c(+tail) on the right
        h.check_locked()
        free = list(h.free_spans())
        assert len(free) == 1
        merged = free[0]
        assert merged.start == a.start and merged.end == h.arena_used
        assert spans_entry(h, merged.start) == merged.addr
        assert spans_entry(h, merged.end - PAGE_SIZE) == merged.addr
        assert h.heap_idle == idle_before + 5 * PAGE_SIZE


def test_mheap_exact_list_is_lifo_and_mask_tracks_it(heap):
    h = heap
    with h.lock:
        spans = [h.alloc_span_locked(2) for _ in range(6)]
        for s in spans[0:6:2]:  # free 3 non-adjacent 2-page spans
            h.free_span_locked(s)
        assert len(h.free[2]) == 3 and h.nonempty_mask >> 2 & 1
        again = h.alloc_span_locked(2)
        assert again.start == spans[4].start  # the most recently freed
        h.check_locked()


def test_mheap_large_best_fit_takes_smallest_then_lowest_address(heap):
    h = heap
    with h.lock:
        sizes = [300, 200, 250, 200, 400]
        spans = []
        for n in sizes:
            spans.append(h.alloc_span_locked(n))
            spans.append(h.alloc_span_locked(1))  # separators keep them apart
        for s in spans[0::2]:
            h.free_span_locked(s)
        h.check_locked()
        s = h.alloc_span_locked(200)
        assert s.start == spans[2].start  # the lower of the two 200-page spans
        t = h.alloc_span_locked(210)
        assert t.start == spans[4].start  # 250 is the best fit for 210
        assert h.free[40].get(next(iter(h.free[40]), 0)) is not None  # 250-210 split to free[40]
        h.check_locked()


def test_mheap_grow_is_at_least_1mib_and_search_reruns(heap):
    h = heap
    with h.lock:
        s = h.alloc_span_locked(1)
        assert h.arena_used - h.arena_start == round_up(1 * MiB, h.align)
        big = h.alloc_span_locked(129)  # more than what is left: grows again
        assert big.npages == 129
        assert h.arena_used - h.arena_start >= 1 * MiB + 129 * PAGE_SIZE
        h.free_span_locked(s)
        h.free_span_locked(big)
        h.check_locked()


def test_mheap_grow_ahead_grows_further_or_just_enough_near_the_end(os_page):
    h = MHeap(mem.SysMemory(page_size=os_page), arena_size=16 * MiB)
    with h.lock:
        s = h.alloc_span_locked(1, grow_ahead=(4 * MiB) >> PAGE_SHIFT)
        assert h.arena_used - h.arena_start == 4 * MiB  # one grow serves what comes next
        t = h.alloc_span_locked(128, grow_ahead=(4 * MiB) >> PAGE_SHIFT)
        assert h.arena_used - h.arena_start == 4 * MiB  # no grow: it fit
        # Near the end the arena cannot grow ahead; it grows by what is asked.
        left = (h.arena_end - h.arena_used) >> PAGE_SHIFT
        used = h.arena_used
        u = h.alloc_span_locked(left // 2, grow_ahead=4 * left)
        assert u.npages == left // 2
        assert h.arena_used - used < (h.arena_end - used) // 2 + 2 * MiB  # not ahead
        for x in (s, t, u):
            h.free_span_locked(x)
        h.check_locked()
        h.close_locked()


def test_mheap_spans_table_lives_in_real_memory_readable_from_c():
    with goheap.Heap(arena_size=64 * MiB) as h:
        p = h.malloc(100_000)
        entry = _native.read_word(h.spans + ((p - h.arena_start) >> PAGE_SHIFT) * 8)
        span = _native.span_at(entry)
        assert span.start == p and span.npages == 13
        h.free(p)


@pytest.mark.parametrize("n", [127, 128, 129])
def test_mheap_list_boundary_sizes(heap, n):
    h = heap
    with h.lock:
        s = h.alloc_span_locked(n)
        sep = h.alloc_span_locked(1)
        h.free_span_locked(s)
        on_exact = n < MAX_MHEAP_LIST
        assert (s.addr in h.free[n]) if on_exact else (s in h.freelarge)
        again = h.alloc_span_locked(n)
        assert again.start == s.start
        h.free_span_locked(again)
        h.free_span_locked(sep)
        h.check_locked()


def test_mheap_injected_growth_failures_then_recovery(os_page):
    for prim, nth in [("map", 1), ("map", 2), ("map", 3)]:
        m = mem.SysMemory(page_size=os_page)
        h = MHeap(m, arena_size=64 * MiB)
        try:
            with h.lock:
                a = h.alloc_span_locked(1)
                fields = (h.arena_used, h.arena_end, h.bitmap_mapped, h.spans_mapped)
                m.inject(prim, nth=nth)
                try:
                    for _ in range(3):
                        h.alloc_span_locked(200)
                except OutOfMemory:
                    pass
                else:
                    pytest.fail(f"{prim} #{nth}: no OutOfMemory")
                assert h.arena_used >= fields[0]
                h.check_locked()
                s = h.alloc_span_locked(200)
                h.free_span_locked(s)
                h.free_span_locked(a)
                h.check_locked()
        finally:
            with h.lock:
                h.close_locked()


# ---- scavenging -----------------------------------------------------------------------------


def test_mheap_scavenge_releases_whole_os_pages_and_rss_falls():
    n = 256 * MiB
    with goheap.Heap(arena_size=1 * GiB) as h:
        ps = [h.malloc(1 * MiB) for _ in range(n // MiB)]
        base = heap_resident(h)
        for p in ps:
            v = h.view(p)
            for off in range(0, MiB, TOUCH):
                v[off] = 1
        touched = heap_resident(h) - base
        assert touched >= n
        for p in ps:
            h.free(p)
        released = h.scavenge()
        dropped = base + touched - heap_resident(h)
        assert released >= n
        assert dropped >= n, (touched, dropped)
        st = h.stats()
        assert st.heap_released == released and st.heap_released <= st.heap_idle
        # reuse after release: sys_used, accounting back, memory zero
        p = h.malloc(1 * MiB)
        assert h.view(p)[0] == 0
        assert h.stats().heap_released == released - MiB
        h.check()


@pytest.mark.parametrize("os_page", PAGE_SIZES, ids=lambda p: f"os{p // 1024}k")
def test_mheap_scavenge_gives_back_the_pages_of_dead_span_structs(os_page):
    # Issue 13: after scavenge() nothing stays resident for free spans, their
    # span structs included.  5,000 live large objects need 5,000 structs.
    with goheap.Heap(arena_size=1 * GiB, sysmem=mem.SysMemory(page_size=os_page)) as h:
        sa = h._h.spanalloc
        ps = [h.malloc(40 * KiB) for _ in range(5000)]
        chunks = list(sa.chunks)
        held = sum(resident(v, n) for v, n in chunks)
        assert held >= 5000 * sa.size
        for p in ps:
            h.free(p)
        h.scavenge()
        h.check()
        # One struct is left (the coalesced free span's): the OS page or two it is on.
        left = sum(resident(v, n) for v, n in chunks)
        assert left <= 2 * os_page and left < held, (left, held)
        assert sa.inuse == 1
        # Released structs come back as fresh, zeroed pages when reused.
        qs = [h.malloc(40 * KiB) for _ in range(3000)]
        for q in qs:
            h.view(q, 8)[:] = b"\x01" * 8
        h.check()
        for q in qs:
            h.free(q)
        h.check()


def test_mheap_live_large_spans_cost_no_python_objects():
    import gc

    from goheap.mspan import MSpan

    def wrappers() -> int:
        gc.collect()
        return sum(isinstance(o, MSpan) for o in gc.get_objects())

    with goheap.Heap(arena_size=1 * GiB) as h:
        before = wrappers()
        ps = [h.malloc(40 * KiB) for _ in range(2000)]
        assert wrappers() - before < 20  # free spans only, not one per object
        assert h.lookup(ps[1000]) == (ps[1000], 40 * KiB)
        s = h._h.lookup(ps[1000])  # made on demand, from the C struct
        assert (s.start, s.npages, s.state) == (ps[1000], 5, SpanState.IN_USE)
        h.check()
        for p in ps:
            h.free(p)
        h.check()


def test_mheap_scavenger_releases_spans_idle_longer_than_scavenge_after():
    with goheap.Heap(arena_size=256 * MiB, scavenge_after=0.05) as h:
        p = h.malloc(4 * MiB)
        q = h.malloc(64 * KiB)
        h.free(p)
        assert h.stats().heap_released == 0  # freed just now
        time.sleep(0.12)
        r = h.malloc(64 * KiB)  # heap activity lets the scavenger look
        h.free(r)
        time.sleep(0.12)
        h.free(h.malloc(64 * KiB))
        assert h.stats().heap_released >= 4 * MiB
        h.free(q)
        h.check()


def test_mheap_scavenge_never_releases_a_page_shared_with_a_live_span(os_page):
    if os_page <= PAGE_SIZE:
        pytest.skip("only bigger OS pages are shared between heap pages")
    h = MHeap(mem.SysMemory(page_size=os_page), arena_size=64 * MiB)
    try:
        m = h.mem
        m.trace = []
        with h.lock:
            per = os_page // PAGE_SIZE
            # live 1 page | free 1 page | live ... : the free page shares its OS page
            a = h.alloc_span_locked(1)
            b = h.alloc_span_locked(1)
            c = h.alloc_span_locked(per * 3)
            h.free_span_locked(b)
            got = h.scavenge_locked(float("inf"), 0)
            for prim, v, n in m.trace:
                if prim == "unused":
                    assert v % os_page == 0 and n % os_page == 0
                    assert not (v < a.end and a.start < v + n)
                    assert not (v < c.end and c.start < v + n)
            h.check_locked()
            assert got % os_page == 0
            h.free_span_locked(a)
            h.free_span_locked(c)
            h.check_locked()
    finally:
        with h.lock:
            h.close_locked()


# ---- stats and check ---------------------------------------------------------------------------


def test_mheap_stats_identities_hold_throughout():
    with goheap.Heap(arena_size=256 * MiB) as h:
        ps = []
        for i in range(200):
            ps.append(h.malloc((i * 7919) % 70000))
            st = h.stats()
            assert not st.identity_errors()
            assert st.sys == st.heap_sys + st.mspan_sys + st.gc_sys + st.other_sys
        for p in ps:
            h.free(p)
        assert not h.stats().identity_errors()
        assert h.stats().heap_alloc == 0


@pytest.mark.parametrize(
    "corrupt, message",
    [
        ("idle", "page accounting"),
        ("free_list", "not on its free list"),
        ("spans_table", "spans table"),
        ("mask", "nonempty_mask"),
    ],
)
def test_mheap_check_names_the_broken_invariant(heap, corrupt, message):
    h = heap
    with h.lock:
        a = h.alloc_span_locked(3)
        b = h.alloc_span_locked(4)
        h.free_span_locked(a)
        if corrupt == "idle":
            h.heap_idle += PAGE_SIZE
        elif corrupt == "free_list":
            del h.free[3][a.addr]
            h.nonempty_mask &= ~(1 << 3)
        elif corrupt == "spans_table":
            _native.spans_set(h.c, b.start + PAGE_SIZE, 1, _native.NULL_SPAN)
        elif corrupt == "mask":
            h.nonempty_mask |= 1 << 9
        with pytest.raises(HeapCorruption, match=message):
            h.check_locked()
        h.closed = True  # the fixture must not check a heap we broke on purpose
        h.closed = False
        h.close_locked()


def test_mheap_8gib_live_heap_of_1mib_spans():
    with goheap.Heap(arena_size=16 * GiB) as h:
        ps = [h.malloc(1 * MiB) for _ in range(8 * 1024)]
        for p in ps:
            h.view(p, 1)[0] = 0x7F  # one byte per span: address space, not RSS
        st = h.stats()
        assert st.heap_inuse >= 8 * GiB
        assert st.heap_alloc == 8 * GiB
        h.check()
        for p in ps:
            h.free(p)
        h.check()
        assert h.stats().heap_inuse == 0
