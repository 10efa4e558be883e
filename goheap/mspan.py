"""MSpan: a run of heap pages, and the two structures that hold spans.

See goheap/malloc.py for the overview.

Vocabulary:
- *span*: ``[start, start + npages * PAGE_SIZE)``, heap-page aligned.  Its fields
  live in a C ``gh_mspan`` struct (so the C fast path can reach a span from the
  spans table without Python); ``MSpan`` wraps that struct and adds the page
  heap's own bookkeeping (released OS pages, idle time).
- ``SpanAlloc``: Go's FixAlloc for span structs, carving them from chunks of OS
  memory charged to ``mspan_sys``.  Chunks stay mapped until the heap closes:
  the spans table may still hold stale pointers to dead structs (a free span
  maps only its first and last page), and C must always be able to read them.
  OS pages holding only dead structs are given back by scavenge() (zeroed
  first: an all-zero struct describes no extent) and read as zero after.
- ``LargeFree``: the free spans of MAX_MHEAP_LIST pages or more, ordered by
  (npages, start) for best fit with the lowest address on ties.  Go 2014 scanned
  a list; this is a bucketed sorted list, so the search is O(log n) and an insert
  or removal moves at most one bucket (O(sqrt n) words, memmove-fast).

Invariants:
- ``released`` holds disjoint, OS-page-aligned ranges inside the span that are
  in the Prepared state (given back with sys_unused); ``npreleased_bytes`` is
  their total.  Only a FREE span has released ranges.
- A struct is allocated in SpanAlloc while its span is not DEAD (or while C
  holds it as a spare); a FREE span's MSpan is the one object on the free
  lists, any other span's MSpan is made on demand and holds nothing of its own.
"""

from __future__ import annotations

import bisect
import enum
from collections.abc import Iterator
from typing import Any

from goheap import _native
from goheap.errors import OutOfMemory, throw
from goheap.mem import SysMemory

PAGE_SHIFT = _native.PAGE_SHIFT
PAGE_SIZE = _native.PAGE_SIZE


class SpanState(enum.IntEnum):
    IN_USE = _native.MSPAN_IN_USE
    FREE = _native.MSPAN_FREE
    LIST_HEAD = _native.MSPAN_LIST_HEAD
    DEAD = _native.MSPAN_DEAD
    FAULTED = _native.MSPAN_FAULTED  # goheap: efence span whose object was freed
    CACHED = _native.MSPAN_CACHED  # goheap: freed large span kept by C (cut, coalesced)


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
        c.undropped = 0
        c.marked = 0
        c.next = c.prev = _native.NULL_SPAN
        self.released = []
        self.unusedsince = 0.0

    def __repr__(self) -> str:
        return (
            f"MSpan({self.start:#x}+{self.npages}p {SpanState(self.state).name} "
            f"class={self.sizeclass} ref={self.ref})"
        )


class SpanAlloc:
    """Go's FixAlloc for span structs.  The caller holds the heap lock.

    Which structs are allocated is one bit per struct (``_used``, an int per
    chunk), not a Python object per struct: MHeap makes the MSpan wrapper of
    a span when it needs one (MHeap.span_of) and keeps only those of free
    spans, so a heap of many large objects costs Python no memory per object,
    and nothing Python allocated for them is left behind in its arenas once
    they are freed.  A free struct is reused lowest address first, so live
    structs stay packed at the front and ``release_unused`` can give whole OS
    pages of dead ones back (issue 13: after scavenge() nothing stays resident
    for free spans)."""

    CHUNK = 64 << 10

    def __init__(self, sysmem: SysMemory) -> None:
        self.sysmem = sysmem
        self.size = _native.SPAN_STRUCT_SIZE
        self.chunks: list[tuple[int, int]] = []
        self._used: list[int] = []  # per chunk: bit i = struct i is allocated
        self._released: list[int] = []  # per chunk: bit j = OS page j is given back
        self._bases: list[int] = []  # chunk starts, sorted, with their index
        self._index: list[int] = []
        self._hint = 0  # no chunk before this one has a free struct
        self.inuse = 0

    def _nstructs(self, ci: int) -> int:
        return self.chunks[ci][1] // self.size

    def _locate(self, addr: int) -> tuple[int, int] | None:
        """(chunk index, struct index) of struct address addr, or None."""
        k = bisect.bisect_right(self._bases, addr) - 1
        if k < 0:
            return None
        ci = self._index[k]
        v, _ = self.chunks[ci]
        i, rem = divmod(addr - v, self.size)
        if rem or i >= self._nstructs(ci):
            return None
        return ci, i

    def is_live(self, addr: int) -> bool:
        """Whether addr is an allocated struct (a live span's, or a spare)."""
        at = self._locate(addr)
        return at is not None and bool(self._used[at[0]] >> at[1] & 1)

    def alloc(self) -> MSpan:
        """A struct for a new span (fields as they were: the caller inits)."""
        return MSpan(self._alloc_addr())

    def alloc_addrs(self, n: int) -> list[int]:
        """n structs' addresses, no wrapper made (C inits them: efence's
        carve); all or none (OutOfMemory)."""
        got: list[int] = []
        try:
            while len(got) < n:
                got.append(self._alloc_addr())
                # The rest from the same chunk's free bits at once, unless some
                # of its pages were given back (_alloc_addr takes them back).
                ci = self._hint
                if self._released[ci]:
                    continue
                v, used = self.chunks[ci][0], self._used[ci]
                free = ~used & ((1 << self._nstructs(ci)) - 1)
                if free:
                    # Structs are taken lowest first, so the free ones are
                    # mostly one run: take as much of it as is wanted at once.
                    i = (free & -free).bit_length() - 1
                    k = min(n - len(got), (free >> i ^ (free >> i) + 1).bit_length() - 1)
                    run = ((1 << k) - 1) << i
                    used |= run
                    free &= ~run
                    got.extend(range(v + i * self.size, v + (i + k) * self.size, self.size))
                    self.inuse += k
                while free and len(got) < n:
                    low = free & -free
                    free ^= low
                    used |= low
                    got.append(v + (low.bit_length() - 1) * self.size)
                    self.inuse += 1
                self._used[ci] = used
        except BaseException:
            for addr in got:
                self.free(MSpan(addr))
            raise
        return got

    def _alloc_addr(self) -> int:
        for ci in range(self._hint, len(self.chunks)):
            free = ~self._used[ci] & ((1 << self._nstructs(ci)) - 1)
            if free:
                i = (free & -free).bit_length() - 1
                break
        else:
            n = self.sysmem.round_up(self.CHUNK)
            v = self.sysmem.sys_alloc(n, "mspan_sys")
            self.chunks.append((v, n))
            self._used.append(0)
            self._released.append(0)
            k = bisect.bisect_left(self._bases, v)
            self._bases.insert(k, v)
            self._index.insert(k, len(self.chunks) - 1)
            ci, i = len(self.chunks) - 1, 0
        self._hint = ci
        addr = self.chunks[ci][0] + i * self.size
        if self._released[ci]:
            self._reuse(ci, addr)
        self._used[ci] |= 1 << i
        self.inuse += 1
        return addr

    def _reuse(self, ci: int, addr: int) -> None:
        """Take back (sys_used) the released OS pages struct addr lies on."""
        v, _ = self.chunks[ci]
        ps = self.sysmem.page_size
        for j in range((addr - v) // ps, (addr + self.size - 1 - v) // ps + 1):
            if self._released[ci] >> j & 1:
                self.sysmem.sys_used(v + j * ps, ps)
                self._released[ci] &= ~(1 << j)

    def free(self, s: MSpan) -> None:
        """Return a struct; it is marked DEAD so stale spans-table entries read as dead."""
        at = self._locate(s.addr)
        if at is None or not self._used[at[0]] >> at[1] & 1:
            throw(f"SpanAlloc.free: {s.addr:#x} is not an allocated span struct")
        s.state = SpanState.DEAD
        s.released = []
        ci, i = at
        self._used[ci] &= ~(1 << i)
        self.inuse -= 1
        self._hint = min(self._hint, ci)

    def _structs_on(self, j: int, total: int) -> tuple[int, int]:
        """The first and last struct index touching OS page j of a chunk of
        total structs (first > last: none)."""
        ps = self.sysmem.page_size
        return j * ps // self.size, min(((j + 1) * ps - 1) // self.size, total - 1)

    def release_unused(self) -> int:
        """Give back every whole OS page of the chunks on which no struct is
        allocated; return the bytes newly released.  The dead structs that
        touch such a page are zeroed first, their part on a page that stays
        too: a spans-table entry may still point at a dead struct (a free
        span maps only its ends), and a struct read half as it was and half
        as zero could describe an extent; all zero, it describes none.  All
        zeroing comes before any release (a struct straddling two released
        pages would fault the first back in), and a struct on a page released
        earlier is zero already.  A failed sys_unused keeps its page (advice,
        as scavenging is)."""
        ps, size = self.sysmem.page_size, self.size
        released = 0
        for ci, (v, n) in enumerate(self.chunks):
            total, used, before = self._nstructs(ci), self._used[ci], self._released[ci]
            pages = []
            for j in range(n // ps):
                first, last = self._structs_on(j, total)
                if before >> j & 1 or (
                    first <= last and used >> first & ((2 << (last - first)) - 1)
                ):
                    continue
                pages.append(j)
            for j in pages:
                first, last = self._structs_on(j, total)
                if first <= last and before >> (first * size // ps) & 1:
                    first += 1  # starts on a page released earlier: zero already
                if first <= last and before >> (((last + 1) * size - 1) // ps) & 1:
                    last -= 1  # ends on a page released earlier
                if first <= last:
                    _native.memclr(v + first * size, (last - first + 1) * size)
            for j in pages:
                try:
                    self.sysmem.sys_unused(v + j * ps, ps)
                except (OSError, OutOfMemory):
                    continue
                self._released[ci] |= 1 << j
                released += ps
        return released

    def compact(self) -> None:
        """scavenge()'s last step: the pages of dead structs go back too."""
        self.release_unused()

    def release_all(self) -> None:
        for v, n in self.chunks:
            self.sysmem.sys_free(v, n, "mspan_sys")
        self.chunks.clear()
        self._used.clear()
        self._released.clear()
        self._bases.clear()
        self._index.clear()
        self._hint = 0
        self.inuse = 0


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
