"""efence: every object on pages of its own, faulted when freed.

See goheap/malloc.py for the overview.

The seed commit's second lesson: efence used to give a freed span's memory back
to the OS (SysFree) without telling the heap, so when the OS reused those
addresses the span and bitmap metadata were wrong.  Here a freed efence span
stays owned and exact: state FAULTED, still in the spans table, hidden from
lookup, on no free list, counted in heap_inuse, its object's start marked
*boundary* in the bitmap (so a second free is a DoubleFree) -- and its pages are
made inaccessible with sys_fault, so any later touch faults at the instruction.

Vocabulary:
- *unit*: ``max(PAGE_SIZE, OS page)``.  Efence spans start on a unit and are
  whole units long, so faulting one never touches a neighbour's half of an OS
  page (Go's efence fails on 16 KiB pages, Go #44993).
- *guard* (beyond Go): ``guard="after"`` (or True) places the object at the end
  of its data pages, right-aligned to ``align`` bytes, followed by one faulted
  unit, so reading or writing past ``usable_size`` faults; ``guard="before"``
  puts the faulted unit first and the object right after it (underruns).
  ``align`` is Electric Fence's EF_ALIGNMENT: the usable size is the request
  rounded up to it, so with align=16 an overrun inside that padding is not
  caught; align=1 catches the first byte past the request.  With align < 8 an
  object may start at any byte; its bitmap bits are those of the heap word
  holding its start (``word``), and free() of that word's address, which is not
  the object, is refused like any other interior pointer.
- *quarantine* (beyond Go, the seed's own wish): with ``quarantine=BYTES`` the
  most recently freed spans stay faulted up to that many bytes (and, with
  ``max_spans``, that many spans); older ones are deleted (``delete_span``, the seed's "MHeap_DeleteSpan"): removed from the
  bitmap and the efence books, their pages mapped fresh (Reserved -> Ready, zero)
  and freed to the page heap, which may hand the addresses out again.  The
  trade-off: a use-after-free of an object older than the quarantine is no
  longer caught (it reads zeros, or someone else's object).  Default None:
  nothing is ever recycled, as Go; the heap then runs out of arena or of kernel
  mappings after enough frees, and says which.

*sampled* (``Heap(efence_sample=N)``, GWP-ASan's idea): in a normal heap,
about one allocation in N, of any size, becomes an efence object with a guard
after it.  C picks them (a countdown re-armed with a random interval of mean
N, goheap/_sys.c) and reports a miss; the slow path asks C whether a sample
is pending and makes the object here.  Everything else about such an object
is efence's: free faults it (``holds`` tells the free path which spans are
sampled), the quarantine retires it.  Its alignment is malloc's (8, 16 from
16 bytes, or ``align=``), so an overrun inside that rounding is not caught,
as in GWP-ASan.  The quarantine is bounded by default, as GWP-ASan sizes its
pool by what the process can afford rather than by what it would like to
keep: ``SAMPLE_QUARANTINE_SPANS`` spans and ``sample_quarantine_bytes(arena)``
bytes, whichever comes first; once it is full, the next sampled object of the
same page count takes its oldest span (``reuse``, as GWP-ASan reuses a freed
slot): its data pages mapped again, its guard left faulted, no page-heap work.

C's part (the steady state makes no Python call).  The quarantine's books
are C's (gh_mheap.efq_*: one FIFO list of the FAULTED spans, its totals, the
bounds Python sets), so free of an efence object faults and lists it in C
while the quarantine has room, and C takes the oldest span back for a
sampled malloc once it is full.  A free makes its span PROT_NONE at once;
its pages are dropped (MADV_DONTNEED) with the next few frees', one call per
run of adjacent spans, so a sampled pair costs two system calls: map the
data again, fault it.  Fresh spans come from the page heap, which is
Python's, so a miss makes a batch of ``ready_batch`` *ready* spans of the
length asked for: Python takes one page-heap span and the span structs, and
C cuts it, faults the guards and lists the pieces (gh_efence_ready_carve)
that it hands out without a system call, to every malloc of an efence heap
and to sampled ones (GWP-ASan's free slots).  Python still decides
everything else: retiring spans past a bound, growth, ``scavenge`` (ready
spans go back to the page heap, undropped pages are dropped), ``check``.
While the OS layer injects failures or traces calls (``SysMemory.c_hooked``)
C makes no efence system call, so each one is seen there (and an object's
own span comes before its batch, so a failure surfaces in its malloc).
A sample that cannot be had (the kernel's
mappings or the arena ran out) is lost and the normal path serves the
allocation, as GWP-ASan does when its pool is full.

Running out.  Each faulted span can split a kernel mapping (Linux caps them at
vm.max_map_count, 65,530 by default).  When mprotect or mmap fails, the
operation is undone and OutOfMemory names the cause: a failed free leaves the
object live and readable, a failed guard leaves no span behind, and a span is
FAULTED only after the kernel said its pages are PROT_NONE.

Diagnosis.  ``install_fault_reporter()`` (``goheap.install_fault_reporter``;
every efence or sampling heap calls it) installs the C handler that writes
one line for a fault in a goheap heap, then chains to the handler it
replaced (faulthandler's stack follows):
``goheap: overrun at 0x<addr>: 1 byte past object 0x<base> (112 bytes),
span 0x<start>+2 pages`` (kinds: overrun, underrun, use-after-free, guard,
wild access; the format is in _sys.c).  ``fault_address(text)`` reads the
address back, so a parent can ask ``Heap.explain`` what its child touched.

Invariants (``check``): every FAULTED span is on C's quarantine list (links,
states and totals checked in C memory) and the bytes agree with the arena; the
quarantine holds at most ``quarantine`` bytes (unless the OS refused a delete);
every efence span is whole units at a unit boundary and marked efence; a
faulted span's object start is *boundary* in the bitmap, never *allocated*;
every live object stays clear of its guard; every ready span is on its list.  The caller of every method holds the heap lock.
"""

from __future__ import annotations

import os
import re
import struct
from typing import Any

from goheap import _native
from goheap.errors import HeapCorruption, OutOfMemory
from goheap.mheap import MHeap, round_up
from goheap.mspan import MSpan, SpanState
from goheap.sizeclasses import PAGE_SHIFT

_WORDS = struct.Struct("=Q")
_AUXV = struct.Struct("=QQ")  # goheap is 64-bit only

GUARDS = ("none", "after", "before")
WORD = 8  # heap word: the bitmap's granularity

# Sampled efence's default quarantine.  Spans: each faulted span splits at
# most two kernel mappings off the arena's, so 1,024 of them cost at most
# 2,048 of vm.max_map_count's default 65,530 (3 %): a long test suite, and a
# few such heaps side by side, never run the kernel out of mappings.  Bytes:
# faulted pages go back to the OS, so they cost arena address space only;
# 64 MiB, and never more than 1/16 of the arena, so a small arena keeps room
# for the objects that are not sampled.
SAMPLE_QUARANTINE_SPANS = 1024
SAMPLE_QUARANTINE_BYTES = 64 << 20
# The sampling rate's bound: C draws intervals from [1, 2N-1] in 32 bits.
MAX_SAMPLE_RATE = (1 << 31) - 1


def sample_quarantine_bytes(arena_bytes: int) -> int:
    """The default byte bound of a sampling heap's quarantine."""
    return min(SAMPLE_QUARANTINE_BYTES, arena_bytes // 16)


def sample_rate(n: object, source: str = "efence_sample") -> int:
    """efence_sample's value checked: N >= 1, or 0 for None/0 (off).  TypeError
    for a non-int (bool included), ValueError out of range.  Called before
    any memory is reserved."""
    if n is None:
        return 0
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"{source} must be an int >= 1 (0 or None: off), not {n!r}")
    if n < 0 or n > MAX_SAMPLE_RATE:
        raise ValueError(f"{source} must be from 1 to {MAX_SAMPLE_RATE} (0: off), not {n}")
    return n


def sample_rate_from_env(text: str) -> int:
    """GOHEAP_EFENCE_SAMPLE's value: "" or "0" is off; ValueError unless it
    is an int from 1 to MAX_SAMPLE_RATE."""
    text = text.strip()
    if not text:
        return 0
    try:
        n = int(text, 10)
    except ValueError:
        raise ValueError(
            f"GOHEAP_EFENCE_SAMPLE must be an int >= 1 (0: off), not {text!r}"
        ) from None
    return sample_rate(n, "GOHEAP_EFENCE_SAMPLE")


def word(v: int) -> int:
    """The heap word holding byte v: where its object's bitmap bits live."""
    return v & ~(WORD - 1)


def options(guard: bool | str, align: int, quarantine: int | None) -> tuple[str, int, int | None]:
    """Heap(efence=True)'s options, checked: (guard mode, align, quarantine).
    ValueError names the first bad one.  Called before any memory is reserved."""
    if guard is True:
        guard = "after"
    elif guard is False:
        guard = "none"
    if guard not in GUARDS:
        raise ValueError(f"guard must be True, False or one of {GUARDS}, not {guard!r}")
    if (
        isinstance(align, bool)
        or not isinstance(align, int)
        or align < 1
        or align > 16
        or align & (align - 1)
    ):
        raise ValueError(f"align must be a power of two from 1 to 16, not {align!r}")
    if quarantine is not None and (
        isinstance(quarantine, bool) or not isinstance(quarantine, int) or quarantine < 0
    ):
        raise ValueError(f"quarantine must be None or a byte count >= 0, not {quarantine!r}")
    return guard, align, quarantine


class EFence:
    def __init__(
        self,
        h: MHeap,
        guard: bool | str,
        align: int,
        quarantine: int | None,
        max_spans: int | None = None,
        reuse: bool = False,
    ) -> None:
        guard, align, quarantine = options(guard, align, quarantine)
        self.h = h
        self.guard = guard
        self.align = align
        self.quarantine = quarantine
        self.max_spans = max_spans  # the quarantine's bound in spans (None: bytes only)
        self.unit = h.align
        # The quarantine's books are C's (gh_mheap.efq_*: one list of the
        # FAULTED spans, oldest first), so that C can fault a freed efence
        # object and, with reuse, hand a full quarantine's oldest span of the
        # size asked for to the next sampled object (GWP-ASan reuses a freed
        # slot) without Python: in the steady state a sampled malloc+free is
        # two system calls and no Python.  Python sets the bounds and
        # retires spans past them; C marks each efence span (gh_mspan.efence)
        # so its free knows one.
        self.reuse = reuse
        self.deleted = 0
        self._reused = 0  # by Python (C counts its own: gh_mheap.efence_reused)
        self.delete_refused = False
        c = h.c
        c.efq_max_bytes = quarantine if quarantine is not None else _UNBOUNDED
        c.efq_max_spans = max_spans if max_spans is not None else _UNBOUNDED
        c.efq_unit = self.unit
        c.efq_pagesize = h.mem.page_size
        hook = getattr(h.mem, "c_hooked", None)
        if hook is not None:
            c.efq_hook = hook
        c.efq_reuse = int(reuse and guard == "after")
        c.efq_guard = _GUARD_CODES[guard]
        c.efq_align = 0 if reuse else align  # sampled objects: malloc's alignment
        c.efq_on = int(hook is not None)  # an OS layer C cannot see past: Python does it all

    # ---- the books (C's) ----------------------------------------------------------

    @property
    def faulted_bytes(self) -> int:
        return int(self.h.c.efq_bytes)

    @property
    def nfaulted(self) -> int:
        return int(self.h.c.efq_nspans)

    @property
    def reused(self) -> int:
        return self._reused + int(self.h.c.efence_reused)

    def faulted_spans(self) -> list[MSpan]:
        """The quarantined spans, oldest first."""
        found = _native.efence_q_list(self.h.c)
        if found is None:
            raise HeapCorruption("efence: the quarantine's list is broken")
        return [MSpan(a) for a in found]

    def guard_of(self, s: MSpan) -> tuple[int, int] | None:
        """The faulted guard of live efence span s: (address, length), or None."""
        if self.guard == "after":
            return s.end - self.unit, self.unit
        if self.guard == "before":
            return s.start, self.unit
        return None

    # ---- ready spans (C hands them out) -----------------------------------------

    def refill(self, units: int) -> None:
        """Make a batch (``ready_batch``) of fresh spans for objects of
        ``units`` data units, guards faulted, and give them to C, which hands
        them out with no system call (GWP-ASan's free slots).  The page heap
        (Python's) gives one span for the batch and SpanAlloc its structs; C
        cuts it, points the spans table and faults the guards in one call.
        Advice: if the arena or the OS says no, fewer or none are made and
        the next miss tries again."""
        h, unit = self.h, self.unit
        c = h.c
        if not c.efq_on or not 1 <= units <= _native.EFR_LISTS:
            return
        if c.efr[units - 1] != _native.NULL_SPAN:
            return  # not empty (malloc(align=) comes here past them): nothing to make
        span_bytes = units * unit + (unit if self.guard != "none" else 0)
        n = ready_batch(span_bytes)
        try:
            spares = h.spanalloc.alloc_addrs(n - 1)
        except (OSError, MemoryError):
            return
        made = 0
        try:
            npages = (span_bytes >> PAGE_SHIFT) * n
            ahead = max(npages, READY_GROW_BYTES >> PAGE_SHIFT)
            s = h.alloc_span_aligned_locked(npages, unit, grow_ahead=ahead)
        except (OSError, MemoryError):
            s = None
        if s is not None:
            if self._c_may_call():
                made, _ = _native.efence_ready_carve(c, s._c, units, n, spares)
            else:
                made = self._carve_seen(s, units, span_bytes, n, spares)
            if made < n:
                h.free_span_locked(s)  # the rest, plain Ready memory as it came
        for addr in spares[made:]:
            h.spanalloc.free(MSpan(addr))

    def _carve_seen(self, s: MSpan, units: int, span_bytes: int, n: int, spares: list[int]) -> int:
        """refill's cut while the OS layer injects or traces calls: the
        guards are faulted here, top piece (of span_bytes) first as C does,
        so each call is seen there; C cuts as many pieces as got their guard."""
        done = 0
        top = s.end
        if self.guard != "none":
            for _ in range(n):
                start = top - span_bytes
                g = start + span_bytes - self.unit if self.guard == "after" else start
                try:
                    self.h.mem.sys_fault(g, self.unit)
                except (OSError, MemoryError):
                    break
                done += 1
                top = start
        else:
            done = n
        if not done:
            return 0
        made, _ = _native.efence_ready_carve(self.h.c, s._c, units, done, spares, guards_done=True)
        return made

    def _c_may_call(self) -> bool:
        """Whether C may make efence's system calls now (gh_mheap.efq_on, the
        OS layer neither injecting nor tracing, no check() running): else
        every call is Python's, so each one is seen (and may fail) there."""
        c = self.h.c
        hook = c.efq_hook
        return bool(c.efq_on) and not c.frozen and (hook == _native.ffi.NULL or not hook[0])

    def flush_ready(self) -> None:
        """Give every ready span back to the page heap (scavenge): guard
        mapped again, unmarked.  Stops, leaving the rest ready, if the OS
        refuses to map a guard again."""
        h = self.h
        while True:
            addr = _native.efence_ready_take(h.c, 0)
            if not addr:
                return
            s = MSpan(addr)
            g = self.guard_of(s)
            try:
                if g is not None:
                    h.mem.sys_map(g[0], g[1], None)
            except (OSError, MemoryError):
                _native.efence_ready_put(h.c, s._c)
                return
            s._c.efence = 0
            s.elemsize, s.base, s.limit = s.nbytes, s.start, s.end
            s.needzero = True
            h.free_span_locked(s)

    def ready_spans(self) -> set[int]:
        found = _native.efence_ready_list(self.h.c)
        if found is None:
            raise HeapCorruption("efence: the ready spans' lists or totals are broken")
        return set(found)

    # ---- alloc ------------------------------------------------------------------

    def alloc(self, n: int, zero: bool, align: int = 1) -> tuple[int, int]:
        """A fresh span for one object of n bytes: (address, usable size).
        ``align`` (``malloc(align=)``, a power of two up to the unit) raises the
        object's alignment above the heap's ``align``: the usable size is
        rounded up to it, so with guard="after" the object still ends at its
        guard, and an overrun shorter than that rounding is not caught."""
        h, unit = self.h, self.unit
        usable = round_up(max(n, 1), max(self.align, align))
        data = round_up(usable, unit)
        span_bytes = data + (unit if self.guard != "none" else 0)
        if self.reuse and self.guard == "after" and self.quarantine_full(span_bytes):
            v = self._reuse(span_bytes >> PAGE_SHIFT, data, usable)
            if v:
                return v, usable
        # C's next objects of this length, and this one, from one batch.  While
        # the OS layer injects or traces calls, this object's own span comes
        # first, so that a failure of its calls surfaces here; the batch,
        # advice, follows.
        ready, batch_after = 0, False
        if data <= _native.EFR_LISTS * unit:
            batch_after = not self._c_may_call()
            if not batch_after:
                self.refill(data // unit)
                ready = _native.efence_ready_take(h.c, data // unit)
        if ready:
            s = MSpan(ready)  # guard faulted already
        else:
            try:
                s = h.alloc_span_aligned_locked(span_bytes >> PAGE_SHIFT, unit)
            except OutOfMemory as e:
                raise OutOfMemory(
                    f"efence: malloc({n}) needs {span_bytes} bytes of fresh pages: "
                    f"{self.exhaustion_cause(e)}"
                ) from e
        if self.guard == "after":
            guard_lo = s.start + data
            base = guard_lo - usable
        elif self.guard == "before":
            guard_lo = s.start
            base = s.start + unit
        else:
            guard_lo, base = 0, s.start
        if self.guard != "none" and not ready:
            try:
                h.mem.sys_fault(guard_lo, unit)
            except (OSError, MemoryError) as e:
                # sys_fault changes nothing when it fails: the span is plain
                # Ready memory and goes back as it came.
                h.free_span_locked(s)
                raise OutOfMemory(
                    f"efence: malloc({n}): cannot fault the guard page at {guard_lo:#x}: "
                    f"{self.exhaustion_cause(e)}"
                ) from e
        if zero and s.needzero:
            _native.memclr(base, usable)
        s.needzero = True
        s.base = base
        s.elemsize = usable
        s.limit = base + usable
        s.ref = 1
        s._c.efence = 1
        _native.bitmap_set(h.c, word(base), _native.BIT_ALLOCATED, _native.BIT_BOUNDARY)
        if batch_after:
            self.refill(data // unit)
        return base, usable

    def quarantine_full(self, span_bytes: int) -> bool:
        """Whether one more faulted span of span_bytes would pass a bound."""
        if self.max_spans is not None and self.nfaulted >= self.max_spans:
            return True
        return self.quarantine is not None and self.faulted_bytes + span_bytes > self.quarantine

    def _reuse(self, npages: int, data: int, usable: int) -> int:
        """The oldest faulted span of npages pages, live again for an object of
        usable bytes right-aligned against its guard (guard="after": the guard
        is where it was and stays faulted); its address, or 0 if there is none
        or the OS refuses to map its data pages again (nothing changed then).
        C does the same (efence_reuse in _sys.c) when it may make the calls."""
        addr = _native.efence_q_oldest(self.h.c, npages)
        if not addr:
            return 0
        s = MSpan(addr)
        try:
            self.h.mem.sys_map(s.start, data, None)  # Reserved -> Ready, zero
        except (OSError, MemoryError):
            return 0
        _native.efence_q_unlink(self.h.c, s._c)
        h, old = self.h, word(s.base)
        base = s.start + data - usable
        if old != word(base):
            _native.bitmap_set(h.c, old, 0, _native.BIT_BOUNDARY)
        _native.bitmap_set(h.c, word(base), _native.BIT_ALLOCATED, _native.BIT_BOUNDARY)
        s.state = SpanState.IN_USE
        s.needzero = True  # fresh pages from the OS now, dirty once handed out
        s.base, s.elemsize, s.limit, s.ref = base, usable, base + usable, 1
        self._reused += 1
        return base

    # ---- free -------------------------------------------------------------------

    def free_unaligned(self, v: int) -> int:
        """free's first step for an address C refused as not word aligned: with
        align < 8 an efence object may start there.  Marks the object free in
        the bitmap exactly as C does for an aligned one and returns C's status
        (FREED_LARGE, or EINVALID / EDOUBLE with nothing changed)."""
        h = self.h
        s = h.lookup(v)
        if s is None or s.sizeclass != 0 or s.base != v:
            return _native.EINVALID
        bits = _native.bitmap_get(h.c, word(v))
        if s.state != SpanState.IN_USE or not bits & _native.BIT_ALLOCATED:
            return _native.EDOUBLE if bits & _native.BIT_BOUNDARY else _native.EINVALID
        _native.bitmap_set(h.c, word(v), _native.BIT_BOUNDARY, _native.BIT_ALLOCATED)
        s.ref = 0
        return _native.FREED_LARGE

    def refuse_word_free(self, s: MSpan | None, v: int) -> bool:
        """C freed the word-aligned v, but v only shares its heap word with an
        unaligned object's start (align < 8): undo C's marking and return True,
        so the caller raises InvalidFree.  False if that is not the case."""
        if s is None or s.sizeclass != 0 or s.base == v or word(s.base) != v:
            return False
        _native.bitmap_set(self.h.c, v, _native.BIT_ALLOCATED, _native.BIT_BOUNDARY)
        s.ref = 1
        return True

    def free(self, s: MSpan) -> None:
        """Fault the whole span and keep it (the bitmap already says "free").
        If the fault fails the object stays live and OutOfMemory says why.
        (C does the same in efence_free when the quarantine has room.)"""
        h = self.h
        # The data pages only: the guard is faulted already, and a fault the
        # OS refuses part way must not open it (sys_fault undoes its markers).
        lo, hi = s.start, s.end
        g = self.guard_of(s)
        if g is not None:
            lo, hi = (g[0] + g[1], hi) if g[0] == lo else (lo, g[0])
        try:
            h.mem.sys_fault(lo, hi - lo)
        except (OSError, MemoryError) as e:
            _native.bitmap_set(h.c, word(s.base), _native.BIT_ALLOCATED, _native.BIT_BOUNDARY)
            s.ref = 1
            raise OutOfMemory(
                f"efence: free({s.base:#x}): cannot fault its span [{s.start:#x}, {s.end:#x}): "
                f"{self.exhaustion_cause(e)}; the object is still live"
            ) from e
        s.state = SpanState.FAULTED
        s.needzero = True  # sys_fault does not say whether its pages were dropped
        _native.efence_q_push(h.c, s._c)
        while self.over_quarantine():
            oldest = _native.efence_q_oldest(h.c, 0)
            if not oldest or not self.delete_span(MSpan(oldest)):
                break

    def over_quarantine(self) -> bool:
        """Whether the faulted spans exceed the quarantine's bounds."""
        over_bytes = self.quarantine is not None and self.faulted_bytes > self.quarantine
        return over_bytes or (self.max_spans is not None and self.nfaulted > self.max_spans)

    def holds(self, s: MSpan) -> bool:
        """Whether live span s holds one of this EFence's objects.  For a
        sampling heap, where efence objects and normal large ones share the
        page heap: C's mark on the span says."""
        return bool(s._c.efence)

    def delete_span(self, s: MSpan) -> bool:
        """MHeap_DeleteSpan: retire a faulted span so its addresses can be reused,
        with every structure told.  Returns False (and changes nothing) if the OS
        refuses to map the pages again; the next free tries again."""
        h = self.h
        try:
            h.mem.sys_map(s.start, s.nbytes, None)  # Reserved -> Ready, zero
        except (OSError, MemoryError):
            self.delete_refused = True
            return False
        self.delete_refused = False
        _native.efence_q_unlink(h.c, s._c)
        self.deleted += 1
        _native.bitmap_unmarkspan(h.c, s.start, s.nbytes)
        s.needzero = False
        s._c.efence = 0
        h.free_span_locked(s)
        return True

    # ---- running out ---------------------------------------------------------------

    def exhaustion_cause(self, e: BaseException) -> str:
        """Why the OS or the arena said no, in words a user can act on."""
        maps, limit = mapping_count(), max_map_count()
        if maps is not None and limit is not None and maps >= limit - 16:
            return (
                f"the process has {maps} kernel mappings of vm.max_map_count={limit} "
                "(each faulted span splits one; pass quarantine=BYTES to recycle) "
                f"[{e}]"
            )
        h = self.h
        left = h.arena_end - h.arena_used
        if "cannot allocate" in str(e) or left < self.unit:
            return (
                f"arena exhausted: {h.heap_inuse} bytes in efence spans "
                f"({self.faulted_bytes} faulted), {left} bytes of arena unused "
                f"(pass quarantine=BYTES to recycle) [{e}]"
            )
        return f"the OS refused: {e}"

    # ---- diagnosis ----------------------------------------------------------------

    def explain(self, addr: int) -> str | None:
        """What efence knows about addr, or None if it is not in an efence span."""
        s = self.h.lookup(addr)
        if s is None:
            return None
        obj = f"[{s.base:#x}, +{s.elemsize})"
        where = _position(addr, s.base, s.elemsize)
        if s.state == SpanState.FAULTED:
            return (
                f"{addr:#x} is {where} freed efence object {obj} (guard {self.guard}), "
                f"faulted span [{s.start:#x}, {s.end:#x}): use after free"
            )
        g = self.guard_of(s) if self.holds(s) else None
        if g is not None and g[0] <= addr < g[0] + g[1]:
            kind = "overrun" if self.guard == "after" else "underrun"
            return (
                f"{addr:#x} is in the guard page [{g[0]:#x}, {g[0] + g[1]:#x}) {self.guard} "
                f"live object {obj}: {kind}, {where} it"
            )
        return (
            f"{addr:#x} is on the pages of live efence object {obj} but outside it ({where} "
            "it, not faulted)"
        )

    # ---- consistency --------------------------------------------------------------

    def check(self, faulted_walked: int) -> None:
        """The quarantine's list in C memory (links, states, totals: C checks
        those) against the arena walk's FAULTED bytes, and each listed span."""
        listed = _native.efence_q_list(self.h.c)
        if listed is None:
            raise HeapCorruption("efence: the quarantine's list, states or totals are broken")
        if len(set(listed)) != len(listed):
            raise HeapCorruption("efence: a span is listed twice in the quarantine")
        if faulted_walked != self.faulted_bytes:
            raise HeapCorruption(
                f"efence: the arena holds {faulted_walked} faulted bytes, the books "
                f"{self.faulted_bytes}"
            )
        for a in listed:
            s = MSpan(a)
            if self.h.span_of(a) is None or _native.spans_get(self.h.c, s.start) != a:
                raise HeapCorruption(f"efence: quarantined {s!r} is not in the spans table")
            bits = _native.bitmap_get(self.h.c, word(s.base))
            if bits & _native.BIT_ALLOCATED or not bits & _native.BIT_BOUNDARY:
                raise HeapCorruption(f"efence: faulted {s!r} not marked freed (bits {bits:#x})")
            self._check_geometry(s)
        if self.over_quarantine() and not self.delete_refused:
            raise HeapCorruption(
                f"efence: quarantine holds {self.faulted_bytes} bytes in {self.nfaulted} "
                f"spans, limits {self.quarantine} bytes, {self.max_spans} spans"
            )

    def check_live(self, s: MSpan) -> None:
        """A live efence span: whole units, marked, its guard where the mode says
        and clear of the object."""
        self._check_geometry(s)
        if not s._c.efence:
            raise HeapCorruption(f"efence: live {s!r} is not marked an efence span")
        g = self.guard_of(s)
        if g is not None and (g[0] < s.limit and s.base < g[0] + g[1]):
            raise HeapCorruption(f"efence: guard {g[0]:#x}+{g[1]:#x} overlaps object of {s!r}")

    def _check_geometry(self, s: MSpan) -> None:
        if s.start % self.unit or s.nbytes % self.unit:
            raise HeapCorruption(f"efence: {s!r} is not whole OS pages ({self.unit})")
        if not s.start <= s.base < s.base + s.elemsize <= s.end:
            raise HeapCorruption(f"efence: object of {s!r} leaves its span")


_UNBOUNDED = (1 << 64) - 1  # C's "no bound"
_GUARD_CODES = {
    "none": _native.EFENCE_GUARD_NONE,
    "after": _native.EFENCE_GUARD_AFTER,
    "before": _native.EFENCE_GUARD_BEFORE,
}
# Ready spans made per miss: one Python slow path (a page-heap allocation,
# SpanAlloc's structs) per batch of efence objects of a length, and one C
# call that cuts it.  A batch is READY_BATCH_BYTES of spans, at least
# READY_BATCH_MIN and at most READY_BATCH_MAX of them: 64 x 16 KiB for the
# smallest objects with guards at 4 KiB pages, 16 x 72 KiB for the largest.
# Their pages are address space until used (only pages an earlier user
# dirtied are resident), and scavenge() gives them back.  With guard
# markers a guard splits no mapping, so batches are four times larger: the
# Python a miss costs (a few hundred microseconds) was most of what a
# fresh sampled object cost, before the quarantine fills.
READY_BATCH_BYTES = 1 << 20
READY_BATCH_MARKED = 4  # times more, with guard markers
# When a batch makes the heap grow, it grows by this much at least (address
# space, mapped untouched; four plain batches): a grow costs as much Python
# as the batch itself.
READY_GROW_BYTES = 4 << 20
READY_BATCH_MIN = 16
READY_BATCH_MAX = 64


def ready_batch(span_bytes: int) -> int:
    """How many ready spans of span_bytes one miss makes."""
    k = READY_BATCH_MARKED if _native.guard_regions()[0] else 1
    return max(READY_BATCH_MIN, min(k * READY_BATCH_MAX, k * READY_BATCH_BYTES // span_bytes))


def _position(addr: int, base: int, size: int) -> str:
    """Where addr is relative to the object [base, base+size): an overrun of
    one byte is "1 byte past the end", an underrun of one "1 byte before"."""
    if addr < base:
        return f"{_bytes(base - addr)} before"
    if addr >= base + size:
        return f"{_bytes(addr - (base + size) + 1)} past the end of"
    return f"at offset {addr - base} of"


def _bytes(n: int) -> str:
    return f"{n} byte" if n == 1 else f"{n} bytes"


# ---- what the kernel says ------------------------------------------------------------

# /proc/self/pagemap: one 64-bit word per kernel page; bit 58 marks a guard
# marker (Linux 6.15+), which /proc/self/maps cannot show.
_PM_GUARD_REGION = 1 << 58


def guard_marked(lo: int, hi: int) -> list[tuple[int, int]] | None:
    """The runs of [lo, hi) that guard markers make fault (what efence's
    spans are faulted with where the kernel has markers), from
    /proc/self/pagemap; None where it cannot say (no pagemap, or a kernel
    that makes no markers)."""
    if not _native.guard_regions()[1] or _kernel_release() < (6, 15):
        return None  # no markers, or no pagemap bit for them (6.13, 6.14)
    page = _kernel_page()
    lo -= lo % page
    runs: list[tuple[int, int]] = []
    try:
        with open("/proc/self/pagemap", "rb", buffering=0) as f:
            f.seek(lo // page * 8)
            v = lo
            while v < hi:
                raw = f.read(min(-(-(hi - v) // page), 8192) * 8)
                if not raw:
                    break
                for (word,) in _WORDS.iter_unpack(raw):
                    if word & _PM_GUARD_REGION:
                        if runs and runs[-1][1] == v:
                            runs[-1] = (runs[-1][0], v + page)
                        else:
                            runs.append((v, v + page))
                    v += page
    except OSError:
        return None
    return [(a, min(b, hi)) for a, b in runs]


def _kernel_release() -> tuple[int, int]:
    """The running kernel's (major, minor), (0, 0) if it does not say."""
    m = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _kernel_page() -> int:
    """The kernel's page (AT_PAGESZ), in which pagemap counts: the one the
    tests' page-size shim leaves alone."""
    try:
        with open("/proc/self/auxv", "rb") as f:
            for key, val in _AUXV.iter_unpack(f.read()):
                if key == 6:  # AT_PAGESZ
                    return int(val)
    except OSError:
        pass
    return _native.os_page_size()


# ---- the kernel's mapping budget ------------------------------------------------------


def mapping_count() -> int | None:
    """Kernel mappings (VMAs) of this process, or None where /proc is absent."""
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return None


def max_map_count() -> int | None:
    """vm.max_map_count, or None where the kernel has no such limit."""
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


# ---- fault reports ----------------------------------------------------------------------


# The file object the reporter writes to, when one was given: kept alive so
# its descriptor stays open (faulthandler keeps its file the same way).
_report_file: Any = None


def install_fault_reporter(file: Any = None) -> None:
    """Install goheap's C fault reporter for SIGSEGV and SIGBUS (public as
    ``goheap.install_fault_reporter``).  A fault in a goheap heap's arena --
    an efence overrun, underrun or use-after-free -- writes one line,
    ``goheap: <kind> at 0x<addr>: <n> bytes past|before|into object
    0x<base> (<size> bytes), span 0x<start>+<npages> pages``; then, and for
    any fault that is not goheap's (no line), the handler that was there
    before runs: faulthandler's Python stack, a sanitizer's report, or the
    default action, so the process dies of the signal as it would have.

    ``file``: where the line goes, a file object with a ``fileno()`` or a
    descriptor, as ``faulthandler.enable(file=...)`` takes it; the reporter
    keeps it open.  ``None`` keeps the current destination, which starts as
    descriptor 2 (stderr); so a heap that installs the reporter itself never
    undoes a destination chosen earlier.  A closed or invalid descriptor is a
    ValueError and changes nothing.

    Idempotent: if the reporter is the current handler nothing changes (it
    never chains to itself).  If another handler took over since (e.g.
    ``faulthandler.enable()`` after it), calling it again installs it on top,
    which is how to get goheap's line before faulthandler's stack: enable
    faulthandler first, then this."""
    global _report_file
    if file is not None:
        fd = file if isinstance(file, int) else file.fileno()
        _native.fault_reporter_set_fd(fd)
        _report_file = file
    _native.install_fault_reporter()


def fault_reporter_fd() -> int:
    """The descriptor the reporter's line goes to."""
    return _native.fault_reporter_fd()


def fault_reporter_installed() -> bool:
    """Whether the reporter is the current SIGSEGV and SIGBUS handler."""
    return _native.fault_reporter_installed()


report_faults = install_fault_reporter  # its name before issue 15 (efence_demo uses it)

_REPORT = re.compile(
    r"goheap: (overrun|underrun|use-after-free|guard|wild access) at (0x[0-9a-f]+)"
)


def fault_address(text: str) -> int | None:
    """The faulting address of the last reporter line in text, or None."""
    found = _REPORT.findall(text)
    return int(found[-1][1], 16) if found else None


def fault_kind(text: str) -> str | None:
    """The kind of the last reporter line in text ("overrun", ...), or None."""
    found = _REPORT.findall(text)
    return found[-1][0] if found else None
