"""Sampled efence, Heap(efence_sample=N) (issue 15 item 2), on real memory.

What is sampled is read back from the kernel: a sampled object ends where a
PROT_NONE guard mapping starts (/proc/self/maps), a freed one's span is
PROT_NONE whole, and a touch of either faults in a child process.  Counts are
statistical where the choice is random; the bounds are many standard
deviations wide (each test says how many), so they cannot flake.
"""

from __future__ import annotations

import bisect
import ctypes
import threading

import pytest
from osview import died_of_fault, guard_runs, mappings, perms_over, resident, run_child
from pycalls import goheap_python_calls

import goheap
from goheap import _native, efence, mem

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
REAL_PAGE = _native.os_page_size()
# efence places objects in units of a heap page or an OS page, the larger.
EFENCE_UNIT = max(REAL_PAGE, 8 * KiB)
PAGE_SIZES = sorted(
    {REAL_PAGE, 16 * KiB, 64 * KiB} - {p for p in (16 * KiB, 64 * KiB) if p < REAL_PAGE}
)
SIZES = (0, 1, 8, 15, 16, 100, 4000, 8192, 32 * KiB, 32 * KiB + 1, 40_000, 100_000, MiB + 3)


@pytest.fixture(params=PAGE_SIZES, ids=lambda p: f"os{p // KiB}k")
def page(request):
    return request.param


def new_heap(page_size=REAL_PAGE, **kw):
    kw.setdefault("arena_size", 4 * GiB)
    return goheap.Heap(sysmem=mem.SysMemory(page_size=page_size), **kw)


class Maps:
    """One snapshot of /proc/self/maps."""

    def __init__(self):
        self.maps = sorted(mappings(), key=lambda m: m.start)
        self.starts = [m.start for m in self.maps]

    def at(self, v):
        i = bisect.bisect_right(self.starts, v) - 1
        m = self.maps[i] if i >= 0 else None
        return m if m is not None and m.start <= v < m.end else None

    def guarded(self, p, size):
        """Whether the object [p, p+size) ends where a PROT_NONE mapping starts."""
        g = self.at(p + size)
        return g is not None and g.start == p + size and g.perms.startswith("---")

    def faulted(self, lo, hi):
        """Whether [lo, hi) is all PROT_NONE."""
        v = lo
        while v < hi:
            m = self.at(v)
            if m is None or not m.perms.startswith("---"):
                return False
            v = m.end
        return True


def sampled_objects(h, ptrs):
    # Past arena_used the arena is a PROT_NONE reservation: an object ending
    # there is not guarded by a guard of its own.
    maps, used = Maps(), h._h.arena_used
    return [p for p in ptrs if p + h.usable_size(p) < used and maps.guarded(p, h.usable_size(p))]


# ---- every allocation, with N = 1 -------------------------------------------------------------


@pytest.mark.pagesize
def test_efence_sample_1_makes_every_allocation_efence(page):
    with new_heap(page, efence_sample=1) as h:
        assert h.efence_sample == 1 and not h.efence
        ptrs = [h.malloc(n) for n in SIZES]
        ptrs.append(goheap.Heap.malloc(h, 200))  # the Python reference path
        ptrs.append(h.malloc(100, align=64))  # align= through the fast path
        ptrs.append(h.malloc(5000, zero=False))
        maps = Maps()
        unit = max(page, 8 * KiB)
        for p in ptrs:
            base, size = h.lookup(p)
            assert base == p and (p + size) % unit == 0
            assert maps.guarded(p, size), hex(p)
            assert maps.at(p).perms.startswith("rw")
        assert ptrs[-2] % 64 == 0
        # Objects sit on pages of their own: no two share a mapping.
        assert len({maps.at(p).start for p in ptrs}) == len(ptrs)
        st = h.stats()
        assert st.efence_sampled == st.mallocs == len(ptrs)
        h.check()
        for p in ptrs:
            h.free(p)
        st = h.stats()
        assert st.frees == len(ptrs) and st.heap_alloc == 0 and st.efence_faulted > 0
        maps = Maps()
        for p in ptrs:
            s = h._h.lookup(p)
            assert maps.faulted(s.start, s.end)
        h.check()


@pytest.mark.pagesize
def test_efence_sample_1_guard_and_free_fault_in_a_child(page):
    proc = run_child(f"""
import ctypes, os, goheap
from goheap import mem
h = goheap.Heap(arena_size=1 << 30, efence_sample=1, sysmem=mem.SysMemory(page_size={page}))
a, b = h.malloc(100), h.malloc(50_000)
h.free(b)
def touch(addr):
    pid = os.fork()
    if pid == 0:
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
        ctypes.memset(addr, 1, 1)
        os._exit(0)
    return os.waitpid(pid, 0)[1] & 0x7f
print(touch(a + 111), touch(a + 112), touch(b), touch(b + 49_999))
""")
    assert proc.returncode == 0, proc.stderr
    inside, guard, freed, freed_end = (int(x) for x in proc.stdout.split())
    assert inside == 0 and guard in (11, 7) and freed in (11, 7) and freed_end in (11, 7)


def test_efence_sample_realloc_and_blocks_are_sampled():
    with new_heap(efence_sample=1) as h:
        p = h.malloc(100)
        h.view(p)[:4] = b"abcd"
        q = h.realloc(p, 5000)  # moves: the new object is sampled, the old one faulted
        assert q != p and bytes(h.view(q, 4)) == b"abcd"
        maps = Maps()
        assert maps.guarded(q, h.usable_size(q))
        s = h._h.lookup(p)
        assert maps.faulted(s.start, s.end)
        blk = h.alloc(300)
        assert Maps().guarded(blk._addr, h.usable_size(blk._addr))
        blk.free()
        assert h.stats().efence_sampled == 3
        h.free(q)
        h.check()


# ---- about one in N --------------------------------------------------------------------------


def test_efence_sample_n_samples_about_one_in_n():
    # N = 100 over 20,000 allocations: intervals uniform on [1, 199] (mean 100,
    # sd 57.4), so the count is about 200 with sd about 8.  [100, 300] is 12
    # standard deviations either side.  Small and large sizes alike.
    n_alloc, rate = 20_000, 100
    with new_heap(efence_sample=rate) as h:
        sizes = [64 if i % 10 else 40_000 for i in range(n_alloc)]
        ptrs = [h.malloc(n) for n in sizes]
        sampled = sampled_objects(h, ptrs)
        st = h.stats()
        assert 100 <= st.efence_sampled <= 300, st.efence_sampled
        assert len(sampled) == st.efence_sampled  # the kernel agrees with the count
        large = {p for p, n in zip(ptrs, sizes, strict=True) if n > 32 * KiB}
        assert any(p in large for p in sampled) and any(p not in large for p in sampled)
        h.check()
        for p in ptrs:
            h.free(p)
        h.check()
        st = h.stats()
        assert st.mallocs == st.frees == n_alloc and st.heap_alloc == 0
        assert st.efence_faulted == sum(s.nbytes for s in h._sampler.faulted_spans())


def test_efence_sample_mean_interval_is_n():
    # The mean of [1, 2N-1] is N exactly: with N = 7 over 70,000 pairs the count is
    # 10,000 with sd about 37; [9,000, 11,000] is 27 sd wide each side.
    with new_heap(efence_sample=7, quarantine=0) as h:
        for _ in range(70_000):
            h.free(h.malloc(32))
        st = h.stats()
        assert 9_000 <= st.efence_sampled <= 11_000, st.efence_sampled
        assert st.efence_deleted == st.efence_sampled  # quarantine=0 retires each at once
        h.check()


def test_efence_sample_off_costs_normal_objects_nothing():
    with new_heap(efence_sample=efence.MAX_SAMPLE_RATE) as h:
        ptrs = [h.malloc(n) for n in SIZES * 20]
        assert sampled_objects(h, ptrs) == []
        for p in ptrs:
            h.free(p)
        st = h.stats()
        assert st.efence_sampled == 0 and st.efence_faulted == 0
        arena = [m for m in mappings() if h.arena_start <= m.start < h.arena_end]
        assert not [m for m in arena if m.perms.startswith("---") and m.end <= h.arena_used]
        h.check()


# ---- the environment and bad values -----------------------------------------------------------


def test_efence_sample_from_the_environment(monkeypatch):
    monkeypatch.setenv("GOHEAP_EFENCE_SAMPLE", "1")
    with new_heap() as h:
        assert h.efence_sample == 1
        p = h.malloc(24)
        assert Maps().guarded(p, h.usable_size(p))
        h.free(p)
    with new_heap(efence_sample=0) as h:  # the argument wins over the environment
        assert h.efence_sample == 0
    with new_heap(efence=True) as h:  # efence makes every object one; the sample is moot
        assert h.efence and h.efence_sample == 0
    monkeypatch.setenv("GOHEAP_EFENCE_SAMPLE", "0")
    with new_heap() as h:
        assert h.efence_sample == 0
    monkeypatch.setenv("GOHEAP_EFENCE_SAMPLE", "often")
    with pytest.raises(ValueError, match="GOHEAP_EFENCE_SAMPLE"):
        new_heap()


class CountingSysMemory(mem.SysMemory):
    """For testing: counts reservations, so a refused Heap() is seen to make none."""

    reserved = 0

    def sys_reserve(self, *a, **kw):
        CountingSysMemory.reserved += 1
        return super().sys_reserve(*a, **kw)


@pytest.mark.parametrize(
    ("kw", "exc"),
    [
        ({"efence_sample": -1}, ValueError),
        ({"efence_sample": 1 << 31}, ValueError),
        ({"efence_sample": 1.5}, TypeError),
        ({"efence_sample": True}, TypeError),
        ({"efence_sample": "3"}, TypeError),
        ({"efence_sample": 5, "efence": True}, ValueError),
        ({"efence_sample": 5, "guard": True}, ValueError),
        ({"efence_sample": 5, "quarantine": -1}, ValueError),
        ({"quarantine": 1 << 20}, ValueError),
    ],
    ids=[
        "Negative",
        "TooLarge",
        "Float",
        "Bool",
        "Str",
        "WithEfence",
        "Guard",
        "BadQuarantine",
        "QuarantineAlone",
    ],
)
def test_efence_sample_bad_values_refused_before_any_reservation(kw, exc):
    before = CountingSysMemory.reserved
    with pytest.raises(exc):
        goheap.Heap(arena_size=GiB, sysmem=CountingSysMemory(), **kw)
    assert CountingSysMemory.reserved == before


# ---- frees, misuse and check() ---------------------------------------------------------------


def test_efence_sample_mixed_frees_double_and_interior_frees():
    with new_heap(efence_sample=3) as h:
        ptrs = [h.malloc(n) for n in (48, 200, 40_000) * 30]
        sampled = set(sampled_objects(h, ptrs))
        normal = [p for p in ptrs if p not in sampled]
        assert sampled and normal
        s1, n1 = sorted(sampled)[0], normal[0]
        # An interior pointer of either kind is refused, and nothing changes.
        for p in (s1 + 8, n1 + 8):
            with pytest.raises(goheap.InvalidFree) as ei:
                h.free(p)
            assert not isinstance(ei.value, goheap.DoubleFree)
            h.check()
        faulted0 = h.stats().efence_faulted
        h.free(n1)  # a normal free: no efence path
        assert h.stats().efence_faulted == faulted0
        h.free(s1)  # a sampled free: faulted and quarantined
        assert h.stats().efence_faulted > faulted0
        with pytest.raises(goheap.DoubleFree):
            h.free(s1)
        h.check()
        with pytest.raises(goheap.DoubleFree):
            h.free(n1)
        h.check()
        for p in ptrs:
            if p not in (s1, n1):
                h.free(p)
                if p in sampled:
                    h.check()
        st = h.stats()
        assert st.heap_alloc == 0 and st.mallocs == st.frees == len(ptrs)
        assert st.efence_sampled == len(sampled)
        h.check()


def test_efence_sample_quarantine_bounded_by_default():
    # Full, the quarantine hands its oldest span to the next object of that
    # size: the spans in use stop growing at the bound, and each is faulted
    # whole until it is handed out again.
    with new_heap(efence_sample=1) as h:
        # The span bound, or the byte bound where spans are big (64 KiB pages).
        span_bytes = 2 * EFENCE_UNIT
        bound = min(
            efence.SAMPLE_QUARANTINE_SPANS, efence.sample_quarantine_bytes(4 * GiB) // span_bytes
        )
        spans = set()
        for _ in range(bound + 40):
            p = h.malloc(64)
            spans.add(h._h.lookup(p).start)
            h.free(p)
        st = h.stats()
        ef = h._sampler
        assert ef.nfaulted == bound and len(spans) == bound
        assert ef.reused == 40 and st.efence_deleted == 0 and st.efence_sampled == bound + 40
        assert ef.quarantine == efence.sample_quarantine_bytes(4 * GiB)
        maps = Maps()
        assert all(maps.faulted(s.start, s.end) for s in ef.faulted_spans())
        h.check()


def test_efence_sample_reused_span_is_live_again():
    with new_heap(efence_sample=1, quarantine=0) as h:
        p = h.malloc(100)
        h.free(p)  # quarantine=0: nothing is kept, the span goes back to the page heap
        q = h.malloc(100)
        h.free(q)
    # A small sampled object's span: one efence unit of data, one of guard.
    with new_heap(efence_sample=1, quarantine=2 * EFENCE_UNIT) as h:
        p = h.malloc(100)
        h.free(p)
        with pytest.raises(goheap.DoubleFree):
            h.free(p)
        q = h.malloc(40)  # the same page count: p's span, live again, zeroed
        assert h._h.lookup(q).start == h._h.lookup(p).start and q != p
        assert bytes(h.view(q)) == bytes(48) and Maps().guarded(q, 48)
        with pytest.raises(goheap.InvalidFree):
            h.free(p)  # the old start is nothing now
        h.check()
        h.free(q)
        h.check()


def test_efence_sample_quarantine_in_bytes():
    # Sizes of different page counts: a full quarantine that holds none of the
    # size asked for retires its oldest spans instead.
    # Room for either size's span (data units plus a guard unit), not both:
    # 56 KiB at 4 KiB pages.
    # The big size spans more data units than the small one at every page size.
    big = max(40_000, 2 * EFENCE_UNIT + 1)
    small = 2 * EFENCE_UNIT
    large = -(-big // EFENCE_UNIT) * EFENCE_UNIT + EFENCE_UNIT
    bound = small + large - EFENCE_UNIT
    with new_heap(efence_sample=1, quarantine=bound) as h:
        for i in range(50):
            h.free(h.malloc(big if i % 2 else 100))
        st = h.stats()
        assert 0 < st.efence_faulted <= bound and st.efence_deleted > 0
        h.check()


def test_efence_sample_threads_then_check():
    with new_heap(efence_sample=10) as h:

        def work():
            ptrs = [h.malloc(n) for n in (16, 300, 40_000) * 100]
            for p in ptrs:
                h.free(p)

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        st = h.stats()
        assert st.mallocs == st.frees == 1200 and st.heap_alloc == 0
        assert 40 <= st.efence_sampled <= 300  # mean 120, sd about 6
        h.check()


def test_efence_sample_explain_names_sampled_objects():
    with new_heap(efence_sample=1) as h:
        p = h.malloc(100)
        assert "overrun, 1 byte past the end" in h.explain(p + 112)
        h.free(p)
        assert "use after free" in h.explain(p)
        assert "efence_sample=1" in repr(h)


def test_efence_sample_zeroes_like_malloc():
    with new_heap(efence_sample=1, quarantine=0) as h:
        p = h.malloc(4000)
        ctypes.memset(p, 0xAB, 4000)
        h.free(p)
        q = h.malloc(4000)  # the retired span's pages come back fresh
        assert bytes(h.view(q)) == bytes(h.usable_size(q))
        h.free(q)
        h.check()


def test_efence_sample_child_dies_on_overrun_of_sampled_object():
    proc = run_child("""
import ctypes, goheap
h = goheap.Heap(arena_size=1 << 30, efence_sample=1)
p = h.malloc(24)
ctypes.memset(p + h.usable_size(p), 1, 1)
""")
    assert died_of_fault(proc), proc
    assert "goheap: overrun at" in proc.stderr


def test_efence_sample_numpy_arrays_through_the_handler():
    # NumPy's handler misses to the same slow path as Heap.malloc (interface
    # with goheap/_nphandler.c): with N = 1 every array's data is sampled.
    np = pytest.importorskip("numpy")
    with new_heap(efence_sample=1) as h:
        with goheap.numpy_allocator(h):
            arrays = [np.zeros(10), np.empty(100_000), np.arange(1000) * 2]
        maps = Maps()
        for a in arrays:
            base, size = h.lookup(a.ctypes.data)
            assert base == a.ctypes.data and size >= a.nbytes
            assert maps.guarded(base, size)
        assert h.stats().efence_sampled >= len(arrays)
        del arrays, a
        h.check()


# ---- the quarantine's steady state in C -------------------------------------------------------


def full_sampling_heap(bound=8, **kw):
    """An efence_sample=1 heap whose quarantine (``bound`` spans) is full of
    64-byte objects' spans, freed through C."""
    h = new_heap(efence_sample=1, **kw)
    h._sampler.max_spans = bound  # the bound Python governs, and tells C
    h._c.efq_max_spans = bound
    for _ in range(bound):
        h.free(h.malloc(64))
    assert h._sampler.nfaulted == bound
    return h


def test_efence_sample_steady_state_makes_no_python_call_and_no_python_syscall():
    # Full, each sampled malloc takes the oldest span back and each free faults
    # it again, in C: the OS layer sees no call (C makes them), no goheap
    # Python function runs, and the kernel shows what the books say.
    with full_sampling_heap() as h:
        calls = dict(h._h.mem.calls)
        reused = h._sampler.reused
        sampled = h.stats().efence_sampled
        m, f = h.malloc, h.free
        with goheap_python_calls() as called:
            for _ in range(50):
                f(m(64))
            p = m(40)
        assert called == []
        assert h._h.mem.calls == calls
        assert h._sampler.reused == reused + 51
        assert h.stats().efence_sampled == sampled + 51
        maps = Maps()
        assert maps.guarded(p, 48) and bytes(h.view(p)) == bytes(48)
        assert all(maps.faulted(s.start, s.end) for s in h._sampler.faulted_spans())
        assert h._sampler.nfaulted == 7
        h.check()
        f(p)
        with pytest.raises(goheap.DoubleFree):
            f(p)  # C's quarantine keeps the verdict
        with pytest.raises(goheap.InvalidFree):
            f(p + 16)
        assert h._sampler.nfaulted == 8
        h.check()


def test_efence_sample_quarantine_order_is_fifo_across_c_and_python():
    # The oldest span is handed out first, whoever faulted it: frees alternate
    # between C and Python (a traced OS layer sends every call to Python).
    with full_sampling_heap(bound=4) as h:
        order = [s.start for s in h._sampler.faulted_spans()]
        got = []
        for i in range(8):
            h._h.mem.trace = [] if i % 2 else None
            p = h.malloc(64)
            got.append(h._h.lookup(p).start)
            h.free(p)
            h.check()
        h._h.mem.trace = None
        assert got == order + order
        assert h.stats().efence_deleted == 0


def test_efence_sample_traced_or_injected_calls_all_reach_python():
    with full_sampling_heap(bound=4) as h:
        h._h.mem.trace = []
        h.free(h.malloc(64))
        assert [c[0] for c in h._h.mem.trace] == ["map", "fault"]
        h._h.mem.trace = None
        assert not h._h.mem.c_hooked[0]


@pytest.mark.parametrize("primitive", ["map", "fault"])
def test_efence_sample_injected_failure_in_the_steady_state(primitive):
    # map: the oldest span stays quarantined and the object gets a fresh span;
    # fault: the object stays live and free raises OutOfMemory.
    with full_sampling_heap(bound=4) as h:
        before = [s.start for s in h._sampler.faulted_spans()]
        maps_calls = h._h.mem.calls["map"]
        h._h.mem.inject(primitive, nth=1)
        p = h.malloc(64)
        if primitive == "map":
            assert h._h.mem.calls["map"] == maps_calls + 1  # tried, in Python, and refused
            assert h._sampler.nfaulted == 4
            assert [s.start for s in h._sampler.faulted_spans()] == before
            # A fresh span instead (sampled still), the quarantine as it was.
            assert Maps().guarded(p, 64) and h._h.lookup(p).start not in before
            h.check()
            h.free(p)
        else:
            with pytest.raises(goheap.OutOfMemory):
                h.free(p)
            h.check()
            h.view(p)[0] = 1  # still live and writable
            h.free(p)
        h.check()
        assert not h._h.mem.c_hooked[0]
        h.free(h.malloc(64))  # C again
        h.check()


def test_efence_sample_check_reads_the_c_quarantine():
    with full_sampling_heap(bound=4) as h:
        h.check()
        c = h._c
        c.efq_nspans += 1
        with pytest.raises(goheap.HeapCorruption, match="quarantine"):
            h.check()
        c.efq_nspans -= 1
        s = h._sampler.faulted_spans()[1]
        s.state = efence.SpanState.IN_USE  # listed, but not faulted
        with pytest.raises(goheap.HeapCorruption):
            h.check()
        s.state = efence.SpanState.FAULTED
        h.check()


def test_efence_sample_c_quarantine_faults_in_a_child():
    # A use-after-free of an object C freed, and an overrun of one C handed out
    # again, are named by the reporter like any other.
    for touch_, kind in (
        ("h.free(p); ctypes.memset(p + 8, 1, 1)", "use-after-free"),
        ("ctypes.memset(p + 64, 1, 1)", "overrun"),
    ):
        proc = run_child(f"""
import ctypes, goheap
h = goheap.Heap(arena_size=1 << 30, efence_sample=1)
h._sampler.max_spans = h._c.efq_max_spans = 2
for _ in range(5):
    h.free(h.malloc(64))
calls = dict(h._h.mem.calls)
p = h.malloc(64)
assert h._h.mem.calls == calls and h._sampler.reused == 4
{touch_}
""")
        assert died_of_fault(proc), proc
        assert f"goheap: {kind} at" in proc.stderr, proc.stderr


# ---- pages of freed spans dropped in batches (gh_mheap.efq_undropped) -------------------
# With mprotect (kernels before 6.13, macOS); guard markers drop at once (below).


def test_efence_sample_freed_span_faults_at_once_and_its_pages_go_in_a_batch(mprotect_faults):
    """C faults a freed span at once and gives its pages back with the next
    few frees' (one madvise per run of adjacent spans): never more than
    GH_EFQ_DROP_BATCH spans wait, and scavenge() drops them at once."""
    span_bytes = 2 * EFENCE_UNIT  # a 3000-byte object's: one unit of data, one of guard
    # Spans wait until GH_EFQ_DROP_BATCH of them, or GH_EFQ_DROP_BYTES, would.
    batch = min(_native.lib.GH_EFQ_DROP_BATCH, (_native.lib.GH_EFQ_DROP_BYTES - 1) // span_bytes)
    with new_heap(efence_sample=1) as h:
        first = None
        for i in range(batch + 1):
            p = h.malloc(3000)
            h.view(p)[:] = b"\xab" * h.usable_size(p)  # resident now
            s = h._h.lookup(p)
            assert s.nbytes == span_bytes
            h.free(p)
            assert Maps().faulted(s.start, s.end)  # PROT_NONE at the free itself
            if first is None:
                first = s
                assert resident(s.start, s.nbytes) > 0  # not dropped yet
                assert first.start in {t.start for t in h._sampler.faulted_spans()}
            assert int(h._c.efq_nundropped) == (i % batch) + 1
            h.check()
        # The batch went in one go when it was full: the first span's pages too.
        assert resident(first.start, first.nbytes) == 0
        s = h._h.lookup(p)
        assert resident(s.start, s.nbytes) > 0 and int(h._c.efq_nundropped) == 1
        h.scavenge()
        assert resident(s.start, s.nbytes) == 0 and int(h._c.efq_nundropped) == 0
        h.check()


def test_efence_sample_undropped_span_reused_reads_zero(mprotect_faults):
    """A span reused before its pages were dropped is cleared, not read stale."""
    with full_sampling_heap(bound=4) as h:
        seen = set()
        for _ in range(12):
            p = h.malloc(64)
            assert bytes(h.view(p)) == bytes(64)
            h.view(p)[:] = b"\xcd" * 64
            seen.add(h._h.lookup(p).start)
            h.free(p)
        assert len(seen) == 4  # the quarantine's spans, in turn
        assert int(h._c.efq_nundropped) > 0
        h.check()


def test_efence_sample_check_reads_the_undropped_spans(mprotect_faults):
    with full_sampling_heap(bound=4) as h:
        c = h._c
        assert int(c.efq_nundropped) > 0
        c.efq_nundropped -= 1
        with pytest.raises(goheap.HeapCorruption, match="quarantine"):
            h.check()
        c.efq_nundropped += 1
        s = h._sampler.faulted_spans()[0]
        s._c.undropped ^= 1  # one span more (or fewer) than the array holds
        with pytest.raises(goheap.HeapCorruption, match="quarantine"):
            h.check()
        s._c.undropped ^= 1
        h.check()


# ---- guard markers (MADV_GUARD_INSTALL, Linux 6.13+) ------------------------------------


def test_efence_sample_guard_markers_fault_and_drop_at_the_free(guard_markers):
    """With guard markers a C free is one call: the span faults at once, its
    pages are gone at once (none wait in efq_undropped), the mapping is not
    split, and the books say how it was faulted."""
    with new_heap(efence_sample=1) as h:
        ps = [h.malloc(3000) for _ in range(40)]
        for p in ps:
            h.view(p)[:] = b"\xab" * h.usable_size(p)
        nmaps = efence.mapping_count()
        for p in ps[::2]:  # a checkerboard: mprotect would make 40 mappings more
            s = h._h.lookup(p)
            h.free(p)
            assert Maps().faulted(s.start, s.end)
            assert guard_runs(s.start, s.end) == [(s.start, s.end)]  # markers, not PROT_NONE
            assert efence.guard_marked(s.start, s.end) == [(s.start, s.end)]
            assert resident(s.start, s.nbytes) == 0
            assert int(h._c.efq_nundropped) == 0
            assert s._c.marked == _native.lib.GH_FAULT_MARKS
        assert efence.mapping_count() - nmaps < 5
        h.check()


def test_efence_sample_guard_markers_reused_span_reads_zero_guard_kept(guard_markers):
    """The quarantine's oldest span, opened again in C: its data pages read
    zero with no marker left, the guard after them keeps its marker."""
    with full_sampling_heap(bound=4) as h:
        for _ in range(8):
            p = h.malloc(64)
            s = h._h.lookup(p)
            assert bytes(h.view(p)) == bytes(64)
            g = h._sampler.guard_of(s)
            assert guard_runs(s.start, s.end) == [(g[0], g[0] + g[1])]
            assert Maps().guarded(p, h.usable_size(p))
            h.view(p)[:] = b"\xcd" * 64
            h.free(p)
        assert int(h._c.efence_reused) > 0
        h.check()


def test_efence_sample_spans_faulted_either_way_open_again(guard_markers):
    """The setting is process-wide and may change under a full quarantine:
    each span records how it was faulted (C's frees under markers, then under
    mprotect, and Python's sys_fault while traced), and C opens each its way."""
    with full_sampling_heap(bound=6) as h:
        _native.guard_regions(False)
        for _ in range(3):
            h.free(h.malloc(64))  # C reuses a marked span, faults it with mprotect
        h._h.mem.trace = []  # traced: Python faults, C is told "either"
        for _ in range(3):
            h.free(h.malloc(64))
        h._h.mem.trace = None
        kinds = {int(s._c.marked) for s in h._sampler.faulted_spans()}
        assert kinds == {_native.lib.GH_FAULT_PROT, _native.lib.GH_FAULT_EITHER}, kinds
        _native.guard_regions(True)
        for _ in range(12):
            p = h.malloc(64)
            assert bytes(h.view(p)) == bytes(64)  # opened, whatever faulted it
            h.view(p)[:] = b"\xee" * 64
            h.free(p)
            h.check()


def test_efence_sample_check_refuses_a_marked_span_waiting_for_a_drop(guard_markers):
    with full_sampling_heap(bound=4) as h:
        s = h._sampler.faulted_spans()[0]
        assert s._c.marked == _native.lib.GH_FAULT_MARKS and not s._c.undropped
        s._c.marked = 7
        with pytest.raises(goheap.HeapCorruption, match="quarantine"):
            h.check()
        s._c.marked = _native.lib.GH_FAULT_MARKS
        h.check()


def vm_locked() -> int:
    """Bytes this process has mlock'ed, as the kernel counts them."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmLck:"):
                return int(line.split()[1]) * 1024
    return 0


@pytest.mark.parametrize("path", ["c", "python"])
def test_efence_sample_refused_markers_leave_the_guard_faulted(guard_markers, path):
    """mlock'ed data pages refuse guard markers (EINVAL): the free falls back
    to mprotect, and undoing its failed markers never opens the guard after
    the object (it used to take away every marker of the span).  "c": C frees
    into a quarantine with room; "python": the quarantine is full, so
    Python's free faults (then pushes the span as "either")."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mlock.argtypes = libc.munlock.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    h = new_heap(efence_sample=1) if path == "c" else full_sampling_heap(bound=4)
    with h:
        p = h.malloc(64)
        s = h._h.lookup(p)
        glo, glen = h._sampler.guard_of(s)
        lo, n = s.start, glo - s.start
        assert guard_runs(glo, glo + glen) == [(glo, glo + glen)]
        if path == "python":
            h._c.efq_max_spans = h._c.efq_nspans  # no room for C: Python frees
        locked = vm_locked()
        if libc.mlock(lo, n) != 0:
            pytest.skip(f"mlock: errno {ctypes.get_errno()}")
        if vm_locked() - locked < n:
            libc.munlock(lo, n)
            pytest.skip("mlock locked nothing (ASan's interceptor ignores it)")
        try:
            h.free(p)
            assert guard_runs(glo, glo + glen) == [(glo, glo + glen)]  # still marked
            assert guard_runs(lo, lo + n) == [] and perms_over(lo, n) == {"---p"}
            want = _native.lib.GH_FAULT_PROT if path == "c" else _native.lib.GH_FAULT_EITHER
            assert s._c.marked == want
            h.check()
        finally:
            libc.munlock(lo, n)
        q = h.malloc(64)  # the span back, opened its way, guard in place
        assert bytes(h.view(q, 64)) == bytes(64)
        h.free(q)
        h.check()
