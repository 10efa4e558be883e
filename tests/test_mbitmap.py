"""The GC bitmap's geometry (mbitmap.py) against Go's worked example and against
the bits the C core really wrote below arena_start."""

from __future__ import annotations

import goheap
from goheap import _native, mbitmap


def test_mbitmap_geometry_matches_gos_example():
    a = 0xC208000000
    assert mbitmap.bitmap_word_addr(a, a) == (0xC207FFFFF8, 0)
    assert mbitmap.bitmap_word_addr(a, a + 0x78) == (0xC207FFFFF8, 15)
    assert mbitmap.bitmap_word_addr(a, a + 0x80) == (0xC207FFFFF0, 0)
    assert mbitmap.bitmap_word_addr(a, a + 0x2000) == (0xC207FFFDF8, 0)


def test_mbitmap_bits_are_where_the_geometry_says():
    with goheap.Heap(arena_size=1 << 26) as h:
        ps = [h.malloc(48) for _ in range(40)]
        h.free(ps[7])
        for p in ps:
            word, shift = mbitmap.bitmap_word_addr(h.arena_start, p)
            raw = _native.read_word(word)  # the bitmap as it sits in memory
            got = (raw >> shift) & (mbitmap.BIT_ALLOCATED | mbitmap.BIT_BOUNDARY)
            assert got == mbitmap.bits(h._c, p) & (mbitmap.BIT_ALLOCATED | mbitmap.BIT_BOUNDARY)
            assert mbitmap.is_live(h._c, p) == (p != ps[7])
        live, boundary = mbitmap.count(h._c, h.arena_start, h.arena_used - h.arena_start)
        assert live == 39
        assert boundary == 170 - 39 + 1  # free starts of the one 48-byte span, and its tail mark
        for p in ps[:7] + ps[8:]:
            h.free(p)
