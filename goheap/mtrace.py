"""mtrace: goheap's objects in Python's tracemalloc.  See goheap/malloc.py for the overview.

Vocabulary: a *domain* is tracemalloc's name space for addresses (0 is Python's
own allocator); goheap reports under TRACEMALLOC_DOMAIN, so its objects never
collide with Python's and one ``tracemalloc.DomainFilter`` selects them.

How: ``install(heap)`` gives that one heap instance-level ``malloc``/``free``/
``realloc``/``close`` that wrap the ones it had and call the stable C API
``PyTraceMalloc_Track``/``Untrack`` through ``ctypes.pythonapi`` (which holds
the GIL, as those functions require).  Nothing else changes, so a heap that is
not traced runs exactly the code it ran before: tracing costs nothing when off.  Both calls are no-ops while
tracemalloc is not tracing, so a traced heap may outlive ``tracemalloc.stop()``.

Sizes: each trace carries the object's usable size (its class size, or its
span for a large object), so the traces of a heap add up to
``stats().heap_alloc``, Go's figure.

Frames: tracemalloc records the Python frames that are running when
``PyTraceMalloc_Track`` is called; the innermost is always goheap's own
wrapper (this file), because only a C caller could call it from the user's
frame and the C core never calls Python.  So with ``tracemalloc.start(1)``
every goheap trace names this file, and ``statistics("lineno")`` groups them
all on one line.  Start tracemalloc with enough frames to reach the caller
(``malloc``: 2, ``Heap.alloc``: 4, ``Heap.ndarray``: 5; ``tracemalloc.start(8)``
is comfortable) and ask ``allocation_site(trace.traceback)`` for the first
frame outside goheap.

Invariant: ``live`` holds exactly the addresses of this heap that were tracked
and not yet untracked; ``close`` untracks them, so a closed heap leaves no
traces behind.
"""

from __future__ import annotations

import ctypes
import os
import tracemalloc
from typing import Any

# "goh" in ASCII: any number tracemalloc is not using would do (0 is Python's
# allocator, numpy uses 389047); it only has to be the same in every process.
TRACEMALLOC_DOMAIN = 0x676F68

_track = ctypes.pythonapi.PyTraceMalloc_Track
_track.argtypes = (ctypes.c_uint, ctypes.c_size_t, ctypes.c_size_t)
_track.restype = ctypes.c_int
_untrack = ctypes.pythonapi.PyTraceMalloc_Untrack
_untrack.argtypes = (ctypes.c_uint, ctypes.c_size_t)
_untrack.restype = ctypes.c_int

# Set by malloc.enable_tracemalloc(): heaps created afterwards trace too.
enabled = False

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def install(heap: Any) -> None:
    """Make ``heap`` report every malloc and free to tracemalloc.  Idempotent.
    Objects allocated before this call are not traced (their frees untrack
    nothing, which tracemalloc allows)."""
    if getattr(heap, "_traced", False):
        return
    heap._traced = True
    malloc, free, close, usable_size = heap.malloc, heap.free, heap.close, heap.usable_size
    realloc = heap.realloc
    live: set[int] = set()
    domain = TRACEMALLOC_DOMAIN

    def traced_malloc(size: int, zero: bool = True, *, align: int | None = None) -> int:
        v = malloc(size, zero) if align is None else malloc(size, zero, align=align)
        _track(domain, v, usable_size(v))
        live.add(v)
        return v

    def traced_realloc(v: int, size: int) -> int:
        w = realloc(v, size)  # raises on a bad address: then nothing changes
        if w != v:  # in place, the usable size (the trace's size) is unchanged
            if v in live:
                live.discard(v)
                _untrack(domain, v)
            _track(domain, w, usable_size(w))
            live.add(w)
        return w

    def traced_free(v: int) -> None:
        free(v)  # raises on a bad address: then nothing is untracked
        if v in live:
            live.discard(v)
            _untrack(domain, v)

    def traced_close() -> None:
        close()
        for v in live:
            _untrack(domain, v)
        live.clear()

    traced_malloc.__doc__ = malloc.__doc__
    traced_free.__doc__ = free.__doc__
    traced_close.__doc__ = close.__doc__
    traced_realloc.__doc__ = realloc.__doc__
    heap.malloc, heap.free, heap.close = traced_malloc, traced_free, traced_close
    heap.realloc = traced_realloc
    heap._trace_live = live  # for tests: what this heap has tracked


def is_installed(heap: Any) -> bool:
    """Whether ``install(heap)`` has run."""
    return "_trace_live" in vars(heap)


def allocation_site(traceback: tracemalloc.Traceback) -> tracemalloc.Frame | None:
    """The innermost frame of ``traceback`` outside the goheap package: the
    Python line that asked for the object.  None if tracemalloc kept too few
    frames to reach it (see the module docstring: ``tracemalloc.start(8)``)."""
    for frame in reversed(traceback):  # Traceback is oldest first; walk innermost first
        if not os.path.abspath(frame.filename).startswith(_PACKAGE_DIR):
            return frame
    return None
