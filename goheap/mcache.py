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
from goheap.mcentral import MCentral
from goheap.mheap import MHeap
from goheap.sizeclasses import NUM_SIZE_CLASSES


class MCache:
    def __init__(self, h: MHeap, central: list[MCentral]) -> None:
        self.h = h
        self.central = central

    def refill(self, cl: int) -> None:
        """MCache_Refill's slow case: a freshly carved span for class cl.  The old
        one goes to the nonempty list if it has room (C does that in the swap)."""
        s = self.central[cl].grow()
        _native.mcache_swap(self.h.c, cl, s.handle())

    def release_all(self) -> None:
        """MCache_ReleaseAll: uncache every span (before scavenging everything)."""
        for cl in range(1, NUM_SIZE_CLASSES):
            _native.mcache_swap(self.h.c, cl, _native.NULL_SPAN)

    def cached(self, cl: int) -> int:
        """The struct address of class cl's cached span, or 0."""
        return _native.ffi_addr(self.h.c.alloc[cl])
