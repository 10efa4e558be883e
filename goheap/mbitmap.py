"""The GC bitmap's geometry and its whole-heap check.

See goheap/malloc.py for the overview.

Four bits per 8-byte heap word, grouped by kind in each 64-bit bitmap word:
bits 0-15 *allocated*, 16-31 *block boundary*, 32-47 *marked*, 48-63 *special*,
for heap words 16k .. 16k+15.  The bitmap lies below ``arena_start`` and grows
down: the word describing heap address v is at
``arena_start - 8 * ((v - arena_start) / 8 / 16 + 1)``, bit ``(v - arena_start)/8 % 16``.

Meaning (Go 1.2, which lets free detect misuse): *allocated* only on the first
word of a live object; *boundary* alone on the first word of a free object (and
just past the last object of a span with a tail); nothing anywhere else.  The
bitmap is the single truth for "a live object starts here"; the marking itself
runs in C (goheap/_sys.c, section "GC bitmap").
"""

from __future__ import annotations

from typing import Any

from goheap import _native

WORDS_PER_BITMAP_WORD = 16
BITMAP_GROUP = 8 * WORDS_PER_BITMAP_WORD  # heap bytes one bitmap word describes
BIT_ALLOCATED = _native.BIT_ALLOCATED
BIT_BOUNDARY = _native.BIT_BOUNDARY


def bitmap_word_addr(arena_start: int, v: int) -> tuple[int, int]:
    """(address of the bitmap word, shift) for heap address v."""
    off = (v - arena_start) // 8
    return arena_start - 8 * (off // WORDS_PER_BITMAP_WORD + 1), off % WORDS_PER_BITMAP_WORD


def bits(c: Any, v: int) -> int:
    """v's four bits by kind: BIT_ALLOCATED, BIT_BOUNDARY, ..."""
    return _native.bitmap_get(c, v)


def is_live(c: Any, v: int) -> bool:
    return bool(_native.bitmap_get(c, v) & BIT_ALLOCATED)


def count(c: Any, start: int, nbytes: int) -> tuple[int, int]:
    """(allocated, boundary) bits describing [start, start + nbytes)."""
    return _native.bitmap_count(c, start, nbytes)
