"""MCache: the span each size class allocates from, and its refill.

See goheap/malloc.py for the overview.

The cache itself lives in C (``gh_mheap.alloc[]``) so that the fast path pops
an object without Python, and refills from the class's nonempty list without
Python too (goheap/_sys.c).  Python's ``refill`` runs only when no span of the
class has room: it carves a new one (MCentral.grow) and installs it.

Go has one MCache per P; goheap has one per heap, guarded by the heap's C
lock, because Python threads have no P to pin a cache to and a per-thread cache
would need thread-local storage in C (which the shared-library hazards in
shared/reference/peers.md rule out).  The caller of every method holds the
heap lock.
"""

from __future__ import annotations

from goheap import _native
from goheap.errors import OutOfMemory
from goheap.mcentral import MCentral
from goheap.mheap import MHeap
from goheap.mspan import PAGE_SIZE
from goheap.sizeclasses import NUM_SIZE_CLASSES, class_to_allocnpages

# Carving ahead stops at this many bytes of spans per refill: a class that keeps
# growing then enters Python once per 64 KiB of objects, not once per span, and
# a class used once costs one span, as in Go.
REFILL_AHEAD_BYTES = 64 << 10


class MCache:
    def __init__(self, h: MHeap, central: list[MCentral]) -> None:
        self.h = h
        self.central = central
        # Spans to carve at the next refill of each class: 1, doubling with every
        # refill up to REFILL_AHEAD_BYTES (jemalloc's tcache fill count grows so).
        self.batch = [1] * NUM_SIZE_CLASSES
        self.max_batch = [
            max(1, REFILL_AHEAD_BYTES // (n * PAGE_SIZE)) if n else 1 for n in class_to_allocnpages
        ]

    def refill(self, cl: int) -> None:
        """MCache_Refill's slow case: freshly carved spans for class cl, the last
        one cached, the others on the class's nonempty list, where C's fast path
        swaps them in without Python.  The old cached span goes to the nonempty
        list if it has room (C does that in the swap).  Spans carved ahead of
        need are the first MCentral.reclaim gives back."""
        want = self.batch[cl]
        self.batch[cl] = min(2 * want, self.max_batch[cl])
        for i in range(want):
            try:
                s = self.central[cl].grow()
            except (OutOfMemory, OSError):
                if i == 0:
                    raise
                return  # carving ahead is advice; the span needed is in
            _native.mcache_swap(self.h.c, cl, s.handle())

    def release_all(self) -> None:
        """MCache_ReleaseAll: uncache every span (before scavenging everything)."""
        for cl in range(1, NUM_SIZE_CLASSES):
            _native.mcache_swap(self.h.c, cl, _native.NULL_SPAN)

    def cached(self, cl: int) -> int:
        """The struct address of class cl's cached span, or 0."""
        return _native.ffi_addr(self.h.c.alloc[cl])
