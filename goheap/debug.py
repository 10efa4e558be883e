"""Debug level: how much checking runs at API boundaries.

See goheap/malloc.py for the overview.

Tiers, named by cost (as mimalloc's MI_DEBUG): ``throw()`` and the C core's
link and bitmap validation are always on (level 1, the default); level >= 3
runs ``Heap.check()`` (O(heap)) after every malloc and free of heaps created
while it is set.  Set with GOHEAP_DEBUG=N or ``set_level``.
"""

from __future__ import annotations

import os

level: int = int(os.environ.get("GOHEAP_DEBUG", "1") or 1)


def set_level(n: int) -> None:
    """Set the debug level for heaps created from now on and for running checks."""
    global level
    level = int(n)
