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
  caught; align=1 catches the first byte past the request.
- *quarantine* (beyond Go, the seed's own wish): with ``quarantine=BYTES`` the
  most recently freed spans stay faulted up to that many bytes; older ones are
  deleted (``delete_span``, the seed's "MHeap_DeleteSpan"): removed from the
  bitmap and the efence books, their pages mapped fresh (Reserved -> Ready, zero)
  and freed to the page heap, which may hand the addresses out again.  The
  trade-off: a use-after-free of an object older than the quarantine is no
  longer caught.  Default None: nothing is ever recycled, as Go.

Invariants (``check``): every FAULTED span is in ``faulted``; the bytes agree;
the quarantine holds at most ``quarantine`` bytes; a faulted span's object start
is *boundary* in the bitmap, never *allocated*.
The caller of every method holds the heap lock.
"""

from __future__ import annotations

from collections import OrderedDict

from goheap import _native
from goheap.errors import HeapCorruption, OutOfMemory
from goheap.mheap import MHeap, round_up
from goheap.mspan import MSpan, SpanState
from goheap.sizeclasses import PAGE_SHIFT

GUARDS = ("none", "after", "before")


class EFence:
    def __init__(self, h: MHeap, guard: bool | str, align: int, quarantine: int | None) -> None:
        if guard is True:
            guard = "after"
        elif guard is False:
            guard = "none"
        if guard not in GUARDS:
            raise ValueError(f"guard must be True, False or one of {GUARDS}, not {guard!r}")
        if not isinstance(align, int) or align < 1 or align > 16 or align & (align - 1):
            raise ValueError(f"align must be a power of two from 1 to 16, not {align!r}")
        if quarantine is not None and (not isinstance(quarantine, int) or quarantine < 0):
            raise ValueError(f"quarantine must be None or a byte count >= 0, not {quarantine!r}")
        self.h = h
        self.guard = guard
        self.align = align
        self.quarantine = quarantine
        self.unit = h.align
        self.faulted: OrderedDict[int, MSpan] = OrderedDict()  # oldest first
        self.faulted_bytes = 0
        self.deleted = 0
        self.guards: dict[int, tuple[int, int]] = {}  # span struct -> faulted guard range
        self.delete_refused = False

    # ---- alloc ------------------------------------------------------------------

    def alloc(self, n: int, zero: bool) -> tuple[int, int]:
        """A fresh span for one object of n bytes: (address, usable size)."""
        h, unit = self.h, self.unit
        usable = round_up(max(n, 1), self.align)
        data = round_up(usable, unit)
        span_bytes = data + (unit if self.guard != "none" else 0)
        s = h.alloc_span_aligned_locked(span_bytes >> PAGE_SHIFT, unit)
        if self.guard == "after":
            data_lo, guard_lo = s.start, s.start + data
            base = s.start + data - usable
        elif self.guard == "before":
            guard_lo, data_lo = s.start, s.start + unit
            base = data_lo
        else:
            data_lo, guard_lo, base = s.start, 0, s.start
        if self.guard != "none":
            try:
                h.mem.sys_fault(guard_lo, unit)
            except OSError as e:
                h.free_span_locked(s)
                raise OutOfMemory(
                    f"efence: cannot fault the guard page at {guard_lo:#x}: {e} "
                    "(address space or vm.max_map_count exhausted)"
                ) from e
            self.guards[s.addr] = (guard_lo, unit)
        if zero and s.needzero:
            _native.memclr(data_lo, data)
        s.needzero = True
        s.base = base
        s.elemsize = usable
        s.limit = base + usable
        s.ref = 1
        _native.bitmap_set(h.c, base, _native.BIT_ALLOCATED, _native.BIT_BOUNDARY)
        return base, usable

    # ---- free -------------------------------------------------------------------

    def free(self, s: MSpan) -> None:
        """Fault the whole span and keep it (C has already marked the object
        free in the bitmap).  If the fault fails the object stays live."""
        h = self.h
        try:
            h.mem.sys_fault(s.start, s.nbytes)
        except OSError as e:
            _native.bitmap_set(h.c, s.base, _native.BIT_ALLOCATED, _native.BIT_BOUNDARY)
            s.ref = 1
            raise OutOfMemory(
                f"efence: cannot fault freed object {s.base:#x} ({e}); it is still live"
            ) from e
        self.guards.pop(s.addr, None)
        s.state = SpanState.FAULTED
        self.faulted[s.addr] = s
        self.faulted_bytes += s.nbytes
        if self.quarantine is not None:
            while self.faulted_bytes > self.quarantine and self.faulted:
                if not self.delete_span(next(iter(self.faulted.values()))):
                    break

    def delete_span(self, s: MSpan) -> bool:
        """MHeap_DeleteSpan: retire a faulted span so its addresses can be reused,
        with every structure told.  Returns False (and changes nothing) if the OS
        refuses to map the pages again."""
        h = self.h
        try:
            h.mem.sys_map(s.start, s.nbytes, None)  # Reserved -> Ready, zero
        except OSError:
            self.delete_refused = True  # over quota until the OS lets us map again
            return False
        self.delete_refused = False
        del self.faulted[s.addr]
        self.faulted_bytes -= s.nbytes
        self.deleted += 1
        _native.bitmap_unmarkspan(h.c, s.start, s.nbytes)
        s.needzero = False
        h.free_span_locked(s)
        return True

    # ---- diagnosis ----------------------------------------------------------------

    def explain(self, addr: int) -> str | None:
        """What efence knows about addr, or None if it is not in an efence span."""
        s = self.h.lookup(addr)
        if s is None:
            return None
        if s.state == SpanState.FAULTED:
            where = "inside" if s.base <= addr < s.base + s.elemsize else "beside"
            return (
                f"{addr:#x} is {where} a freed efence object [{s.base:#x}, +{s.elemsize}) "
                f"in faulted span [{s.start:#x}, {s.end:#x}): use after free"
            )
        g = self.guards.get(s.addr)
        if g is not None and g[0] <= addr < g[0] + g[1]:
            side = "after" if self.guard == "after" else "before"
            return (
                f"{addr:#x} is in the guard page {side} live object [{s.base:#x}, "
                f"+{s.elemsize}): {'overrun' if side == 'after' else 'underrun'} "
                f"by {addr - s.limit + 1 if side == 'after' else s.base - addr} bytes"
            )
        return None

    # ---- consistency --------------------------------------------------------------

    def check(self, faulted_walked: int) -> None:
        if faulted_walked != self.faulted_bytes:
            raise HeapCorruption(
                f"efence: the arena holds {faulted_walked} faulted bytes, the books "
                f"{self.faulted_bytes}"
            )
        for s in self.faulted.values():
            if s.state != SpanState.FAULTED:
                raise HeapCorruption(f"efence: {s!r} is listed as faulted")
            if _native.bitmap_get(self.h.c, s.base) & _native.BIT_ALLOCATED:
                raise HeapCorruption(f"efence: faulted {s!r} still marked allocated")
            if s.start % self.unit or s.nbytes % self.unit:
                raise HeapCorruption(f"efence: {s!r} is not whole OS pages")
        if (
            self.quarantine is not None
            and self.faulted_bytes > self.quarantine
            and not self.delete_refused
        ):
            raise HeapCorruption(
                f"efence: quarantine holds {self.faulted_bytes} bytes, limit {self.quarantine}"
            )
