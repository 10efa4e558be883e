"""(h) Distinct large sizes: a malloc+free round trip whose size changes every time.

See benchmarks/run.py for the layout of the suite.

A round trip of one size (a) lets every allocator reuse the block it just freed, exactly. Here
the size cycles over 100 different page counts, from 5 to 512 pages of 8 KiB (40 KiB to 4 MiB),
spaced geometrically (each a few percent above the last, and the first few one page apart so no
count repeats), visited in a fixed shuffled order, so no request is the size of the one before
it: the page heap has to split, coalesce and search. Each size also ends a random number of bytes
short of its last page, as real requests do. The sizes are the same for every peer; one sample is
one or more passes over all of them, and a figure is ns per round trip.
"""

from __future__ import annotations

import random

import harness as H
import targets as T

KEY = "h"

PAGE = 8 * H.KiB  # goheap's PAGE_SIZE, fixed here so every page-size lane asks the same sizes
NSIZES, FIRST_PAGES, LAST_PAGES = 100, 5, 512
# Issue 13: distinct large sizes no dearer than twice glibc; zero=False against malloc, the zeroed
# default against calloc (its fair reference, as in a).
TARGET_DISTINCT = 2.0


def page_counts() -> list[int]:
    """NSIZES distinct page counts from FIRST_PAGES to LAST_PAGES, geometrically spaced."""
    q = (LAST_PAGES / FIRST_PAGES) ** (1 / (NSIZES - 1))
    out: list[int] = []
    for i in range(NSIZES):
        out.append(max(round(FIRST_PAGES * q**i), out[-1] + 1 if out else FIRST_PAGES))
    return out


def sizes(seed: int) -> list[int]:
    rng = random.Random(seed)
    out = [(n - 1) * PAGE + rng.randint(1, PAGE) for n in page_counts()]
    rng.shuffle(out)
    return out


def steps(bench: H.Bench) -> int:
    return bench.cfg.repeats


def run(bench: H.Bench) -> None:
    cycle = sizes(bench.cfg.seed)
    runs = {p.name: H.cycle_runner(p, cycle) for p in bench.peers_for(min(cycle))}
    case = bench.measure(
        f"h {len(cycle)} sizes, {FIRST_PAGES}..{page_counts()[-1]} pages",
        runs,
        (H.REF, H.CALLOC),
        ops=len(cycle),
    )
    bench.record(
        "h",
        "(h) distinct large sizes: malloc+free, the size cycling over 100 page counts",
        "ns per op",
        [case],
        sizes=cycle,
    )
    T.nozero_and_zeroed(
        bench,
        case,
        "(h) distinct large sizes",
        "h",
        (TARGET_DISTINCT, TARGET_DISTINCT),
        ", 100 sizes of 5..512 pages",
    )
