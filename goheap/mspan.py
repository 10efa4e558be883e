"""MSpan: a run of heap pages, and the two structures that hold spans.

See goheap/malloc.py for the overview.

Vocabulary:
- *span*: ``[start, start + npages * PAGE_SIZE)``, heap-page aligned.  Its fields
  live in a C ``gh_mspan`` struct (so the C fast path can reach a span from the
  spans table without Python); ``MSpan`` wraps that struct and adds the page
  heap's own bookkeeping (released OS pages, idle time).
- ``SpanAlloc``: Go's FixAlloc for span structs, carving them from chunks of OS
  memory charged to ``mspan_sys``.  Chunks are never given back before the heap
  closes: the spans table may still hold stale pointers to dead structs (a free
  span maps only its first and last page), and C must always be able to read them.
- ``LargeFree``: the free spans of MAX_MHEAP_LIST pages or more, ordered by
  (npages, start) for best fit with the lowest address on ties.  Go 2014 scanned
  a list; this is a bucketed sorted list, so the search is O(log n) and an insert
  or removal moves at most one bucket (O(sqrt n) words, memmove-fast).

Invariants:
- ``released`` holds disjoint, OS-page-aligned ranges inside the span that are
  in the Prepared state (given back with sys_unused); ``npreleased_bytes`` is
  their total.  Only a FREE span has released ranges.
- A span's struct is owned by exactly one MSpan object while it is not DEAD.
"""

from __future__ import annotations

import bisect
import enum
from collections.abc import Iterator
from typing import Any

from goheap import _native
from goheap.errors import throw
from goheap.mem import SysMemory

PAGE_SHIFT = _native.PAGE_SHIFT
PAGE_SIZE = _native.PAGE_SIZE


class SpanState(enum.IntEnum):
    IN_USE = _native.MSPAN_IN_USE
    FREE = _native.MSPAN_FREE
    LIST_HEAD = _native.MSPAN_LIST_HEAD
    DEAD = _native.MSPAN_DEAD
    FAULTED = _native.MSPAN_FAULTED  # goheap: efence span whose object was freed
    CACHED = _native.MSPAN_CACHED  # goheap: freed large span kept whole in C's large cache


def _cfield(name: str, kind: type = int, writable: bool = True) -> Any:
    """A property over field ``name`` of the span's C struct; C owns the value."""

    def get(self: MSpan) -> Any:
        return kind(getattr(self._c, name))

    def put(self: MSpan, value: Any) -> None:
        setattr(self._c, name, int(value))

    return property(get, put if writable else None, doc=f"gh_mspan.{name}")


class MSpan:
    """One span.  Fields shared with C are properties over the struct."""

    __slots__ = ("_c", "addr", "released", "unusedsince")

    def __init__(self, addr: int) -> None:
        self.addr = addr  # address of the C struct: what the spans table stores
        self._c: Any = _native.span_at(addr)
        self.released: list[tuple[int, int]] = []
        self.unusedsince = 0.0

    # goheap: Go reads these as struct fields; here each access goes through cffi.
    # Reads come back as plain ints (or bools): the state as an int, because
    # SpanState's constructor would cost more than the read (IntEnum members
    # compare equal to it).
    start = _cfield("start")
    npages = _cfield("npages")
    state = _cfield("state")
    sizeclass = _cfield("sizeclass")
    elemsize = _cfield("elemsize")
    base = _cfield("base")
    limit = _cfield("limit")
    ref = _cfield("ref")
    freelist = _cfield("freelist")
    needzero = _cfield("needzero", bool)
    nelems = _cfield("nelems", writable=False)
    incache = _cfield("incache", bool, writable=False)
    inlist = _cfield("inlist", bool, writable=False)

    @property
    def nbytes(self) -> int:
        return int(self._c.npages) << PAGE_SHIFT

    @property
    def end(self) -> int:
        return int(self._c.start) + (int(self._c.npages) << PAGE_SHIFT)

    @property
    def npreleased_bytes(self) -> int:
        return sum(n for _, n in self.released)

    def handle(self) -> Any:
        """The struct handle C functions take."""
        return self._c

    def init(self, start: int, npages: int) -> None:
        """MSpan_Init: a fresh span covering [start, start + npages pages), state DEAD
        until the heap says otherwise."""
        c = self._c
        c.start = start
        c.npages = npages
        c.freelist = 0
        c.limit = 0
        c.elemsize = 0
        c.base = start
        c.ref = 0
        c.nelems = 0
        c.state = SpanState.DEAD
        c.sizeclass = 0
        c.incache = 0
        c.needzero = 0
        c.inlist = 0
        c.next = c.prev = _native.NULL_SPAN
        self.released = []
        self.unusedsince = 0.0

    def __repr__(self) -> str:
        return (
            f"MSpan({self.start:#x}+{self.npages}p {SpanState(self.state).name} "
            f"class={self.sizeclass} ref={self.ref})"
        )


class SpanAlloc:
    """Go's FixAlloc for span structs.  The caller holds the heap lock."""

    CHUNK = 64 << 10

    def __init__(self, sysmem: SysMemory) -> None:
        self.sysmem = sysmem
        self.size = _native.SPAN_STRUCT_SIZE
        self.chunks: list[tuple[int, int]] = []
        # Dead structs form a list through their own ``next`` field (Go's FixAlloc
        # list): the MSpan wrapper goes with the span and the list costs no
        # Python memory, so a heap that shrinks back gives that memory back too.
        self._free_head = 0
        self._next = 0  # next unused struct in the newest chunk
        self._end = 0
        self.live: dict[int, MSpan] = {}  # struct address -> wrapper, for live spans

    @property
    def inuse(self) -> int:
        return len(self.live)

    def alloc(self) -> MSpan:
        if self._free_head:
            addr = self._free_head
            self._free_head = _native.ffi_addr(_native.span_at(addr).next)
        else:
            if self._next + self.size > self._end:
                n = self.sysmem.round_up(self.CHUNK)
                v = self.sysmem.sys_alloc(n, "mspan_sys")
                self.chunks.append((v, n))
                self._next, self._end = v, v + n
            addr = self._next
            self._next += self.size
        s = self.live[addr] = MSpan(addr)
        return s

    def free(self, s: MSpan) -> None:
        """Return a struct; it is marked DEAD so stale spans-table entries read as dead."""
        s.state = SpanState.DEAD
        s.released = []
        del self.live[s.addr]
        s._c.next = _native.span_at(self._free_head) if self._free_head else _native.NULL_SPAN
        self._free_head = s.addr

    def compact(self) -> None:
        """Rebuild the live map: a dict keeps its largest table after deletions."""
        live = dict(self.live)
        self.live.clear()
        self.live.update(live)

    def release_all(self) -> None:
        for v, n in self.chunks:
            self.sysmem.sys_free(v, n, "mspan_sys")
        self.chunks.clear()
        self._free_head = 0
        self._next = self._end = 0
        self.live.clear()


class LargeFree:
    """Free spans of >= MAX_MHEAP_LIST pages keyed by (npages, start page).

    A sorted list of sorted buckets (at most ``LOAD`` keys each) and, per
    bucket, its largest key for the outer bisect."""

    LOAD = 512
    _SHIFT = 64  # key = npages << 64 | page number: one int compare orders both

    def __init__(self) -> None:
        self._buckets: list[list[int]] = []
        self._maxes: list[int] = []
        self._spans: dict[int, MSpan] = {}

    @classmethod
    def key(cls, s: MSpan) -> int:
        return (s.npages << cls._SHIFT) | (s.start >> PAGE_SHIFT)

    def __len__(self) -> int:
        return len(self._spans)

    def __iter__(self) -> Iterator[MSpan]:
        return iter(list(self._spans.values()))

    def __contains__(self, s: MSpan) -> bool:
        return self._spans.get(self.key(s)) is s

    def insert(self, s: MSpan) -> None:
        k = self.key(s)
        if k in self._spans:
            throw(f"LargeFree.insert: {s!r} already listed")
        self._spans[k] = s
        if not self._buckets:
            self._buckets.append([k])
            self._maxes.append(k)
            return
        i = min(bisect.bisect_left(self._maxes, k), len(self._buckets) - 1)
        b = self._buckets[i]
        bisect.insort(b, k)
        self._maxes[i] = b[-1]
        if len(b) > 2 * self.LOAD:
            self._buckets[i : i + 1] = [b[: self.LOAD], b[self.LOAD :]]
            self._maxes[i : i + 1] = [b[self.LOAD - 1], b[-1]]

    def remove(self, s: MSpan) -> None:
        k = self.key(s)
        if self._spans.pop(k, None) is not s:
            throw(f"LargeFree.remove: {s!r} is not listed")
        i = bisect.bisect_left(self._maxes, k)
        b = self._buckets[i]
        del b[bisect.bisect_left(b, k)]
        if b:
            self._maxes[i] = b[-1]
        else:
            del self._buckets[i]
            del self._maxes[i]

    def best_fit(self, npages: int) -> MSpan | None:
        """The smallest span of at least npages pages, lowest address on ties."""
        k = npages << self._SHIFT
        i = bisect.bisect_left(self._maxes, k)
        if i == len(self._buckets):
            return None
        b = self._buckets[i]
        return self._spans[b[bisect.bisect_left(b, k)]]
