"""MCentral: the spans of one size class, and where new ones come from.

See goheap/malloc.py for the overview.

Go keeps two lists per class, ``nonempty`` (spans with a free object) and
``empty``.  goheap keeps the nonempty list in C (``gh_mheap.nonempty[cl]``,
doubly linked through the spans), because both ends of it are hot: a free
into a full span links it, and a cache miss takes the head, neither needing
Python.  A full span is on no list (Go's ``empty`` list had no reader but the
sweeper, which goheap does not have).  Python keeps ``spans``, every in-use
span of the class, and decides the two things that are policy:

- ``grow``: when no span has room, carve a fresh one from MHeap
  (class_to_allocnpages pages; objects in address order, linked through word 0,
  each start marked *boundary* in the bitmap; the carving runs in C);
- ``reclaim``: a span whose objects are all free stays on the nonempty list,
  ready to be cached again without carving, until MHeap needs pages (before it
  grows, on the scavenger tick, in ``Heap.scavenge``).  Then it goes back to
  MHeap, so it can coalesce and be scavenged.  This is Go's MHeap_Reclaim step:
  in Go 2014 such spans waited for the sweeper; returning each at its last
  free made a free-everything-then-allocate-again workload re-carve every span.

Invariant (``check``): every span in ``spans`` is IN_USE of this class and is
exactly one of: the mcache's span (incache), on the nonempty list (has a free
object), or full (no free object, on no list).
The caller of every method holds the heap lock.
"""

from __future__ import annotations

from goheap import _native
from goheap.errors import HeapCorruption, throw
from goheap.mheap import MHeap
from goheap.mspan import MSpan, SpanState
from goheap.sizeclasses import class_to_allocnpages, class_to_size


class MCentral:
    __slots__ = ("h", "sizeclass", "spans")

    def __init__(self, h: MHeap, sizeclass: int) -> None:
        self.h = h
        self.sizeclass = sizeclass
        self.spans: dict[int, MSpan] = {}

    def grow(self) -> MSpan:
        """MCentral_Grow: a fresh span from MHeap, carved into objects."""
        s = self.h.alloc_span_locked(class_to_allocnpages[self.sizeclass])
        s.sizeclass = self.sizeclass
        _native.mspan_carve(self.h.c, s.handle(), class_to_size[self.sizeclass])
        self.spans[s.addr] = s
        return s

    def reclaim(self) -> int:
        """Give every uncached span with no live object back to MHeap."""
        n = 0
        while True:
            batch = _native.mcentral_take_empty(self.h.c, self.sizeclass)
            for addr in batch:
                self.return_to_heap(self.spans.pop(addr))
            n += len(batch)
            if len(batch) < 256:
                return n

    def return_to_heap(self, s: MSpan) -> None:
        """MCentral_ReturnToHeap: s has no live object; its pages go back to MHeap."""
        if s.ref != 0 or s.incache or s.inlist:
            throw(f"return_to_heap: {s!r} still in use")
        _native.bitmap_unmarkspan(self.h.c, s.start, s.nbytes)
        s.needzero = True
        s.freelist = 0
        self.h.free_span_locked(s)

    def check(self, cached: int) -> int:
        """Every span of the class is where its state says, and passes the C
        span walk; returns the live objects counted."""
        cl = self.sizeclass
        listed = _native.mcentral_list(self.h.c, cl, len(self.spans) + 1)
        if listed is None:
            raise HeapCorruption(
                f"mcentral[{cl}]: nonempty list longer than its {len(self.spans)} spans"
            )
        on_list = set(listed)
        if len(on_list) != len(listed) or not on_list <= self.spans.keys():
            raise HeapCorruption(f"mcentral[{cl}]: nonempty list holds foreign or repeated spans")
        live = 0
        for addr, s in self.spans.items():
            if s.state != SpanState.IN_USE or s.sizeclass != cl:
                raise HeapCorruption(f"mcentral[{cl}] holds {s!r}")
            if s.incache != (addr == cached):
                raise HeapCorruption(
                    f"mcentral[{cl}]: {s!r} incache={s.incache}, mcache has {cached:#x}"
                )
            if (not s.incache and bool(s.freelist) != (addr in on_list)) or s.inlist != (
                addr in on_list
            ):
                raise HeapCorruption(
                    f"mcentral[{cl}]: {s!r} with free list {s.freelist:#x} "
                    f"{'is' if addr in on_list else 'is not'} on the nonempty list"
                )
            live += check_span(self.h, s)
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
