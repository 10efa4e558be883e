"""(c) Large objects: malloc, write the first byte of each OS page, free.

See benchmarks/run.py for the layout of the suite.

Unlike (a), the memory is used: every OS page is faulted in, as a program that fills a buffer
would, so the cost of fresh pages (and of giving them back) shows.
"""

from __future__ import annotations

import harness as H

KEY = "c"


def steps(bench: H.Bench) -> int:
    return len(bench.cfg.large_sizes) * bench.cfg.repeats


def run(bench: H.Bench) -> None:
    cases = [
        bench.measure(
            f"c {H.fmt_size(size)}",
            {p.name: H.round_trip_runner(p, size, touch=True) for p in bench.peers_for(size)},
            (H.REF, H.CALLOC),
        )
        for size in bench.cfg.large_sizes
    ]
    bench.record(
        "c",
        "(c) large objects: malloc, write the first byte of each OS page, free",
        "ns per op",
        cases,
    )
