"""cli: ``python -m goheap demo|stats|map|classes``.  See goheap/malloc.py for the overview.

Every figure printed is read from a heap that really ran the workload, never
typed in.  The workload is the same for ``stats`` and ``map``: ``--objects``
allocations with sizes drawn from a seeded mix of small and large requests,
then every ``--free-every``-th object freed, optionally followed by a
scavenge; so two runs with the same arguments draw the same heap shape.
Optional extras: tqdm draws the progress bar of long runs (else nothing is
drawn), matplotlib draws ``map --png`` (``pip install 'goheap[plot]'``).

Mistakes never end in a traceback: argparse checks every option (exit 2 with
the usage line); a run that fails (an unwritable PNG, matplotlib missing, the
arena too small for the workload) prints one ``goheap: error: ...`` line and
exits 1; a closed stdout (``goheap map | head -1``) ends quietly.  A
HeapCorruption is goheap's own bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
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


ARENA_MIB_64 = 4096  # --arena-mib default: address space only, nothing is touched
ARENA_MIB_32 = goheap.MAX_ARENA32 >> 20  # --mode 32bit: its default, and its limit


def _heap_from(args: argparse.Namespace) -> goheap.Heap:
    return goheap.Heap(arena_size=args.arena_mib << 20, mode=args.mode, efence=args.efence)


def _check_workload_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fill --arena-mib's default from --mode and refuse a 32-bit arena that
    cannot be (argparse's error: usage line, exit 2)."""
    if args.arena_mib is None:
        args.arena_mib = ARENA_MIB_32 if args.mode == "32bit" else ARENA_MIB_64
    elif args.mode == "32bit" and args.arena_mib > ARENA_MIB_32:
        parser.error(
            f"argument --arena-mib: a 32-bit arena holds at most {ARENA_MIB_32} MiB, "
            f"not {args.arena_mib}"
        )


# ---- option types: argparse turns ArgumentTypeError into "usage ... error", exit 2 -------


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def positive_int(text: str) -> int:
    """An integer >= 1."""
    n = _int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {n}")
    return n


def count(text: str) -> int:
    """An integer >= 0."""
    n = _int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {n}")
    return n


def percent(text: str) -> float:
    """A finite number from 0 to 100."""
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= x <= 100:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a percentage from 0 to 100, not {text}")
    return x


def _add_workload_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--objects",
        type=count,
        default=5000,
        metavar="N",
        help="allocations to make (default: %(default)s)",
    )
    p.add_argument(
        "--free-every",
        type=count,
        default=3,
        metavar="N",
        help="free every Nth object, 0 for none (default: %(default)s)",
    )
    p.add_argument(
        "--large-pct",
        type=percent,
        default=2.0,
        metavar="PCT",
        help=f"percent of objects that are large, {SMALL_MAX + 1} B to {LARGE_MAX >> 10} KiB; "
        "the rest are small (default: %(default)s)",
    )
    p.add_argument(
        "--seed", type=_int, default=1, help="seed of the size mix (default: %(default)s)"
    )
    p.add_argument("--scavenge", action="store_true", help="release free pages afterwards")
    p.add_argument(
        "--arena-mib",
        type=positive_int,
        metavar="MIB",
        help=f"arena reservation in MiB, address space only (default: {ARENA_MIB_64}; "
        f"with --mode 32bit {ARENA_MIB_32}, also its maximum)",
    )
    p.add_argument(
        "--mode",
        choices=("64bit", "32bit"),
        default="64bit",
        help="arena layout (default: %(default)s)",
    )
    p.add_argument("--efence", action="store_true", help="efence mode (every object its own span)")


def _run_workload(args: argparse.Namespace, h: goheap.Heap) -> None:
    workload(h, args.objects, args.free_every, args.seed, args.large_pct)
    if args.scavenge:
        h.scavenge()
    h.check()


# ---- stats --------------------------------------------------------------------------------


# Go MemStats fields goheap never fills: always 0, kept in MStats (and --json) so
# code written against Go's names reads the same.  The table names them once,
# grouped by the reason.
ALWAYS_ZERO = {
    "lookups": "Heap.lookup() calls are not counted",
    "stacks_inuse": "no goroutine stacks",
    "stacks_sys": "no goroutine stacks",
    "mcache_inuse": "the one MCache lives in the heap's C struct, not in mapped metadata",
    "mcache_sys": "the one MCache lives in the heap's C struct, not in mapped metadata",
    "buckhash_sys": "no profiling buckets",
    "next_gc": "no garbage collector",
    "last_gc": "no garbage collector",
    "pause_total_ns": "no garbage collector",
    "num_gc": "no garbage collector",
}
BYTE_FIELD_ENDS = ("alloc", "sys", "idle", "inuse", "released", "faulted", "allocated", "peak")


def stats_table(st: goheap.MStats) -> str:
    """MemStats as aligned "name  value" lines (bytes also in MiB), the fields of
    ALWAYS_ZERO named once at the end (any that is not 0 is listed as usual);
    then by_size as a table of the classes that saw any malloc."""
    lines = []
    zero = []
    for f in dataclasses.fields(st):
        x = getattr(st, f.name)
        if f.name == "by_size" or not isinstance(x, (int, float)):
            continue
        if f.name in ALWAYS_ZERO and x == 0:
            zero.append(f.name)
            continue
        mib = f"  ({x / (1 << 20):.2f} MiB)" if f.name.endswith(BYTE_FIELD_ENDS) else ""
        lines.append(f"{f.name:<16} {x:>14}{mib}")
    if zero:
        lines.append("\nalways 0 in goheap, kept for Go's names (--json has them):")
        reasons: dict[str, list[str]] = {}
        for name in zero:
            reasons.setdefault(ALWAYS_ZERO[name], []).append(name)
        lines.extend(f"  {', '.join(names)}: {why}" for why, names in reasons.items())
    lines.append(f"\n{'class':>5} {'size':>6} {'mallocs':>9} {'frees':>9}  (by_size, classes used)")
    used = [(cl, b) for cl, b in enumerate(st.by_size) if b.mallocs]
    if not used:
        lines.append("  (none: no small object allocated through a size class)")
    lines.extend(f"{cl:>5} {b.size:>6} {b.mallocs:>9} {b.frees:>9}" for cl, b in used)
    return "\n".join(lines)


def cmd_stats(args: argparse.Namespace) -> int:
    """``stats``: run the workload, print its MemStats (table or JSON)."""
    _check_workload_args(args.parser, args)
    with _heap_from(args) as h:
        _run_workload(args, h)
        st = h.stats()
    if args.json:
        print(json.dumps(dataclasses.asdict(st), indent=2))
    else:
        print(stats_table(st))
    return 0


# ---- map ----------------------------------------------------------------------------------


def _check_png_target(path: str) -> None:
    """Fail before the workload runs if the PNG cannot be drawn or written."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CLIError(
            "map --png needs matplotlib: pip install 'goheap[plot]' (or matplotlib)"
        ) from None
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise CLIError(f"cannot write {path}: no such directory {folder}")
    if os.path.isdir(path):
        raise CLIError(f"cannot write {path}: it is a directory")


def cmd_map(args: argparse.Namespace) -> int:
    """``map``: run the workload (unless --empty), then print the text map, or
    with --png write the picture and print one line saying where."""
    _check_workload_args(args.parser, args)
    if args.png:
        _check_png_target(args.png)
    with _heap_from(args) as h:
        if not args.empty:
            _run_workload(args, h)
        m = heapmap.ArenaMap(h, max_cells=args.max_cells)
    if not args.png:
        print(m.text(width=args.width))
        return 0
    m.png(args.png, width=args.png_width)
    print(
        f"wrote {args.png}: {len(m.spans)} spans, {m.ncells} cells of "
        f"{heapmap.format_bytes(m.cell_bytes)}, {args.png_width} per row"
    )
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


# ---- parser and main ----------------------------------------------------------------------


class CLIError(Exception):
    """A mistake the user can fix, reported as one ``goheap: error:`` line, exit 1."""


# Failures of a run, not of goheap: reported as one line.  HeapCorruption (a
# goheap bug) is not among them and keeps its traceback.
RUNTIME_ERRORS = (CLIError, OSError, MemoryError, ImportError, ValueError, goheap.HeapClosed)


def version() -> str:
    """The installed distribution's version, else the package's own."""
    try:
        return importlib.metadata.version("goheap")
    except importlib.metadata.PackageNotFoundError:
        return str(getattr(goheap, "__version__", "unknown"))


def prog_name() -> str:
    """The program name as invoked: ``goheap`` for the console script,
    ``python -m goheap`` (with the interpreter's own name) for -m."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if name in ("", "-c", "__main__.py"):
        return f"{os.path.basename(sys.executable) or 'python'} -m goheap"
    return name


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The argparse parser of the command line (``prog``: default prog_name())."""
    parser = argparse.ArgumentParser(
        prog=prog or prog_name(),
        description="goheap: the Go runtime's 2014 page heap on real memory.",
    )
    parser.add_argument("--version", action="version", version=f"goheap {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("demo", help="a narrated tour of goheap on real memory")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("stats", help="MemStats of a workload, as a table or JSON")
    _add_workload_args(p)
    p.add_argument("--json", action="store_true", help="print JSON (every MemStats field)")
    p.set_defaults(func=cmd_stats, parser=p)
    p = sub.add_parser("map", help="a picture of the arena after a workload: text, or --png")
    _add_workload_args(p)
    p.add_argument("--empty", action="store_true", help="draw a fresh heap (no workload)")
    p.add_argument(
        "--png", metavar="FILE", help="write a PNG instead of printing text (needs matplotlib)"
    )
    p.add_argument(
        "--width",
        type=positive_int,
        default=64,
        metavar="N",
        help="text cells per line (default: %(default)s)",
    )
    p.add_argument(
        "--png-width",
        type=positive_int,
        default=128,
        metavar="N",
        help="PNG cells per row (default: %(default)s)",
    )
    p.add_argument(
        "--max-cells",
        type=positive_int,
        default=2048,
        metavar="N",
        help="at most this many cells: pages are grouped to fit (default: %(default)s)",
    )
    p.set_defaults(func=cmd_map, parser=p)
    p = sub.add_parser("classes", help="the size-class table with waste figures")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_classes)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line with ``argv`` (default sys.argv[1:]); the exit status:
    0, 1 for a runtime error (one line on stderr), 2 for a usage error (argparse),
    130 on Ctrl-C.  A closed stdout (``goheap ... | head -1``) ends quietly with 1,
    as the Python docs recommend ("Note on SIGPIPE")."""
    args = build_parser().parse_args(argv)
    try:
        result: Any = args.func(args)
        sys.stdout.flush()  # here, so a closed pipe raises inside the try
    except BrokenPipeError:
        # Python flushes stdout again at exit: point it at devnull so that
        # flush cannot fail a second time and print "Exception ignored".
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print("goheap: interrupted", file=sys.stderr)
        return 130
    except RUNTIME_ERRORS as e:
        print(f"goheap: error: {_one_line(e)}", file=sys.stderr)
        return 1
    return int(result)


def _one_line(e: BaseException) -> str:
    """``e`` as one line of text (its type when it has no message)."""
    text = " ".join(str(e).split())
    return text or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
