"""Block: one goheap object as a Python buffer.  See goheap/malloc.py for the overview.

Vocabulary: a *Block* owns exactly one object of one heap (``Heap.alloc``); an
*export* is a buffer some consumer (memoryview, bytes, NumPy) took from it.

The buffer protocol is C's (``BlockBase`` in goheap/_pyfast.c), the same on
every Python: format "B", itemsize 1, writable, one dimension, and every
export counted until it is released.  Only a C type can export a buffer
before Python 3.12, and the count has to live where the buffer is handed out.
Everything else -- when to free, what to say -- is here.

Lifetime, the invariants this module owns:
- the object is freed exactly once: by ``free()``, by the ``with`` block's end,
  or by the finalizer when the Block is garbage, whichever comes first
  (C's ``_release`` flips the Block to freed once, so nothing frees twice);
- ``free()`` under a live export raises BufferError and frees nothing (as
  ``bytearray`` refuses to resize and ``mmap`` to close); every export holds a
  reference to the Block, so the finalizer never runs under one;
- after ``free()`` every access raises ValueError before touching memory:
  ``memoryview(b)``, ``bytes(b)``, ``numpy.frombuffer(b)``, ``b[0]``, slicing,
  ``len``, ``addr`` (``free()`` itself may be repeated, like ``file.close()``);
- the Block holds its heap's arena owner (mheap.ArenaOwner), so its memory
  stays mapped after ``Heap.close()`` until the Block and its exports are
  gone: it stays readable and writable, and ``free()`` says HeapClosed.
"""

from __future__ import annotations

import math
import operator
from typing import TYPE_CHECKING, Any, NoReturn

from goheap import _native

if TYPE_CHECKING:
    import numpy as np

BlockBase: Any = _native.block_base()


class Block(BlockBase):  # a C type: mypy sees Any
    """One live goheap object, as a writable bytes-like buffer of ``size`` bytes.

    Made by ``Heap.alloc(size)``; never construct it directly.  Supports
    ``memoryview(block)``, ``bytes(block)``, ``len``, indexing and slicing
    (an int, or ``bytes`` for a slice, as ``mmap`` does), slice assignment,
    ``numpy.frombuffer(block, dtype)``, and ``with``.  ``free()`` gives the
    object back; otherwise it is freed when the Block is garbage collected.
    Equality and hash are identity: two Blocks are never the same object."""

    __slots__ = ("__weakref__",)

    # ---- identity ------------------------------------------------------------------------

    @property
    def addr(self) -> int:
        """The object's address (an int); valid until ``free()``."""
        self._check()
        return int(self._addr)

    @property
    def size(self) -> int:
        """The length of the buffer in bytes: the size asked for, not the class size
        (``heap.usable_size(block.addr)`` gives that)."""
        return int(self._size)

    @property
    def heap(self) -> Any:
        """The Heap the object belongs to."""
        return self._heap

    # ---- access --------------------------------------------------------------------------

    def _check(self) -> None:
        if self.freed:
            raise ValueError(f"operation on a freed goheap.Block (was {self._addr:#x})")

    @property
    def view(self) -> memoryview:
        """A writable memoryview of the ``size`` bytes (format "B"): an export,
        so ``free()`` raises BufferError until it is released.  ValueError if
        the Block is freed."""
        return memoryview(self)

    def __len__(self) -> int:
        self._check()
        return int(self._size)

    def __getitem__(self, key: int | slice) -> int | bytes:
        with memoryview(self) as m:
            v = m[key]
            if isinstance(v, memoryview):
                with v:
                    return v.tobytes()
            return v

    def __setitem__(self, key: int | slice, value: Any) -> None:
        with memoryview(self) as m:
            m[key] = value

    def __bytes__(self) -> bytes:
        with memoryview(self) as m:
            return m.tobytes()

    # ---- freeing -------------------------------------------------------------------------

    def free(self) -> None:
        """Free the object now.  Repeating it does nothing.  BufferError (and no
        free) while an exported buffer is alive; HeapClosed if the heap was
        closed (the Block counts as freed then: its memory goes with it)."""
        if self._release():
            self._heap.free(self._addr)

    def __del__(self) -> None:
        # The garbage collector's free: nobody to raise to, and the heap may be
        # closed (then the memory goes with the Block's arena owner).
        try:
            if self._release():
                self._heap.free(self._addr)
        except Exception:
            pass

    def __enter__(self) -> Block:
        self._check()
        return self

    def __exit__(self, *exc: object) -> None:
        self.free()

    def __repr__(self) -> str:
        state = "freed" if self.freed else f"at {self._addr:#x}"
        return f"<goheap.Block {self._size} bytes {state}>"

    # ---- no copies -----------------------------------------------------------------------

    def _refuse_copy(self, *args: object) -> NoReturn:
        raise TypeError(
            "cannot copy or pickle a goheap.Block: it owns one object at an address "
            "of this process's heap, which a copy would share and free twice; "
            "copy its contents instead (bytes(block), or heap.alloc and slice assignment)"
        )

    __reduce_ex__ = __reduce__ = __copy__ = __deepcopy__ = _refuse_copy


def new_block(heap: Any, size: int, zero: bool = True, align: int | None = None) -> Block:
    """``Heap.alloc``'s body: malloc ``size`` bytes (zeroed unless ``zero`` is
    False, aligned as ``malloc`` aligns) and wrap them."""
    owner = heap._owner()  # first: a close() after the malloc cannot unmap under us
    try:
        v = heap.malloc(size, zero) if align is None else heap.malloc(size, zero, align=align)
    except BaseException:
        # The exception's traceback holds this frame, and the caller may keep
        # it (a log record, pytest's excinfo, sys.last_exc, another thread's
        # errors list): the frame must not keep the arena owner, or the heap
        # stays mapped after close() for as long as the exception lives.
        del owner
        raise
    try:
        return _native.block_new(Block, heap, owner, v, size)
    except BaseException:
        del owner  # as above
        heap.free(v)
        raise


def _shape(shape: Any) -> tuple[int, ...]:
    """``shape`` as np.empty reads it: an integer (int, numpy.int64 ...), or an
    iterable of them."""
    try:
        return (operator.index(shape),)
    except TypeError:
        pass
    try:
        dims = tuple(shape)
    except TypeError:
        raise TypeError(
            f"shape must be an integer or a sequence of integers, not {type(shape).__name__}"
        ) from None
    try:
        return tuple(operator.index(d) for d in dims)
    except TypeError:
        raise TypeError(f"shape {shape!r}: every dimension must be an integer") from None


def new_ndarray(
    heap: Any, shape: Any, dtype: Any, order: str = "C", zero: bool = True
) -> np.ndarray[Any, Any]:
    """``Heap.ndarray``'s body: a NumPy array on one goheap object, which lives
    as long as the array (and any view of it) does."""
    try:
        import numpy as np
    except ImportError as e:  # NumPy is optional for goheap, required here
        raise ImportError(
            "goheap.Heap.ndarray needs NumPy, which is not installed: pip install numpy"
        ) from e
    dt = np.dtype(dtype)
    dims = _shape(shape)
    if order not in ("C", "F"):
        raise ValueError(f"order must be 'C' or 'F', not {order!r}")
    if any(d < 0 for d in dims):
        raise ValueError(f"negative dimensions are not allowed: {dims}")
    count = math.prod(dims)
    b = new_block(heap, count * dt.itemsize, zero)
    # frombuffer cannot cut an itemsize-0 dtype; reshape keeps the view (and
    # so the Block) as the array's base.
    flat = np.frombuffer(b, dtype=dt, count=count) if dt.itemsize else np.empty(count, dt)
    return flat.reshape(dims, order="F" if order == "F" else "C")
