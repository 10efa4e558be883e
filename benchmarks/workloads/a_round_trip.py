"""(a) Round trip: malloc+free of one size, repeated, from 8 B to 4 MiB.

See benchmarks/run.py for the layout of the suite.

Every peer at every size it is meant for. Ratios are to glibc malloc+free through cffi
("cffi-libc") and to glibc calloc+free through the same module ("cffi-libc calloc"): goheap's
default malloc hands out zeroed memory, so calloc is its fair reference, and
``malloc(n, zero=False)`` is judged against malloc. Above 32 KiB goheap leaves the small-object
fast path for the page heap (issue 13), so the large sizes are where the two differ most.
"""

from __future__ import annotations

import harness as H
import targets as T

KEY = "a"

# Issue 4/6: the public (zeroed) round trip of a small size, against glibc malloc.
TARGET_SMALL_RT = 1.0
# Issue 13: at every size from 8 B to 4 MiB, zero=False against malloc, zeroed against calloc.
TARGET_NOZERO = 1.0
TARGET_ZEROED = 1.2


def steps(bench: H.Bench) -> int:
    return len(bench.cfg.rt_sizes) * bench.cfg.repeats


# Round trips every runner makes before the harness calibrates it.  A peer's first calls at a
# large size are not its steady state, and the harness's one untimed call does not cover them:
# glibc's first calloc of 4 MiB is an mmap, its second fresh sbrk memory it need not clear, its
# third clears those pages and so touches them for the first time (a page fault per OS page);
# goheap's first is a fresh span, its second clears it and touches it first. Calibrated on such
# a call (2.5 ms for one 4 MiB round trip, issue 13), goheap's 5 ms samples held 2 round trips,
# one of them cold after the other peers ran, and glibc's 79: the ratio measured calibration,
# not allocation. Same calls, same sizes; only the samples get their intended length.
WARMUP = 4


def run(bench: H.Bench) -> None:
    cases = []
    for size in bench.cfg.rt_sizes:
        runs = {p.name: H.round_trip_runner(p, size) for p in bench.peers_for(size)}
        for r in runs.values():
            r(WARMUP)
        cases.append(bench.measure(f"a {H.fmt_size(size)}", runs, (H.REF, H.CALLOC)))
    bench.record("a", "(a) round trip malloc+free of one size", "ns per op", cases)
    judge_small(bench, cases)
    judge_every_size(bench, cases)


def judge_small(bench: H.Bench, cases: list[dict]) -> None:
    for case in cases:
        size = case["case"]
        if not size.endswith(" B") or int(size.split()[0]) > 1024:
            continue
        row = case["rows"].get("goheap")
        info = case["rows"].get("goheap zero=False")
        extra = f"zero=False {info['ratio']:.2f}x" if info else ""
        for other in ("numpy.empty", "pyarrow-mimalloc"):
            if row and other in case["rows"]:
                r = H.paired_ratio(row["samples"], case["rows"][other]["samples"])["ratio"]
                extra += f"; vs {other} {r:.2f}x"
        T.at_most(
            bench,
            f"(a) round trip {size} <= {TARGET_SMALL_RT}x cffi-libc",
            "a",
            row["ratio"] if row else None,
            TARGET_SMALL_RT,
            "goheap public malloc/free (zeroed) vs glibc through cffi",
            extra.strip("; "),
            why_missing=bench.goheap_skip or "goheap not measured",
        )


def judge_every_size(bench: H.Bench, cases: list[dict]) -> None:
    for case in cases:
        T.nozero_and_zeroed(
            bench, case, f"(a) {case['case']}", "a", (TARGET_NOZERO, TARGET_ZEROED), ""
        )
