"""goheap's exception types and the always-on consistency check.

See goheap/malloc.py for the overview.

Every public call either succeeds or raises one of these (or a plain ValueError /
TypeError for a malformed argument), and in every case the heap is left as it
was: ``Heap.check()`` passes afterwards.
"""

from __future__ import annotations

from typing import NoReturn


class HeapError(Exception):
    """Base of every goheap error."""


class InvalidFree(HeapError, ValueError):
    """free() of an address that is not the start of a live object."""


class DoubleFree(InvalidFree):
    """free() of an object that is already free."""


class HeapCorruption(HeapError):
    """A heap invariant is broken; the message names it and the values involved."""


class HeapClosed(HeapError):
    """The heap was closed; its memory is gone."""


class OutOfMemory(HeapError, MemoryError):
    """The OS or the arena could not provide the memory."""


class HeapWarning(UserWarning):
    """Base of goheap's warnings."""


class ArenaFallbackWarning(HeapWarning):
    """The 64-bit reservation could not be had and the heap fell back to Go's
    32-bit layout (at most MAX_ARENA32 bytes of arena), as Go's mallocinit does.
    Only when that still gives the arena asked for; otherwise Heap() raises
    OutOfMemory."""


def throw(msg: str) -> NoReturn:
    """Go's runtime·throw: an impossible state.  Always on (never ``assert``,
    which ``python -O`` strips)."""
    raise HeapCorruption(msg)
