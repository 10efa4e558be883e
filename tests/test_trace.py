"""goheap objects in tracemalloc (mtrace.py): the domain's traces are the live objects."""

from __future__ import annotations

import subprocess
import sys
import tracemalloc

import pytest

import goheap
from goheap import mtrace

DOMAIN = [tracemalloc.DomainFilter(True, goheap.TRACEMALLOC_DOMAIN)]


@pytest.fixture
def tracing():
    tracemalloc.start(8)
    yield
    tracemalloc.stop()


def goheap_traces():
    return tracemalloc.take_snapshot().filter_traces(DOMAIN).traces


def test_trace_off_by_default_runs_the_class_methods():
    with goheap.Heap(arena_size=1 << 28) as h:
        assert not mtrace.is_installed(h)
        assert "traced" not in h.malloc.__name__ and "traced" not in h.free.__name__
        with goheap.Heap(arena_size=1 << 28, trace=True) as t:
            assert t.malloc.__name__ == "traced_malloc" and t.free.__name__ == "traced_free"


def test_trace_domain_traces_are_the_live_objects(tracing):
    with goheap.Heap(arena_size=1 << 30, trace=True) as h:
        sizes = [0, 8, 100, 1000, 32768, 40_000, 300_000] * 3
        vs = [h.malloc(n) for n in sizes]
        for v in vs[::2]:
            h.free(v)
        live = vs[1::2]
        traces = goheap_traces()
        assert sorted(t.size for t in traces) == sorted(h.usable_size(v) for v in live)
        assert sum(t.size for t in traces) == h.stats().heap_alloc
        assert len(traces) == h.stats().heap_objects == len(live)
        assert h._trace_live == set(live)
        h.check()
    assert len(goheap_traces()) == 0  # close untracks what was still live


def test_trace_names_the_allocating_line(tracing):
    with goheap.Heap(arena_size=1 << 30, trace=True) as h:
        v = h.malloc(100)
        line = sys._getframe().f_lineno - 1
        b = h.alloc(5000)
        bline = sys._getframe().f_lineno - 1
        sites = {t.size: mtrace.allocation_site(t.traceback) for t in goheap_traces()}
        assert sites[112].filename == __file__ and sites[112].lineno == line
        assert sites[h.usable_size(b.addr)].lineno == bline
        # The innermost frame is goheap's wrapper: what tracemalloc.start(1) would keep.
        t = next(iter(goheap_traces()))
        assert t.traceback[-1].filename == mtrace.__file__
        h.free(v)
        b.free()
        assert len(goheap_traces()) == 0


def test_trace_bad_free_untracks_nothing(tracing):
    with goheap.Heap(arena_size=1 << 28, trace=True) as h:
        v = h.malloc(64)
        with pytest.raises(goheap.InvalidFree):
            h.free(v + 16)
        assert [t.size for t in goheap_traces()] == [64]
        h.free(v)


def test_trace_enable_tracemalloc_covers_old_and_new_heaps():
    # Global switch: run it in a child so it does not leak into other tests.
    code = """
import tracemalloc, goheap
tracemalloc.start(4)
old = goheap.Heap(arena_size=1 << 28)
goheap.enable_tracemalloc()
new = goheap.Heap(arena_size=1 << 28)
a, b = old.malloc(10), new.malloc(5000)
snap = tracemalloc.take_snapshot().filter_traces(
    [tracemalloc.DomainFilter(True, goheap.TRACEMALLOC_DOMAIN)])
print(sorted(t.size for t in snap.traces))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[0] == "[16, 5376]"
