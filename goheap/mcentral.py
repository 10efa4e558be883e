"""MCentral: the spans of one size class that the mcache is not using.

See goheap/malloc.py for the overview.

Two lists, as Go's: ``nonempty`` (spans with at least one free object) and
``empty`` (spans with none).  A span cached by the mcache is on neither: the C
fast path owns its free list.  New spans come from MHeap in
``class_to_allocnpages`` pages and are carved in C (objects in address order,
linked through word 0, each start marked *boundary* in the bitmap).  A span
whose objects are all free stays on ``nonempty``, ready to be cached again
without carving, until MHeap needs pages (``reclaim``, called before the heap
grows, by the scavenger tick and by ``Heap.scavenge``): then it goes back to
MHeap, so it can coalesce and be scavenged.  This is Go's MHeap_Reclaim step:
in Go 2014 such spans waited for the sweeper; returning each at its last free
made a free-everything-then-allocate-again workload re-carve every span.

The C free path changes an uncached span's free list without this lock and
reports what changed (goheap/_sys.c ``gh_mcache_free``); ``reconcile`` then
moves the span under the lock.  Between the two a span may sit on ``empty``
with a free object, or on a list with no live object: check() accepts exactly
those two transient states.  The caller of every method holds the heap lock.
"""

from __future__ import annotations

from goheap import _native
from goheap.errors import HeapCorruption, throw
from goheap.mheap import MHeap
from goheap.mspan import MSpan, SpanState
from goheap.sizeclasses import class_to_allocnpages, class_to_size


class MCentral:
    __slots__ = ("empty", "h", "nonempty", "sizeclass")

    def __init__(self, h: MHeap, sizeclass: int) -> None:
        self.h = h
        self.sizeclass = sizeclass
        self.nonempty: dict[int, MSpan] = {}
        self.empty: dict[int, MSpan] = {}

    def cache_span(self) -> MSpan:
        """MCentral_CacheSpan: a span with free objects, taken off both lists."""
        while self.nonempty:
            _, s = self.nonempty.popitem()
            if s.freelist:
                return s
            self.empty[s.addr] = s  # emptied since it was listed
        return self.grow()

    def uncache_span(self, s: MSpan) -> None:
        """MCentral_UncacheSpan: the mcache is done with s."""
        self._place(s)

    def reconcile(self, s: MSpan) -> None:
        """After a C free reported an event for s: put s where it now belongs."""
        if s.state != SpanState.IN_USE or s.sizeclass != self.sizeclass or s.incache:
            return
        self.nonempty.pop(s.addr, None)
        self.empty.pop(s.addr, None)
        self._place(s)

    def reclaim(self) -> int:
        """Give every uncached span with no live object back to MHeap."""
        done = [s for s in self.nonempty.values() if s.ref == 0 and not s.incache]
        for s in done:
            del self.nonempty[s.addr]
            self.return_to_heap(s)
        return len(done)

    def _place(self, s: MSpan) -> None:
        if s.freelist:
            self.nonempty[s.addr] = s
        else:
            self.empty[s.addr] = s

    def grow(self) -> MSpan:
        """MCentral_Grow: a fresh span from MHeap, carved into objects."""
        s = self.h.alloc_span_locked(class_to_allocnpages[self.sizeclass])
        s.sizeclass = self.sizeclass
        _native.mspan_carve(self.h.c, s.handle(), class_to_size[self.sizeclass])
        return s

    def return_to_heap(self, s: MSpan) -> None:
        """MCentral_ReturnToHeap: s has no live object; its pages go back to MHeap."""
        if s.ref != 0 or s.incache:
            throw(f"return_to_heap: {s!r} still in use")
        _native.bitmap_unmarkspan(self.h.c, s.start, s.nbytes)
        s.needzero = True
        s.freelist = 0
        self.h.free_span_locked(s)

    def check(self) -> int:
        """Every listed span belongs here and passes the C span walk; returns
        the live objects counted."""
        live = 0
        for name, d in (("nonempty", self.nonempty), ("empty", self.empty)):
            for s in d.values():
                if s.state != SpanState.IN_USE or s.sizeclass != self.sizeclass or s.incache:
                    raise HeapCorruption(f"mcentral[{self.sizeclass}].{name} holds {s!r}")
                if name == "nonempty" and not s.freelist:
                    raise HeapCorruption(f"mcentral[{self.sizeclass}].nonempty span {s!r} is full")
                live += check_span(self.h, s)
        both = self.nonempty.keys() & self.empty.keys()
        if both:
            raise HeapCorruption(f"mcentral[{self.sizeclass}]: spans on both lists: {both}")
        return live


def check_span(h: MHeap, s: MSpan) -> int:
    """The C walk of one small span; returns its live objects."""
    st, nfree, what = _native.mspan_check(h.c, s.handle())
    if st != _native.OK:
        rules = {
            1: "a free-list link points outside the span, off an object start, or at a live object",
            2: "the free list is longer than the span (a cycle)",
            3: "free + live objects != capacity",
            4: "allocated bits != live objects",
            5: "boundary bits != free objects",
            6: "limit != start + nelems * elemsize",
        }
        raise HeapCorruption(
            f"span {s!r}: {rules.get(what, f'rule {what}')} "
            f"(free list {nfree}, ref {s.ref}, nelems {s.nelems}, status {st})"
        )
    return s.ref
