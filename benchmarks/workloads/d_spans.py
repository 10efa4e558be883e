"""(d) Large malloc+free against 10..100,000 free spans.

See benchmarks/run.py for the layout of the suite.

Go 2014 searched its large free list (spans of >= 128 pages, MaxMHeapList) linearly; goheap's
best fit must not grow with it (issue 13). One heap per N is fragmented into exactly N free spans:
allocate 2N large objects, alternately a span of 128..135 pages and a 5-page separator, then free
the spans and keep the separators, so no two free spans can coalesce. The request, 132 pages, has
exact fits. All the heaps are alive at once and every repeat samples each of them, zeroed and
zero=False, next to glibc malloc+free and calloc+free of the same size, in a shuffled order: the
flatness is then not a drift between cases measured minutes apart.
"""

from __future__ import annotations

from typing import Any

import harness as H
import peers as P
import targets as T

KEY = "d"

REQUEST_PAGES = 132
# Issue 13: flat within 1.5x from 10 to 100,000 free spans, and no dearer than glibc.
TARGET_SPANS_FLAT = 1.5
TARGET_SPANS_RATIO = 1.0

ROWS = ("goheap", "goheap zero=False")


def steps(bench: H.Bench) -> int:
    return bench.cfg.repeats if bench.heap is not None else 0


NAME_FLAT = f"(d) large vs 10..100,000 free spans flat within {TARGET_SPANS_FLAT}x"
NAME_RATIO = f"(d) large vs 10..100,000 free spans <= {TARGET_SPANS_RATIO}x cffi-libc"


def run(bench: H.Bench) -> None:
    if bench.heap is None:
        for name, limit in ((NAME_FLAT, TARGET_SPANS_FLAT), (NAME_RATIO, TARGET_SPANS_RATIO)):
            bench.target(name, "d", None, limit, bench.goheap_skip or "", None)
        return
    import goheap

    c = bench.cfg
    want = REQUEST_PAGES * goheap.PAGE_SIZE
    heaps: dict[int, Any] = {}
    try:
        for n in c.free_spans:
            heap = fragmented_heap(bench, n, goheap.PAGE_SIZE)
            if heap is None:
                break
            heaps[n] = heap
        runs: dict[str, H.Runner] = {
            name: H.round_trip_runner(bench.by_name[name], want)
            for name in (H.REF, H.CALLOC)
            if name in bench.by_name
        }
        for n, heap in heaps.items():
            for peer in P.goheap_peers(bench.mod, heap):
                runs[f"{peer.name} @{n}"] = H.round_trip_runner(peer, want)
        samples, counts = bench.sample("d free spans", runs, target_ns=c.sample_ns // 2)
    finally:
        for heap in heaps.values():
            heap.close()
    cases = [split_case(n, samples, counts) for n in heaps]
    bench.record(
        "d_spans",
        f"(d) large malloc+free ({REQUEST_PAGES} pages) vs number of free spans >= 128 pages",
        "ns per op",
        cases,
        x=list(heaps),
    )
    judge(bench, cases)


def split_case(n: int, samples: dict[str, list[float]], counts: dict[str, int]) -> dict:
    """The case for N free spans: its heap's goheap rows and the shared references, each paired
    per repeat with the references' samples of the same repeat."""
    mine = {name: samples[f"{name} @{n}"] for name in ROWS}
    mine.update((name, samples[name]) for name in (H.REF, H.CALLOC) if name in samples)
    extra = {name: {"free_spans": n, "count": counts[f"{name} @{n}"]} for name in ROWS}
    extra.update((name, {"count": counts[name]}) for name in (H.REF, H.CALLOC) if name in counts)
    return H.case_result(f"{n:,}", mine, (H.REF, H.CALLOC), extra)


def fragmented_heap(bench: H.Bench, n: int, page: int) -> Any:
    """A new heap holding exactly n free spans of 128..135 pages, or None if it does not fit."""
    import goheap

    try:
        heap = goheap.Heap(arena_size=256 * H.GiB)
    except (ValueError, goheap.HeapError):
        heap = goheap.Heap()
    try:
        spans = []
        for i in range(n):
            spans.append(heap.malloc((128 + i % 8) * page, zero=False))
            heap.malloc(5 * page, zero=False)  # the live separator, freed by close()
        for a in spans:
            heap.free(a)
    except MemoryError as e:
        bench.note(f"(d) free spans: stopped before {n:,}: {e}")
        heap.close()
        return None
    return heap


def judge(bench: H.Bench, cases: list[dict]) -> None:
    if not cases:
        return
    for name in ROWS:
        first = cases[0]["rows"][name]["samples"]
        for case in cases:
            row = case["rows"][name]
            row["vs_fewest"] = H.paired_ratio(row["samples"], first)["ratio"]
    span = f"{cases[0]['case']}..{cases[-1]['case']}"
    quick = "quick run: stops at 10,000" if bench.cfg.quick else ""
    meds = {name: [c["rows"][name]["median"] for c in cases] for name in ROWS}
    T.at_most(
        bench,
        NAME_FLAT,
        "d",
        T.flatness(meds["goheap zero=False"]),
        TARGET_SPANS_FLAT,
        f"slowest/fastest h.malloc(n, zero=False)+free median over {span} free spans",
        "; ".join(x for x in (f"zeroed {T.flatness(meds['goheap']):.2f}x", quick) if x),
    )
    worst = max(T.row_ratio(c, "goheap zero=False", H.REF, H.REF) or 0.0 for c in cases)
    zeroed = [T.row_ratio(c, "goheap", H.CALLOC, H.REF) for c in cases]
    T.at_most(
        bench,
        NAME_RATIO,
        "d",
        worst,
        TARGET_SPANS_RATIO,
        f"worst over {span} free spans, zero=False vs glibc malloc+free",
        "; ".join(
            x
            for x in (
                f"zeroed vs calloc worst {max(zeroed):.2f}x" if None not in zeroed else "",
                quick,
            )
            if x
        ),
    )
