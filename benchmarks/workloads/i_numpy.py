"""(i) NumPy on goheap: np.empty(n) under goheap's NEP 49 handler against NumPy's default.

See benchmarks/run.py for the layout of the suite.

``np.empty(n)`` (float64) for n = 10, 1,000 and 100,000 (80 B, 8,000 B and 800,000 B of data: a
small class, a larger small class, a large span), created and dropped as a NumPy user does, once
with NumPy's default handler and once inside ``goheap.numpy_allocator(heap)`` (issue 15), which
routes the array's data through goheap's C fast path. The two loops are the same code; the
goheap one runs with the handler installed for the current context, entered outside the timed
loop. Before timing, one array of each size is checked to carry the handler it should (name
"goheap" and its data found by ``heap.lookup``; the default row's not), so the figures are known
to measure what they say. When ``Heap(efence_sample=)`` exists, a third row runs the handler on
a heap sampling one allocation in 1,000 as efence (what ``pytest --goheap=sample:1000`` costs).

Ratios are to NumPy's default handler in the same repeat.
"""

from __future__ import annotations

from typing import Any

import harness as H
import peers as P
import targets as T

KEY = "i"

COUNTS = (10, 1_000, 100_000)
DEFAULT = "numpy default"
GOHEAP = "numpy goheap"
SAMPLED = "numpy goheap sample:1000"

# Issue 15: np.empty(n) under goheap's handler within 20% of NumPy's default handler.
TARGET_NUMPY = 1.2


def steps(bench: H.Bench) -> int:
    return len(COUNTS) * bench.cfg.repeats


def empty_peer(np: Any, name: str, note: str) -> P.Peer:
    return P.Peer(
        name=name,
        alloc="empty(s)",
        free="{p} = None",
        touch="pass",
        ns={"empty": np.empty},
        note=note,
    )


def in_handler(goheap: Any, heap: Any, runner: H.Runner) -> H.Runner:
    """runner(k) with goheap's handler installed for this context around it."""

    def run(k: int) -> int:
        with goheap.numpy_allocator(heap):
            return runner(k)

    return run


def placement_problem(np: Any, goheap: Any, heap: Any, n: int) -> str | None:
    """Why np.empty(n) would not measure what its row says, or None when it does."""
    from goheap import numpy_handler

    outside = np.empty(n)
    if numpy_handler.handler_name(outside) == "goheap":
        return f"np.empty({n}) outside numpy_allocator() already uses goheap's handler"
    with goheap.numpy_allocator(heap):
        inside = np.empty(n)
    name = numpy_handler.handler_name(inside)
    if name != "goheap":
        return f"np.empty({n}) inside numpy_allocator() has handler {name!r}, not 'goheap'"
    if heap.lookup(inside.ctypes.data) is None:
        return f"np.empty({n})'s data at {inside.ctypes.data:#x} is not on the heap"
    return None


def skip_all(bench: H.Bench, why: str) -> None:
    bench.note(f"(i) numpy: skipped: {why}")
    bench.skipped.append(("numpy goheap", why))
    judge(bench, [], why)


def run(bench: H.Bench) -> None:
    try:
        import numpy as np
    except ImportError as e:
        skip_all(bench, f"numpy is not installed ({e}); pip install '.[bench]'")
        return
    if bench.heap is None:
        skip_all(bench, str(bench.goheap_skip))
        return
    import goheap

    if not hasattr(goheap, "numpy_allocator"):
        skip_all(bench, "goheap has no numpy_allocator() yet (issue 15)")
        return
    heaps = [goheap.Heap()]
    try:
        sampled = goheap.Heap(efence_sample=1000)
    except TypeError as e:
        bench.note(f"(i) numpy: no {SAMPLED} row: Heap(efence_sample=) is not there ({e})")
    else:
        heaps.append(sampled)
    try:
        problems = [
            why for h in heaps for n in COUNTS if (why := placement_problem(np, goheap, h, n))
        ]
        if problems:
            skip_all(bench, "; ".join(problems))
            return
        default = empty_peer(np, DEFAULT, f"numpy {np.__version__} np.empty(n), default handler")
        handled = empty_peer(np, GOHEAP, "np.empty(n) inside goheap.numpy_allocator(Heap())")
        cases = []
        for n in COUNTS:
            runs = {
                DEFAULT: H.round_trip_runner(default, n),
                GOHEAP: in_handler(goheap, heaps[0], H.round_trip_runner(handled, n)),
            }
            if len(heaps) > 1:
                runs[SAMPLED] = in_handler(goheap, heaps[1], H.round_trip_runner(handled, n))
            cases.append(bench.measure(f"i np.empty({n:,})", runs, (DEFAULT,)))
    finally:
        for h in heaps:
            h.close()
    bench.record(
        "i",
        "(i) np.empty(n) float64 under goheap's NEP 49 handler vs NumPy's default handler",
        "ns per np.empty + drop",
        cases,
        reference=DEFAULT,
    )
    judge(bench, cases, None)


def judge(bench: H.Bench, cases: list[dict], why_missing: str | None) -> None:
    by_case = {c["case"]: c for c in cases}
    for n in COUNTS:
        label = f"np.empty({n:,})"
        case = by_case.get(label)
        sampled = T.row_ratio(case, SAMPLED, DEFAULT, DEFAULT) if case else None
        T.at_most(
            bench,
            f"(i) {label} goheap handler <= {TARGET_NUMPY}x default handler",
            "i",
            T.row_ratio(case, GOHEAP, DEFAULT, DEFAULT) if case else None,
            TARGET_NUMPY,
            "np.empty(n) inside goheap.numpy_allocator(h) vs NumPy's default handler",
            f"sample:1000 {sampled:.2f}x" if sampled is not None else "",
            why_missing=why_missing or "not measured",
        )
