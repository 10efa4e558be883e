"""GOHEAP_DEBUG=3 checks the whole heap after every malloc and free."""

from __future__ import annotations

import goheap
from goheap import _native, debug
from goheap.errors import HeapCorruption


def test_debug_level3_checks_after_every_call(monkeypatch):
    monkeypatch.setattr(debug, "level", 3)
    with goheap.Heap(arena_size=1 << 26) as h:
        ps = [h.malloc(32) for _ in range(4)]
        h.free(ps[1])
        h.free(ps[2])
        _native.write_word(ps[2], ps[0])  # corrupt a free-list link (a write after free)
        try:
            h.malloc(100)  # another class: the fast path is fine, check() is not
        except HeapCorruption as e:
            assert "free-list link" in str(e)
        else:
            raise AssertionError("level 3 did not check after malloc")
        _native.write_word(ps[2], ps[1])  # undo, so close() sees a sound heap
        h.check()
