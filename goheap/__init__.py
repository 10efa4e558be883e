"""goheap: the Go runtime's 2014 page heap (mallocinit, MHeap, MCentral, MCache,
the GC bitmap, efence) on real memory obtained with mmap.

    >>> import goheap
    >>> with goheap.Heap(arena_size=1 << 30) as h:
    ...     p = h.malloc(100)
    ...     h.usable_size(p)
    ...     h.free(p)
    112

See README.md for the tour and goheap/malloc.py for the design overview.
"""

from goheap.errors import (
    ArenaFallbackWarning,
    DoubleFree,
    HeapClosed,
    HeapCorruption,
    HeapError,
    HeapWarning,
    InvalidFree,
    OutOfMemory,
)
from goheap.malloc import (
    MAX_ARENA32,
    TRACEMALLOC_DOMAIN,
    Block,
    Heap,
    enable_tracemalloc,
    install_fault_reporter,
)
from goheap.mstats import BySize, MStats
from goheap.numpy_handler import numpy_allocator
from goheap.sizeclasses import (
    MAX_SMALL_SIZE,
    NUM_SIZE_CLASSES,
    PAGE_SHIFT,
    PAGE_SIZE,
    class_to_allocnpages,
    class_to_size,
    roundupsize,
    size_to_class,
)

__all__ = [
    "MAX_ARENA32",
    "MAX_SMALL_SIZE",
    "NUM_SIZE_CLASSES",
    "PAGE_SHIFT",
    "PAGE_SIZE",
    "TRACEMALLOC_DOMAIN",
    "ArenaFallbackWarning",
    "Block",
    "BySize",
    "DoubleFree",
    "Heap",
    "HeapClosed",
    "HeapCorruption",
    "HeapError",
    "HeapWarning",
    "InvalidFree",
    "MStats",
    "OutOfMemory",
    "class_to_allocnpages",
    "class_to_size",
    "enable_tracemalloc",
    "install_fault_reporter",
    "numpy_allocator",
    "roundupsize",
    "size_to_class",
]
__version__ = "0.1.0"
