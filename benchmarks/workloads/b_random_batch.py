"""(b) Random sizes 8..1024 B, all allocated then freed in random order.

See benchmarks/run.py for the layout of the suite.

Two cases: 100,000 objects once (the heap grows, the free order scatters), and 1,000 objects
x 100 passes (a working set that stays in the caches).
"""

from __future__ import annotations

import harness as H
import peers as P
import targets as T

KEY = "b"

TARGET_BATCH = 0.7  # issue 6: goheap's 100k random batch / cffi-libc


def steps(bench: H.Bench) -> int:
    return bench.cfg.batch_repeats + bench.cfg.repeats


def batch_case(
    bench: H.Bench,
    label: str,
    n: int,
    passes: int,
    repeats: int,
    peers: list[P.Peer],
    bases: tuple[str, ...] = (H.REF, H.CALLOC),
) -> dict:
    """One random-batch case: n sizes from the run's seed, freed in a shuffled order."""
    sizes, order = H.random_batch(n, bench.cfg.seed + n)
    runs = {p.name: H.batch_runner(p, sizes, order) for p in peers}
    return bench.measure(label, runs, bases, ops=n, count=passes, repeats=repeats)


def run(bench: H.Bench) -> None:
    c = bench.cfg
    small = bench.peers_for(8)
    cases = [
        batch_case(
            bench, f"b {c.batch_n:,} random 8..1024 B", c.batch_n, 1, c.batch_repeats, small
        ),
        batch_case(
            bench,
            f"b {c.cache_n:,} x {c.cache_passes} passes",
            c.cache_n,
            c.cache_passes,
            c.repeats,
            small,
        ),
    ]
    bench.record(
        "b",
        "(b) random sizes 8..1024 B, all allocated then freed in random order",
        "ns per object (malloc+free)",
        cases,
    )
    row = cases[0]["rows"].get("goheap")
    info = cases[0]["rows"].get("goheap zero=False")
    T.at_most(
        bench,
        f"(b) 100k random batch <= {TARGET_BATCH}x cffi-libc",
        "b",
        row["ratio"] if row else None,
        TARGET_BATCH,
        "goheap public malloc/free (zeroed) vs glibc through cffi",
        f"zero=False {info['ratio']:.2f}x" if info else "",
        why_missing=bench.goheap_skip or "goheap not measured",
    )
