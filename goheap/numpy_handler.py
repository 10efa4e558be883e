"""NumPy arrays on a goheap heap: a NEP 49 data-memory handler named "goheap".
See goheap/malloc.py for the overview; the handler's C half is goheap/_nphandler.c.

    with goheap.numpy_allocator(h):
        a = np.zeros(1000)          # a's data is an object of h
    goheap.numpy_handler.handler_name(a)   # "goheap"

Vocabulary: NumPy keeps the *current handler* (a PyCapsule named "mem_handler")
in a context variable, so it is per context: per thread (a new thread starts
with NumPy's default on Python 3.10-3.13), and per asyncio task (a copy of
its parent's).  Every array that owns its data keeps the capsule it was made
with and frees through it, whatever the context says later.

What this module owns:
- one capsule per heap, made on first use and cached on the Heap until
  ``close()``; it holds the heap's arena owner, so an array keeps the arena
  mapped after its ``with`` block, after ``close()`` and after the Heap
  object is gone, and the arena is unmapped when the last such array goes;
- ``numpy_allocator(h)``: installs h's capsule for the current context and
  puts back, on exit, exactly the handler its entry replaced (what
  ``PyDataMem_SetHandler`` returned), so blocks nest and the same object may be
  entered again, in any context; exits must mirror entries per context;
- NumPy stays optional: it is imported on first use, and without it (or with
  a NumPy older than 1.22, which has no handler API) the ImportError says so.

The handler's malloc/calloc/realloc/free are C, on the C core's fast path
(no GIL); a miss calls the same Python slow paths as ``Heap.malloc``/``free``/
``realloc`` (``Heap._malloc_slow`` ...), under the GIL.  Alignment: 16 bytes
at least (large objects: 8 KiB); an efence heap's own ``align`` governs there.
NumPy's tracemalloc domain (``np.lib.tracemalloc_domain``) keeps working: NumPy
reports the handler's allocations itself.
"""

from __future__ import annotations

import contextvars
import importlib
import types
import weakref
from typing import Any

from goheap import _native
from goheap.errors import HeapClosed
from goheap.malloc import Heap

__all__ = ["HANDLER_NAME", "NumPyAllocator", "handler_name", "numpy_allocator"]

HANDLER_NAME = "goheap"

_MIN_NUMPY = (1, 22)  # NEP 49's PyDataMem_SetHandler appeared in NumPy 1.22

# Per context: the entries not yet exited, innermost last, as
# (the NumPyAllocator entered, the handler its entry replaced).  A tuple, never
# mutated: a context copied (a new task, copy_context) gets its own stack.
_entered: contextvars.ContextVar[tuple[tuple[NumPyAllocator, Any], ...]] = contextvars.ContextVar(
    "goheap_numpy_entered", default=()
)


class _NumPy:
    """What NumPy's handler API needs, loaded once."""

    def __init__(self) -> None:
        try:
            import numpy as np
        except ImportError as e:
            raise ImportError(
                "goheap.numpy_allocator needs NumPy (>= 1.22): pip install numpy", name="numpy"
            ) from e
        version = tuple(int(x) for x in np.__version__.split(".")[:2] if x.isdigit())
        if version < _MIN_NUMPY:
            raise ImportError(
                f"goheap.numpy_allocator needs NumPy >= 1.22 (NEP 49's data-memory handlers); "
                f"this is NumPy {np.__version__}",
                name="numpy",
            )
        # As NumPy's own import_array does: the 2.x module first, and the 1.x
        # one only if that does not exist (on 2.x, reading the 1.x path's
        # _ARRAY_API raises ImportError and writes a warning to stderr).
        try:
            umath = importlib.import_module("numpy._core._multiarray_umath")
        except ModuleNotFoundError:
            umath = importlib.import_module("numpy.core._multiarray_umath")
        self.new_handler, load_api, self.set_handler, self.get_handler = _native.numpy_handler_api()
        load_api(umath._ARRAY_API)  # checks the ABI and feature versions
        multiarray = "numpy._core.multiarray" if version >= (2, 0) else "numpy.core.multiarray"
        self.get_handler_name = importlib.import_module(multiarray).get_handler_name


_api: _NumPy | None = None


def _numpy() -> _NumPy:
    global _api
    if _api is None:
        _api = _NumPy()
    return _api


def handler_name(arr: Any = None) -> str | None:
    """The name of the handler ``arr`` frees its data through ("goheap",
    "default_allocator" ...), or None for an array that owns no data (a
    view); without ``arr``, the current context's handler.  NumPy 1.22+ and
    2.x; ValueError for something that is not an ndarray (NumPy's)."""
    get = _numpy().get_handler_name
    return get() if arr is None else get(arr)


def _capsule(heap: Heap) -> Any:
    """heap's handler capsule, made once (under the heap lock, so two threads
    never make two).  HeapClosed once the heap is closed."""
    cap = heap._numpy_handler
    if cap is not None:
        return cap
    api = _numpy()
    with heap._lock:
        if heap._closed:
            raise HeapClosed("numpy_allocator on a closed heap")
        if heap._numpy_handler is None:
            # The same slow paths as the builtin malloc/free/realloc
            # (Heap._bind_fast_paths), through weak references: an array
            # keeps the arena mapped, never the Heap alive.
            heap._numpy_handler = api.new_handler(
                _native.mheap_addr(heap._c),
                heap._c,
                heap._owner(),
                weakref.WeakMethod(heap._malloc_slow),
                weakref.WeakMethod(heap._free_slow),
                weakref.WeakMethod(types.MethodType(Heap.realloc, heap)),  # not the builtin
            )
        return heap._numpy_handler


class NumPyAllocator:
    """The context manager ``numpy_allocator(heap)`` returns: inside it, the
    data of every array NumPy creates in this context lives on ``heap``.

    Entering installs the heap's handler for the current context (HeapClosed
    if the heap is closed by then); exiting puts back the handler that entry
    replaced.  Re-entrant and nestable; each context (thread, task) that
    enters it must exit it, innermost first (RuntimeError otherwise, and the
    handler is left as it was).  ``with`` gives the heap."""

    __slots__ = ("heap",)

    def __init__(self, heap: Heap) -> None:
        if not isinstance(heap, Heap):
            raise TypeError(f"numpy_allocator needs a goheap.Heap, not {type(heap).__name__}")
        if heap._closed:
            raise HeapClosed("numpy_allocator on a closed heap")
        _numpy()  # ImportError now, not at the with
        self.heap = heap

    def __enter__(self) -> Heap:
        cap = _capsule(self.heap)
        old = _numpy().set_handler(cap)
        _entered.set((*_entered.get(), (self, old)))
        return self.heap

    def __exit__(self, *exc: object) -> None:
        stack = _entered.get()
        if not stack or stack[-1][0] is not self:
            raise RuntimeError(
                "numpy_allocator: exit without a matching entry in this context "
                "(blocks must be exited innermost first, in the context that entered them)"
            )
        _entered.set(stack[:-1])
        _numpy().set_handler(stack[-1][1])

    def __repr__(self) -> str:
        return f"numpy_allocator({self.heap!r})"


def numpy_allocator(heap: Heap) -> NumPyAllocator:
    """``with numpy_allocator(heap):`` -- NumPy arrays created inside, in this
    context, keep their data on ``heap`` (see NumPyAllocator).  TypeError for
    anything but a Heap, HeapClosed for a closed one, ImportError without
    NumPy >= 1.22."""
    return NumPyAllocator(heap)
