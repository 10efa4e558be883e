"""MCache: the span each size class allocates from, and its refill.

See goheap/malloc.py for the overview.

The cache itself lives in C (``gh_mheap.alloc[]``) so that the fast path pops
an object without Python.  Go has one MCache per P; goheap has one per heap,
guarded by the heap's C lock, because Python threads have no P to pin a cache
to and a per-thread cache would need thread-local storage in C (which the
shared-library hazards in shared/reference/peers.md rule out).  Refill runs in
Python under the heap lock: uncache the exhausted span, cache a fresh one.
"""

from __future__ import annotations

from goheap import _native
from goheap.mcentral import MCentral
from goheap.mheap import MHeap
from goheap.sizeclasses import NUM_SIZE_CLASSES


class MCache:
    def __init__(self, h: MHeap, central: list[MCentral]) -> None:
        self.h = h
        self.central = central

    def refill(self, cl: int) -> None:
        """MCache_Refill: give back class cl's span and cache one with free objects.
        The caller holds the heap lock."""
        old = self.h.span_of(_native.mcache_swap(self.h.c, cl, _native.NULL_SPAN))
        if old is not None:
            self.central[cl].uncache_span(old)
        s = self.central[cl].cache_span()
        _native.mcache_swap(self.h.c, cl, s.handle())

    def release_all(self) -> None:
        """MCache_ReleaseAll: uncache every span (before scavenging everything)."""
        for cl in range(1, NUM_SIZE_CLASSES):
            old = self.h.span_of(_native.mcache_swap(self.h.c, cl, _native.NULL_SPAN))
            if old is not None:
                self.central[cl].uncache_span(old)

    def cached(self) -> dict[int, int]:
        """class -> struct address of the cached span, for check()."""
        out = {}
        for cl in range(1, NUM_SIZE_CLASSES):
            addr = int(_native.ffi_addr(self.h.c.alloc[cl]))
            if addr:
                out[cl] = addr
        return out
