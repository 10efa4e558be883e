"""heapmap: pictures of the arena, as text or PNG.  See goheap/malloc.py for the overview.

Vocabulary: a *cell* is one square of the picture: one heap page (8 KiB) when
the mapped arena is small enough, else a run of pages (``pages_per_cell``).  A
cell shows the span covering its first page.  Only ``[arena_start, arena_used)``
is drawn: the rest of the reservation is address space with nothing in it.

What a cell can be (text character / PNG colour):
- ``#`` large object span (orange)
- ``0-9a-zA-Z...`` small-object span, its size class as a character of DIGITS (1 = ``0``, 11 = ``a``) (a colour
  from the class colormap: small classes dark, large classes light)
- ``.`` free span, pages still backed (light grey)
- ``_`` free span with pages released to the OS by the scavenger (white)
- ``!`` efence span whose object was freed: faulted, any touch kills (red)
- ``" "`` hole the 32-bit arena skipped (black)

Occupancy: for in-use spans, the fraction of the span's objects that are live
(``ref / nelems``: the objects whose first word the GC bitmap marks
*allocated*; ``Heap.check`` proves the two agree).  The PNG draws it as a
second panel; the text map prints it per span kind in the summary.

Reads the heap only through ``Heap._spans_snapshot()`` (a read-only accessor
for tools), so drawing never changes the heap.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter
from typing import Any

from goheap.sizeclasses import NUM_SIZE_CLASSES, PAGE_SHIFT

# One character per small class (66 of them at 8 KiB pages).
DIGITS = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ+*@%&="
if len(DIGITS) < NUM_SIZE_CLASSES - 1:
    raise ImportError(f"heapmap: {NUM_SIZE_CLASSES - 1} size classes, {len(DIGITS)} characters")

HOLE, FREE, RELEASED, LARGE, FAULTED = " ", ".", "_", "#", "!"

SpanRow = tuple[int, int, str, int, int, int, int]


def span_char(state: str, sizeclass: int, released: int) -> str:
    """The text character for a span (see the module docstring)."""
    if state == "FREE":
        return RELEASED if released else FREE
    if state == "FAULTED":
        return FAULTED
    if state == "IN_USE":
        return DIGITS[sizeclass - 1] if sizeclass else LARGE
    return "?"


class ArenaMap:
    """The cells of one heap's arena, taken at one moment."""

    def __init__(self, heap: Any, max_cells: int = 4096) -> None:
        self.arena_start = heap.arena_start
        self.arena_used = heap.arena_used
        self.spans: list[SpanRow] = heap._spans_snapshot()
        npages = (self.arena_used - self.arena_start) >> PAGE_SHIFT
        self.pages_per_cell = max(1, math.ceil(npages / max_cells))
        self.ncells = math.ceil(npages / self.pages_per_cell)
        self._starts = [s[0] for s in self.spans]

    def span_at_page(self, page: int) -> SpanRow | None:
        """The span covering heap page number ``page`` of the arena, or None (hole)."""
        v = self.arena_start + (page << PAGE_SHIFT)
        i = bisect.bisect_right(self._starts, v) - 1
        if i >= 0:
            s = self.spans[i]
            if v < s[0] + (s[1] << PAGE_SHIFT):
                return s
        return None

    def cells(self) -> list[SpanRow | None]:
        """The span shown by each cell, in address order."""
        return [self.span_at_page(i * self.pages_per_cell) for i in range(self.ncells)]

    def text(self, width: int = 64) -> str:
        """The map as lines of ``width`` cells, each line labelled with its address,
        then a legend and per-kind totals."""
        chars = [HOLE if s is None else span_char(s[2], s[3], s[6]) for s in self.cells()]
        cell_bytes = self.pages_per_cell << PAGE_SHIFT
        lines = [
            f"arena [{self.arena_start:#x}, {self.arena_used:#x}) mapped: "
            f"{len(self.spans)} spans, one cell = {self.pages_per_cell} page(s) = "
            f"{cell_bytes // 1024} KiB"
        ]
        for i in range(0, len(chars), width):
            lines.append(
                f"{self.arena_start + i * cell_bytes:#14x} |{''.join(chars[i : i + width])}|"
            )
        lines.append(
            f"legend: {LARGE} large  0-9a-z.. small class (DIGITS)  {FREE} free  "
            f"{RELEASED} released  {FAULTED} efence faulted  ' ' hole"
        )
        lines.extend(self.summary())
        return "\n".join(lines)

    def summary(self) -> list[str]:
        """One line per span kind: spans, pages and live-object occupancy."""
        kinds: Counter[str] = Counter()
        pages: Counter[str] = Counter()
        live: Counter[str] = Counter()
        slots: Counter[str] = Counter()
        for _start, npages, state, cl, ref, nelems, released in self.spans:
            kind = {"FREE": "free (released)" if released else "free", "FAULTED": "faulted"}.get(
                state, "large" if state == "IN_USE" and cl == 0 else "small"
            )
            kinds[kind] += 1
            pages[kind] += npages
            if state == "IN_USE":
                live[kind] += ref
                slots[kind] += nelems if cl else 1
        out = []
        for kind in ("small", "large", "free", "free (released)", "faulted"):
            if kinds[kind]:
                occ = f", {live[kind]}/{slots[kind]} objects live" if slots[kind] else ""
                out.append(f"  {kind:<16} {kinds[kind]:>6} spans {pages[kind]:>8} pages{occ}")
        return out

    def rgba(self, width: int = 128) -> tuple[Any, Any]:
        """Two NumPy RGBA images of ``rows x width`` cells: span kinds, and the
        occupancy of in-use spans (0 = no live object, 1 = full)."""
        import numpy as np
        from matplotlib import colormaps

        cells = self.cells()
        rows = max(1, math.ceil(len(cells) / width))
        kind = np.zeros((rows * width, 4))
        kind[:] = (0, 0, 0, 1)  # holes and past arena_used: black
        occ = np.zeros((rows * width, 4))
        occ[:] = (0, 0, 0, 1)
        classes = colormaps["viridis"]
        fill = colormaps["magma"]
        for i, s in enumerate(cells):
            if s is None:
                continue
            _start, _npages, state, cl, ref, nelems, released = s
            if state == "FREE":
                kind[i] = (1, 1, 1, 1) if released else (0.8, 0.8, 0.8, 1)
                occ[i] = kind[i]
            elif state == "FAULTED":
                kind[i] = (0.85, 0.1, 0.1, 1)
                occ[i] = kind[i]
            elif state == "IN_USE" and cl == 0:
                kind[i] = (0.95, 0.55, 0.1, 1)
                occ[i] = fill(0.35 + 0.6 * min(ref, 1))
            elif state == "IN_USE":
                kind[i] = classes(0.15 + 0.85 * cl / (NUM_SIZE_CLASSES - 1))
                occ[i] = fill(0.35 + 0.6 * (ref / nelems if nelems else 0))
        return kind.reshape(rows, width, 4), occ.reshape(rows, width, 4)

    def png(self, path: str, width: int = 128, title: str | None = None) -> None:
        """Write the picture to ``path`` (needs matplotlib: ``pip install goheap[plot]``)."""
        try:
            import matplotlib
        except ImportError as e:
            raise ImportError(
                "drawing a PNG needs matplotlib: pip install 'goheap[plot]' (or matplotlib)"
            ) from e
        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
        from matplotlib import colormaps
        from matplotlib.patches import Patch

        kind, occ = self.rgba(width)
        # A fixed canvas, so pictures of different heaps compare pixel for pixel.
        fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 6))
        cell_kib = (self.pages_per_cell << PAGE_SHIFT) // 1024
        ax1.imshow(kind, interpolation="nearest", aspect="auto")
        ax1.set_title(
            title
            or f"arena [{self.arena_start:#x}, {self.arena_used:#x}): {len(self.spans)} spans, "
            f"cell = {cell_kib} KiB, {width} cells per row"
        )
        ax2.imshow(occ, interpolation="nearest", aspect="auto")
        ax2.set_title(
            "live objects per in-use span (bitmap 'allocated' bits): dark = few, light = full"
        )
        for ax in (ax1, ax2):
            ax.set_xticks([])
            ax.set_yticks([])
        mid = colormaps["viridis"]
        legend = [
            Patch(color=mid(0.2), label="small span (colour = size class)"),
            Patch(color=(0.95, 0.55, 0.1), label="large object"),
            Patch(color=(0.8, 0.8, 0.8), label="free"),
            Patch(facecolor=(1, 1, 1), edgecolor="k", label="free, released to OS"),
            Patch(color=(0.85, 0.1, 0.1), label="efence: freed, faulted"),
            Patch(color=(0, 0, 0), label="hole / not mapped"),
        ]
        ax1.legend(
            handles=legend, loc="upper center", bbox_to_anchor=(0.5, -0.02), ncol=3, fontsize=8
        )
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
