"""``python -m goheap demo``: a narrated tour on real memory.

See goheap/malloc.py for the overview.  Everything printed is read back from
the OS (/proc/self/maps, RSS) or from the heap's own fields, never typed in.
"""

from __future__ import annotations

import os
import sys

import psutil

from goheap import mem


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
    print(f"\n== {title} " + "=" * max(0, 66 - len(title)))


def tour_primitives(out: object = sys.stdout) -> None:
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
    print(f"sys_unused(16 MiB): pages back to the OS: RSS {_rss_mib():.1f} MiB, byte 0 reads {buf[0]}")
    m.sys_used(v, 16 << 20)
    m.sys_fault(v, ps)
    print("\nsys_fault(first page): inaccessible, any touch would fault (efence uses this):")
    print("\n".join(_maps_lines(v, 4 * ps)))
    m.sys_free(v, n, None)
    print("\nsys_free(64 MiB): the mapping is gone:")
    print("\n".join(_maps_lines(v, n)))


def main(argv: list[str] | None = None) -> int:
    tour_primitives()
    return 0
