"""Block: one goheap object as a Python buffer.  See goheap/malloc.py for the overview.

Vocabulary: a *Block* owns exactly one object of one heap (``Heap.alloc``); an
*export* is a buffer some consumer (memoryview, bytes, NumPy) took from it.

Lifetime, the invariants this module owns:
- the object is freed exactly once: by ``free()``, by the ``with`` block's end,
  or by a ``weakref.finalize`` when the Block is garbage, whichever comes first
  (the finalizer is detached by ``free()``, so it never frees twice);
- every export holds a reference to the Block, so a NumPy array or memoryview
  built on a Block keeps the object alive: the finalizer cannot run under it;
- after ``free()`` every Block operation raises ValueError before touching
  memory (``free()`` itself may be repeated, like ``file.close()``).

The buffer protocol, and why there are two implementations:
- Python >= 3.12 (PEP 688): Block defines ``__buffer__``/``__release_buffer__``
  and counts its exports; ``free()`` raises BufferError while one is alive
  (as ``bytearray`` refuses to resize and ``mmap`` to close), and a freed Block
  refuses to export.  The Block is then fully safe.
- Python 3.10/3.11 cannot let a Python class export a buffer.  There each Block
  is an instance of a per-size subclass of ``ctypes.c_ubyte * size`` placed on
  the object's address (``from_address``: no copy), so ``memoryview(block)`` and
  ``numpy.frombuffer(block)`` work, zero-copy, with ctypes as the exporter.
  ctypes spells the format "<B", which NumPy reads but memoryview will not
  index: use ``memoryview(block).cast("B")``, or ``block.view`` (format "B").
  ctypes does not count exports, so here ``free()`` cannot see a live view: a
  memoryview or array taken from a Block and kept past ``free()`` points at
  freed memory, and ``memoryview(block)`` after ``free()`` is not caught.
  Everything written in Python (indexing, slicing, ``bytes()``, ``.view``,
  ``len``) still checks.  Letting the Block go out of scope instead of calling
  ``free()`` is always safe: the finalizer waits for the last view.
"""

from __future__ import annotations

import ctypes
import functools
import math
import sys
import weakref
from typing import Any, cast

PEP688 = sys.version_info >= (3, 12)


def _free_quietly(heap: Any, v: int) -> None:
    # Runs from the garbage collector: the heap may have been closed (its
    # memory is gone, nothing to free) and there is nobody to raise to.
    try:
        heap.free(v)
    except Exception:
        pass


class Block:
    """One live goheap object, as a writable bytes-like buffer of ``size`` bytes.

    Made by ``Heap.alloc(size)``; never construct it directly.  Supports
    ``memoryview(block)``, ``bytes(block)``, ``len``, indexing and slicing
    (an int, or ``bytes`` for a slice, as ``mmap`` does), slice assignment,
    ``numpy.frombuffer(block, dtype)``, and ``with``.  ``free()`` gives the
    object back; otherwise it is freed when the Block is garbage collected.
    See the module docstring for what Python 3.10/3.11 cannot check."""

    __slots__ = ()  # storage comes from the concrete class (see _block_class)

    _heap: Any
    _addr: int
    _size: int
    _finalizer: weakref.finalize
    _exports: int

    # ---- identity ------------------------------------------------------------------------

    @property
    def addr(self) -> int:
        """The object's address (an int); valid until ``free()``."""
        self._check()
        return self._addr

    @property
    def size(self) -> int:
        """The length of the buffer in bytes: the size asked for, not the class size
        (``heap.usable_size(block.addr)`` gives that)."""
        return self._size

    @property
    def heap(self) -> Any:
        """The Heap the object belongs to."""
        return self._heap

    @property
    def freed(self) -> bool:
        """Whether ``free()`` has run."""
        return not self._finalizer.alive

    # ---- access --------------------------------------------------------------------------

    def _check(self) -> None:
        if not self._finalizer.alive:
            raise ValueError(f"operation on a freed goheap.Block (was {self._addr:#x})")

    @property
    def view(self) -> memoryview:
        """A writable memoryview of the ``size`` bytes (format "B"), checked now:
        ValueError if the Block is freed, HeapClosed if its heap is.  Like any
        view, it must not be used after ``free()``."""
        self._check()
        return self._heap.view(self._addr, self._size) if self._size else memoryview(b"")

    def __len__(self) -> int:
        self._check()
        return self._size

    def __getitem__(self, key: int | slice) -> int | bytes:
        v = self.view[key]
        return v.tobytes() if isinstance(v, memoryview) else v

    def __setitem__(self, key: int | slice, value: Any) -> None:
        self.view[key] = value

    def __bytes__(self) -> bytes:
        return self.view.tobytes()

    # ---- the buffer protocol on Python >= 3.12 (PEP 688) ---------------------------------

    def __buffer__(self, flags: int) -> memoryview:
        """PEP 688 export: refused once freed; counted until released."""
        v = self.view
        self._exports += 1  # type: ignore[misc]  # slots live in the concrete class
        return v

    def __release_buffer__(self, view: memoryview) -> None:
        """PEP 688: the consumer is done with an export."""
        self._exports -= 1  # type: ignore[misc]
        view.release()

    # ---- freeing -------------------------------------------------------------------------

    def free(self) -> None:
        """Free the object now.  Repeating it does nothing.  BufferError (and no
        free) while a buffer exported on Python >= 3.12 is alive."""
        if not self._finalizer.alive:
            return
        if self._exports:
            raise BufferError(
                f"goheap.Block {self._addr:#x}: {self._exports} exported buffer(s) still alive"
            )
        self._finalizer.detach()
        self._heap.free(self._addr)

    def __enter__(self) -> Block:
        self._check()
        return self

    def __exit__(self, *exc: object) -> None:
        self.free()

    def __repr__(self) -> str:
        state = "freed" if self.freed else f"at {self._addr:#x}"
        return f"<goheap.Block {self._size} bytes {state}>"


if PEP688:

    class _HeapBlock(Block):
        __slots__ = ("__weakref__", "_addr", "_exports", "_finalizer", "_heap", "_size")

    def _block_class(size: int) -> Any:
        return _HeapBlock

    def _place(cls: Any, v: int) -> Any:
        return object.__new__(cls)

else:

    @functools.lru_cache(maxsize=512)
    def _block_class(size: int) -> Any:
        # goheap: Python < 3.12 lets only C types export buffers; a ctypes array
        # over the object is the exporter, and Block's methods come first.
        return type("Block", (Block, ctypes.c_ubyte * size), {"__module__": __name__})

    def _place(cls: Any, v: int) -> Any:
        return cls.from_address(v)


def new_block(heap: Any, size: int) -> Block:
    """``Heap.alloc``'s body: malloc ``size`` zeroed bytes and wrap them."""
    v = heap.malloc(size)
    try:
        b = _place(_block_class(size), v)
        b._heap, b._addr, b._size, b._exports = heap, v, size, 0
        b._finalizer = weakref.finalize(b, _free_quietly, heap, v)
        b._finalizer.atexit = False  # at exit the heap's unmapping frees everything
    except BaseException:
        heap.free(v)
        raise
    return b


def new_ndarray(heap: Any, shape: int | tuple[int, ...], dtype: Any) -> Any:
    """``Heap.ndarray``'s body: a zeroed NumPy array on one goheap object, which
    lives as long as the array (and any view of it) does."""
    try:
        import numpy as np
    except ImportError as e:  # NumPy is optional for goheap, required here
        raise ImportError(
            "goheap.Heap.ndarray needs NumPy, which is not installed: pip install numpy"
        ) from e
    dt = np.dtype(dtype)
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    count = math.prod(shape)
    if count < 0 or any(d < 0 for d in shape):
        raise ValueError(f"negative dimensions are not allowed: {shape}")
    b = new_block(heap, count * dt.itemsize)
    return np.frombuffer(cast(Any, b), dtype=dt, count=count).reshape(shape)
