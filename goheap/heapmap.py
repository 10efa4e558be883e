"""heapmap: pictures of the arena, as text or PNG.  See goheap/malloc.py for the overview.

Vocabulary: a *cell* is one square of the picture: one heap page (8 KiB) when
the mapped arena is small enough, else a run of pages (``pages_per_cell``).  A
cell shows the span covering its first page.  Only ``[arena_start, arena_used)``
is drawn: the rest of the reservation is address space with nothing in it (a
fresh heap has mapped nothing yet and is drawn as one row of such cells).

What a cell can be, its *kind* (text character / PNG colour):
- ``#`` large object span (orange)
- ``$`` efence object span: in efence mode every object, small or large, is
  alone on pages of its own (a sizeclass-0 span, like a large object), so on an
  efence heap every in-use span is one of these (pink)
- ``0-9a-zA-Z...`` small-object span, its size class as a character of DIGITS
  (1 = ``0``, 11 = ``a``) (a colour from the class colormap: small classes dark,
  large classes light)
- ``.`` free span, pages still backed (light grey)
- ``_`` free span with pages released to the OS by the scavenger (white)
- ``!`` efence span whose object was freed: faulted, any touch kills (red)
- ``" "`` hole the 32-bit arena skipped (black)
- past ``arena_used``: reserved, not mapped yet (PNG only, pale blue)

Object borders: neighbouring large (or efence, live or faulted) objects would
read as one.  In
the text map an object drawn over two or more cells starts with ``[`` (so
``[##`` is one object and ``##`` two); in the PNG each object is drawn a shade
darker or lighter than the one before it.

Occupancy: for in-use spans, the fraction of the span's objects that are live
(``ref / nelems``: the objects whose first word the GC bitmap marks
*allocated*; ``Heap.check`` proves the two agree).  The PNG draws it as a
second panel; the text map prints it per span kind in the summary.

Reads the heap only through ``Heap._spans_snapshot()`` (a read-only accessor
for tools) and ``Heap.efence``, so drawing never changes the heap.
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

HOLE, FREE, RELEASED, LARGE, EFENCE, FAULTED = " ", ".", "_", "#", "$", "!"
START = "["  # first cell of an object drawn over two or more cells

SpanRow = tuple[int, int, str, int, int, int, int]

# Span kinds, in the order the summary lists them.
KINDS = ("small", "large", "efence", "free", "free (released)", "faulted")
OBJECT_KINDS = ("large", "efence", "faulted")  # one object per span: borders drawn
KIND_CHAR = {
    "large": LARGE,
    "efence": EFENCE,
    "free": FREE,
    "free (released)": RELEASED,
    "faulted": FAULTED,
}

# PNG colours (RGB); the object kinds have two shades, alternating between neighbours.
RGB_LARGE = ((0.95, 0.55, 0.1), (0.75, 0.38, 0.02))
RGB_EFENCE = ((0.93, 0.45, 0.75), (0.7, 0.25, 0.55))
RGB_FREE = (0.8, 0.8, 0.8)
RGB_RELEASED = (1.0, 1.0, 1.0)
RGB_FAULTED = ((0.85, 0.1, 0.1), (0.6, 0.05, 0.05))
RGB_HOLE = (0.0, 0.0, 0.0)
RGB_UNMAPPED = (0.86, 0.91, 0.97)


def span_kind(s: SpanRow, efence: bool) -> str:
    """The kind of span row ``s`` (one of KINDS); ``efence``: the heap is in efence mode."""
    _start, _npages, state, cl, _ref, _nelems, released = s
    if state == "FREE":
        return "free (released)" if released else "free"
    if state == "CACHED":  # a freed large span C keeps whole: idle memory, free to the user
        return "free"
    if state == "FAULTED":
        return "faulted"
    if cl:
        return "small"
    if not _ref and efence:  # a ready efence span (efence.py): idle until C hands it out
        return "free"
    return "efence" if efence else "large"


def span_char(kind: str, sizeclass: int) -> str:
    """The text character for a span of ``kind`` (see the module docstring)."""
    if kind == "small":
        return DIGITS[sizeclass - 1]
    return KIND_CHAR.get(kind, "?")


def format_bytes(n: int) -> str:
    """``n`` bytes in the largest binary unit that keeps it whole (or one decimal)."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            x = n / (1 << shift)
            return f"{x:.0f} {unit}" if x == int(x) else f"{x:.1f} {unit}"
    return f"{n} B"


class ArenaMap:
    """The cells of one heap's arena, taken at one moment."""

    def __init__(self, heap: Any, max_cells: int = 4096) -> None:
        if max_cells < 1:
            raise ValueError(f"max_cells must be >= 1, not {max_cells}")
        self.arena_start = heap.arena_start
        self.arena_used = heap.arena_used
        self.arena_end = heap.arena_end
        self.efence = bool(heap.efence)
        self.spans: list[SpanRow] = heap._spans_snapshot()
        npages = (self.arena_used - self.arena_start) >> PAGE_SHIFT
        self.pages_per_cell = max(1, math.ceil(npages / max_cells))
        self.ncells = math.ceil(npages / self.pages_per_cell)
        self.cell_bytes = self.pages_per_cell << PAGE_SHIFT
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

    def kind(self, s: SpanRow | None) -> str:
        """The kind of a cell's span ("hole" for None)."""
        return "hole" if s is None else span_kind(s, self.efence)

    def chars(self) -> list[str]:
        """One text character per cell, object starts marked (module docstring)."""
        cells = self.cells()
        out = []
        for i, s in enumerate(cells):
            if s is None:
                out.append(HOLE)
                continue
            kind = self.kind(s)
            first = i == 0 or cells[i - 1] is not s
            multi = i + 1 < len(cells) and cells[i + 1] is s
            out.append(START if kind in OBJECT_KINDS and first and multi else span_char(kind, s[3]))
        return out

    def text(self, width: int = 64) -> str:
        """The map as lines of ``width`` cells, each line labelled with its address,
        then a legend and per-kind totals."""
        if width < 1:
            raise ValueError(f"width must be >= 1, not {width}")
        chars = self.chars()
        lines = [
            f"arena [{self.arena_start:#x}, {self.arena_used:#x}) mapped: "
            f"{len(self.spans)} spans, one cell = {self.pages_per_cell} page(s) = "
            f"{format_bytes(self.cell_bytes)}"
        ]
        if not chars:
            lines.append(
                f"  nothing mapped yet: [{self.arena_start:#x}, {self.arena_end:#x}) "
                f"({format_bytes(self.arena_end - self.arena_start)}) is reserved address space"
            )
        for i in range(0, len(chars), width):
            lines.append(
                f"{self.arena_start + i * self.cell_bytes:#14x} |{''.join(chars[i : i + width])}|"
            )
        lines.append(
            f"legend: {LARGE} large object  {EFENCE} efence object  {FAULTED} efence faulted  "
            f"{START} first cell of an object drawn over several"
        )
        lines.append(
            f"        0-9a-z.. small span (size class, DIGITS)  {FREE} free  "
            f"{RELEASED} free, released  ' ' hole"
        )
        lines.extend(self.summary())
        return "\n".join(lines)

    def summary(self) -> list[str]:
        """One line per span kind: spans, pages and live-object occupancy."""
        kinds: Counter[str] = Counter()
        pages: Counter[str] = Counter()
        live: Counter[str] = Counter()
        slots: Counter[str] = Counter()
        for s in self.spans:
            kind = span_kind(s, self.efence)
            kinds[kind] += 1
            pages[kind] += s[1]
            if s[2] == "IN_USE":
                live[kind] += s[4]
                slots[kind] += s[5] if kind == "small" else 1
        out = []
        for kind in KINDS:
            if kinds[kind]:
                occ = f", {live[kind]}/{slots[kind]} objects live" if slots[kind] else ""
                out.append(f"  {kind:<16} {kinds[kind]:>6} spans {pages[kind]:>8} pages{occ}")
        return out

    def rgba(self, width: int = 128) -> tuple[Any, Any]:
        """Two NumPy RGBA images of ``rows x width`` cells: span kinds, and the
        occupancy of in-use spans (0 = no live object, 1 = full).  Cells past
        ``arena_used`` (all of them on a fresh heap) are reserved, not mapped."""
        import numpy as np
        from matplotlib import colormaps

        cells = self.cells()
        rows = max(1, math.ceil(len(cells) / width))
        kind = np.zeros((rows * width, 4))
        kind[:] = (*RGB_UNMAPPED, 1)
        occ = kind.copy()
        classes = colormaps["viridis"]
        fill = colormaps["magma"]
        shade = 0  # flips at every new span: neighbouring objects differ
        for i, s in enumerate(cells):
            if i and cells[i - 1] is not s:
                shade ^= 1
            k = self.kind(s)
            if s is None:
                kind[i] = occ[i] = (*RGB_HOLE, 1)
            elif k in ("free", "free (released)"):
                kind[i] = occ[i] = (*(RGB_FREE if k == "free" else RGB_RELEASED), 1)
            elif k == "faulted":
                kind[i] = occ[i] = (*RGB_FAULTED[shade], 1)
            elif k in OBJECT_KINDS:
                kind[i] = (*(RGB_LARGE if k == "large" else RGB_EFENCE)[shade], 1)
                occ[i] = fill(0.35 + 0.6 * min(s[4], 1))
                occ[i, :3] *= 1 - 0.15 * shade  # darker, same hue: the occupancy reads the same
            else:
                kind[i] = classes(0.15 + 0.85 * s[3] / (NUM_SIZE_CLASSES - 1))
                occ[i] = fill(0.35 + 0.6 * (s[4] / s[5] if s[5] else 0))
        return kind.reshape(rows, width, 4), occ.reshape(rows, width, 4)

    def _address_axes(self, ax: Any, rows: int, width: int) -> None:
        """Label ``ax``'s rows with their start addresses and its columns with
        the offset into the row."""
        row_bytes = width * self.cell_bytes
        step = max(1, math.ceil(rows / 8))
        ys = list(range(0, rows, step))
        ax.set_yticks([y - 0.5 for y in ys])
        ax.set_yticklabels([f"{self.arena_start + y * row_bytes:#x}" for y in ys], fontsize=7)
        xs = [width * q // 4 for q in range(5)]
        ax.set_xticks([x - 0.5 for x in xs])
        ax.set_xticklabels([f"+{format_bytes(x * self.cell_bytes)}" for x in xs], fontsize=7)
        ax.set_ylabel("row start address", fontsize=8)

    def png(self, path: str, width: int = 128, title: str | None = None) -> None:
        """Write the picture to ``path`` (needs matplotlib: ``pip install goheap[plot]``)."""
        try:
            import matplotlib
        except ImportError as e:
            raise ImportError(
                "drawing a PNG needs matplotlib: pip install 'goheap[plot]' (or matplotlib)"
            ) from e
        if width < 1:
            raise ValueError(f"width must be >= 1, not {width}")
        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
        from matplotlib import colormaps
        from matplotlib.patches import Patch

        kind, occ = self.rgba(width)
        # A fixed canvas, so pictures of different heaps compare pixel for pixel.
        fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 6))
        try:
            ax1.imshow(kind, interpolation="nearest", aspect="auto")
            if title is None and not self.ncells:
                title = (
                    f"arena [{self.arena_start:#x}, {self.arena_end:#x}) reserved, "
                    f"nothing mapped yet: 0 spans, cell = {format_bytes(self.cell_bytes)}"
                )
            ax1.set_title(
                title
                or f"arena [{self.arena_start:#x}, {self.arena_used:#x}): {len(self.spans)} "
                f"spans, cell = {format_bytes(self.cell_bytes)}, {width} cells per row",
                fontsize=10,
            )
            ax2.imshow(occ, interpolation="nearest", aspect="auto")
            ax2.set_title(
                "live objects per in-use span (bitmap 'allocated' bits): dark = few, light = full",
                fontsize=10,
            )
            for ax in (ax1, ax2):
                self._address_axes(ax, kind.shape[0], width)
            ax2.set_xlabel("offset into the row", fontsize=8)
            mid = colormaps["viridis"]
            legend = [
                Patch(color=mid(0.2), label="small span (colour = size class)"),
                Patch(color=RGB_LARGE[0], label="large object (neighbours alternate shade)"),
                Patch(color=RGB_EFENCE[0], label="efence object (own pages)"),
                Patch(color=RGB_FAULTED[0], label="efence: freed, faulted"),
                Patch(color=RGB_FREE, label="free"),
                Patch(facecolor=RGB_RELEASED, edgecolor="k", label="free, released to OS"),
                Patch(color=RGB_UNMAPPED, label="reserved, not mapped yet"),
                Patch(color=RGB_HOLE, label="hole (32-bit)"),
            ]
            ax1.legend(
                handles=legend, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=4, fontsize=7
            )
            fig.tight_layout()
            fig.savefig(path, dpi=100)
        finally:
            plt.close(fig)
