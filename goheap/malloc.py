"""goheap: the Go runtime's 2014 memory allocator on real memory.  The overview.

Structures, bottom up (one module each):
- ``SysMemory`` (mem.py): the OS, as Go's Sys* primitives, with the region
  states None -> Reserved -> Prepared <-> Ready; wrappable for fault injection.
- ``MHeap`` (mheap.py): the page heap.  One reservation [spans | bitmap | arena]
  made by mallocinit; free spans of 1..127 pages on exact lists, larger ones in a
  best-fit structure; growth through MHeap_SysAlloc; coalescing; scavenging.
- ``MSpan`` (mspan.py): a run of 8 KiB heap pages; its fields live in a C struct
  that the spans table points at, so C finds the span of any address.
- ``MCentral`` (mcentral.py): per size class, spans with and without free objects.
- ``MCache`` (mcache.py, state in C): per size class, the span being allocated from.
- The GC bitmap (mbitmap.py, marking in C): 4 bits per heap word below
  arena_start; *allocated* marks exactly the live objects' first words.
- ``MStats`` (mstats.py): Go's MemStats.

Allocating a small object (<= 32 KiB) walks up a hierarchy of caches:
1. C: round the size up to its class and pop the head of the cached span's free
   list, mark it allocated in the bitmap, count it.  No Python, no lock but the
   heap's spinlock.  This is the whole hot path.
2. If the cached span is empty, Python refills: the span goes back to its
   MCentral, which hands over a span with free objects ...
3. ... or carves a fresh one from MHeap (class_to_allocnpages pages) ...
4. ... and MHeap grows the arena (at least 1 MiB) when no free span fits.

Allocating a large object (> 32 KiB): a span of its own, ceil(size / 8 KiB)
pages, straight from MHeap.

Freeing:
1. C: the bitmap must say "a live object starts here" (else InvalidFree, or
   DoubleFree when it says "a free object starts here"); the spans table gives
   the span; the object is pushed on the span's free list.
2. If that span was full or is now empty and the mcache does not hold it,
   Python moves it between MCentral's lists, or gives it back to MHeap.
3. A large object's span goes back to MHeap, which coalesces it with both
   neighbours; in efence mode it is faulted instead (efence.py).

Growing: MHeap_SysAlloc maps more of the reservation (sys_map), then the bitmap
and spans-table pages that describe it; in 32-bit mode it may reserve more
address space, realigned, as the seed commit fixed it.

Zeroing: memory fresh from the OS is zero and is not cleared again.  A freed
small object keeps the rule "word 1 is zero only if the object is all zero"
(free writes a marker there), so ``malloc(zero=True)`` clears only its link
word unless the object was used before.  Large spans carry ``needzero``.

Thread safety: each C call is atomic (the heap's spinlock); Python's slow paths
hold the heap's RLock.  Locks are re-created in a forked child.
"""

from __future__ import annotations

import functools
import math
import operator
import os
import sys
import threading
import traceback
import weakref
from typing import TYPE_CHECKING, Any

from goheap import _native, debug, mtrace
from goheap import efence as _efence_mod
from goheap.block import Block, new_block, new_ndarray
from goheap.efence import EFence, install_fault_reporter
from goheap.efence import options as efence_options
from goheap.errors import DoubleFree, HeapClosed, HeapCorruption, InvalidFree, OutOfMemory
from goheap.mcache import MCache
from goheap.mcentral import MCentral
from goheap.mem import SysMemory
from goheap.mheap import MAX_ARENA32, HeapLock, MHeap
from goheap.mspan import SpanState
from goheap.mstats import BySize, MStats
from goheap.sizeclasses import (
    MAX_SMALL_SIZE,
    NUM_SIZE_CLASSES,
    PAGE_SIZE,
    class_to_size,
    size_to_class,
    size_to_class8,
    size_to_class128,
)

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "MAX_ARENA32",
    "TRACEMALLOC_DOMAIN",
    "Block",
    "Heap",
    "enable_tracemalloc",
    "install_fault_reporter",
]

TRACEMALLOC_DOMAIN = mtrace.TRACEMALLOC_DOMAIN

_STATUS_LIMIT = _native.STATUS_LIMIT
_MISS = -_native.MISS
_CORRUPT = -_native.ECORRUPT
_mcache_alloc = _native.mcache_alloc
_mcache_alloc_nozero = _native.mcache_alloc_nozero
_mcache_alloc_unsampled = _native.mcache_alloc_unsampled
_mcache_free = _native.mcache_free
_FREED_LARGE = _native.FREED_LARGE
_EBUSY = _native.EBUSY
_EDOUBLE = _native.EDOUBLE
_EINVALID = _native.EINVALID
_EARG = _native.EARG

_live_heaps: weakref.WeakSet[Heap] = weakref.WeakSet()

# malloc(align=): the largest alignment asked of a large span.  Aligning
# over-allocates align - 8 KiB of pages and gives the rest back, so beyond
# this the request is more likely a mistake than a need.
MAX_ALIGN = 1 << 30


def _aligned_classes(align: int) -> tuple[int, ...]:
    """Per size class, the first class at or above it whose size is a
    multiple of align (0: none).  Such a class serves malloc(align=) on the
    fast path: span starts are heap-page aligned and its objects sit at
    multiples of its size, so each one starts on a multiple of align."""
    out, nxt = [0] * NUM_SIZE_CLASSES, 0
    for cl in range(NUM_SIZE_CLASSES - 1, 0, -1):
        if class_to_size[cl] % align == 0:
            nxt = cl
        out[cl] = nxt
    return tuple(out)


_ALIGNED_CLASS = {1 << k: _aligned_classes(1 << k) for k in range(4, PAGE_SIZE.bit_length())}


def _check_align(align: object) -> int:
    if isinstance(align, bool):  # align=True reads as "aligned", which it does not mean
        raise TypeError("align must be an int, not bool")
    if not isinstance(align, int):
        try:
            align = align.__index__()  # type: ignore[attr-defined]
        except AttributeError:
            raise TypeError(f"align must be an int, not {type(align).__name__}") from None
    assert isinstance(align, int)
    if align <= 0 or align & (align - 1):
        raise ValueError(f"align must be a power of two, not {align}")
    if align > MAX_ALIGN:
        raise ValueError(f"align {align}: at most {MAX_ALIGN} (1 GiB)")
    return align


def _after_fork_in_child() -> None:
    # A lock held by another thread at fork time would stay held forever in
    # the child, where that thread does not exist.
    for h in list(_live_heaps):
        h._reinit_locks()


_held_at_fork: list[Heap] = []


def _before_fork() -> None:
    # goheap (issue 8): new locks alone are not enough -- a thread that is in
    # the middle of a slow path at fork time leaves the child a half-updated
    # heap (a span off its list, a counter not yet bumped).  Hold every heap's
    # lock across fork, so the copy is taken between operations.
    _held_at_fork[:] = list(_live_heaps)
    for h in _held_at_fork:
        h._lock.acquire()


def _after_fork_in_parent() -> None:
    for h in _held_at_fork:
        h._lock.release()
    _held_at_fork.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )


def enable_tracemalloc() -> None:
    """Report every heap's malloc and free to tracemalloc under
    TRACEMALLOC_DOMAIN from now on: the heaps alive now and every heap created
    later, as if each had been made with ``Heap(trace=True)``.  tracemalloc
    itself must be tracing (``tracemalloc.start(8)``: see mtrace.py on frames)."""
    mtrace.enabled = True
    for h in list(_live_heaps):
        if not h._closed:
            mtrace.install(h)


def _address(addr: object) -> int | None:
    """addr as an address, or None for an int no address can be (negative, or
    beyond 64 bits): such an int is in no heap.  TypeError if not an int."""
    a = operator.index(addr)  # type: ignore[arg-type]
    return a if 0 <= a < 1 << 64 else None


class Heap:
    """A Go-style heap on its own reservation of address space.

    ``arena_size``: bytes of arena to reserve (default 128 GiB in 64-bit mode,
    512 MiB initial in 32-bit mode); costs address space, not memory.
    ``mode``: "64bit" (one reservation) or "32bit" (Go on a 32-bit machine:
    2 GiB window, growth by MHeap_SysAlloc).  ``efence``: every object on pages
    of its own, faulted when freed (default from GOHEAP_EFENCE=1).  ``guard``,
    ``align``, ``quarantine``: efence options (see efence.py).
    ``efence_sample``: N >= 1 makes about one allocation in N, of any size, an
    efence object with a guard page after it (0 or None: off; default from
    GOHEAP_EFENCE_SAMPLE=N); the others take the normal path at its speed.
    ``quarantine`` then bounds the freed ones kept faulted (default:
    efence.SAMPLE_QUARANTINE_SPANS spans and sample_quarantine_bytes bytes).
    Efence and sampling heaps install the fault reporter
    (``install_fault_reporter``).
    ``scavenge_after``: seconds a free span waits before its pages go back to the
    OS.  ``sysmem``: the OS layer (tests pass a wrapped or simulated one).
    ``trace``: report every malloc/free to tracemalloc under TRACEMALLOC_DOMAIN
    (mtrace.py; also on when ``enable_tracemalloc()`` ran); costs nothing when off.
    """

    def __init__(
        self,
        arena_size: int | None = None,
        mode: str = "64bit",
        efence: bool | None = None,
        scavenge_after: float = 300.0,
        *,
        guard: bool | str = False,
        align: int = 16,
        quarantine: int | None = None,
        sysmem: SysMemory | None = None,
        trace: bool = False,
        efence_sample: int | None = None,
    ) -> None:
        self._closed = True  # until built: __del__ of a half-built Heap has nothing to do
        if efence is None:
            efence = os.environ.get("GOHEAP_EFENCE", "") not in ("", "0")
        # Every argument is checked before the arena is reserved: a refused
        # Heap() leaves no address space behind.
        sample = _efence_mod.sample_rate(efence_sample)
        if efence_sample is None and not efence:
            sample = _efence_mod.sample_rate_from_env(os.environ.get("GOHEAP_EFENCE_SAMPLE", ""))
        if efence and sample:
            raise ValueError(
                "efence_sample is for heaps without efence: efence makes every object one"
            )
        if efence or sample:
            efence_options(guard, align, quarantine)
        if not efence and (guard is not False or align != 16):
            raise ValueError("guard and align are efence options: pass efence=True")
        if not efence and not sample and quarantine is not None:
            raise ValueError("quarantine is an efence option: pass efence=True or efence_sample=N")
        self._h = MHeap(sysmem, arena_size, mode, scavenge_after)
        try:
            self._build(efence, guard, align, quarantine, trace, sample)
        except BaseException:
            with self._h.lock:
                self._h.close_locked()
            raise

    def _build(
        self,
        efence: bool,
        guard: bool | str,
        align: int,
        quarantine: int | None,
        trace: bool,
        sample: int = 0,
    ) -> None:
        self._c: Any = self._h.c
        self._lock = self._h.lock
        self._init_tables()
        self._central = [MCentral(self._h, cl) for cl in range(NUM_SIZE_CLASSES)]
        self._mcache = MCache(self._h, self._central)
        self._h.reclaim = self._reclaim
        self._efence = EFence(self._h, guard, align, quarantine) if efence else None
        self._build_sampler(sample, quarantine)
        _native.fault_register(self._c)  # the reporter names faults in any live heap
        if efence or sample:
            install_fault_reporter()
        # Large objects are counted in C (gh_mheap.nlargealloc ...), where a
        # hit in the large cache counts them without Python.
        self._c.lcache_limit = 0 if efence else self._h.lcache_cap()
        self._c.efence = int(efence)  # realloc's C half moves every efence object
        self._bind_fast_paths()
        if trace or mtrace.enabled:
            mtrace.install(self)  # instance-level wrappers: the class methods stay untraced
        self._closed = False
        _live_heaps.add(self)

    def _build_sampler(self, sample: int, quarantine: int | None) -> None:
        """Sampled efence: an EFence for the sampled objects (guard after them,
        malloc's alignment, a bounded quarantine) and C's countdown."""
        self._sample_rate = sample
        self._sampled = 0  # efence objects made by sampling (stats().efence_sampled)
        self._sampler: EFence | None = None
        if not sample:
            return
        h = self._h
        if quarantine is None:
            quarantine = _efence_mod.sample_quarantine_bytes(h.arena_end - h.arena_start)
        self._sampler = EFence(
            h, "after", 8, quarantine, max_spans=_efence_mod.SAMPLE_QUARANTINE_SPANS, reuse=True
        )
        _native.efence_sample_init(self._c, sample, int.from_bytes(os.urandom(8), "little"))

    def _init_tables(self) -> None:
        c = self._c
        for i, n in enumerate(class_to_size):
            c.class_to_size[i] = n
        for i, cl in enumerate(size_to_class8):
            c.size_to_class8[i] = cl
        for i, cl in enumerate(size_to_class128):
            c.size_to_class128[i] = cl
        c.size_to_class8[0] = size_to_class(0)  # malloc(0): a distinct 8-byte object

    def _bind_fast_paths(self) -> None:
        """Shadow malloc and free with builtin methods over the C fast path
        (goheap/_pyfast.c): one vectorcall per call instead of a Python frame
        plus a cffi call.  They behave exactly as the methods below, which stay
        the documented interface and the reference implementation; anything but
        a plain hit goes to the same slow paths, through weak references so the
        Heap is never kept alive by them."""
        malloc, free, realloc = _native.fast_methods(
            self._c,
            weakref.WeakMethod(self._malloc_slow),
            weakref.WeakMethod(self._free_slow),
            weakref.WeakMethod(self.realloc),  # the class's: realloc's in-place case is C's
        )
        # For malloc(align=) and realloc: the untraced entry points, so that
        # mtrace's wrappers count each object once.
        self._malloc_fast, self._free_fast = malloc, free
        if debug.level >= 3:
            malloc, free, realloc = (self._checked(f) for f in (malloc, free, realloc))
        self.malloc, self.free = malloc, free  # type: ignore[method-assign]
        self.realloc = realloc  # type: ignore[method-assign]

    def _checked(self, call: Any) -> Any:
        """GOHEAP_DEBUG=3: run check() after every malloc and free (O(heap) each)."""
        ref = weakref.ref(self)

        def checked(*args: Any, **kw: Any) -> Any:
            r = call(*args, **kw)
            h = ref()
            if h is not None:
                h.check()
            return r

        checked.__doc__ = call.__doc__
        return checked

    def _reclaim(self) -> int:
        # Only classes that own spans can give one back (an efence heap owns
        # none, and grows for every batch of ready spans).
        return sum(c.reclaim() for c in self._central[1:] if c.spans)

    def _reinit_locks(self) -> None:
        self._checker = 0  # a check() in another thread at fork time never ends here
        self._h.lock = HeapLock()
        self._lock = self._h.lock
        self._c.lock = 0
        self._c.frozen = 0  # a check() in another thread at fork time never ends here

    # ---- read-only arena fields --------------------------------------------------------

    arena_start = property(lambda self: self._h.arena_start, doc="First arena byte.")
    arena_used = property(lambda self: self._h.arena_used, doc="End of the mapped arena.")
    arena_end = property(lambda self: self._h.arena_end, doc="End of the reservation.")
    spans = property(lambda self: self._h.spans, doc="Address of the spans table.")
    bitmap = property(lambda self: self._h.bitmap, doc="Low end of the GC bitmap region.")
    os_page_size = property(lambda self: self._h.os_page_size, doc="The OS page in bytes.")
    mode = property(lambda self: self._h.mode, doc='"64bit", or "32bit" (also after fallback).')
    efence = property(lambda self: self._efence is not None, doc="Whether efence mode is on.")
    efence_sample = property(
        lambda self: self._sample_rate, doc="N of efence_sample=N (0: no sampling)."
    )

    # ---- malloc / free -------------------------------------------------------------------

    def malloc(self, size: int, zero: bool = True, *, align: int | None = None) -> int:
        """Allocate ``size`` bytes; return the address (an int).  8-byte aligned,
        16 for sizes >= 16, 8 KiB for large objects.  ``malloc(0)`` returns a
        distinct address that must be freed like any other.  Raises TypeError
        (not an int), ValueError (negative), OutOfMemory, HeapClosed.

        ``align``: a power of two up to MAX_ALIGN (1 GiB) the address must be a
        multiple of.  Up to the heap page (8 KiB) a small object comes from
        the first size class whose size is a multiple of ``align``, so
        ``usable_size`` may exceed the next class up (``malloc(48, align=64)``
        is a 64-byte object); beyond it the object gets a span of its own
        aligned as asked.  In efence mode ``align`` may reach the efence unit
        (the OS page, at least 8 KiB) and rounds the usable size up to it; it
        is unrelated to ``Heap(efence=True, align=N)``, the heap-wide rounding
        that right-aligns every efence object against its guard."""
        if align is not None:
            return self._malloc_slow(size, zero, 0, align)
        try:
            v = (_mcache_alloc if zero else _mcache_alloc_nozero)(self._c, size)
        except (OverflowError, TypeError):
            v = 0
        if v >= _STATUS_LIMIT:
            return v
        return self._malloc_slow(size, zero, v)

    def _check_size(self, size: object) -> int:
        if isinstance(size, bool) or not isinstance(size, int):
            try:
                size = size.__index__()  # type: ignore[attr-defined]
            except AttributeError:
                raise TypeError(f"malloc size must be an int, not {type(size).__name__}") from None
        assert isinstance(size, int)
        if size < 0:
            raise ValueError(f"malloc size must be >= 0, not {size}")
        return size

    def _malloc_slow(self, size: object, zero: bool, status: int, align: object = None) -> int:
        if self._checker == threading.get_ident():
            again = lambda: self.malloc(size, zero, align=align)  # type: ignore[arg-type]  # noqa: E731
            return int(self._during_check(again))
        n = self._check_size(size)
        a = 1 if align is None else _check_align(align)
        if 8 < a <= PAGE_SIZE and self._efence is None:
            if n <= MAX_SMALL_SIZE:
                n = class_to_size[_ALIGNED_CLASS[a][size_to_class(n)]]
            else:  # the same pages; a sampled object, which ends at its guard, starts on a
                n = -(-n // a) * a
            return int(self._malloc_fast(n, zero))  # large spans start on a heap page
        if self._sampler is not None and a <= self._sampler.unit:
            # C's countdown drew this one (status != 0: it reached C), or
            # counts it now (status 0: it never did).  Once, here: the tries
            # below ask C without counting again.
            if _native.efence_sample_take(self._c, status == 0):
                v = self._malloc_sampled(n, zero, a)
                if v:
                    return v
        with self._lock:
            if self._closed:
                raise HeapClosed("malloc on a closed heap")
            # A 32-bit arena grows (MHeap_SysAlloc) up to MAX_ARENA32, so its
            # current reservation is not the limit there (issue 8: a 3 MiB malloc
            # on a 2 MiB initial 32-bit arena was refused without trying).
            limit = MAX_ARENA32 if self._h.arena32 else self._h.arena_end - self._h.arena_start
            slack = a - PAGE_SIZE if a > PAGE_SIZE else 0  # alloc_span_aligned_locked's
            if n + slack > limit or n >= 1 << 62:
                raise OutOfMemory(f"malloc({n}): larger than the arena ({limit} bytes)")
            if self._efence is not None:
                if a > self._efence.unit:
                    raise ValueError(
                        f"align {a}: efence objects align to at most the efence unit "
                        f"({self._efence.unit} bytes)"
                    )
                v, nbytes = self._efence.alloc(n, zero, a)
                _native.large_account(self._c, 1, nbytes, 0, 0)
                return v
            if n > MAX_SMALL_SIZE or a > PAGE_SIZE:
                return self._malloc_large(n, zero, a)
            if status == _CORRUPT:
                self._raise_corrupt(n)
            cl = size_to_class(n)
            v = _mcache_alloc_unsampled(self._c, n, zero)  # another thread may have refilled
            if v < _STATUS_LIMIT and v != _CORRUPT:
                self._mcache.refill(cl)
                v = _mcache_alloc_unsampled(self._c, n, zero)
            if v == _CORRUPT:
                self._raise_corrupt(n)
            if v < _STATUS_LIMIT:
                raise HeapCorruption(f"malloc({n}): refill of class {cl} gave no object")
            return v

    def _malloc_sampled(self, n: int, zero: bool, a: int) -> int:
        """A sampled efence object of n bytes, aligned as malloc aligns (or to
        a), or 0 if it cannot be had: then the normal path serves the
        allocation (and names the error if there is one)."""
        with self._lock:
            if self._closed:
                raise HeapClosed("malloc on a closed heap")
            assert self._sampler is not None
            if n > self._h.arena_end - self._h.arena_start:
                return 0
            try:
                v, nbytes = self._sampler.alloc(n, zero, a if a > 1 else 16 if n >= 16 else 8)
            except OutOfMemory:
                return 0  # GWP-ASan's rule: a sample the pool cannot hold is lost
            _native.large_account(self._c, 1, nbytes, 0, 0)
            self._sampled += 1
            return v

    def _raise_corrupt(self, n: int) -> None:
        cl = size_to_class(n)
        s = self._h.span_of(_native.ffi_addr(self._c.alloc[cl]))
        raise HeapCorruption(
            f"malloc({n}): the free list of class {cl} links outside its span {s!r} "
            "(a write into freed memory?); the object was not handed out"
        )

    def _malloc_large(self, n: int, zero: bool, align: int = PAGE_SIZE) -> int:
        h = self._h
        npages = max(1, math.ceil(n / PAGE_SIZE))
        s = h.alloc_span_aligned_locked(npages, align)
        s.elemsize = s.nbytes
        s.ref = 1
        _native.bitmap_set(self._c, s.start, _native.BIT_ALLOCATED, _native.BIT_BOUNDARY)
        if zero and s.needzero:
            _native.memclr(s.start, s.nbytes)
        s.needzero = True
        _native.large_account(self._c, 1, s.nbytes, 0, 0)
        return s.start

    def free(self, v: int) -> None:
        """Free the object starting at v.  InvalidFree if v is not the start of a
        live object (DoubleFree if it is a freed one); nothing changes then.
        A stale address that has since been handed out again is, to the heap,
        the new object: freeing it frees the new object."""
        try:
            st = _mcache_free(self._c, v)
        except (OverflowError, TypeError):
            st = _EINVALID if isinstance(v, int) else None
        if st == 0:
            return
        self._free_slow(v, st)

    def _free_slow(self, v: Any, st: int | None) -> None:
        if st is None:
            raise TypeError(f"free() takes an int address, not {type(v).__name__}")
        v = v.__index__()  # numpy.uint64 and friends: C took them as ints too
        if self._closed:
            raise HeapClosed("free on a closed heap")
        if self._checker == threading.get_ident():
            self._during_check(lambda: self.free(v))
            return
        if st == _EBUSY:
            with self._lock:  # check() froze the fast path; it is done once we hold the lock
                st = _mcache_free(self._c, v)
            if st == 0:
                return
        if st == _EARG:
            raise HeapClosed("free on a closed heap")
        reshapes = st > 0 or (st == _EINVALID and self._efence is not None and v & 7)
        if reshapes and self._lock.held_here():
            # A finalizer the GC ran inside one of this thread's heap operations:
            # the page heap changes between operations, not in the middle of one
            # (HeapLock).  A verdict that changes nothing is given at once.
            self._lock.defer(functools.partial(self._deferred_free, v))
            return
        marked = False
        if st == _EINVALID and self._efence is not None and v & 7:
            with self._lock:  # efence align < 8: objects C cannot see (efence.py)
                st = self._efence.free_unaligned(v)
                marked = True
        if st == _EDOUBLE:
            raise DoubleFree(f"free({v:#x}): double free of an object")
        if st == _EINVALID:
            raise InvalidFree(f"free({v:#x}): not the start of a live object")
        if st < 0:
            raise HeapCorruption(f"free({v:#x}): the heap's metadata disagrees (status {st})")
        with self._lock:
            h = self._h
            if st & _FREED_LARGE:
                s = h.lookup(v)
                if s is None or s.sizeclass != 0 or s.base != v:
                    if self._efence is not None and self._efence.refuse_word_free(s, v):
                        raise InvalidFree(f"free({v:#x}): not the start of a live object")
                    if not marked and _native.large_free(self._c, v) in (_EDOUBLE, _EINVALID):
                        # C saw a live large object, but another thread's free of
                        # it took the lock first: what is left is a double free.
                        raise DoubleFree(f"free({v:#x}): double free of an object")
                    raise HeapCorruption(f"free({v:#x}): bitmap says large object, span {s!r}")
                if not marked:
                    # C only looked; mark it now, under the lock, so that a racing
                    # second free of v is a DoubleFree and check() never sees a
                    # span half freed.
                    st = _native.large_free(self._c, v)
                    if st == _EDOUBLE:
                        raise DoubleFree(f"free({v:#x}): double free of an object")
                    if st == _EINVALID:
                        raise InvalidFree(f"free({v:#x}): not the start of a live object")
                if self._efence is not None:
                    self._efence.free(s)  # on failure the object stays live
                elif self._sampler is not None and self._sampler.holds(s):
                    self._sampler.free(s)  # a sampled efence object: faulted, quarantined
                else:
                    _native.bitmap_set(self._c, v, 0, _native.BIT_BOUNDARY)
                    h.free_span_locked(s)
                _native.large_account(self._c, 0, 0, 1, s.elemsize)
                return
            raise HeapCorruption(f"free({v:#x}): unknown status {st} from the fast path")

    def realloc(self, v: int, size: int) -> int:
        """Resize the object at v to ``size`` bytes; return its address, v or a
        new one.  The first min(usable size, size) bytes are kept and any bytes
        past the old usable size read as zero.  It stays where it is when
        ``size`` is of its size class, or, for a large object, when its span
        holds ``size`` and ``size`` needs more than half of it (a larger waste
        is given back by moving); else it moves (malloc, copy, free).  A moved
        object has malloc's default alignment.  An efence object always moves,
        and the old one is faulted as a free would.  InvalidFree or DoubleFree
        for an address ``free`` would refuse, TypeError, ValueError or
        OutOfMemory for a bad size: nothing changes then."""
        n = self._check_size(size)
        a = _address(v)
        if self._closed:
            raise HeapClosed("realloc on a closed heap")
        if a is None:
            raise InvalidFree(f"realloc({v:#x}): not the start of a live object")
        st, old, cl = _native.object_size(self._c, a)
        if st == _EINVALID and self._efence is not None and a & 7:
            with self._lock:  # efence align < 8: objects C cannot see (efence.py)
                s = self._h.lookup(a)
                if s is not None and s.sizeclass == 0 and s.base == a:
                    st = _EDOUBLE if s.state == SpanState.FAULTED else 0
                    old, cl = s.elemsize, 0
        if st == _EDOUBLE:
            raise DoubleFree(f"realloc({a:#x}): the object was freed")
        if st == _EINVALID:
            raise InvalidFree(f"realloc({a:#x}): not the start of a live object")
        if st != 0:
            raise HeapCorruption(f"realloc({a:#x}): the heap's metadata disagrees (status {st})")
        if self._efence is None:
            if cl and n <= MAX_SMALL_SIZE and size_to_class(n) == cl:
                return a
            if not cl and n <= old and 2 * math.ceil(n / PAGE_SIZE) > old // PAGE_SIZE:
                return a
        w = int(self._malloc_fast(n))
        _native.memmove(w, a, min(old, n))
        try:
            self._free_fast(a)
        except BaseException:
            self._free_fast(w)
            raise
        return w

    def _deferred_free(self, v: int) -> None:
        # A finalizer's free, run after the operation it interrupted: nobody to
        # raise to, as in a finalizer.  A stale or closed address is what a
        # finalizer may meet; anything else is printed, as Python prints an
        # exception raised in __del__.
        try:
            self.free(v)
        except (InvalidFree, HeapClosed):
            pass
        except Exception:
            print(f"Exception ignored in goheap's deferred free of {v:#x}:", file=sys.stderr)
            traceback.print_exc()

    # ---- Python-facing objects (block.py) ------------------------------------------------

    def alloc(self, size: int, *, align: int | None = None) -> Block:
        """A Block owning a new zeroed object of ``size`` bytes: a buffer
        (memoryview, bytes, NumPy) freed by ``Block.free()``, ``with``, or when
        the Block is garbage collected.  ``align`` as for ``malloc``."""
        return new_block(self, size, align=align)

    def _owner(self) -> Any:
        """For exports (block.py, view()): the arena owner, which keeps the
        heap's memory mapped while they live.  HeapClosed once closed."""
        owner = self._h.owner
        if owner is None:
            raise HeapClosed("the heap is closed")
        return owner

    def ndarray(
        self, shape: Any, dtype: Any = float, *, order: str = "C", zero: bool = True
    ) -> np.ndarray[Any, Any]:
        """A NumPy array of ``shape`` and ``dtype`` on one goheap object, freed
        when the array and every view of it are gone; zeroed unless
        ``zero=False`` (then it is ``np.empty``).  ``shape`` and ``order``
        ("C" or "F") as ``np.empty`` takes them.  Needs NumPy."""
        return new_ndarray(self, shape, dtype, order=order, zero=zero)

    # ---- queries -----------------------------------------------------------------------

    def lookup(self, addr: int) -> tuple[int, int] | None:
        """(base, size) of the live object containing addr, or None (also for
        an int that is no address at all: negative, or beyond 64 bits)."""
        if self._closed:
            raise HeapClosed("lookup on a closed heap")
        a = _address(addr)
        return None if a is None else _native.mheap_lookup(self._c, a)

    def usable_size(self, v: int) -> int:
        """The size of the object at v: its class size, or its span when large."""
        r = self.lookup(v)
        if r is None or r[0] != v:
            raise InvalidFree(f"usable_size({v:#x}): not the start of a live object")
        return r[1]

    def view(self, v: int, size: int | None = None) -> memoryview:
        """A writable memoryview of ``size`` bytes at v (default: to the object's
        end).  ValueError if the range leaves the live object containing v.
        The view keeps the heap's memory mapped after ``close()`` (see there);
        like any raw address, it must not be used after ``free(v)``."""
        owner = self._owner()  # first: a close() after the lookup cannot unmap under the view
        try:
            r = self.lookup(v)
            if r is None:
                raise ValueError(f"view({v:#x}): not inside a live object")
            base, n = r
            avail = base + n - v
            if size is None:
                size = avail
            if not isinstance(size, int) or size < 0 or size > avail:
                raise ValueError(f"view({v:#x}, {size}): the object [{base:#x}, +{n}) ends first")
            return _native.view(v, size, owner)
        except BaseException:
            # A kept exception must not keep a closed heap mapped through this
            # frame (block.py's new_block says why).
            del owner
            raise

    def explain(self, addr: int) -> str:
        """One line saying what addr is: a live object (base, size), a freed and
        faulted efence object, an efence guard page, a free span, metadata, or
        outside the heap."""
        with self._lock:
            if self._closed:
                raise HeapClosed("explain on a closed heap")
            h = self._h
            a = _address(addr)
            if a is None:
                return f"{addr:#x} is not an address (outside the heap)"
            addr = a
            r = _native.mheap_lookup(self._c, addr)
            if r is not None:
                base, n = r
                return f"{addr:#x} is {addr - base} bytes into live object [{base:#x}, +{n})"
            ef = self._efence or self._sampler
            if ef is not None:
                what = ef.explain(addr)
                if what is not None:
                    return what
            if h.arena_start <= addr < h.arena_used:
                for lo, hi in h.holes:
                    if lo <= addr < hi:
                        return f"{addr:#x} is in a hole the 32-bit arena skipped"
                s = h.span_of(_native.spans_get(self._c, addr))
                s = h.lookup(addr) or next(
                    (t for t in h.free_spans() if t.start <= addr < t.end), s
                )
                if s is not None and s.state == SpanState.CACHED:
                    return (
                        f"{addr:#x} is in a freed large object [{s.start:#x}, {s.end:#x}) "
                        "that the large cache keeps for reuse"
                    )
                if s is not None and s.state == SpanState.FREE:
                    rel = " (released to the OS)" if s.released else ""
                    return f"{addr:#x} is in free span [{s.start:#x}, {s.end:#x}){rel}"
                if s is not None:
                    return f"{addr:#x} is in span [{s.start:#x}, {s.end:#x}) but in no live object"
            if h.spans <= addr < h.spans + h.spans_size:
                return f"{addr:#x} is in the spans table"
            if h.bitmap <= addr < h.arena_start:
                return f"{addr:#x} is in the GC bitmap"
            if h.arena_used <= addr < h.arena_end:
                return f"{addr:#x} is reserved arena not yet in use"
            return f"{addr:#x} is outside the heap"

    def _spans_snapshot(self) -> list[tuple[int, int, str, int, int, int, int]]:
        """For tools (heapmap.py), read-only: every span in address order as
        (start, npages, state name, sizeclass, ref, nelems, released bytes)."""
        with self._lock:
            if self._closed:
                raise HeapClosed("_spans_snapshot on a closed heap")
            return [
                (
                    s.start,
                    s.npages,
                    SpanState(s.state).name,
                    s.sizeclass,
                    s.ref,
                    s.nelems,
                    s.npreleased_bytes,
                )
                for s in self._h.walk()
            ]

    def stats(self) -> MStats:
        """A consistent MemStats snapshot."""
        with self._lock:
            if self._closed:
                raise HeapClosed("stats on a closed heap")
            return self._stats_locked()

    def _stats_locked(self) -> MStats:
        h = self._h
        nm, nf = _native.mcache_counts(self._c)
        small_alloc = sum((nm[c] - nf[c]) * class_to_size[c] for c in range(1, NUM_SIZE_CLASSES))
        small_total = sum(nm[c] * class_to_size[c] for c in range(1, NUM_SIZE_CLASSES))
        c = self._c
        nlargealloc, nlargefree = int(c.nlargealloc), int(c.nlargefree)
        largealloc, largefree = int(c.largealloc), int(c.largefree)
        cached = int(c.lcache_bytes)  # freed large spans C keeps whole: idle, not in use
        cached += int(c.efr_bytes)  # ready efence spans (efence.py): idle until handed out
        heap_alloc = small_alloc + largealloc - largefree
        # Read after the counts: the peak only grows between resets, which
        # take the lock this caller holds, so it is never below heap_alloc.
        _, peak = _native.mheap_peak(c)
        mallocs = sum(nm) + nlargealloc
        frees = sum(nf) + nlargefree
        by_size = tuple(BySize(class_to_size[c], nm[c], nf[c]) for c in range(NUM_SIZE_CLASSES))
        mspan_sys = sum(n for _, n in h.spanalloc.chunks)
        gc_sys, other_sys = h.bitmap_mapped, h.spans_mapped + h.slack_sys
        ef = self._efence or self._sampler
        return MStats(
            alloc=heap_alloc,
            total_alloc=small_total + largealloc,
            sys=h.heap_sys + mspan_sys + gc_sys + other_sys,
            mallocs=mallocs,
            frees=frees,
            heap_alloc=heap_alloc,
            heap_sys=h.heap_sys,
            heap_idle=h.heap_idle + cached,
            heap_inuse=h.heap_inuse - cached,
            heap_released=h.heap_released,
            heap_objects=mallocs - frees,
            mspan_inuse=h.spanalloc.inuse * h.spanalloc.size,
            mspan_sys=mspan_sys,
            gc_sys=gc_sys,
            other_sys=other_sys,
            by_size=by_size,
            efence_faulted=ef.faulted_bytes if ef else 0,
            efence_deleted=ef.deleted if ef else 0,
            efence_sampled=self._sampled + int(self._c.efence_sampled_c),
            os_page_size=h.os_page_size,
            peak_alloc=peak,
        )

    def reset_peak(self) -> int:
        """Start ``stats().peak_alloc`` over from the bytes live now (as
        ``tracemalloc.reset_peak``); return the peak it replaced."""
        with self._lock:
            if self._closed:
                raise HeapClosed("reset_peak on a closed heap")
            return _native.mheap_peak(self._c, reset=True)[1]

    # ---- scavenging, checking, closing --------------------------------------------------

    def scavenge(self) -> int:
        """Give every free span's whole OS pages back to the OS now (Go's
        debug.FreeOSMemory); return the bytes newly released."""
        with self._lock:
            if self._closed:
                raise HeapClosed("scavenge on a closed heap")
            self._mcache.release_all()
            self._reclaim()
            self._h.flush_lcache_locked()
            ef = self._efence or self._sampler
            if ef is not None:
                ef.flush_ready()  # their pages, Ready, would stay resident
                _native.efence_q_drop(self._c)  # freed spans C faulted, pages not dropped yet
            released = self._h.scavenge_locked(math.inf, 0.0)
            self._h.spanalloc.compact()
            return released

    # NumPy's handler capsule for this heap, made once by numpy_handler.py.
    _numpy_handler: Any = None

    # check() on this thread: its thread id, else 0 (see _during_check).
    _checker = 0
    _check_dirty = False
    CHECK_WALKS = 100

    def check(self) -> None:
        """Walk every invariant; raise HeapCorruption naming the first broken one."""
        with self._lock:
            if self._closed:
                raise HeapClosed("check on a closed heap")
            # A finalizer the GC runs inside the walk may malloc or free on this
            # thread; it runs at once (_during_check) and the walk starts over,
            # since what it saw before may no longer hold.  The walk only reads,
            # so starting over is always safe, and each pass can only meet the
            # garbage there is: a heap that changes under every walk is a
            # finalizer that allocates garbage forever.
            for _ in range(self.CHECK_WALKS):
                if self._check_walk_locked():
                    return
            raise RuntimeError(
                f"check(): finalizers changed the heap during each of {self.CHECK_WALKS} walks"
            )

    def _check_walk_locked(self) -> bool:
        """One walk; False if a finalizer changed the heap during it."""
        # Other threads' C fast paths do not take the Python lock: freeze
        # them (they fall back to the slow path, which waits for this lock)
        # so the walk sees one consistent heap.
        self._check_dirty = False
        self._checker = threading.get_ident()
        _native.mheap_freeze(self._c, True)
        try:
            self._check_locked()
        except Exception:
            # Mid-walk, a re-entrant malloc or free can break any rule the
            # walk was checking (or the walk itself); only a clean heap's
            # verdict counts.
            if not self._check_dirty:
                raise
        finally:
            self._checker = 0
            _native.mheap_freeze(self._c, False)
        return not self._check_dirty

    def _during_check(self, op: Any) -> Any:
        """Run op, a malloc or free that re-entered check() on its own thread (a
        finalizer run by the GC during the walk), now and for real: it holds
        the re-entrant lock, so it cannot wait for the walk to end, and
        deferring it would leak on error paths.  The fast path is thawed
        around it and the walk starts over (issue 14: frozen, the free said
        HeapCorruption and the malloc carved a span mid-walk)."""
        self._checker = 0
        _native.mheap_freeze(self._c, False)
        try:
            return op()
        finally:
            self._check_dirty = True
            _native.mheap_freeze(self._c, True)
            self._checker = threading.get_ident()

    def _check_locked(self) -> None:
        h = self._h
        h.check_locked()
        live_small = [0] * NUM_SIZE_CLASSES
        small_spans: set[int] = set()
        for cl in range(1, NUM_SIZE_CLASSES):
            cached = self._mcache.cached(cl)
            if cached and cached not in self._central[cl].spans:
                raise HeapCorruption(f"mcache[{cl}] holds {h.span_of(cached)!r}, not of its class")
            live_small[cl] += self._central[cl].check(cached)
            small_spans.update(self._central[cl].spans)
        large_live = large_bytes = faulted = faulted_spans = free_starts = 0
        in_lcache = _native.lcache_list(self._c)
        if in_lcache is None:
            raise HeapCorruption("the large cache's lists, mask or totals are broken")
        lcached = set(in_lcache)
        ef = self._efence or self._sampler
        ready = ef.ready_spans() if ef is not None else set()
        for s in h.walk():
            if s.addr in ready:  # an efence span C will hand out (efence.py)
                ready.discard(s.addr)
            elif s.state == SpanState.IN_USE and s.sizeclass:
                if s.addr not in small_spans:
                    raise HeapCorruption(f"small span {s!r} is neither cached nor in its mcentral")
                free_starts += s.nelems - s.ref + (s.limit < s.end)
            elif s.state == SpanState.IN_USE:
                base_word = s.base & ~7  # efence align < 8: the word holding the start
                if s.ref != 1 or not _native.bitmap_get(self._c, base_word) & _native.BIT_ALLOCATED:
                    raise HeapCorruption(f"large span {s!r}: object not marked allocated")
                if self._efence is not None:
                    self._efence.check_live(s)
                elif self._sampler is not None and self._sampler.holds(s):
                    self._sampler.check_live(s)
                large_live += 1
                large_bytes += s.elemsize
            elif s.state == SpanState.FAULTED:
                faulted += s.nbytes
                faulted_spans += 1
            elif s.state == SpanState.CACHED:
                if s.addr not in lcached:
                    raise HeapCorruption(f"cached span {s!r} is not in the large cache")
                lcached.discard(s.addr)
                free_starts += 1  # a freed large object's start: a boundary bit
        if lcached:
            raise HeapCorruption(
                f"the large cache holds {len(lcached)} spans the arena walk did not find"
            )
        if ready:
            raise HeapCorruption(f"{len(ready)} ready efence spans are not in the arena")
        nm, nf = _native.mcache_counts(self._c)
        for cl in range(1, NUM_SIZE_CLASSES):
            if nm[cl] - nf[cl] != live_small[cl]:
                raise HeapCorruption(
                    f"class {cl}: stats say {nm[cl] - nf[cl]} live objects, spans hold "
                    f"{live_small[cl]}"
                )
        c = self._c
        if large_live != c.nlargealloc - c.nlargefree:
            raise HeapCorruption(
                f"large objects: stats say {c.nlargealloc - c.nlargefree}, spans hold {large_live}"
            )
        if large_bytes != c.largealloc - c.largefree:
            raise HeapCorruption(
                f"large bytes: stats say {c.largealloc - c.largefree}, spans {large_bytes}"
            )
        if h.arena_used > h.arena_start:
            nalloc, nbound = _native.bitmap_count(
                self._c, h.arena_start, h.arena_used - h.arena_start
            )
            if nalloc != sum(live_small) + large_live:
                raise HeapCorruption(
                    f"bitmap has {nalloc} allocated bits for {sum(live_small) + large_live} "
                    "live objects"
                )
            if nbound != free_starts + faulted_spans:
                raise HeapCorruption(
                    f"bitmap has {nbound} boundary bits for {free_starts} free objects and "
                    f"tail marks and {faulted_spans} faulted efence objects (free spans "
                    "must carry no bits)"
                )
        ef = self._efence or self._sampler
        if ef is not None:
            ef.check(faulted)
        elif faulted:
            raise HeapCorruption(f"{faulted} bytes of faulted spans in a heap without efence")
        st = self._stats_locked()
        errs = st.identity_errors()
        live = _native.mheap_peak(c)[0]
        if live != st.heap_alloc:
            errs.append(f"C counts {live} live bytes, the class and large counts {st.heap_alloc}")
        if errs:
            raise HeapCorruption("MStats: " + "; ".join(errs))

    def close(self) -> None:
        """Close the heap: from now on malloc, free and every query raise
        HeapClosed (closing twice is fine), in every thread, C callers
        included.  The memory is unmapped now if nothing can reach it, else
        when the last export is gone: a Block, a ``Heap.ndarray`` array or a
        view of one, a ``view()`` memoryview, an array NumPy made under
        ``numpy_allocator``.  Those stay readable and writable until then;
        ``Block.free()`` raises HeapClosed (the Block's finalizer says
        nothing).  Then nothing of the heap stays mapped."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            # The cached NumPy handler holds the arena owner: from now on only
            # the arrays made with it may (numpy_handler.py).
            self._numpy_handler = None
            self._h.close_locked()
        _live_heaps.discard(self)

    def __enter__(self) -> Heap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Address space is a resource too: give it back with the last reference.
        try:
            if not self._closed:
                self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"arena [{self.arena_start:#x}, {self.arena_end:#x})"
        mode = " efence" if self._efence else ""
        if getattr(self, "_sampler", None) is not None:
            mode = f" efence_sample={self._sample_rate}"
        return f"<goheap.Heap {self.mode} {state}{mode}>"
