"""cli: ``python -m goheap demo|stats|map|classes``.  See goheap/malloc.py for the overview.

Every figure printed is read from a heap that really ran the workload, never
typed in.  The workload is the same for ``stats`` and ``map``: ``--objects``
allocations with sizes drawn from a seeded mix of small and large requests,
then every ``--free-every``-th object freed, optionally followed by a
scavenge; so two runs with the same arguments draw the same heap shape.
Optional extras: tqdm draws the progress bar of long runs (else nothing is
drawn), matplotlib draws ``map --png`` (``pip install 'goheap[plot]'``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import goheap
from goheap import heapmap, sizeclasses

T = TypeVar("T")

# A rough mix: mostly small objects over all classes, a few large ones.
SMALL_MAX = goheap.MAX_SMALL_SIZE
LARGE_MAX = 256 << 10


def progress(items: Iterable[T], total: int, desc: str) -> Iterator[T]:
    """``items``, with a tqdm progress bar on stderr when tqdm is installed and
    the run is long (> 20,000 steps); tqdm hides itself when stderr is no tty."""
    if total > 20_000:
        try:
            from tqdm import tqdm
        except ImportError:
            pass
        else:
            yield from tqdm(items, total=total, desc=desc, unit="obj", disable=None)
            return
    yield from items


def workload(
    h: goheap.Heap, objects: int, free_every: int, seed: int, large_pct: float
) -> list[int]:
    """Allocate ``objects`` objects, free every ``free_every``-th; return the live ones."""
    rng = random.Random(seed)
    live = []
    for i in progress(range(objects), objects, "malloc"):
        n = (
            rng.randint(SMALL_MAX + 1, LARGE_MAX)
            if rng.random() * 100 < large_pct
            else (int(rng.expovariate(1 / 256)) % SMALL_MAX)
        )
        v = h.malloc(n)
        if free_every and i % free_every == free_every - 1:
            h.free(v)
        else:
            live.append(v)
    return live


def _heap_from(args: argparse.Namespace) -> goheap.Heap:
    return goheap.Heap(arena_size=args.arena_mib << 20, mode=args.mode, efence=args.efence)


def _add_workload_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--objects", type=int, default=5000, help="allocations to make (default 5000)")
    p.add_argument("--free-every", type=int, default=3, help="free every Nth object (0: none)")
    p.add_argument("--large-pct", type=float, default=2.0, help="percent of large objects")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--scavenge", action="store_true", help="release free pages afterwards")
    p.add_argument("--arena-mib", type=int, default=4096, help="arena reservation in MiB")
    p.add_argument("--mode", choices=("64bit", "32bit"), default="64bit")
    p.add_argument("--efence", action="store_true", help="efence mode (every object its own span)")


def _run_workload(args: argparse.Namespace, h: goheap.Heap) -> None:
    workload(h, args.objects, args.free_every, args.seed, args.large_pct)
    if args.scavenge:
        h.scavenge()
    h.check()


# ---- stats --------------------------------------------------------------------------------


def stats_table(st: goheap.MStats) -> str:
    """MemStats as aligned "name  value" lines (bytes also in MiB); by_size as a
    table of the classes that saw any malloc."""
    lines = []
    for f in dataclasses.fields(st):
        if f.name == "by_size":
            continue
        x = getattr(st, f.name)
        mib = (
            f"  ({x / (1 << 20):.2f} MiB)"
            if f.name.endswith(("alloc", "sys", "idle", "inuse", "released", "faulted"))
            else ""
        )
        lines.append(f"{f.name:<16} {x:>14}{mib}")
    lines.append(f"\n{'class':>5} {'size':>6} {'mallocs':>9} {'frees':>9}  (by_size, classes used)")
    for cl, b in enumerate(st.by_size):
        if b.mallocs:
            lines.append(f"{cl:>5} {b.size:>6} {b.mallocs:>9} {b.frees:>9}")
    return "\n".join(lines)


def cmd_stats(args: argparse.Namespace) -> int:
    """``stats``: run the workload, print its MemStats (table or JSON)."""
    with _heap_from(args) as h:
        _run_workload(args, h)
        st = h.stats()
    if args.json:
        print(json.dumps(dataclasses.asdict(st), indent=2))
    else:
        print(stats_table(st))
    return 0


# ---- map ----------------------------------------------------------------------------------


def cmd_map(args: argparse.Namespace) -> int:
    """``map``: run the workload (unless --empty), print the text map, write --png."""
    with _heap_from(args) as h:
        if not args.empty:
            _run_workload(args, h)
        m = heapmap.ArenaMap(h, max_cells=args.max_cells)
        print(m.text(width=args.width))
        if args.png:
            m.png(args.png, width=args.png_width)
            print(f"wrote {args.png}")
    return 0


# ---- classes ------------------------------------------------------------------------------


def cmd_classes(args: argparse.Namespace) -> int:
    """``classes``: the size-class table with tail and worst-case waste."""
    rows = sizeclasses.class_table()
    if args.json:
        print(json.dumps([r._asdict() for r in rows], indent=2))
        return 0
    print(
        f"{len(rows) + 1} size classes (class 0 = large, > {goheap.MAX_SMALL_SIZE} B) "
        f"at {goheap.PAGE_SIZE} B heap pages"
    )
    print("tail: bytes left over at the end of each span; max waste: worst case per object,")
    print("a request one byte above the previous class, as a percent of the class size.")
    print(f"{'class':>5} {'size':>6} {'npages':>6} {'objs':>5} {'tail':>6} {'max waste %':>11}")
    for r in rows:
        print(
            f"{r.sizeclass:>5} {r.size:>6} {r.npages:>6} {r.nobjs:>5} {r.tail_waste:>6} "
            f"{r.max_waste_pct:>11.1f}"
        )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """``demo``: the narrated tour (demo.py)."""
    from goheap import demo

    return demo.main([])


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``python -m goheap``."""
    parser = argparse.ArgumentParser(
        prog="python -m goheap",
        description="goheap: the Go runtime's 2014 page heap on real memory.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="a narrated tour of goheap on real memory")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("stats", help="MemStats of a workload, as a table or JSON")
    _add_workload_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_stats)
    p = sub.add_parser("map", help="a picture of the arena after a workload (text, or --png)")
    _add_workload_args(p)
    p.add_argument("--empty", action="store_true", help="draw a fresh heap (no workload)")
    p.add_argument("--png", metavar="FILE", help="also write a PNG (needs matplotlib)")
    p.add_argument("--width", type=int, default=64, help="text cells per line")
    p.add_argument("--png-width", type=int, default=128, help="PNG cells per row")
    p.add_argument("--max-cells", type=int, default=2048, help="pages are grouped to fit")
    p.set_defaults(func=cmd_map)
    p = sub.add_parser("classes", help="the size-class table with waste figures")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_classes)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``python -m goheap`` with ``argv`` (default sys.argv[1:]); the exit status."""
    args = build_parser().parse_args(argv)
    result: Any = args.func(args)
    return int(result)


if __name__ == "__main__":
    sys.exit(main())
