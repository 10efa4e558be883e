"""(f) efence: every object its own span, faulted on free, against normal mode.

See benchmarks/run.py for the layout of the suite.

Heap(efence=True) trades speed for catching use-after-free; this shows what it costs. Ratios are
to cffi-libc and to goheap in normal mode.
"""

from __future__ import annotations

import harness as H
import peers as P

from workloads.b_random_batch import batch_case

KEY = "f"

SIZES = (8, 512, 4096, 32768)


def steps(bench: H.Bench) -> int:
    return (len(SIZES) + 1) * bench.cfg.repeats


def run(bench: H.Bench) -> None:
    if bench.heap is None:
        bench.note(f"(f) efence: skipped: {bench.goheap_skip}")
        return
    import goheap

    try:
        fence = goheap.Heap(efence=True)
        fence.free(fence.malloc(64))
    except Exception as e:
        bench.note(f"(f) efence: skipped: Heap(efence=True) failed: {type(e).__name__}: {e}")
        return
    normal = goheap.Heap()
    chosen = [
        bench.by_name[H.REF],
        P.goheap_peers(bench.mod, normal)[0],
        P.goheap_peers(bench.mod, fence, "goheap efence")[0],
    ]
    bases = (H.REF, "goheap")
    c = bench.cfg
    try:
        cases = [
            bench.measure(
                f"f {H.fmt_size(size)}",
                {p.name: H.round_trip_runner(p, size) for p in chosen},
                bases,
            )
            for size in SIZES
        ]
        cases.append(
            batch_case(
                bench, f"f {c.cache_n:,} random x 10", c.cache_n, 10, c.repeats, chosen, bases
            )
        )
    finally:
        fence.close()
        normal.close()
    bench.record(
        "f",
        "(f) efence (every object its own span, faulted on free) vs normal mode",
        "ns per op",
        cases,
    )
