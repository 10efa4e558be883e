"""MStats: Go's MemStats in snake_case, as a snapshot.

See goheap/malloc.py for the overview.

Identities that hold in every snapshot (``Heap.check()`` verifies them):
- ``heap_sys == heap_idle + heap_inuse``: every mapped arena byte is in exactly
  one span, free or in use;
- ``sys == heap_sys + stacks_sys + mspan_sys + mcache_sys + buckhash_sys + gc_sys
  + other_sys``;
- ``heap_released <= heap_idle``; ``heap_alloc == alloc <= peak_alloc``;
- ``heap_objects == mallocs - frees``; for every class,
  ``by_size[c].mallocs >= by_size[c].frees``.

goheap has no garbage collector, so the GC fields (next_gc, num_gc, pause ...)
stay zero and are kept only so code written against Go's MemStats reads the
same names.  goheap's own additions come last.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class BySize:
    size: int
    mallocs: int
    frees: int


@dataclass(frozen=True)
class MStats:
    # General statistics.
    alloc: int = 0  # bytes in live objects (= heap_alloc)
    total_alloc: int = 0  # bytes ever allocated
    sys: int = 0  # bytes obtained from the OS, all categories
    lookups: int = 0
    mallocs: int = 0  # objects ever allocated
    frees: int = 0  # objects ever freed
    # Heap.
    heap_alloc: int = 0
    heap_sys: int = 0  # arena bytes mapped
    heap_idle: int = 0  # bytes in free spans
    heap_inuse: int = 0  # bytes in in-use spans
    heap_released: int = 0  # bytes of free spans given back to the OS
    heap_objects: int = 0
    # Off-heap metadata.
    stacks_inuse: int = 0
    stacks_sys: int = 0
    mspan_inuse: int = 0
    mspan_sys: int = 0
    mcache_inuse: int = 0
    mcache_sys: int = 0
    buckhash_sys: int = 0
    gc_sys: int = 0  # GC bitmap mapped
    other_sys: int = 0  # spans table mapped, and other metadata
    # Garbage collector (none in goheap).
    next_gc: int = 0
    last_gc: int = 0
    pause_total_ns: int = 0
    num_gc: int = 0
    by_size: tuple[BySize, ...] = field(default_factory=tuple)
    # goheap additions.
    efence_faulted: int = 0  # bytes of freed efence spans kept faulted
    efence_deleted: int = 0  # efence spans retired from the quarantine
    efence_sampled: int = 0  # efence objects made by sampling (Heap(efence_sample=N))
    os_page_size: int = 0
    # The high-water mark of heap_alloc since the heap was made or
    # Heap.reset_peak() (pyarrow's max_memory; total_alloc is its
    # total_bytes_allocated).  Exact: C counts live bytes on every path.
    peak_alloc: int = 0

    SYS_PARTS = (
        "heap_sys",
        "stacks_sys",
        "mspan_sys",
        "mcache_sys",
        "buckhash_sys",
        "gc_sys",
        "other_sys",
    )

    def identity_errors(self) -> list[str]:
        """The identities above that do not hold, each with its values."""
        errs = []
        if self.heap_sys != self.heap_idle + self.heap_inuse:
            errs.append(
                f"heap_sys {self.heap_sys} != heap_idle {self.heap_idle} "
                f"+ heap_inuse {self.heap_inuse}"
            )
        parts = sum(getattr(self, p) for p in self.SYS_PARTS)
        if self.sys != parts:
            errs.append(f"sys {self.sys} != sum of *_sys {parts}")
        if self.heap_released > self.heap_idle:
            errs.append(f"heap_released {self.heap_released} > heap_idle {self.heap_idle}")
        if self.alloc != self.heap_alloc:
            errs.append(f"alloc {self.alloc} != heap_alloc {self.heap_alloc}")
        if self.peak_alloc < self.heap_alloc:
            errs.append(f"peak_alloc {self.peak_alloc} < heap_alloc {self.heap_alloc}")
        if self.heap_objects != self.mallocs - self.frees:
            errs.append(
                f"heap_objects {self.heap_objects} != mallocs {self.mallocs} - frees {self.frees}"
            )
        for i, b in enumerate(self.by_size):
            if b.frees > b.mallocs:
                errs.append(f"by_size[{i}] frees {b.frees} > mallocs {b.mallocs}")
        return errs
