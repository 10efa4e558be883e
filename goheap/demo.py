"""``python -m goheap demo``: a narrated tour on real memory.

See goheap/malloc.py for the overview.  Everything printed is read back from
the OS (/proc/self/maps, RSS) or from the heap's own fields, never typed in.

Sections, in order: the OS primitives; mallocinit's layout and why arena_start
is rounded; small and large objects with their classes and spans; MemStats and
RSS before and after a scavenge; 32-bit mode growth; efence catching a
use-after-free and an overrun in child processes (goheap/efence_demo.py, when
present); and a map of the arena.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import psutil

import goheap
from goheap import heapmap, mem


def _maps_lines(v: int, n: int) -> list[str]:
    if not os.path.exists("/proc/self/maps"):
        return ["(no /proc/self/maps on this OS)"]
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if hi > v and lo < v + n:
                out.append("    " + line.rstrip())
    return out or ["    (nothing mapped)"]


def _rss_mib() -> float:
    return psutil.Process().memory_info().rss / (1 << 20)


def section(title: str) -> None:
    """Print a section banner."""
    print(f"\n== {title} " + "=" * max(0, 66 - len(title)))


def tour_primitives(out: object = sys.stdout) -> None:
    """The OS layer's primitives on a 64 MiB reservation, with /proc/self/maps and RSS."""
    m = mem.SysMemory()
    ps = m.page_size
    section("The OS layer")
    print(f"OS page size: {ps} bytes; heap page: 8192 bytes.")
    if ps != 8192:
        print("They differ, so every region the OS hands back must be realigned by the heap:")
        print("that is the seed commit's first lesson (runtime: fix malloc page alignment).")
    n = 64 << 20
    v = m.sys_reserve(0, n)
    print(f"\nsys_reserve(64 MiB) -> {v:#x}: address space only (PROT_NONE), no RSS")
    print("\n".join(_maps_lines(v, n)))
    m.sys_map(v, 16 << 20, "heap_sys")
    print(f"\nsys_map(first 16 MiB): read-write, contents zero; RSS {_rss_mib():.1f} MiB")
    print("\n".join(_maps_lines(v, n)))
    buf = m.view(v, 16 << 20)
    for off in range(0, 16 << 20, ps):
        buf[off] = 1
    print(f"touched every page: RSS {_rss_mib():.1f} MiB")
    m.sys_unused(v, 16 << 20)
    print(
        f"sys_unused(16 MiB): pages back to the OS: RSS {_rss_mib():.1f} MiB, byte 0 reads {buf[0]}"
    )
    m.sys_used(v, 16 << 20)
    m.sys_fault(v, ps)
    print("\nsys_fault(first page): inaccessible, any touch would fault (efence uses this):")
    print("\n".join(_maps_lines(v, 4 * ps)))
    m.sys_free(v, n, None)
    print("\nsys_free(64 MiB): the mapping is gone:")
    print("\n".join(_maps_lines(v, n)))


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def tour_mallocinit() -> goheap.Heap:
    """mallocinit's fields on a default (128 GiB) heap; returns the heap."""
    section("mallocinit: one reservation [spans | bitmap | arena]")
    h = goheap.Heap()
    st = h.stats()
    print(
        f"Heap() reserved {_mib(h.arena_end - h.spans)} of address space; RSS {_rss_mib():.1f} MiB."
    )
    print(
        f"  spans       {h.spans:#x}  one 8-byte entry per arena page ({_mib(h.bitmap - h.spans)})"
    )
    print(f"  bitmap      {h.bitmap:#x}  4 bits per arena word, read backwards from arena_start")
    print(f"  arena_start {h.arena_start:#x}  first byte objects may use")
    print(f"  arena_used  {h.arena_used:#x}  end of the mapped part (nothing mapped yet)")
    print(f"  arena_end   {h.arena_end:#x}  end of the reservation itself")
    print(
        f"arena_start % 8192 = {h.arena_start % 8192}: the OS aligns a reservation only to its own"
    )
    print(
        f"{h.os_page_size}-byte page, so mallocinit rounds the start up to the 8 KiB heap page and"
    )
    print(
        f"keeps arena_end at the reservation's true end ({h.arena_end - h.arena_start:#x} bytes of"
    )
    print("arena, one heap page more than asked): the seed commit's fix.  Mapped metadata so far:")
    print(f"gc_sys {st.gc_sys} B, other_sys {st.other_sys} B, heap_sys {st.heap_sys} B.")
    print("\n".join(_maps_lines(h.spans, h.arena_end - h.spans)))
    return h


def _span_line(h: goheap.Heap, v: int) -> str:
    for start, npages, state, cl, ref, nelems, _rel in h._spans_snapshot():
        if start <= v < start + npages * goheap.PAGE_SIZE:
            kind = f"class {cl}, {ref}/{nelems} objects live" if cl else "one large object"
            return f"span [{start:#x}, +{npages} pages) {state}, {kind}"
    return "no span"


def tour_objects(h: goheap.Heap) -> None:
    """Small and large objects: their classes, usable sizes and spans."""
    section("Small and large objects")
    for n in (8, 100, 1000, 32768, 100_000):
        v = h.malloc(n)
        cl = goheap.size_to_class(n)
        what = (
            f"class {cl} ({goheap.class_to_size[cl]} B)" if n <= goheap.MAX_SMALL_SIZE else "large"
        )
        print(f"malloc({n:>6}) -> {v:#x}  {what}, usable {h.usable_size(v)}")
        print(f"{'':17}{_span_line(h, v)}")
    print(f"arena_used moved to {h.arena_used:#x}: the heap grew by at least 1 MiB at a time.")


def tour_scavenge(h: goheap.Heap) -> None:
    """64 MiB touched, freed, then scavenged: MemStats and RSS at each step."""
    section("MemStats and RSS, before and after a scavenge")
    vs = [h.malloc(1 << 20) for _ in range(64)]
    for v in vs:
        h.view(v)[:: h.os_page_size] = b"\1" * ((1 << 20) // h.os_page_size)
    st = h.stats()
    print(
        f"64 x 1 MiB live, every page touched: heap_inuse {_mib(st.heap_inuse)}, RSS {_rss_mib():.1f} MiB"
    )
    for v in vs:
        h.free(v)
    st = h.stats()
    print(
        f"all freed: heap_idle {_mib(st.heap_idle)}, heap_released {_mib(st.heap_released)}, "
        f"RSS {_rss_mib():.1f} MiB (free spans keep their pages)"
    )
    released = h.scavenge()
    st = h.stats()
    print(
        f"scavenge() released {_mib(released)}: heap_released {_mib(st.heap_released)}, "
        f"RSS {_rss_mib():.1f} MiB"
    )
    print(
        "heap_sys = heap_inuse + heap_idle always; heap_idle - heap_released is what RSS can still hold."
    )


def tour_32bit() -> None:
    """A 32-bit mode heap growing its arena upward, reservation by reservation."""
    section("32-bit mode: a 2 GiB window, growth by MHeap_SysAlloc")
    with goheap.Heap(mode="32bit", arena_size=64 << 20) as h:
        print(
            f"Heap(mode='32bit', arena_size=64 MiB): arena [{h.arena_start:#x}, {h.arena_end:#x}) "
            f"= {_mib(h.arena_end - h.arena_start)}"
        )
        for _ in range(12):
            end = h.arena_end
            h.malloc(8 << 20)
            if h.arena_end != end:
                print(
                    f"  after {_mib(h.arena_used - h.arena_start)} used: arena_end {end:#x} -> "
                    f"{h.arena_end:#x} (+{_mib(h.arena_end - end)}, reserved right above)"
                )
        print(
            f"arena_end - arena_start = {_mib(h.arena_end - h.arena_start)}, "
            f"at most {_mib(goheap.MAX_ARENA32)}."
        )


def tour_efence() -> None:
    """efence in child processes (efence_demo.tour), when that module exists."""
    section("efence: use-after-free and overruns caught (child processes)")
    if importlib.util.find_spec("goheap.efence_demo") is None:
        print(
            "TODO(efence_demo): goheap/efence_demo.py is not in this checkout yet; nothing shown."
        )
        return
    from goheap import efence_demo

    efence_demo.tour()


def tour_map(h: goheap.Heap) -> None:
    """The text map of the tour's heap."""
    section("The arena (python -m goheap map --png FILE draws it)")
    print(heapmap.ArenaMap(h, max_cells=256).text())


def main(argv: list[str] | None = None) -> int:
    """Run the whole tour; the exit status."""
    tour_primitives()
    with tour_mallocinit() as h:
        tour_objects(h)
        tour_scavenge(h)
        tour_map(h)
        h.check()
    tour_32bit()
    tour_efence()
    return 0
