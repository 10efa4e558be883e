"""MHeap: the page heap.  mallocinit's arena layout, growth, span alloc/free, scavenging.

See goheap/malloc.py for the overview.

Layout (mallocinit).  One reservation ``[spans | bitmap | arena]`` plus ``align``
bytes of slack, where ``align = max(PAGE_SIZE, OS page)``: the OS returns
addresses aligned only to its own page, so the start is rounded up to ``align``
(the seed's ``p1``) and ``arena_end`` is where the reservation really ends
(``p + p_size``), not ``arena_start + arena_size``.  The bitmap sits right below
``arena_start`` and is indexed backwards from it; the spans table holds one
8-byte ``gh_mspan*`` per heap page of the arena.  Both are mapped lazily, in
whole OS pages, as ``arena_used`` grows.

32-bit mode simulates Go on a 32-bit machine: bitmap and spans sized for
MAX_ARENA32 (2 GiB), a small initial arena, and growth through ``sys_alloc``
exactly as the seed fixed MHeap_SysAlloc, without Go's holes (a failed or
misplaced reservation never moves arena_end/arena_used backwards or to garbage).
When growth moves the arena, the skipped range becomes a *hole*: inside
``[arena_start, arena_used)`` but not heap memory.

Span allocator.  ``free[n]`` holds free spans of exactly n pages (n < 128), most
recently freed last (LIFO, as Go's list head); ``nonempty_mask`` has bit n set
when ``free[n]`` is non-empty, so the exact-or-larger search is one bit trick.
``freelarge`` holds the rest, best fit with the lowest address on ties.

Invariants (``check()`` re-derives each):
- spans tile ``[arena_start, arena_used)`` minus the holes, without gap or overlap;
- no two free spans are adjacent (free coalesces with both neighbours);
- a free span is on exactly the list its size says, an in-use span on none;
- spans table: an in-use span owns every one of its pages, a free span at least
  its first and last;
- ``heap_sys == heap_idle + heap_inuse``; ``heap_released`` is the sum of the
  free spans' released ranges;
- bitmap and spans mappings cover ``arena_used``.
The caller of every ``*_locked`` method holds ``self.lock``.
"""

from __future__ import annotations

import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

from goheap import _native
from goheap.errors import ArenaFallbackWarning, HeapClosed, HeapCorruption, OutOfMemory, throw
from goheap.mem import SysMemory
from goheap.mspan import LargeFree, MSpan, SpanAlloc, SpanState

PAGE_SHIFT = _native.PAGE_SHIFT
PAGE_SIZE = _native.PAGE_SIZE
MAX_MHEAP_LIST = 1 << (20 - PAGE_SHIFT)  # 128: exact lists for spans under 1 MiB
HEAP_ALLOC_CHUNK = 1 << 20  # grow by at least this much
GROW_ROUND_PAGES = 16  # ... in multiples of 128 KiB
MAX_MEM = 128 << 30  # Go's MaxMem: the default 64-bit arena
MAX_ARENA32 = 2 << 30  # what a 32-bit bitmap and spans table can describe
LCACHE_CAP = 256 << 20  # at most this much freed large memory kept in C
# Spare span structs C holds for cutting a cached span in two; coalescing gives
# one back per join, so a handful covers a burst of allocations between frees.
# Topped up whenever Python allocates a span, taken back with the cache.
LCACHE_SPARES = 8
ARENA32_INITIAL = 512 << 20
ARENA32_GROW = 256 << 20  # 32-bit growth reserves in these units
SCAVENGE_AFTER = 300.0  # seconds a span stays free before it is released (Go: 5 min)
SCAVENGE_TICK = 60.0  # how often the page heap looks (Go's scavenger loop)

MODES = ("64bit", "32bit")


def round_up(n: int, a: int) -> int:
    return -(-n // a) * a


def round_down(n: int, a: int) -> int:
    return n // a * a


class ArenaOwner:
    """Owns what ``close()`` gives back to the OS: the heap's reservations
    (spans table, bitmap, arena) and the span-struct chunks.

    Every export of heap memory (a Block, a ``Heap.ndarray`` array, the
    exporter behind a ``Heap.view()`` memoryview) holds a reference, and so
    does the MHeap until it closes; the memory goes with the last reference
    (``__del__``), never while anything can still reach it.  The lists are the
    MHeap's own, so growth needs no extra bookkeeping."""

    def __init__(self, mem: SysMemory, reservations: list[tuple[int, int]], spanalloc: SpanAlloc):
        self.mem = mem
        self.reservations = reservations
        self.spanalloc = spanalloc

    def unmap(self) -> None:
        """Give everything back; raise the first failure after trying it all.
        Repeating it does nothing."""
        # goheap (issue 8): a failed sys_free must not leak everything after
        # it: free what can be freed, then report the first failure.
        err: BaseException | None = None
        for v, n in self.reservations:
            try:
                self.mem.sys_free(v, n, None)
            except (OSError, OutOfMemory) as e:
                err = err or e
        self.reservations.clear()
        try:
            self.spanalloc.release_all()
        except (OSError, OutOfMemory) as e:
            err = err or e
        if err is not None:
            raise err

    def __del__(self) -> None:
        # The last export is gone (or the heap closed with none alive): nobody
        # can reach the memory, and nobody is left to raise to.
        try:
            self.unmap()
        except Exception:
            pass


class HeapLock:
    """The heap lock (Go's single heap lock): re-entrant, and aware of which
    thread holds it.

    The garbage collector can run a finalizer -- a Block's, an ndarray's -- on
    a thread that is in the middle of a heap operation.  A free re-entering
    there would split or coalesce spans under the outer operation, which
    holds half-updated state.  So a free that finds the lock held by its own
    thread is deferred (``defer``) and runs when the outermost holder lets go,
    between operations.  A malloc cannot wait for its result this way; the
    fast paths in C serve most of them, and the slow path is re-entrant only
    inside check() (Heap._during_check)."""

    __slots__ = ("_deferred", "_depth", "_lock", "_owner")

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._owner = 0
        self._depth = 0
        self._deferred: list[Callable[[], object]] = []

    def acquire(self) -> bool:
        self._lock.acquire()
        self._owner = threading.get_ident()
        self._depth += 1
        return True

    def release(self) -> None:
        self._depth -= 1
        if self._depth:
            self._lock.release()
            return
        self._owner = 0
        todo, self._deferred = self._deferred, []
        self._lock.release()
        for op in todo:
            op()

    __enter__ = acquire

    def __exit__(self, *exc: object) -> None:
        self.release()

    def held_here(self) -> bool:
        return self._owner == threading.get_ident()

    def defer(self, op: Callable[[], object]) -> None:
        """Run op once this thread's outermost hold ends (the caller holds it)."""
        self._deferred.append(op)


class MHeap:
    """The page heap.  Thread-safe through ``lock`` (an RLock shared with the
    object layers above, as Go's single heap lock)."""

    def __init__(
        self,
        sysmem: SysMemory | None = None,
        arena_size: int | None = None,
        mode: str = "64bit",
        scavenge_after: float = SCAVENGE_AFTER,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        if arena_size is not None and (
            isinstance(arena_size, bool) or not isinstance(arena_size, int) or arena_size <= 0
        ):
            raise ValueError(f"arena_size must be a positive int, not {arena_size!r}")
        if mode == "32bit" and arena_size is not None and arena_size > MAX_ARENA32:
            raise ValueError(
                f"arena_size {arena_size} is more than a 32-bit arena can hold "
                f"(MAX_ARENA32 = {MAX_ARENA32})"
            )
        if scavenge_after < 0:
            raise ValueError("scavenge_after must be >= 0 seconds")
        self.mem = sysmem if sysmem is not None else SysMemory()
        self.os_page_size = self.mem.page_size
        # Every region the heap hands out starts on a heap page and on an OS
        # page, so a span can always be given back without touching a neighbour.
        self.align = max(PAGE_SIZE, self.os_page_size)
        self.lock = HeapLock()
        self.clock = clock
        self.scavenge_after = float(scavenge_after)
        self.c: Any = _native.new_mheap()
        self.spanalloc = SpanAlloc(self.mem)
        # struct address -> MSpan of every FREE span (the one on its free list):
        # other spans' MSpans are made on demand (span_of), see mspan.py.
        self.freeobj: dict[int, MSpan] = {}
        self.free: list[dict[int, MSpan]] = [{} for _ in range(MAX_MHEAP_LIST)]
        self.nonempty_mask = 0
        self.freelarge = LargeFree()
        self.heap_sys = 0  # arena bytes mapped (this heap's own count)
        self.slack_sys = 0  # 32-bit last-resort alignment slack, charged to other_sys
        self.heap_inuse = 0
        self.heap_idle = 0
        self.heap_released = 0
        self.reservations: list[tuple[int, int]] = []  # what the owner unmaps
        # None once closed: the memory then lives as long as the exports do.
        self.owner: ArenaOwner | None = ArenaOwner(self.mem, self.reservations, self.spanalloc)
        self.holes: list[tuple[int, int]] = []  # 32-bit: skipped ranges, sorted
        self.closed = False
        # Set by the object layer: gives fully free small spans back to the heap,
        # returning how many (called before growing and by the scavenger tick).
        self.reclaim: Callable[[], int] | None = None
        self.mode = mode
        self.spans_mapped = 0
        self.bitmap_mapped = 0
        self._set_next_scavenge(self.clock() + self._scavenge_tick())
        if mode == "64bit" and self._mallocinit_64(arena_size or MAX_MEM):
            self.arena32 = False
        else:
            if mode == "64bit":
                # Like Go, a 64-bit reservation that cannot be had (ulimit -v)
                # falls back to the 32-bit layout instead of failing -- but never
                # silently, and never to less arena than was asked for.
                asked = arena_size or MAX_MEM
                if arena_size is not None and arena_size > MAX_ARENA32:
                    raise OutOfMemory(
                        f"mallocinit: cannot reserve a {asked}-byte 64-bit arena, and the "
                        f"32-bit layout holds at most {MAX_ARENA32} bytes"
                    )
                warnings.warn(
                    ArenaFallbackWarning(
                        f"mallocinit: cannot reserve a {asked}-byte 64-bit arena; fell back "
                        f"to the 32-bit layout (at most {MAX_ARENA32} bytes of arena)"
                    ),
                    stacklevel=3,
                )
            self.mode = "32bit"
            self.arena32 = True
            self._mallocinit_32(arena_size or ARENA32_INITIAL)

    # ---- mallocinit ----------------------------------------------------------------

    def _mallocinit_64(self, arena_size: int) -> bool:
        align = self.align
        arena_size = round_up(arena_size, align)
        bitmap_size = round_up(arena_size // 16, align)
        spans_size = round_up(arena_size // PAGE_SIZE * 8, align)
        p_size = spans_size + bitmap_size + arena_size + align
        p = None
        for i in range(0x80):
            # Go's hints: 0x00c0 prefixes are not valid UTF-8 and far from 0xff
            # bytes, which made stale pointers easy to spot in a dump.
            hint = i << 40 | 0x00C0 << 32
            try:
                p = self.mem.sys_reserve(hint, p_size, exact=True)
                break
            except OutOfMemory:
                break  # the size is the problem, not the place
            except OSError:
                continue
        if p is None:
            try:
                p = self.mem.sys_reserve(0, p_size)
            except OutOfMemory:
                return False
        self.reservations.append((p, p_size))
        self._set_layout(p, p + p_size, spans_size, bitmap_size)
        self.bitmap_size, self.spans_size = bitmap_size, spans_size
        return True

    def _mallocinit_32(self, arena_size: int) -> None:
        align = self.align
        bitmap_size = round_up(MAX_ARENA32 // 16, align)
        spans_size = round_up(MAX_ARENA32 // PAGE_SIZE * 8, align)
        initial = min(round_up(arena_size, align), MAX_ARENA32)
        # The kernel puts an unhinted reservation right below the previous
        # mapping, so nothing above it is free.  Go relied on the space above its
        # binary; goheap reserves the whole 2 GiB window and gives back its top,
        # so growth at arena_end has room until something else moves in.
        window = spans_size + bitmap_size + MAX_ARENA32 + align
        try:
            p = self.mem.sys_reserve(0, window)
            p_end = p + window
        except OutOfMemory:
            p = None
        if p is not None:
            arena_start = round_up(p, align) + spans_size + bitmap_size
            keep_end = arena_start + initial
            self.mem.sys_free(keep_end, p_end - keep_end, None)
            p_end = keep_end
        else:
            p_size = spans_size + bitmap_size + initial + align
            p = self.mem.sys_reserve(0, p_size)  # OutOfMemory: nothing left to try
            p_end = p + p_size
        self.reservations.append((p, p_end - p))
        self._set_layout(p, p_end, spans_size, bitmap_size)
        self.bitmap_size, self.spans_size = bitmap_size, spans_size

    def _set_layout(self, p: int, p_end: int, spans_size: int, bitmap_size: int) -> None:
        p1 = round_up(p, self.align)
        self.spans = p1
        self.bitmap = p1 + spans_size
        self.arena_start = p1 + spans_size + bitmap_size
        self.arena_used = self.arena_start
        self.arena_end = p_end
        if self.arena_start & (PAGE_SIZE - 1):
            throw(f"misrounded allocation in mallocinit: arena_start={self.arena_start:#x}")
        self.c.arena_start = self.arena_start
        self.c.arena_used = self.arena_used
        self.c.spans = self.spans

    # ---- growth (MHeap_SysAlloc, MapBits, MapSpans) ----------------------------------

    def _extend_used(self, new_used: int) -> None:
        """Map metadata for, then record, a new arena_used.  Metadata first: if a
        map fails, arena_used is unchanged and a mapped high-water mark ahead of
        it is harmless."""
        self.map_bits(new_used)
        self.map_spans(new_used)
        self.arena_used = new_used
        self.c.arena_used = new_used

    def map_bits(self, used: int) -> None:
        need = round_up((used - self.arena_start) // 16, self.os_page_size)
        if need > self.bitmap_mapped:
            if need > self.bitmap_size:
                throw(f"map_bits: arena_used {used:#x} beyond the bitmap")
            self.mem.sys_map(self.arena_start - need, need - self.bitmap_mapped, "gc_sys")
            self.bitmap_mapped = need

    def map_spans(self, used: int) -> None:
        need = round_up((used - self.arena_start) // PAGE_SIZE * 8, self.os_page_size)
        if need > self.spans_mapped:
            if need > self.spans_size:
                throw(f"map_spans: arena_used {used:#x} beyond the spans table")
            self.mem.sys_map(self.spans + self.spans_mapped, need - self.spans_mapped, "other_sys")
            self.spans_mapped = need

    def sys_alloc(self, n: int) -> int | None:
        """MHeap_SysAlloc: n more bytes of arena (n a multiple of align), or None.
        The caller holds the lock.  Raises OutOfMemory when mapping fails."""
        if n > self.arena_end - self.arena_used and self.arena32:
            self._reserve_more_32(n)
        # goheap: arena_end (the reservation's true end) may lie up to one align
        # past what the bitmap and spans table describe: never grow into that.
        described = self.arena_start + min(self.bitmap_size * 16, self.spans_size // 8 * PAGE_SIZE)
        if n <= min(self.arena_end, described) - self.arena_used:
            p = self.arena_used
            self.map_bits(p + n)
            self.map_spans(p + n)
            self.mem.sys_map(p, n, "heap_sys")
            self.heap_sys += n
            self._extend_used(p + n)
            if p & (PAGE_SIZE - 1):
                throw(f"misrounded allocation in MHeap_SysAlloc: {p:#x}")
            return p
        if not self.arena32:
            return None  # the 64-bit reservation is all there is
        return self._sys_alloc_anywhere_32(n)

    def _reserve_more_32(self, n: int) -> None:
        p_size = round_up(n + self.align, ARENA32_GROW)
        window_end = self.arena_start + MAX_ARENA32
        if self.arena_end + p_size > window_end:
            # goheap: Go gave up here and went to SysAlloc anywhere, which near
            # the top of the window lands misaligned and leaves a hole per call.
            # Take what is left of the window instead, if n fits in it.
            p_size = round_down(window_end - self.arena_end, self.align)
            if p_size <= 0 or p_size + (self.arena_end - self.arena_used) < n:
                return
        new_end = self.arena_end + p_size
        p = None
        try:
            p = self.mem.sys_reserve(self.arena_end, p_size, exact=True)
        except FileExistsError:
            # Someone lives at arena_end: ask anywhere, as Go's SysReserve hint did.
            try:
                p = self.mem.sys_reserve(self.arena_end, p_size)
            except (OSError, OutOfMemory):
                return
        except (OSError, OutOfMemory):
            # goheap (issue 8): ENOMEM (OutOfMemory) too: sys_alloc may still
            # find the n bytes that a 256 MiB reservation could not.
            return
        self.reservations.append((p, p_size))
        if p == self.arena_end:
            self.arena_end = new_end
        elif p >= self.arena_used and p + p_size <= self.arena_start + MAX_ARENA32:
            # Keep everything heap-page and OS-page aligned: our pages are
            # bigger than the OS's.  The rest of the old reservation is abandoned.
            start = round_up(p, self.align)
            # goheap (issue 8): map first, record the hole after, so a failed
            # metadata map leaves no hole beyond arena_used.
            old_used = self.arena_used
            self._extend_used(start)
            self._add_hole(old_used, start)
            self.arena_end = p + p_size
        else:
            # goheap: Go also accepted a region below arena_used here, which moved
            # arena_used backwards over live spans.
            self.reservations.pop()
            self.mem.sys_free(p, p_size, None)

    def _sys_alloc_anywhere_32(self, n: int) -> int | None:
        p_size = round_up(n, self.align) + self.align
        try:
            p = self.mem.sys_alloc(p_size, "other_sys")
        except (OSError, OutOfMemory):
            return None
        if p < self.arena_start or p + p_size - self.arena_start >= MAX_ARENA32:
            self.mem.sys_free(p, p_size, "other_sys")
            return None
        p_end = p + p_size
        v = round_up(p, self.align)
        if v >= self.arena_used:
            # Metadata first: if its map fails, no book has moved and the
            # region goes back (kept as a reservation if even that fails).
            old_used = self.arena_used
            try:
                self._extend_used(v + n)
            except BaseException:
                try:
                    self.mem.sys_free(p, p_size, "other_sys")
                except (OSError, OutOfMemory):
                    self.reservations.append((p, p_size))
                    self.slack_sys += p_size  # still charged to other_sys
                raise
            self._add_hole(old_used, v)
        else:
            self._fill_hole(v, v + n)
        self.reservations.append((p, p_size))
        # The heap uses [v, v+n); the slack stays charged to other_sys so that
        # heap_sys == heap_idle + heap_inuse keeps holding.
        self.mem.stats["other_sys"] -= n
        self.mem.stats["heap_sys"] += n
        self.heap_sys += n
        self.slack_sys += p_size - n
        self.arena_end = max(self.arena_end, p_end)
        if v & (PAGE_SIZE - 1):
            throw(f"misrounded allocation in MHeap_SysAlloc: {v:#x}")
        return v

    def _add_hole(self, lo: int, hi: int) -> None:
        if hi > lo:
            self.holes.append((lo, hi))
            self.holes.sort()

    def _fill_hole(self, lo: int, hi: int) -> None:
        for i, (a, b) in enumerate(self.holes):
            if a <= lo and hi <= b:
                self.holes[i : i + 1] = [r for r in ((a, lo), (hi, b)) if r[1] > r[0]]
                return
        throw(f"_fill_hole: [{lo:#x}, {hi:#x}) is not inside a hole")

    def grow(self, npage: int) -> None:
        """MHeap_Grow: add at least npage pages of arena as one free span."""
        ask = max(round_up(npage, GROW_ROUND_PAGES), HEAP_ALLOC_CHUNK >> PAGE_SHIFT)
        nbytes = round_up(ask << PAGE_SHIFT, self.align)
        # goheap (issue 8): the span struct comes first.  If its allocation
        # failed after the arena had grown, the new pages would belong to no span.
        s = self.spanalloc.alloc()
        try:
            v = self.sys_alloc(nbytes)
            if v is None:
                nbytes = round_up(npage << PAGE_SHIFT, self.align)
                v = self.sys_alloc(nbytes)
                if v is None:
                    raise OutOfMemory(
                        f"out of memory: cannot allocate {npage << PAGE_SHIFT}-byte block "
                        f"({self.heap_inuse} in use, arena [{self.arena_start:#x}, "
                        f"{self.arena_end:#x}))"
                    )
        except BaseException:
            self.spanalloc.free(s)
            raise
        # Free a fake in-use span so the new memory coalesces through the one path.
        s.init(v, nbytes >> PAGE_SHIFT)
        s.state = SpanState.IN_USE
        _native.spans_set(self.c, v, s.npages, s.handle())
        self.heap_inuse += nbytes
        self.free_span_locked(s)

    # ---- span lists ------------------------------------------------------------------

    def _list_insert(self, s: MSpan) -> None:
        n = s.npages
        if n < MAX_MHEAP_LIST:
            self.free[n][s.addr] = s
            self.nonempty_mask |= 1 << n
        else:
            self.freelarge.insert(s)
        self.freeobj[s.addr] = s

    def _list_remove(self, s: MSpan) -> None:
        n = s.npages
        if n < MAX_MHEAP_LIST:
            d = self.free[n]
            if d.pop(s.addr, None) is not s:
                throw(f"MHeap list remove: {s!r} not on free[{n}]")
            if not d:
                self.nonempty_mask &= ~(1 << n)
        else:
            self.freelarge.remove(s)
        del self.freeobj[s.addr]

    def span_of(self, struct_addr: int) -> MSpan | None:
        """The MSpan of an allocated span struct, or None (0, or a dead struct).
        A free span's is the one on its free list, which carries the released
        ranges and idle time; any other's is made now, as all of its state
        lives in the C struct."""
        if not struct_addr:
            return None
        s = self.freeobj.get(struct_addr)
        if s is not None:
            return s
        return MSpan(struct_addr) if self.spanalloc.is_live(struct_addr) else None

    def lookup(self, v: int) -> MSpan | None:
        """MHeap_LookupMaybe: the in-use (or faulted) span containing v, or None."""
        if not self.arena_start <= v < self.arena_used:
            return None
        s = self.span_of(_native.spans_get(self.c, v))
        if s is None or s.state not in (SpanState.IN_USE, SpanState.FAULTED):
            return None
        return s if s.start <= v < s.end else None

    # ---- alloc -----------------------------------------------------------------------

    def alloc_span_locked(self, npage: int, grow_ahead: int = 0) -> MSpan:
        """MHeap_AllocLocked: an IN_USE span of exactly npage pages, every page
        mapped to it in the spans table, sizeclass 0.  Raises OutOfMemory.
        grow_ahead: if the heap must grow, by at least this many pages (a
        caller that will come back for more, as efence's batches do)."""
        if npage <= 0:
            throw(f"alloc_span_locked: npage {npage}")
        self._maybe_scavenge()
        s = self._find(npage)
        if s is None and self.reclaim is not None and self.reclaim():
            s = self._find(npage)  # Go's MHeap_Reclaim: empty small spans came back
        if s is None and 2 * int(self.c.lcache_bytes) >= int(self.c.lcache_limit) > 0:
            # The cache costs at most lcache_limit of idle memory; growing beside
            # a cache past half of that would let idle memory build up, so its
            # spans go back first (coalesced, they may fit).  Below it the heap
            # grows, as Go's does beside its own idle spans, and the cache keeps
            # serving the sizes it holds from C.
            self.flush_lcache_locked()
            s = self._find(npage)
        if s is None:
            try:
                self.grow(max(npage, grow_ahead))
            except OutOfMemory:
                if grow_ahead <= npage:
                    raise
                self.grow(npage)  # the arena's end is near: just what was asked
            # goheap: Go searched only freelarge again, missing a small grow.
            s = self._find(npage)
            if s is None:
                throw(f"alloc_span_locked: no span of {npage} pages after growing")
        s = self._have_span(s, npage)
        self._lend_spares()
        return s

    def _lend_spares(self) -> None:
        """Top C's spare span structs up to LCACHE_SPARES (a cut in C needs one).
        Advice: without a struct to spare, C's cuts miss to Python."""
        if not int(self.c.lcache_limit):
            return
        try:
            for _ in range(LCACHE_SPARES - int(self.c.lcache_nspare)):
                t = self.spanalloc.alloc()
                t.init(0, 0)
                _native.lcache_spare_put(self.c, t.handle())
        except (OutOfMemory, OSError):
            pass

    def alloc_span_aligned_locked(self, npage: int, align: int, grow_ahead: int = 0) -> MSpan:
        """An IN_USE span of npage pages whose start is a multiple of ``align``
        bytes (a power of two >= PAGE_SIZE): efence spans must start on an OS
        page.  Over-allocate, then give the misaligned head and the tail back."""
        if align <= PAGE_SIZE:
            return self.alloc_span_locked(npage, grow_ahead)
        extra = align // PAGE_SIZE - 1
        s = self.alloc_span_locked(npage + extra, grow_ahead)
        head = (round_up(s.start, align) - s.start) >> PAGE_SHIFT
        tail = s.npages - npage - head
        if head:
            t = self._split_head(s, head)
            self.free_span_locked(t)
        if tail:
            t = self._split_head(s, npage)
            s, t = t, s
            self.free_span_locked(t)
        return s

    def _split_head(self, s: MSpan, head: int) -> MSpan:
        """Cut the first ``head`` pages of IN_USE s into a new IN_USE span, which is
        returned; s keeps the rest.  Both own all their pages in the spans table."""
        t = self.spanalloc.alloc()
        t.init(s.start, head)
        t.state = SpanState.IN_USE
        t.needzero = s.needzero
        t.elemsize = t.nbytes
        t.base = t.start
        t.limit = t.end
        s.start = s.start + (head << PAGE_SHIFT)
        s.npages -= head
        s.elemsize = s.nbytes
        s.base = s.start
        s.limit = s.end
        _native.spans_set(self.c, t.start, t.npages, t.handle())
        return t

    def _find(self, npage: int) -> MSpan | None:
        if npage < MAX_MHEAP_LIST:
            mask = self.nonempty_mask >> npage
            if mask:
                n = npage + (mask & -mask).bit_length() - 1
                d = self.free[n]
                return d[next(reversed(d))]  # the most recently freed
        return self.freelarge.best_fit(npage)

    def _have_span(self, s: MSpan, npage: int) -> MSpan:
        if s.state != SpanState.FREE or s.npages < npage:
            throw(f"MHeap_AllocLocked - MSpan not free: {s!r}, want {npage} pages")
        # Take back the released OS pages the allocation will touch; the rest
        # stay released in the tail split off below (an OS page straddling the
        # cut is taken back: the allocated part owns some of it).
        cut = round_up(s.start + (npage << PAGE_SHIFT), self.os_page_size)
        # goheap (issue 8): what can fail (the split's span struct, sys_used) runs
        # before s leaves its list, so OutOfMemory/OSError leaves the heap as it was.
        t = self.spanalloc.alloc() if s.npages > npage else None
        try:
            for lo, n in s.released:
                if min(lo + n, cut) > lo:
                    self.mem.sys_used(lo, min(lo + n, cut) - lo)
        except BaseException:
            if t is not None:
                self.spanalloc.free(t)
            raise
        self._list_remove(s)
        s.state = SpanState.IN_USE  # before the split, so the tail cannot merge back
        self.heap_idle -= s.nbytes
        keep: list[tuple[int, int]] = []
        for lo, n in s.released:
            hi = lo + n
            if min(hi, cut) > lo:
                self.heap_released -= min(hi, cut) - lo
            if hi > cut:
                keep.append((max(lo, cut), hi - max(lo, cut)))
        s.released = []
        if t is not None:
            t.init(s.start + (npage << PAGE_SHIFT), s.npages - npage)
            t.needzero = s.needzero
            t.unusedsince = s.unusedsince
            t.released = keep
            t.state = SpanState.IN_USE
            self.heap_idle += t.nbytes
            s.npages = npage
            _native.spans_set(self.c, t.start, 1, t.handle())
            _native.spans_set(self.c, t.end - PAGE_SIZE, 1, t.handle())
            self._free_locked(t, keep_time=True)
        s.state = SpanState.IN_USE
        s.sizeclass = 0
        s.elemsize = s.nbytes
        s.base = s.start
        s.limit = s.end
        s.ref = 0
        s.freelist = 0
        self.heap_inuse += s.nbytes
        _native.spans_set(self.c, s.start, s.npages, s.handle())
        return s

    # ---- free ------------------------------------------------------------------------

    def free_span_locked(self, s: MSpan) -> None:
        """MHeap_FreeLocked: s (IN_USE or FAULTED, no live object) becomes free and
        coalesces with both neighbours."""
        if s.state not in (SpanState.IN_USE, SpanState.FAULTED) or (
            s.sizeclass != 0 and s.ref != 0
        ):
            throw(f"MHeap_FreeLocked - invalid free: {s!r}")
        self.heap_inuse -= s.nbytes
        self.heap_idle += s.nbytes
        self._maybe_scavenge()
        self._free_locked(s, keep_time=False)

    def _free_locked(self, s: MSpan, keep_time: bool) -> None:
        s.state = SpanState.FREE
        s.sizeclass = 0
        s.freelist = 0
        s.limit = 0
        s.ref = 0
        if not keep_time:
            s.unusedsince = self.clock()
        if s.start > self.arena_start:
            t = self.span_of(_native.spans_get(self.c, s.start - PAGE_SIZE))
            if t is not None and t.state == SpanState.FREE and t.end == s.start:
                self._list_remove(t)
                s.start = t.start
                s.npages += t.npages
                self._absorb(s, t)
        if s.end < self.arena_used:
            t = self.span_of(_native.spans_get(self.c, s.end))
            if t is not None and t.state == SpanState.FREE and t.start == s.end:
                self._list_remove(t)
                s.npages += t.npages
                self._absorb(s, t)
        _native.spans_set(self.c, s.start, 1, s.handle())
        _native.spans_set(self.c, s.end - PAGE_SIZE, 1, s.handle())
        self._list_insert(s)

    def _absorb(self, s: MSpan, t: MSpan) -> None:
        s.released = sorted(s.released + t.released)
        s.needzero = s.needzero or t.needzero
        self.spanalloc.free(t)

    # ---- scavenging ------------------------------------------------------------------

    def _scavenge_tick(self) -> float:
        return min(SCAVENGE_TICK, max(self.scavenge_after / 2, 0.001))

    def _set_next_scavenge(self, t: float) -> None:
        """The scavenger's next tick, told to C too: past it, C's large paths
        defer to Python (a miss), so a workload that stays in C still gives idle
        memory back on time.  C reads CLOCK_MONOTONIC, time.monotonic's clock;
        under another clock (tests) it defers every time."""
        self.next_scavenge = t
        self.c.next_tick_ns = int(t * 1e9) if self.clock is time.monotonic else 0

    def lcache_cap(self) -> int:
        """Bytes of freed large spans C may keep (gh_mheap.lcache_limit):
        enough for a working set of NumPy-sized buffers, small next to the arena.
        Idle either way: the cache goes back to the page heap before it grows,
        at every scavenger tick and on scavenge()."""
        return min((self.arena_end - self.arena_start) // 4, LCACHE_CAP)

    def flush_lcache_locked(self) -> int:
        """Free every span of C's large cache into the page heap, where it
        coalesces, and take C's spare structs back; the number of spans."""
        n = 0
        while True:
            batch = _native.lcache_flush(self.c)
            if not batch:
                self._take_spares()
                return n
            for addr in batch:
                s = self.span_of(addr)
                if s is None:
                    throw(f"the large cache held an unknown span struct {addr:#x}")
                self.free_span_locked(s)
            n += len(batch)

    def _take_spares(self) -> None:
        while True:
            batch = _native.lcache_spare_take(self.c)
            if not batch:
                return
            for addr in batch:
                t = self.span_of(addr)
                if t is None or t.state != SpanState.DEAD:
                    throw(f"the large cache gave back a spare that is not a dead struct: {addr:#x}")
                self.spanalloc.free(t)

    def _maybe_scavenge(self) -> None:
        now = self.clock()
        if now >= self.next_scavenge:
            self._set_next_scavenge(now + self._scavenge_tick())
            if self.reclaim is not None:
                self.reclaim()
            self.flush_lcache_locked()
            try:
                self.scavenge_locked(now, self.scavenge_after)
            except (OSError, OutOfMemory):
                # goheap (issue 8): background scavenging is advice.  A failed
                # sys_unused leaves that span unreleased (_release records only
                # success) and the next tick tries again; malloc/free go on.
                pass

    def free_spans(self) -> Iterator[MSpan]:
        for d in self.free:
            yield from list(d.values())
        yield from self.freelarge

    def scavenge_locked(self, now: float, limit: float) -> int:
        """Release every free span idle for at least ``limit`` seconds; return the
        bytes newly released.  Only whole OS pages inside a span are released,
        never one shared with a neighbour (Go #9993)."""
        released = 0
        for s in self.free_spans():
            if now - s.unusedsince >= limit:
                released += self._release(s)
        return released

    def _release(self, s: MSpan) -> int:
        lo = round_up(s.start, self.os_page_size)
        hi = round_down(s.end, self.os_page_size)
        if hi <= lo:
            return 0
        had = s.npreleased_bytes
        if had == hi - lo:
            return 0
        self.mem.sys_unused(lo, hi - lo)
        s.released = [(lo, hi - lo)]
        self.heap_released += hi - lo - had
        for mlo, mhi in self._metadata_pages(s, lo, hi):
            self.mem.sys_unused(mlo, mhi - mlo)
        return hi - lo - had

    def _metadata_pages(self, s: MSpan, lo: int, hi: int) -> list[tuple[int, int]]:
        """The whole OS pages of metadata that describe only [lo, hi) of free span
        s: its GC bitmap (1/16 of the bytes, all zero in a free span) and its
        spans-table entries except the first and last page's, which coalescing
        reads.  Releasing them is what lets RSS return to where it was: a 64 KiB
        object alone dirties a whole 4 KiB bitmap page.  Either content after
        release (zero, or what was there) is correct for them."""
        ps = self.os_page_size
        out = []
        blo = round_up(self.arena_start - (hi - self.arena_start) // 16, ps)
        bhi = round_down(self.arena_start - (lo - self.arena_start) // 16, ps)
        if bhi > blo:
            out.append((blo, bhi))
        first = max(lo, s.start + PAGE_SIZE)
        last = min(hi, s.end - PAGE_SIZE)
        tlo = round_up(self.spans + ((first - self.arena_start) >> PAGE_SHIFT) * 8, ps)
        thi = round_down(self.spans + ((last - self.arena_start) >> PAGE_SHIFT) * 8, ps)
        if thi > tlo:
            out.append((tlo, thi))
        return out

    # ---- consistency -----------------------------------------------------------------

    def walk(self) -> Iterator[MSpan]:
        """Every span in address order (holes skipped)."""
        v = self.arena_start
        holes = iter(self.holes)
        hole = next(holes, None)
        while v < self.arena_used:
            if hole is not None and v == hole[0]:
                v = hole[1]
                hole = next(holes, None)
                continue
            s = self.span_of(_native.spans_get(self.c, v))
            if s is None or s.start != v or s.npages == 0:
                raise HeapCorruption(
                    f"spans do not tile the arena: no span starts at {v:#x} (table says {s!r})"
                )
            yield s
            v = s.end

    def check_locked(self) -> tuple[int, int]:
        """Page-heap invariants; returns (inuse bytes, idle bytes) walked."""
        if self.closed:
            raise HeapClosed("heap is closed")
        inuse = idle = released = nfree = nspans = 0
        prev_free: bool = False
        prev_end = 0
        for s in self.walk():
            nspans += 1
            if s.end > self.arena_used:
                raise HeapCorruption(f"span {s!r} runs past arena_used {self.arena_used:#x}")
            if s.state == SpanState.FREE:
                # goheap (issue 8): only a free neighbour that touches s should
                # have coalesced; walk() skips 32-bit holes, which separate spans.
                if prev_free and prev_end == s.start:
                    raise HeapCorruption(f"free span {s!r} follows another free span")
                listed = (
                    self.free[s.npages].get(s.addr) is s
                    if s.npages < MAX_MHEAP_LIST
                    else s in self.freelarge
                )
                if not listed:
                    raise HeapCorruption(f"free span {s!r} is not on its free list")
                for v in (s.start, s.end - PAGE_SIZE):
                    if _native.spans_get(self.c, v) != s.addr:
                        raise HeapCorruption(f"spans table at {v:#x} does not map free {s!r}")
                for lo, n in s.released:
                    if (
                        lo < s.start
                        or lo + n > s.end
                        or lo % self.os_page_size
                        or n % self.os_page_size
                    ):
                        raise HeapCorruption(f"released range {lo:#x}+{n:#x} outside {s!r}")
                idle += s.nbytes
                released += s.npreleased_bytes
                nfree += 1
            elif s.state in (SpanState.IN_USE, SpanState.FAULTED, SpanState.CACHED):
                bad = _native.spans_mismatch(self.c, s.start, s.npages, s.handle())
                if bad:
                    raise HeapCorruption(f"spans table: {bad} pages of in-use {s!r} map elsewhere")
                if s.released:
                    raise HeapCorruption(f"in-use span {s!r} has released pages")
                inuse += s.nbytes
            else:
                raise HeapCorruption(f"span {s!r} in the arena has state {SpanState(s.state).name}")
            prev_free = bool(s.state == SpanState.FREE)
            prev_end = s.end
        nlisted = sum(len(d) for d in self.free) + len(self.freelarge)
        if nlisted != nfree or len(self.freeobj) != nfree:
            raise HeapCorruption(
                f"free lists hold {nlisted} spans ({len(self.freeobj)} by struct), "
                f"the arena {nfree}"
            )
        nstructs = nspans + int(self.c.lcache_nspare)
        if self.spanalloc.inuse != nstructs:
            raise HeapCorruption(
                f"{self.spanalloc.inuse} span structs allocated for {nspans} spans "
                f"and {int(self.c.lcache_nspare)} spares lent to C"
            )
        for n, d in enumerate(self.free):
            if bool(d) != bool(self.nonempty_mask >> n & 1):
                raise HeapCorruption(f"nonempty_mask bit {n} disagrees with free[{n}]")
            for s in d.values():
                if s.npages != n:
                    raise HeapCorruption(f"{s!r} is on free[{n}]")
        if (idle, inuse, released) != (self.heap_idle, self.heap_inuse, self.heap_released):
            raise HeapCorruption(
                f"page accounting: walked idle={idle} inuse={inuse} released={released}, "
                f"stats idle={self.heap_idle} inuse={self.heap_inuse} "
                f"released={self.heap_released}"
            )
        if self.heap_sys != self.heap_idle + self.heap_inuse:
            raise HeapCorruption(
                f"heap_sys {self.heap_sys} != heap_idle {self.heap_idle} "
                f"+ heap_inuse {self.heap_inuse}"
            )
        used = self.arena_used - self.arena_start
        if self.bitmap_mapped < used // 16 or self.spans_mapped < used // PAGE_SIZE * 8:
            raise HeapCorruption(
                f"metadata does not cover arena_used: bitmap {self.bitmap_mapped:#x} "
                f"spans {self.spans_mapped:#x} for {used:#x} arena bytes"
            )
        if not self.arena_start <= self.arena_used <= self.arena_end:
            raise HeapCorruption(
                f"arena fields out of order: start {self.arena_start:#x} "
                f"used {self.arena_used:#x} end {self.arena_end:#x}"
            )
        return inuse, idle

    # ---- teardown --------------------------------------------------------------------

    def close_locked(self) -> None:
        """Close the heap for C and Python; unmap now unless an export of its
        memory is alive (then the last one unmaps: ArenaOwner).  Raises the
        first failed sys_free of an unmapping done now; the heap is closed all
        the same."""
        if self.closed:
            return
        self.closed = True
        # Under the C lock: a C call running now finishes first, every later
        # one (any thread, GIL or not) sees a closed heap and touches nothing.
        _native.mheap_close(self.c)
        # The reservations go back whole; uncharge what was mapped inside them.
        self.mem.stats["heap_sys"] -= self.heap_sys
        self.mem.stats["gc_sys"] -= self.bitmap_mapped
        self.mem.stats["other_sys"] -= self.spans_mapped + self.slack_sys
        self.free = [{} for _ in range(MAX_MHEAP_LIST)]
        self.freelarge = LargeFree()
        self.freeobj = {}
        self.nonempty_mask = 0
        owner, self.owner = self.owner, None
        # Ours (this frame's and getrefcount's argument) are the only
        # references: no export is alive, so unmap now and let a failure reach
        # the caller instead of dying quietly in __del__.
        if owner is not None and sys.getrefcount(owner) <= 2:
            owner.unmap()
