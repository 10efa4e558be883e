"""efence on real memory: every claim proven by what the kernel did.

A touch that should fault runs in a process of its own: each test's child
process builds the heap, then forks once per touch (``probe``) and reports the
signal each grandchild died of, so thousands of touches cost one interpreter
start.  Accepted deaths: SIGSEGV or SIGBUS.  Everything that cannot crash
(distinct addresses, quarantine bounds, injected failures) runs in the test
process and is checked against /proc/self/maps and psutil.

The whole file runs once per OS page size: the real one and simulated 16 KiB
and 64 KiB pages (``SysMemory(page_size=...)``), where Go's efence breaks
(Go #44993).
"""

from __future__ import annotations

import bisect
import json
import os
import re
import signal
import time

import pytest
from osview import died_of_fault, heap_resident, mappings, run_child
from pycalls import goheap_python_calls

import goheap
from goheap import _native, mem
from goheap.efence import fault_address
from goheap.mspan import SpanState

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
REAL_PAGE = _native.os_page_size()
PAGE_SIZES = sorted(
    {REAL_PAGE, 16 * KiB, 64 * KiB} - {p for p in (16 * KiB, 64 * KiB) if p < REAL_PAGE}
)
FAULTS = {int(signal.SIGSEGV), int(signal.SIGBUS)}
LARGE_SIZES = (32 * KiB + 1, 40_000, 100_000, MiB + 3)

pytestmark = pytest.mark.pagesize


@pytest.fixture(params=PAGE_SIZES, ids=lambda p: f"os{p // KiB}k")
def page(request):
    return request.param


def slow_requested(config):
    expr = config.getoption("-m") or ""
    return os.environ.get("GOHEAP_SLOW") == "1" or ("slow" in expr and "not slow" not in expr)


@pytest.fixture(autouse=True)
def _skip_slow_by_default(request):
    # pyproject's "slow" marker promises these stay out of the default run.
    if request.node.get_closest_marker("slow") and not slow_requested(request.config):
        pytest.skip("slow: run with -m slow or GOHEAP_SLOW=1")


def new_heap(page_size, **kw):
    kw.setdefault("arena_size", 4 * GiB)
    return goheap.Heap(efence=True, sysmem=mem.SysMemory(page_size=page_size), **kw)


def round_up(n, a):
    return -(-n // a) * a


# ---- what the kernel says ----------------------------------------------------------


class Maps:
    """One snapshot of /proc/self/maps, queried many times."""

    def __init__(self):
        self.maps = sorted(mappings(), key=lambda m: m.start)
        self.starts = [m.start for m in self.maps]

    def perms(self, v, n):
        """The set of protections over [v, v+n); '' marks a gap."""
        lo = max(bisect.bisect_right(self.starts, v) - 1, 0)
        hi = bisect.bisect_left(self.starts, v + n)
        over = [m for m in self.maps[lo:hi] if m.end > v]
        seen = {m.perms for m in over}
        # a gap: before the first mapping, between two, or after the last
        edges = [v] + [e for m in over for e in (m.start, m.end)] + [v + n]
        if any(a < b for a, b in zip(edges[::2], edges[1::2], strict=True)):
            seen.add("")
        return seen

    def bytes_in(self, lo, hi, accessible=True):
        """Bytes of [lo, hi) mapped readable/writable (or PROT_NONE)."""
        total = 0
        for m in self.maps:
            a, b = max(m.start, lo), min(m.end, hi)
            if a < b and (m.perms != "---p") == accessible:
                total += b - a
        return total


def spans(h):
    """Every span of the heap (white box: the page heap's own walk)."""
    return list(h._h.walk())


def assert_kernel_agrees(h):
    """Every FAULTED span is PROT_NONE, every live object's bytes are read-write,
    every guard is PROT_NONE, and every efence span is whole OS pages."""
    snap = Maps()
    ef = h._efence
    ps = h.os_page_size
    nfaulted = 0
    ready = ef.ready_spans()
    for s in spans(h):
        if s.state == SpanState.FAULTED:
            nfaulted += 1
            assert snap.perms(s.start, s.nbytes) == {"---p"}, s
        elif s.addr in ready:  # a fresh span C will hand out: guard faulted, data ours
            g = ef.guard_of(s)
            if g is None:
                lo, hi = s.start, s.end
            else:
                lo, hi = (s.start, g[0]) if g[0] > s.start else (g[0] + g[1], s.end)
            assert snap.perms(lo, hi - lo) == {"rw-p"}, s
            if g is not None:
                assert snap.perms(*g) == {"---p"}, (s, g)
        elif s.state == SpanState.IN_USE:
            assert snap.perms(s.base, s.elemsize) == {"rw-p"}, s
            g = ef.guard_of(s) if s.sizeclass == 0 else None
            if g is not None:
                assert snap.perms(*g) == {"---p"}, (s, g)
                assert g[0] % ps == 0 and g[1] % ps == 0
        if s.state != SpanState.FREE:
            assert s.start % ps == 0 and s.nbytes % ps == 0, s
    assert nfaulted == ef.nfaulted == len(ef.faulted_spans())


def assert_books(h, mallocs, frees, live_bytes=None):
    h.check()
    st = h.stats()
    assert (st.mallocs, st.frees, st.heap_objects) == (mallocs, frees, mallocs - frees)
    assert st.efence_faulted == sum(s.nbytes for s in spans(h) if s.state == SpanState.FAULTED)
    if live_bytes is not None:
        assert st.heap_alloc == live_bytes
    ready = h._efence.ready_spans()  # idle: fresh spans C has not handed out yet
    assert st.heap_inuse == sum(
        s.nbytes for s in spans(h) if s.state != SpanState.FREE and s.addr not in ready
    )
    return st


# ---- children that touch memory --------------------------------------------------------

CHILD = f"""
import ctypes, json, os, resource, sys
sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
from osview import mappings  # guard-marked pages read as "---p" there
import goheap
from goheap import mem
from goheap.mspan import SpanState
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

def heap(page_size, **kw):
    kw.setdefault("arena_size", 4 << 30)
    return goheap.Heap(efence=True, sysmem=mem.SysMemory(page_size=page_size), **kw)

def probe(addr, op):
    # One touch in a forked grandchild: the signal it died of, or 0.
    pid = os.fork()
    if pid == 0:
        try:
            if op == "r":
                ctypes.string_at(addr, 1)
            else:
                ctypes.memset(addr, 0x5A, 1)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0

def report(obj):
    sys.stdout.write("RESULT " + json.dumps(obj) + "\\n")
"""


def run(code, timeout=240, env=None):
    """Run CHILD + code; return what it passed to report()."""
    proc = run_child(CHILD + code, timeout=timeout, env=env)
    m = re.search(r"^RESULT (.*)$", proc.stdout, re.M)
    assert proc.returncode == 0 and m, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    return json.loads(m.group(1))


# ---- 1. use after free, every size class --------------------------------------------------


@pytest.mark.heavy
@pytest.mark.parametrize("guard", [False, "after"])
def test_efence_use_after_free_first_and_last_byte_every_class_faults(page, guard):
    sizes = sorted(set(goheap.class_to_size[1:])) + list(LARGE_SIZES)
    out = run(f"""
h = heap({page}, guard={guard!r})
rows = []
for n in {sizes}:
    p = h.malloc(n)
    u = h.usable_size(p)
    h.view(p)[:] = b"\\xab" * u          # the object is really ours, all of it
    h.free(p)
    rows.append([n, p, u] + [probe(a, op) for a in (p, p + u - 1) for op in "rw"])
h.check()
st = h.stats()
report(dict(rows=rows, mallocs=st.mallocs, frees=st.frees, heap_alloc=st.heap_alloc,
            faulted=st.efence_faulted, inuse=st.heap_inuse))
""")
    missed = [(n, sig) for n, p, u, *sig in out["rows"] if not set(sig) <= FAULTS]
    assert not missed, f"touches that did not fault: {missed}"
    assert len(out["rows"]) == len(sizes) == 66 + len(LARGE_SIZES)
    assert (out["mallocs"], out["frees"], out["heap_alloc"]) == (len(sizes), len(sizes), 0)
    # Every freed span stays owned (heap_inuse) and faulted, none reused.
    assert out["faulted"] == out["inuse"] > 0
    assert len({p for _, p, _, *_ in out["rows"]}) == len(sizes)


# ---- 2. overrun and underrun guards ------------------------------------------------------


SWEEP = range(1, 4097)
# Under simulated pages the default run sweeps a sample: every size up to 64,
# both sides of every power of two, and a stride through the rest; the full
# sweep is the "full" case, marked slow (each size is one fork).
SAMPLE = sorted(
    set(range(1, 65))
    | {k + d for k in (1 << i for i in range(6, 13)) for d in (-1, 0, 1) if k + d <= 4096}
    | set(range(1, 4097, 97))
)
SWEEPS = [(p, "full") for p in PAGE_SIZES if p == REAL_PAGE] + [
    case
    for p in PAGE_SIZES
    if p != REAL_PAGE
    for case in ((p, "sample"), pytest.param((p, "full"), marks=pytest.mark.slow))
]


@pytest.fixture(params=SWEEPS, ids=lambda c: f"os{c[0] // KiB}k-{c[1]}")
def sweep(request):
    page, extent = request.param
    return page, list(SWEEP) if extent == "full" else SAMPLE


@pytest.mark.heavy
@pytest.mark.parametrize("align", [16, 1])
def test_efence_guard_after_catches_one_byte_overrun_every_size(sweep, align):
    """align=16: the byte past usable_size faults; align=1: the byte past the
    request.  Every in-bounds byte is written and read back without a fault.
    Objects live in batches, so each guard sits between live neighbours."""
    page, sizes = sweep
    out = run(f"""
# A fresh heap per batch: a forked process's mappings no longer merge, so one
# heap for the whole sweep would make every fork slower than the last.
rows, mallocs, frees = [], 0, 0
sizes = {sizes!r}
for i in range(0, len(sizes), 64):
    with heap({page}, guard=True, align={align}, arena_size=1 << 30) as h:
        ps = [(n, h.malloc(n)) for n in sizes[i:i + 64]]
        for n, p in ps:
            u = h.usable_size(p)
            v = h.view(p)
            v[:] = bytes([n & 0xFF]) * u        # in bounds: must not fault
            ok = v.tobytes() == bytes([n & 0xFF]) * u
            touches = [probe(p + u, "w")] + ([probe(p + u, "r")] if n % 61 == 0 else [])
            rows.append([n, u, p, ok] + touches)
        for n, p in ps:
            h.free(p)
        h.check()
        st = h.stats()
        assert st.heap_alloc == 0
        mallocs, frees = mallocs + st.mallocs, frees + st.frees
report(dict(rows=rows, mallocs=mallocs, frees=frees))
""")
    rows = out["rows"]
    assert [r[0] for r in rows] == sizes
    bad_size = [(n, u) for n, u, *_ in rows if u != round_up(n, align)]
    assert not bad_size
    assert all(ok for _, _, _, ok, *_ in rows), "in-bounds bytes did not read back"
    missed = [(n, t) for n, _, _, _, *t in rows if not set(t) <= FAULTS]
    assert not missed, f"overruns not caught: {missed[:20]} ({len(missed)} in all)"
    # right-aligned: the object ends exactly at its guard page
    unit = max(8 * KiB, page)
    assert all((p + u) % unit == 0 for _, u, p, *_ in rows)
    assert (out["mallocs"], out["frees"]) == (len(sizes), len(sizes))


@pytest.mark.heavy
def test_efence_guard_before_catches_one_byte_underrun_every_size(sweep):
    page, sizes = sweep
    out = run(f"""
rows = []
sizes = {sizes!r}
for i in range(0, len(sizes), 64):
    with heap({page}, guard="before", arena_size=1 << 30) as h:
        ps = [(n, h.malloc(n)) for n in sizes[i:i + 64]]
        for n, p in ps:
            h.view(p)[:] = b"\\x11" * h.usable_size(p)
            rows.append([n, p, probe(p - 1, "w")] + ([probe(p - 1, "r")] if n % 61 == 0 else []))
        for n, p in ps:
            h.free(p)
        h.check()
        assert h.stats().frees == len(ps)
report(rows)
""")
    unit = max(8 * KiB, page)
    assert [r[0] for r in out] == sizes
    assert all(p % unit == 0 for _, p, *_ in out)
    missed = [(n, t) for n, _, *t in out if not set(t) <= FAULTS]
    assert not missed, f"underruns not caught: {missed[:20]} ({len(missed)} in all)"


def test_efence_guard_in_process_kernel_view(page):
    """Live guarded objects side by side: guards PROT_NONE, data read-write, in
    /proc/self/maps; freeing one changes no neighbour's protection."""
    for guard in ("after", "before"):
        with new_heap(page, guard=guard, align=1) as h:
            ps = [h.malloc(n) for n in (1, 100, 4096, 8191, 8192, 40_000, 3 * page + 5)]
            assert_kernel_agrees(h)
            before = Maps()
            victim = ps[3]
            s = h._h.lookup(victim)
            h.free(victim)
            after = Maps()
            assert after.perms(s.start, s.nbytes) == {"---p"}
            for t in spans(h):
                if t is not s and t.state == SpanState.IN_USE:
                    assert after.perms(t.start, t.nbytes) == before.perms(t.start, t.nbytes)
            assert_kernel_agrees(h)
            assert_books(h, len(ps), 1)


# ---- 3. no reuse without quarantine ------------------------------------------------------


@pytest.mark.heavy
def test_efence_addresses_never_reused_without_quarantine(page):
    n_cycles = 10_000
    with new_heap(page, arena_size=16 * GiB) as h:
        seen, total = set(), 0
        for i in range(n_cycles):
            n = (i * 37) % 5000 if i % 100 else 40_000 + i
            p = h.malloc(n)
            seen.add(p)
            total += h.usable_size(p)
            h.free(p)
        assert len(seen) == n_cycles
        st = assert_books(h, n_cycles, n_cycles, live_bytes=0)
        assert st.efence_deleted == 0 and st.total_alloc == total
        assert_kernel_agrees(h)
        # Nothing recycled: every byte the arena handed out is faulted.
        assert st.efence_faulted == h.arena_used - h.arena_start - st.heap_idle


# ---- 4. bounded quarantine ---------------------------------------------------------------


def quarantine_run(page, cycles, quarantine=MiB):
    """cycles x (malloc(100), free): the figures that must stay bounded."""
    with new_heap(page, quarantine=quarantine, arena_size=16 * GiB) as h:
        lo = h.arena_start
        r0 = heap_resident(h)
        figures = []
        t0 = time.perf_counter()
        for done in (cycles // 10, cycles):
            while h.stats().mallocs < done:
                for _ in range(min(1000, done - h.stats().mallocs)):
                    h.free(h.malloc(100))
            snap = Maps()
            figures.append(
                dict(
                    cycles=done,
                    arena=h.arena_used - lo,
                    mapped_rw=snap.bytes_in(lo, h.arena_end, True),
                    faulted_maps=snap.bytes_in(lo, h.arena_used, False),
                    rss_growth=heap_resident(h) - r0,
                    stats=h.stats(),
                )
            )
        seconds = time.perf_counter() - t0
        st = assert_books(h, cycles, cycles, live_bytes=0)
        assert_kernel_agrees(h)
        return figures, seconds, st


def check_quarantine_figures(page, figures, st, cycles, quarantine=MiB):
    unit = max(8 * KiB, page)
    first, last = figures
    # The page heap's address space stops growing: the last 90% of the cycles
    # ran in what the first 10% mapped (plus at most one growth chunk).
    assert last["arena"] <= first["arena"] + 2 * MiB, figures
    assert last["arena"] <= quarantine + 8 * MiB, figures
    # The kernel agrees: read-write arena bytes (free spans) stay bounded too.
    assert last["mapped_rw"] <= first["mapped_rw"] + 2 * MiB, figures
    # The heap's resident pages (mincore over its reservation, not the process's
    # RSS, which under ASan carries the sanitizer's own heap): faulted pages are
    # dropped, recycled ones come back zero and untouched.
    assert last["rss_growth"] < quarantine, figures
    assert st.efence_faulted <= quarantine
    assert st.efence_faulted == (quarantine // unit) * unit
    assert st.efence_deleted == cycles - st.efence_faulted // unit
    assert st.heap_sys == last["arena"]


@pytest.mark.heavy
def test_efence_quarantine_bounds_address_space_and_rss(page, record_property):
    cycles = 50_000 if page == REAL_PAGE else 20_000
    figures, seconds, st = quarantine_run(page, cycles)
    check_quarantine_figures(page, figures, st, cycles)
    last = figures[-1]
    record_property(
        "quarantine",
        dict(
            page=page, seconds=round(seconds, 2), **{k: v for k, v in last.items() if k != "stats"}
        ),
    )
    print(
        f"\nquarantine 1 MiB, os page {page}: {cycles} cycles in {seconds:.1f}s, arena "
        f"{last['arena']} B, rw {last['mapped_rw']} B, faulted {last['faulted_maps']} B, "
        f"RSS +{last['rss_growth']} B"
    )


@pytest.mark.slow
def test_efence_quarantine_one_million_cycles(page):
    cycles = 1_000_000
    figures, seconds, st = quarantine_run(page, cycles)
    check_quarantine_figures(page, figures, st, cycles)
    last = figures[-1]
    print(
        f"\nquarantine 1 MiB, os page {page}: {cycles} cycles in {seconds:.1f}s, arena "
        f"{last['arena']} B, rw {last['mapped_rw']} B, faulted {last['faulted_maps']} B, "
        f"RSS +{last['rss_growth']} B"
    )


def test_efence_use_after_free_within_quarantine_still_faults(page):
    """The last freed objects stay faulted however many cycles ran before;
    one older than the quarantine is recycled (the documented trade-off)."""
    out = run(f"""
q = 1 << 20
h = heap({page}, quarantine=q)
for _ in range(3000):
    h.free(h.malloc(100))
old = h.malloc(100)
h.free(old)
unit = max(8192, {page})
recent = []
for i in range(q // unit):
    p = h.malloc(100)
    h.view(p, 100)[:] = b"x" * 100
    h.free(p)
    recent.append(p)
h.check()
st = h.stats()
report(dict(
    recent=[[probe(p, "w"), probe(p + 99, "r")] for p in recent],
    old_explain=h.explain(old),
    old_touch=probe(old, "w"),
    deleted=st.efence_deleted, faulted=st.efence_faulted))
""")
    assert all(set(t) <= FAULTS for t in out["recent"]), out["recent"]
    assert len(out["recent"]) == MiB // max(8 * KiB, page)
    assert out["faulted"] == MiB
    assert out["deleted"] == 3001
    # Past the quarantine the address is ordinary heap again: no fault.
    assert out["old_touch"] == 0
    assert "freed efence object" not in out["old_explain"]


# ---- 5. running out cleanly ----------------------------------------------------------------


def test_efence_free_that_cannot_fault_leaves_the_object_live(page):
    m = mem.SysMemory(page_size=page)
    with goheap.Heap(arena_size=GiB, efence=True, guard=True, sysmem=m) as h:
        p = h.malloc(300)
        h.view(p)[:3] = b"abc"
        m.inject("fault", nth=1)
        with pytest.raises(goheap.OutOfMemory, match=r"cannot fault its span.*still live"):
            h.free(p)
        assert h.lookup(p) == (p, 304)
        assert Maps().perms(p, 304) == {"rw-p"}
        assert h.view(p, 3).tobytes() == b"abc"
        assert_books(h, 1, 0, live_bytes=304)
        assert_kernel_agrees(h)
        h.free(p)  # the OS is willing again
        assert_books(h, 1, 1, live_bytes=0)
        assert_kernel_agrees(h)
        with pytest.raises(goheap.DoubleFree):
            h.free(p)


def test_efence_malloc_that_cannot_guard_leaves_nothing_behind(page):
    m = mem.SysMemory(page_size=page)
    with goheap.Heap(arena_size=GiB, efence=True, guard=True, sysmem=m) as h:
        keep = h.malloc(10)
        h.scavenge()  # no ready spans left (efence.py): the next malloc's guard is Python's
        before = h.stats()
        m.inject("fault", nth=1)
        with pytest.raises(goheap.OutOfMemory, match="cannot fault the guard page"):
            h.malloc(5000)
        after = assert_books(h, 1, 0, live_bytes=before.heap_alloc)
        assert after.heap_inuse == before.heap_inuse
        assert_kernel_agrees(h)
        # No PROT_NONE byte in the arena beyond the one live guard.
        snap = Maps()
        assert snap.bytes_in(h.arena_start, h.arena_used, False) == h._efence.unit
        p = h.malloc(5000)
        assert h.usable_size(p) == 5008
        h.free(p)
        h.free(keep)
        assert_books(h, 2, 2, live_bytes=0)


def test_efence_malloc_that_cannot_grow_names_the_cause(page):
    m = mem.SysMemory(page_size=page)
    with goheap.Heap(arena_size=GiB, efence=True, sysmem=m) as h:
        m.inject("map", nth=1)
        with pytest.raises(goheap.OutOfMemory, match=r"efence: malloc\(100\) needs"):
            h.malloc(100)
        assert_books(h, 0, 0, live_bytes=0)
        p = h.malloc(100)
        h.free(p)
        assert_books(h, 1, 1, live_bytes=0)
        assert_kernel_agrees(h)


def test_efence_quarantine_delete_refused_then_retried(page):
    m = mem.SysMemory(page_size=page)
    unit = max(8 * KiB, page)
    q = 4 * unit
    with goheap.Heap(arena_size=GiB, efence=True, quarantine=q, sysmem=m) as h:
        ps = [h.malloc(64) for _ in range(6)]
        for p in ps[:4]:
            h.free(p)
        assert h.stats().efence_faulted == q
        m.inject("map", nth=1)
        h.free(ps[4])  # the delete fails: the span stays faulted, over quota
        st = assert_books(h, 6, 5)
        assert (st.efence_faulted, st.efence_deleted) == (q + unit, 0)
        assert_kernel_agrees(h)
        h.free(ps[5])  # the next free catches up
        st = assert_books(h, 6, 6, live_bytes=0)
        assert (st.efence_faulted, st.efence_deleted) == (q, 2)
        assert_kernel_agrees(h)


def test_efence_runs_out_of_arena_cleanly(page):
    unit = max(8 * KiB, page)
    with new_heap(page, arena_size=8 * MiB) as h:
        n = 0
        with pytest.raises(goheap.OutOfMemory, match="arena exhausted"):
            while True:
                h.free(h.malloc(1))
                n += 1
        assert n >= (8 * MiB - 2 * MiB) // unit
        assert_books(h, n, n, live_bytes=0)
        assert_kernel_agrees(h)


@pytest.mark.heavy
def test_efence_rlimit_as_runs_out_cleanly(page):
    """A 32-bit-style heap that must reserve more address space for every
    growth, under RLIMIT_AS: malloc fails with OutOfMemory, the heap checks."""
    out = run(f"""
import resource
vm = int([l for l in open("/proc/self/status") if l.startswith("VmSize")][0].split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), vm + (1 << 30)))
h = heap({page}, mode="32bit", arena_size=16 << 20)
n, err = 0, None
try:
    while True:
        h.free(h.malloc(200_000))
        n += 1
except goheap.OutOfMemory as e:
    err = str(e)
h.check()
st = h.stats()
maps = mappings()
faulted = [s for s in h._h.walk() if s.state == SpanState.FAULTED]
perms = {{}}
for s in faulted:
    for m in maps:
        if m.start < s.end and s.start < m.end:
            perms[m.perms] = perms.get(m.perms, 0) + 1
report(dict(n=n, err=err, mode=h.mode, frees=st.frees, faulted=st.efence_faulted,
            nfaulted=len(faulted), perms=perms))
""")
    assert out["err"] and "efence: malloc(200000)" in out["err"], out
    assert "arena exhausted" in out["err"] or "refused" in out["err"], out
    assert out["n"] == out["frees"] >= (16 * MiB) // round_up(200_000, max(8 * KiB, page)) - 1
    assert out["faulted"] == out["n"] * round_up(200_000, max(8 * KiB, page))
    assert set(out["perms"]) == {"---p"}, out["perms"]


@pytest.mark.heavy
def test_efence_vm_max_map_count_runs_out_cleanly():
    """The real limit, not a simulation: objects freed in a checkerboard split
    the arena into one mapping each, until the kernel refuses (vm.max_map_count
    is global, so it is not lowered: the child fills the default budget).  The
    failing free and a guarded malloc raise OutOfMemory naming the limit; the
    heap checks and no FAULTED span is accessible.  Guard markers split no
    mapping, so this child faults with mprotect (GOHEAP_GUARD_REGIONS=0)."""
    limit = int(open("/proc/sys/vm/max_map_count").read())
    if limit > 300_000:
        pytest.skip(f"vm.max_map_count={limit}: too many mappings to fill in a test")
    out = run(
        f"""
unit = max(8192, {REAL_PAGE})
h = heap({REAL_PAGE}, arena_size=(({limit} + 4000) * unit // (1 << 30) + 2) << 30)
g = heap({REAL_PAGE}, arena_size=1 << 30, guard=True)
g.free(g.malloc(1))
g.scavenge()  # no ready spans (efence.py): g's next malloc faults a fresh guard
ps = [h.malloc(8) for _ in range({limit} + 4000)]
free_err = malloc_err = None
freed = 0
for p in ps[::2]:
    try:
        h.free(p)
        freed += 1
    except goheap.OutOfMemory as e:
        free_err, victim = str(e), p
        break
if free_err:
    still_live = h.lookup(victim) == (victim, 16)
    try:
        g.malloc(100)
    except goheap.OutOfMemory as e:
        malloc_err = str(e)
    # Give the kernel some mappings back: freeing a neighbour of faulted spans
    # merges three mappings into one.
    for p in ps[1:4001:2]:
        h.free(p)
    freed += 2000
h.check()
g.check()
maps = sorted((m.start, m.end, m.perms) for m in mappings())
starts = [m[0] for m in maps]
import bisect
def perms(lo, hi):
    i, seen = bisect.bisect_right(starts, lo) - 1, set()
    while i < len(maps) and maps[i][0] < hi:
        if maps[i][1] > lo:
            seen.add(maps[i][2])
        i += 1
    return seen
bad = [s.start for s in h._h.walk() if s.state == SpanState.FAULTED and perms(s.start, s.end) != {{"---p"}}]
live_bad = [s.start for s in h._h.walk() if s.state == SpanState.IN_USE and perms(s.base, s.limit) != {{"rw-p"}}]
st = h.stats()
report(dict(free_err=free_err, malloc_err=malloc_err, still_live=free_err and still_live,
            freed=freed, frees=st.frees, nmaps=len(maps), bad=len(bad), live_bad=len(live_bad),
            g_frees=g.stats().frees))
""",
        timeout=300,
        env={"GOHEAP_GUARD_REGIONS": "0"},
    )
    assert out["free_err"] and "max_map_count" in out["free_err"], out
    assert "still live" in out["free_err"]
    assert out["still_live"]
    assert out["malloc_err"] and "max_map_count" in out["malloc_err"], out
    assert out["freed"] == out["frees"]
    assert out["bad"] == 0 and out["live_bad"] == 0
    assert out["g_frees"] == 1


# ---- 6. pages, neighbours, diagnosis ------------------------------------------------------------


def test_efence_spans_are_whole_os_pages_and_faulting_spares_neighbours(page):
    with new_heap(page) as h:
        ps = [h.malloc(n) for n in (1, 8, 700, 8192, 8193, 16384, 20000, 65536, 65537, 100_000)]
        for s in spans(h):
            if s.state == SpanState.IN_USE:
                assert s.start % page == 0 and s.nbytes % page == 0, s
                assert s.start % h._efence.unit == 0
        for victim in ps[1::3]:
            before = Maps()
            h.free(victim)
            after = Maps()
            for s in spans(h):
                if s.state == SpanState.IN_USE:
                    assert (
                        after.perms(s.start, s.nbytes)
                        == before.perms(s.start, s.nbytes)
                        == {"rw-p"}
                    )
        assert_kernel_agrees(h)
        assert_books(h, len(ps), len(ps[1::3]))
        for p in ps:
            if h.lookup(p):
                h.free(p)
        assert_books(h, len(ps), len(ps), live_bytes=0)
        assert_kernel_agrees(h)


def test_efence_explain_every_kind_of_address(page):
    with new_heap(page, guard=True, align=1) as h:
        live = h.malloc(10)
        dead = h.malloc(300)
        h.free(dead)
        unit = h._efence.unit
        assert h.explain(live + 3) == f"{live + 3:#x} is 3 bytes into live object [{live:#x}, +10)"
        assert "guard page" in h.explain(live + 10) and "overrun, 1 byte past the end" in h.explain(
            live + 10
        )
        assert "1 byte before it, not faulted" in h.explain(live - 1)
        e = h.explain(dead + 299)
        assert (
            f"at offset 299 of freed efence object [{dead:#x}, +300)" in e and "use after free" in e
        )
        assert "1 byte past the end of freed efence object" in h.explain(dead + 300)
        assert "outside the heap" in h.explain(0x1000)
        assert "reserved arena" in h.explain(h.arena_end - unit)
        with new_heap(page, guard="before") as h2:
            p = h2.malloc(20)
            assert "underrun, 1 byte before" in h2.explain(p - 1)


def test_efence_unaligned_objects_refuse_interior_frees():
    with goheap.Heap(arena_size=GiB, efence=True, guard=True, align=1) as h:
        p = h.malloc(13)
        assert p % 8 and h.usable_size(p) == 13
        for bad in (p & ~7, p + 1, p + 13):
            with pytest.raises(goheap.InvalidFree) as ei:
                h.free(bad)
            assert not isinstance(ei.value, goheap.DoubleFree)
        assert h.lookup(p) == (p, 13)
        assert_books(h, 1, 0, live_bytes=13)
        h.free(p)
        with pytest.raises(goheap.DoubleFree):
            h.free(p)
        assert_books(h, 1, 1, live_bytes=0)


def test_efence_fault_reporter_names_the_address(page):
    proc = run_child(f"""
import ctypes, goheap
from goheap import mem
from goheap.efence import report_faults
h = goheap.Heap(arena_size=1 << 30, efence=True, sysmem=mem.SysMemory(page_size={page}))
p = h.malloc(48)
h.free(p)
print(hex(p), flush=True)
report_faults()
ctypes.memset(p + 40, 1, 1)
""")
    assert died_of_fault(proc), proc
    p = int(proc.stdout.split()[0], 16)
    assert fault_address(proc.stderr) == p + 40
    # A 48-byte object freed: 40 bytes into it, its span one unit plus none.
    assert f"goheap: use-after-free at {p + 40:#x}: 40 bytes into object {p:#x} (48 bytes)" in (
        proc.stderr
    )


def test_efence_from_the_environment():
    env = dict(os.environ, GOHEAP_EFENCE="1")
    proc = run_child(
        """
import ctypes, goheap
h = goheap.Heap(arena_size=1 << 30)
assert h.efence
p = h.malloc(24)
h.free(p)
ctypes.memset(p, 1, 1)
""",
        env=env,
    )
    assert died_of_fault(proc), proc


# ---- 7. the demo, and what efence costs ------------------------------------------------------


def test_efence_demo_tour_catches_both_bugs_and_explains_them():
    proc = run_child("from goheap import efence_demo\nefence_demo.tour()\n", timeout=180)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    reported = [int(a, 16) for a in re.findall(r"goheap: [a-z-]+ at (0x[0-9a-f]+)", out)]
    assert len(reported) == 2 and out.count("child died of SIGSEGV") == 2, out
    uaf, over = reported
    assert f"{uaf:#x} is at offset 8 of freed efence object" in out and "use after free" in out
    assert f"{over:#x} is in the guard page" in out and "overrun, 1 byte past the end" in out
    assert re.search(r"efence \d+\.\d+ us \(x\d+\)", out), out


def test_efence_cost_against_normal_mode():
    from goheap import efence_demo

    c = efence_demo.cost(number=300, repeat=3)
    print(
        f"\nmalloc(100)+free: normal {c['normal'] * 1e9:.0f} ns, efence {c['efence'] * 1e9:.0f} ns "
        f"(x{c['ratio_efence']:.0f}), efence+quarantine {c['efence_quarantine'] * 1e9:.0f} ns "
        f"(x{c['ratio_efence_quarantine']:.0f})"
    )
    # efence pays at least two syscalls per pair (mprotect + madvise); the
    # C fast path pays none.
    assert c["efence"] > c["normal"] and c["efence_quarantine"] > c["normal"]
    assert c["ratio_efence"] == c["efence"] / c["normal"]


# ---- ready spans: C hands out fresh efence spans Python made in a batch -----------------------


@pytest.mark.parametrize("guard", ["none", "after", "before"])
def test_efence_ready_spans_are_handed_out_by_c(guard):
    from goheap import efence as efence_mod

    with goheap.Heap(arena_size=256 * MiB, efence=True, guard=guard) as h:
        ef = h._efence
        p = h.malloc(100)  # Python's: a batch of ready spans of its length, one for p
        batch = efence_mod.ready_batch(h._h.lookup(p).nbytes)
        assert len(ef.ready_spans()) == batch - 1
        h.check()
        calls = dict(h._h.mem.calls)
        with goheap_python_calls() as called:
            ptrs = [h.malloc(n) for n in (1, 100, 4000, 8)]
            for q in ptrs[:2]:
                h.free(q)
        assert called == [] and h._h.mem.calls == calls  # no Python, no call the OS layer saw
        assert len(ef.ready_spans()) == batch - 5
        assert_kernel_agrees(h)
        for q in ptrs[2:]:
            u = h.usable_size(q)
            assert bytes(h.view(q)) == bytes(u)
            s = h._h.lookup(q)
            g = ef.guard_of(s)
            if guard == "after":
                assert q + u == g[0]
            elif guard == "before":
                assert q == g[0] + g[1]
        st = h.stats()
        assert st.heap_objects == 3 and st.efence_faulted == 2 * h._h.lookup(p).nbytes
        h.check()
        h.scavenge()  # ready spans go back to the page heap, guards mapped again
        assert ef.ready_spans() == set() and int(h._c.efr_bytes) == 0
        assert_kernel_agrees(h)
        h.check()
        for q in [p, *ptrs[2:]]:
            h.free(q)
        h.check()


# ---- ready batches cut in C (gh_efence_ready_carve) -----------------------------------


@pytest.mark.parametrize("guard", ["none", "after", "before"])
def test_efence_ready_batch_is_cut_in_c_with_its_guards_faulted(page, guard):
    from goheap import efence as efence_mod

    with new_heap(page, guard=guard) as h:
        calls = dict(h._h.mem.calls)
        p = h.malloc(3 * h._efence.unit - 5)  # 3 data units (4 with the guard)
        s = h._h.lookup(p)
        batch = efence_mod.ready_batch(s.nbytes)
        ready = h._efence.ready_spans()
        assert len(ready) == batch - 1
        # C faulted the guards: the OS layer saw none of them.
        assert h._h.mem.calls["fault"] == calls.get("fault", 0)
        starts = [s.start, *(h._h.span_of(a).start for a in ready)]
        # One page-heap span cut in equal pieces, p's the lowest (handed out first).
        assert sorted(starts) == [s.start + i * s.nbytes for i in range(batch)]
        assert_kernel_agrees(h)
        h.check()
        h.free(p)
        h.check()


def test_efence_ready_batch_with_a_refused_guard_keeps_the_pieces_made(page):
    """While the OS layer injects, Python faults the guards (each call seen)
    and C cuts as many pieces as got one; the rest goes back to the page heap."""
    from goheap import efence as efence_mod

    m = mem.SysMemory(page_size=page)
    with goheap.Heap(arena_size=GiB, efence=True, guard="after", sysmem=m) as h:
        unit = h._efence.unit
        before = h.stats()
        m.inject("fault", nth=4)  # p's own guard, then three of the batch's
        p = h.malloc(100)
        assert len(h._efence.ready_spans()) == 2
        # p's span in use; the two ready ones idle, as stats() counts them
        assert h.stats().heap_inuse == before.heap_inuse + 2 * unit
        assert int(h._c.efr_bytes) == 2 * 2 * unit
        assert_kernel_agrees(h)
        h.check()
        # The next miss of that length makes a whole batch.
        got = [h.malloc(100) for _ in range(3)]
        assert len(h._efence.ready_spans()) == efence_mod.ready_batch(2 * unit) - 1
        for q in [p, *got]:
            h.free(q)
        assert_kernel_agrees(h)
        h.check()


def test_efence_ready_carve_refuses_bad_arguments_and_changes_nothing():
    with goheap.Heap(arena_size=GiB, efence=True, guard="after") as h:
        hh, c = h._h, h._c
        unit = h._efence.unit
        npages = 2 * unit // _native.PAGE_SIZE
        with hh.lock:
            s = hh.alloc_span_aligned_locked(4 * npages, unit)
            spares = hh.spanalloc.alloc_addrs(3)
            bad = [
                (s._c, 0, 4, spares),  # units 0
                (s._c, 9, 4, spares),  # past GH_EFR_LISTS
                (s._c, 1, 0, spares),  # no piece
                (s._c, 1, 5, spares),  # more pieces than structs
                (s._c, 1, 4, spares[:2]),  # 4 pieces fill s: 3 structs needed
                (s._c, 1, 4, [spares[0], spares[0], spares[1]]),  # a struct twice
                (s._c, 1, 4, [spares[0], spares[1], s.addr]),  # s itself
                (s._c, 3, 4, spares),  # 4 pieces of 3 units do not fit
            ]
            for args in bad:
                with pytest.raises(ValueError):
                    _native.efence_ready_carve(c, *args)
            assert int(c.efr_nspans) == 0 and s.state == SpanState.IN_USE
            assert s.npages == 4 * npages
            made, st = _native.efence_ready_carve(c, s._c, 1, 4, spares)
            assert (made, st) == (4, _native.OK)
        assert len(h._efence.ready_spans()) == 4
        assert_kernel_agrees(h)
        h.check()
