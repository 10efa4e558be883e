#!/usr/bin/env python3
"""goheap against what a Python user would pick instead: side by side, in one run, as ratios.

Usage: ``python benchmarks/run.py [--quick] [--only a,b,...] [--repeats N]`` (``make bench``,
``make bench-quick``). Prints a table with PASS/FAIL per target and writes
``benchmarks/results/latest.json`` and ``latest.png``.

Design note: the harness. Every figure is a median over repeated samples, with its spread (median
absolute deviation, as a percentage of the median) and its ratio to the reference, glibc
malloc/free called through a cffi API-mode module ("cffi-libc"), measured in the same process in
the same repeat. Within one case the peers are interleaved: each repeat runs every peer once, in a
freshly shuffled order, so a slow minute on this shared two-core machine lands on all of them
alike. A ratio is the median of the per-repeat ratios (peer sample / reference sample of the same
repeat), which cancels the drift that both saw. Time is the thread's CPU time
(CLOCK_THREAD_CPUTIME_ID, in Python and in the C loops), not wall time: on a shared two-core machine
a sample that loses the CPU to another process would otherwise be charged for that process's work;
page faults and syscalls made by the allocator still count, as they run on our thread. Each peer's loop count is calibrated once (that run
is also the warm-up) so a sample lasts about the same time for every peer; gc is off while timing,
as in timeit. The loops are built from source templates like timeit's, with each peer's own
allocation expression pasted in, so nobody pays for a wrapper call the others do not.

Why not pyperf: pyperf's model is one benchmark per worker process, calibrated and compared across
separate runs. Here the comparison only means something when the peers share a process, a moment
and a state (the scaling workload builds a 4 GiB live heap once and measures five allocators
against it; the reference's cost depends on how many threads the process has), and the ratios must
be paired per repeat. pyperf's worker spawning and its system tuning (which wants to change CPU
settings on a machine other engineers share) would also not fit the five-minute budget. timeit's
ingredients (templates, calibrated loop counts, gc off, many repeats) with our own interleaving do.
Memory (workload e) is the exception that does need processes: each peer runs in a child of its own
so RSS figures are not shared.

Figures are measured, never typed in: this file holds targets (limits), no results.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import peers as P  # noqa: E402  (benchmarks/ is not a package; run.py runs as a script)

RESULTS = HERE / "results"
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
REF = P.REFERENCE

# Targets from issues 4 and 6. They are limits, never loosened to make a run pass.
TARGET_SMALL_RT = 1.0  # (a) goheap round trip of a small size / cffi-libc
TARGET_BATCH = 0.7  # (b) goheap 100k random batch / cffi-libc
TARGET_RSS = 0.05  # (e) RSS after scavenge within 5% of RSS before the allocation
TARGET_FLAT = 1.5  # (d) slowest / fastest goheap cost from 1 MiB to 4 GiB live


@dataclass
class Config:
    quick: bool
    repeats: int
    # How long one timed sample of a calibrated loop should last. Short samples and many
    # repeats: the two samples a ratio pairs are then close in time, so a burst of load from
    # another process on this shared machine is less likely to hit one and not the other.
    sample_ns: int
    batch_n: int
    batch_repeats: int
    cache_n: int
    cache_passes: int
    rt_sizes: tuple[int, ...]
    large_sizes: tuple[int, ...]
    live_sizes: tuple[int, ...]
    free_spans: tuple[int, ...]
    rss_bytes: int
    seed: int = 20140801

    @classmethod
    def make(cls, quick: bool, repeats: int | None) -> Config:
        if quick:
            return cls(quick, repeats or 5, 2_000_000, 100_000, repeats or 3, 1000, 100,
                       (8, 64, 512, 4096, 32768, MiB), (64 * KiB, MiB, 16 * MiB),
                       (MiB, 16 * MiB, 256 * MiB), (10, 100, 1000, 10_000), 256 * MiB)
        return cls(quick, repeats or 15, 5_000_000, 100_000, repeats or 5, 1000, 100,
                   (8, 64, 512, 4096, 32768, MiB), (64 * KiB, 256 * KiB, MiB, 4 * MiB, 16 * MiB),
                   (MiB, 4 * MiB, 16 * MiB, 64 * MiB, 256 * MiB, GiB, 4 * GiB),
                   (10, 100, 1000, 10_000, 100_000), GiB)


def fmt_size(n: int) -> str:
    for unit, name in ((GiB, "GiB"), (MiB, "MiB"), (KiB, "KiB")):
        if n >= unit and n % unit == 0:
            return f"{n // unit} {name}"
    return f"{n} B"


def fmt_ns(ns: float) -> str:
    if ns >= 1e6:
        return f"{ns / 1e6:.1f}ms"
    if ns >= 1e4:
        return f"{ns / 1e3:.0f}us"
    if ns >= 1e3:
        return f"{ns / 1e3:.1f}us"
    return f"{ns:.0f}ns" if ns >= 10 else f"{ns:.1f}ns"


# ---------------------------------------------------------------------------------------------
# Statistics and the interleaving harness


def summarize(samples: list[float]) -> dict[str, Any]:
    med = statistics.median(samples)
    mad = statistics.median(abs(x - med) for x in samples)
    return {"median": med, "spread_pct": 100.0 * mad / med if med else 0.0,
            "min": min(samples), "max": max(samples), "samples": samples}


def paired_ratio(num: list[float], den: list[float]) -> dict[str, float]:
    ratios = [a / b for a, b in zip(num, den, strict=True) if b > 0]
    s = summarize(ratios)
    return {"ratio": s["median"], "ratio_spread_pct": s["spread_pct"]}


class Progress:
    """One tqdm bar for the whole run (stderr), or plain counting without tqdm."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="step", dynamic_ncols=True, file=sys.stderr)
            except ImportError:
                print("tqdm is not installed: no progress bar (pip install '.[bench]')")

    def step(self, what: str, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.set_description(what[:40])
            self.bar.update(n)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def interleave(names: list[str], sample: Callable[[str], float], repeats: int,
               rng: random.Random, progress: Progress, label: str) -> dict[str, list[float]]:
    """Run sample(name) `repeats` times for every name, shuffling the order in each repeat."""
    out: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(repeats):
        order = list(names)
        rng.shuffle(order)
        gc.collect()  # once per repeat: a full collection costs more than a short sample
        gc.disable()
        try:
            for name in order:
                out[name].append(sample(name))
        finally:
            gc.enable()
        progress.step(label)
    return out


def case_result(case: str, samples: dict[str, list[float]], bases: tuple[str, ...],
                extra: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    for name, xs in samples.items():
        row = summarize(xs)
        for base in bases:
            if base in samples:
                r = paired_ratio(xs, samples[base])
                key = "" if base == bases[0] else f"_vs_{base}"
                row[f"ratio{key}"] = r["ratio"]
                row[f"ratio{key}_spread_pct"] = r["ratio_spread_pct"]
        row.update((extra or {}).get(name, {}))
        rows[name] = row
    return {"case": case, "rows": rows}


# ---------------------------------------------------------------------------------------------
# Timing loops, built from templates as timeit does

ROUND_TRIP = """
def run(n, s, pg, timer=timer):
    t0 = timer()
    for _ in range(n):
        p = {alloc}
        {touch}
        {free}
    return timer() - t0
"""

BATCH = """
def run(sizes, order, passes, timer=timer):
    t0 = timer()
    for _ in range(passes):
        ps = [{alloc} for s in sizes]
        for i in order:
            {free}
    return timer() - t0
"""


def build_loop(template: str, peer: P.Peer, touch: bool = False) -> Callable[..., int]:
    src = template.format(alloc=peer.alloc, touch=peer.touch if touch else "pass",
                          free=peer.free_stmt("p" if template is ROUND_TRIP else "ps[i]"))
    namespace = dict(peer.ns, timer=time.thread_time_ns)
    exec(compile(src, f"<{peer.name} loop>", "exec"), namespace)
    return namespace["run"]


# A runner is run(k) -> elapsed ns for k units of work; measure() divides by k * ops.
Runner = Callable[[int], int]


def round_trip_runner(peer: P.Peer, size: int, touch: bool = False) -> Runner:
    loop = build_loop(ROUND_TRIP, peer, touch)

    def run(k: int) -> int:
        if peer.before:
            peer.before()
        return loop(k, size, P.OS_PAGE)

    return run


def batch_runner(peer: P.Peer, sizes: list[int], order: list[int]) -> Runner:
    loop = build_loop(BATCH, peer)

    def run(passes: int) -> int:
        if peer.before:
            peer.before()
        return loop(sizes, order, passes)

    return run


def c_pairs_runner(lib: Any, pair: Any, size: int) -> Runner:
    def run(k: int) -> int:
        t = int(lib.bp_c_pairs(pair, size, k))
        if t < 0:
            raise MemoryError(f"allocation of {size} B failed inside the C loop")
        return t

    return run


def c_batch_runner(lib: Any, pair: Any, arrays: tuple[Any, Any, Any], n: int) -> Runner:
    def run(passes: int) -> int:
        t = int(lib.bp_c_batch(pair, *arrays, n, passes))
        if t < 0:
            raise MemoryError("allocation failed inside the C batch loop")
        return t

    return run


def calibrate(run: Runner, target_ns: int, cap: int = 10_000_000) -> int:
    """Loop count whose run lasts about target_ns. One untimed call first: a peer's first use
    (pyarrow creating its pool, fresh pages) is not its steady state and would make the count 1."""
    run(1)
    n = 1
    while True:
        t = run(n)
        if t >= target_ns // 5 or n >= cap:
            break
        n *= 4
    return max(1, min(cap, round(n * target_ns / max(t, 1))))


def random_batch(n: int, seed: int) -> tuple[list[int], list[int]]:
    rng = random.Random(seed)
    sizes = [rng.randint(8, 1024) for _ in range(n)]
    order = list(range(n))
    rng.shuffle(order)
    return sizes, order


def find_cdata(root: Any, ffi: Any, cname: str, depth: int = 3) -> int | None:
    """Address of the first cffi object of C type `cname` reachable from root's attributes."""
    seen: set[int] = set()
    stack = [(root, 0)]
    while stack:
        obj, d = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, ffi.CData):
            if ffi.typeof(obj).cname.replace("struct ", "") == cname.replace("struct ", ""):
                return int(ffi.cast("uintptr_t", obj))
            continue
        if d < depth:
            attrs = getattr(obj, "__dict__", None) or {}
            slots = [getattr(obj, n, None) for n in getattr(type(obj), "__slots__", ())
                     if isinstance(n, str)]
            stack.extend((v, d + 1) for v in [*attrs.values(), *slots])
    return None


# ---------------------------------------------------------------------------------------------
# The benchmark run


class Bench:
    def __init__(self, cfg: Config, args: argparse.Namespace) -> None:
        self.cfg = cfg
        self.args = args
        self.rng = random.Random(cfg.seed)
        self.mod = P.build()
        self.ffi, self.lib = self.mod.ffi, self.mod.lib
        self.peers, self.skipped = P.discover(self.mod)
        self.goheap_skip = P.goheap_reason()
        self.heap: Any = None
        if self.goheap_skip is None:
            import goheap

            self.heap = goheap.Heap()
            self.peers += P.goheap_peers(self.mod, self.heap)
        else:
            self.skipped.append(("goheap", self.goheap_skip))
        self.by_name = {p.name: p for p in self.peers}
        self.results: dict[str, Any] = {"workloads": {}, "targets": []}
        self._keep: list[Any] = []  # cffi objects the C loops point into
        self.progress = Progress(self.total_steps(), not args.no_progress)

    def want(self, key: str) -> bool:
        return self.args.only is None or key in self.args.only

    def total_steps(self) -> int:
        c = self.cfg
        steps = {
            "a": len(c.rt_sizes) * c.repeats,
            "b": c.batch_repeats + c.repeats,
            "c": len(c.large_sizes) * c.repeats,
            "d": (2 * len(c.live_sizes) + 2 + len(c.free_spans)) * c.repeats,
            "e": len(self.peers) - 1,
            "f": 5 * c.repeats,
            "g": (len(c.rt_sizes) + 1) * c.repeats + c.batch_repeats,
        }
        return sum(v for k, v in steps.items() if self.want(k))

    def note(self, text: str) -> None:
        self.progress.write(text)

    def target(self, name: str, workload: str, value: float | None, limit: float,
               detail: str, passed: bool | None, info: str = "") -> None:
        status = "SKIP" if passed is None else ("PASS" if passed else "FAIL")
        self.results["targets"].append({"target": name, "workload": workload, "value": value,
                                        "limit": limit, "status": status, "detail": detail,
                                        "info": info})

    def measure(self, label: str, runs: dict[str, Runner], bases: tuple[str, ...], ops: int = 1,
                count: int | dict[str, int] | None = None, repeats: int | None = None,
                target_ns: int | None = None,
                extra: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
        """Interleaved samples of every runner: ns per operation, one case of a workload.
        With count=None each runner's count is calibrated (that run is the warm-up); otherwise
        each runs `count` units once untimed first."""
        if count is None:
            counts = {k: calibrate(r, target_ns or self.cfg.sample_ns) for k, r in runs.items()}
        else:
            counts = dict(count) if isinstance(count, dict) else dict.fromkeys(runs, count)
            for k, r in runs.items():
                r(counts[k])
        samples = interleave(list(runs), lambda k: runs[k](counts[k]) / (counts[k] * ops),
                             repeats or self.cfg.repeats, self.rng, self.progress, label)
        more = {k: {"count": counts[k], **(extra or {}).get(k, {})} for k in runs}
        return case_result(label.split(" ", 1)[1], samples, bases, more)

    def peers_for(self, size: int) -> list[P.Peer]:
        return [p for p in self.peers if size >= p.min_size]

    # -- (a) round trip -------------------------------------------------------------------------

    def workload_a(self) -> None:
        cases = [self.measure(f"a {fmt_size(size)}",
                              {p.name: round_trip_runner(p, size) for p in self.peers_for(size)},
                              (REF,))
                 for size in self.cfg.rt_sizes]
        self.results["workloads"]["a"] = {"title": "(a) round trip malloc+free of one size",
                                          "unit": "ns per op", "cases": cases}
        self.judge_small_round_trip()

    def judge_small_round_trip(self) -> None:
        for case in self.results["workloads"]["a"]["cases"]:
            size = case["case"]
            if not size.endswith(" B") or int(size.split()[0]) > 1024:
                continue
            row = case["rows"].get("goheap")
            info = case["rows"].get("goheap zero=False")
            extra = f"zero=False {info['ratio']:.2f}x" if info else ""
            for other in ("numpy.empty", "pyarrow-mimalloc"):
                if row and other in case["rows"]:
                    r = paired_ratio(row["samples"], case["rows"][other]["samples"])["ratio"]
                    extra += f"; vs {other} {r:.2f}x"
            self.target(f"(a) round trip {size} <= {TARGET_SMALL_RT}x cffi-libc", "a",
                        row["ratio"] if row else None, TARGET_SMALL_RT,
                        "goheap public malloc/free (zeroed) vs glibc through cffi",
                        (row["ratio"] <= TARGET_SMALL_RT) if row else None, extra.strip("; "))

    # -- (b) random batches ----------------------------------------------------------------------

    def batch_case(self, label: str, n: int, passes: int, repeats: int,
                   peers: list[P.Peer], bases: tuple[str, ...] = (REF,)) -> dict[str, Any]:
        sizes, order = random_batch(n, self.cfg.seed + n)
        runs = {p.name: batch_runner(p, sizes, order) for p in peers}
        return self.measure(label, runs, bases, ops=n, count=passes, repeats=repeats)

    def workload_b(self) -> None:
        c = self.cfg
        small = self.peers_for(8)
        cases = [
            self.batch_case(f"b {c.batch_n:,} random 8..1024 B", c.batch_n, 1, c.batch_repeats,
                            small),
            self.batch_case(f"b {c.cache_n:,} x {c.cache_passes} passes", c.cache_n,
                            c.cache_passes, c.repeats, small),
        ]
        self.results["workloads"]["b"] = {
            "title": "(b) random sizes 8..1024 B, all allocated then freed in random order",
            "unit": "ns per object (malloc+free)", "cases": cases}
        row = cases[0]["rows"].get("goheap")
        info = cases[0]["rows"].get("goheap zero=False")
        self.target(f"(b) 100k random batch <= {TARGET_BATCH}x cffi-libc", "b",
                    row["ratio"] if row else None, TARGET_BATCH,
                    "goheap public malloc/free (zeroed) vs glibc through cffi",
                    (row["ratio"] <= TARGET_BATCH) if row else None,
                    f"zero=False {info['ratio']:.2f}x" if info else "")

    # -- (c) large objects -----------------------------------------------------------------------

    def workload_c(self) -> None:
        cases = [self.measure(f"c {fmt_size(size)}",
                              {p.name: round_trip_runner(p, size, touch=True)
                               for p in self.peers_for(size)}, (REF,))
                 for size in self.cfg.large_sizes]
        self.results["workloads"]["c"] = {
            "title": "(c) large objects: malloc, write the first byte of each OS page, free",
            "unit": "ns per op", "cases": cases}

    # -- (d) scaling ------------------------------------------------------------------------------

    def workload_d(self) -> None:
        if self.heap is None:
            self.note(f"(d) scaling: goheap skipped ({self.goheap_skip}); peers measured alone")
        self.scaling_live_heap()
        if self.heap is not None:
            self.scaling_flat()
            self.scaling_free_spans()
        else:
            self.target(f"(d) flat within {TARGET_FLAT}x, 1 MiB..4 GiB live", "d", None,
                        TARGET_FLAT, self.goheap_skip or "", None)

    @staticmethod
    def grow(peer: P.Peer, keep: list[int], grown: list[int], rng: random.Random,
             target: int) -> None:
        """Bring peer's live heap to `target` bytes: 1/64 in random 8..1024 B objects, the
        rest in 256 KiB blocks, which stay untouched (address space, not RSS)."""
        malloc = peer.ns["malloc"]
        while grown[0] < target // 64:
            s = rng.randint(8, 1024)
            keep.append(malloc(s))
            grown[0] += s
        while grown[0] + grown[1] + 256 * KiB <= target:
            keep.append(malloc(256 * KiB))
            grown[1] += 256 * KiB

    def scaling_live_heap(self) -> None:
        """Cost of a 64 B malloc+free, and of a cache-resident random batch, while every
        allocator carries the same growing live heap."""
        c = self.cfg
        heap = None
        allocs = [p for p in self.peers if p.kind == "c"]
        if self.heap is not None:
            import goheap

            heap = goheap.Heap()
            allocs.append(P.goheap_peers(self.mod, heap)[0])
        live: dict[str, list[int]] = {p.name: [] for p in allocs}
        grown = {p.name: [0, 0] for p in allocs}  # small bytes, block bytes
        rngs = {p.name: random.Random(c.seed) for p in allocs}
        bsizes, border = random_batch(c.cache_n, c.seed + 1)
        rt = {p.name: round_trip_runner(p, 64) for p in allocs}
        batch = {p.name: batch_runner(p, bsizes, border) for p in allocs}
        counts: dict[str, int] = {}
        cases_rt, cases_batch = [], []
        for target in c.live_sizes:
            for p in allocs:
                self.grow(p, live[p.name], grown[p.name], rngs[p.name], target)
            if not counts:  # the same loop counts at every size, calibrated on the smallest
                counts = {k: calibrate(r, c.sample_ns) for k, r in rt.items()}
            extra = {k: {"live_bytes": sum(g)} for k, g in grown.items()}
            label = fmt_size(target)
            cases_rt.append(self.measure(f"d {label}", rt, (REF,), count=counts, extra=extra))
            cases_batch.append(self.measure(f"d {label}", batch, (REF,), ops=c.cache_n,
                                            count=10, extra=extra))
        for p in allocs:
            for a in live[p.name]:
                p.ns["free"](a)
        if heap is not None:
            heap.close()
        wl = self.results["workloads"]
        wl["d_rt"] = {"title": "(d) 64 B malloc+free as the live heap grows", "unit": "ns per op",
                      "cases": cases_rt, "x": list(c.live_sizes)}
        wl["d_batch"] = {"title": f"(d) {c.cache_n} random objects x 10 passes as the live heap "
                                  "grows", "unit": "ns per object", "cases": cases_batch,
                         "x": list(c.live_sizes)}

    def scaling_flat(self) -> None:
        """The flatness target, measured so that drift cannot fake a slope: one goheap heap per
        live size, all alive at once, and every repeat samples all of them (and cffi-libc) in a
        shuffled order. The lockstep curves above cannot do that for the peers, whose heap is
        the process's own and only grows."""
        import goheap

        c = self.cfg
        bsizes, border = random_batch(c.cache_n, c.seed + 1)
        heaps, rt, batch = [], {}, {}
        try:
            for target in c.live_sizes:
                heap = goheap.Heap()
                heaps.append(heap)
                peer = P.goheap_peers(self.mod, heap)[0]
                self.grow(peer, [], [0, 0], random.Random(c.seed), target)
                rt[fmt_size(target)] = round_trip_runner(peer, 64)
                batch[fmt_size(target)] = batch_runner(peer, bsizes, border)
            rt[REF] = round_trip_runner(self.by_name[REF], 64)
            batch[REF] = batch_runner(self.by_name[REF], bsizes, border)
            count = calibrate(rt[fmt_size(c.live_sizes[0])], c.sample_ns)
            cases = [self.measure("d 64 B round trip", rt, (REF,), count=count),
                     self.measure(f"d {c.cache_n:,} random x 10", batch, (REF,), ops=c.cache_n,
                                  count=10)]
        finally:
            for heap in heaps:
                heap.close()
        self.results["workloads"]["d_flat"] = {
            "title": "(d) goheap, one heap per live size, all sizes interleaved in every repeat",
            "unit": "ns per op", "cases": cases, "x": list(c.live_sizes)}
        span = f"{fmt_size(c.live_sizes[0])}..{fmt_size(c.live_sizes[-1])}"
        for case in cases:
            meds = [case["rows"][fmt_size(x)]["median"] for x in c.live_sizes]
            flat = max(meds) / min(meds)
            self.target(f"(d) {case['case']} flat within {TARGET_FLAT}x, 1 MiB..4 GiB", "d",
                        flat, TARGET_FLAT, f"slowest/fastest goheap median over {span} live",
                        flat <= TARGET_FLAT, "quick run: stops at 256 MiB" if c.quick else "")

    def scaling_free_spans(self) -> None:
        """Large malloc+free with n free spans of >= 128 pages in the heap (the structure Go 2014
        searched linearly; goheap's best fit is O(log n)). Free spans of 128..135 pages are kept
        apart by live 5-page objects; the request (132 pages) has exact fits. One new heap per n,
        so the layout is exactly that."""
        import goheap

        c = self.cfg
        page = goheap.PAGE_SIZE
        want = 132 * page
        cases = []
        for n in c.free_spans:
            heap = self.free_span_heap(n, page)
            if heap is None:
                break
            runs = {"goheap": round_trip_runner(P.goheap_peers(self.mod, heap)[0], want),
                    REF: round_trip_runner(self.by_name[REF], want)}
            cases.append(self.measure(f"d {n:,}", runs, (REF,), target_ns=c.sample_ns // 2,
                                      extra={"goheap": {"free_spans": n}}))
            heap.close()
        if cases:
            first = cases[0]["rows"]["goheap"]["samples"]
            for case in cases:
                row = case["rows"]["goheap"]
                row["vs_fewest"] = paired_ratio(row["samples"], first)["ratio"]
        self.results["workloads"]["d_spans"] = {
            "title": "(d) large malloc+free (132 pages) vs number of free spans >= 128 pages",
            "unit": "ns per op", "cases": cases,
            "x": [int(x["case"].replace(",", "")) for x in cases]}

    def free_span_heap(self, n: int, page: int) -> Any:
        import goheap

        try:
            heap = goheap.Heap(arena_size=256 * GiB)
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
            self.note(f"(d) free spans: stopped before {n:,}: {e}")
            heap.close()
            return None
        return heap

    # -- (e) memory --------------------------------------------------------------------------------

    def rss_of(self, name: str) -> dict[str, Any] | None:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--rss-child", name,
               "--rss-bytes", str(self.cfg.rss_bytes)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            self.note(f"(e) {name}: child timed out")
            return None
        lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
        if proc.returncode != 0 or not lines:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            self.note(f"(e) {name}: child failed (exit {proc.returncode}): {tail}")
            return None
        return json.loads(lines[-1])

    def workload_e(self) -> None:
        c = self.cfg
        rows: dict[str, Any] = {}
        for p in self.peers:
            if p.name != "goheap zero=False":
                row = self.rss_of(p.name)
                if row is not None:
                    rows[p.name] = row
                self.progress.step(f"e rss {p.name}")
        if REF in rows:
            for row in rows.values():
                for k in ("rss_freed", "rss_released"):
                    row[f"{k}_ratio"] = row[k] / rows[REF][k]
        self.results["workloads"]["e"] = {
            "title": f"(e) RSS: {fmt_size(c.rss_bytes)} in 64 KiB blocks, each OS page written, "
                     "freed, then given back", "unit": "bytes", "rows": rows}
        g = rows.get("goheap")
        name = f"(e) RSS after scavenge within {TARGET_RSS:.0%} of before"
        if g is None:
            self.target(name, "e", None, TARGET_RSS, self.goheap_skip or "goheap child failed",
                        None)
            return
        dev = (g["rss_released"] - g["rss_before"]) / g["rss_before"]
        self.target(name, "e", dev, TARGET_RSS,
                    f"before {g['rss_before'] / MiB:.1f} MiB, after scavenge "
                    f"{g['rss_released'] / MiB:.1f} MiB", abs(dev) <= TARGET_RSS,
                    "quick run: 256 MiB, not 1 GiB" if c.quick else "")

    # -- (f) efence --------------------------------------------------------------------------------

    def workload_f(self) -> None:
        if self.heap is None:
            self.note(f"(f) efence: skipped: {self.goheap_skip}")
            return
        import goheap

        try:
            fence = goheap.Heap(efence=True)
            fence.free(fence.malloc(64))
        except Exception as e:
            self.note(f"(f) efence: skipped: Heap(efence=True) failed: {type(e).__name__}: {e}")
            return
        normal = goheap.Heap()
        chosen = [self.by_name[REF], P.goheap_peers(self.mod, normal)[0],
                  P.goheap_peers(self.mod, fence, "goheap efence")[0]]
        bases = (REF, "goheap")
        try:
            cases = [self.measure(f"f {fmt_size(size)}",
                                  {p.name: round_trip_runner(p, size) for p in chosen}, bases)
                     for size in (8, 512, 4096, 32768)]
            cases.append(self.batch_case(f"f {self.cfg.cache_n:,} random x 10", self.cfg.cache_n,
                                         10, self.cfg.repeats, chosen, bases))
        finally:
            fence.close()
            normal.close()
        self.results["workloads"]["f"] = {
            "title": "(f) efence (every object its own span, faulted on free) vs normal mode",
            "unit": "ns per op", "cases": cases}

    # -- (g) the C loop ----------------------------------------------------------------------------

    def goheap_c_pairs(self) -> tuple[dict[str, Any], str | None]:
        """goheap's C fast path as struct bp_pair(s), or ({}, why not).

        goheap._native.fastpath_pointers() gives gh_mcache_alloc/gh_mcache_free, which take the
        heap's gh_mheap handle and report misses and errors in band; bp_status_pair adapts them
        to the loop's shape with the same two indirect calls a peer pays. The zero=False entry
        point, when the extension has it, is measured as a second row, as in (a)."""
        if self.heap is None:
            return {}, self.goheap_skip
        try:
            from goheap import _native
        except ImportError as e:
            return {}, f"goheap._native: {e}"
        if not hasattr(_native, "fastpath_pointers"):
            return {}, "goheap._native has no fastpath_pointers() yet"
        handle = find_cdata(self.heap, _native.ffi, "gh_mheap *")
        if handle is None:
            return {}, "no gh_mheap handle found on the Heap object"
        alloc, free = _native.fastpath_pointers()
        entries = {"goheap": alloc}
        try:
            entries["goheap zero=False"] = int(_native.ffi.cast(
                "uintptr_t", _native.ffi.addressof(_native.lib, "gh_mcache_alloc_nozero")))
        except (AttributeError, TypeError):
            pass
        pairs = {}
        for name, entry in entries.items():
            fns = self.ffi.new("struct bp_status_fns *")
            fns.alloc = self.ffi.cast("uintptr_t (*)(void *, uintptr_t)", entry)
            fns.free = self.ffi.cast("int (*)(void *, uintptr_t)", free)
            fns.ctx = self.ffi.cast("void *", handle)
            fns.status_limit = getattr(_native, "STATUS_LIMIT", 4096)
            pair = self.ffi.new("struct bp_pair *")
            self.lib.bp_status_pair(fns, pair)
            self._keep.append(fns)
            pairs[name] = (pair, fns)
        return pairs, None

    def c_case(self, label: str, pairs: dict[str, Any], gpairs: dict[str, Any],
               make: Callable[[Any], Runner], ops: int, prime: int | None, **kw: Any
               ) -> dict[str, Any]:
        """One C-loop case; goheap's pairs join it only if a trial run needs no Python."""
        runs = {k: make(a) for k, a in pairs.items()}
        for name, (pair, fns) in gpairs.items():
            if prime is not None:  # let Python put a span of this class in goheap's cache
                self.heap.free(self.heap.malloc(prime))
            fns.last_bad_alloc = 0
            try:
                make(pair)(1)
            except MemoryError:
                why = (f"{name}: fast path returned status {fns.last_bad_alloc} (a miss needs "
                       "Python's refill, so no pure-C loop)")
                self.note(f"(g) {label[2:]}: {why}")
                self.results.setdefault("notes", []).append(f"(g) {label[2:]}: {why}")
                continue
            runs[name] = make(pair)
        case = self.measure(label, runs, ("libc",), ops=ops, **kw)
        for name, (_, fns) in gpairs.items():
            if fns.first_bad_free:
                msg = f"(g) {label[2:]}: {name} free returned {fns.first_bad_free}"
                self.note(msg)
                self.results.setdefault("problems", []).append(msg)
        return case

    def workload_g(self) -> None:
        c, ffi, lib = self.cfg, self.ffi, self.lib
        pairs: dict[str, Any] = {}
        for p in self.peers:
            if p.kind == "c":
                pair = ffi.new("struct bp_pair *")
                lib.bp_peer_pair(p.ns["idx"], pair)
                pairs[p.name.split("-", 1)[1]] = pair
        gpairs, why = self.goheap_c_pairs()
        if why:
            self.note(f"(g) C loop: goheap skipped: {why}")
            self.skipped.append(("goheap (C loop)", why))
        cases = [self.c_case(f"g {fmt_size(size)}", pairs, gpairs,
                             functools.partial(c_pairs_runner, lib, size=size), 1, size)
                 for size in c.rt_sizes]
        for n, passes, repeats in ((c.batch_n, 1, c.batch_repeats),
                                   (c.cache_n, c.cache_passes, c.repeats)):
            sizes, order = random_batch(n, c.seed + n)
            arrays = (ffi.new("uint32_t[]", sizes), ffi.new("uint32_t[]", order),
                      ffi.new("void *[]", n))
            label = f"g {n:,} random" if passes == 1 else f"g {n:,} x {passes}"
            cases.append(self.c_case(label, pairs, gpairs,
                                     functools.partial(c_batch_runner, lib, arrays=arrays, n=n),
                                     n, None, count=passes, repeats=repeats))
        self.results["workloads"]["g"] = {
            "title": "(g) C loop, no Python: malloc+free pairs and random batches, two indirect "
                     "calls per operation for every allocator", "unit": "ns per op",
            "cases": cases}

    # -- running ----------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        t0 = time.time()
        for name, why in self.skipped:
            self.note(f"skipped {name}: {why}")
        for key in "abcdefg":
            if self.want(key):
                getattr(self, f"workload_{key}")()
        self.progress.close()
        if self.heap is not None:
            self.heap.close()
        self.results["skipped"] = [{"peer": n, "reason": r} for n, r in self.skipped]
        self.results["peers"] = {p.name: p.note for p in self.peers}
        self.results["seconds"] = time.time() - t0
        return self.results


# ---------------------------------------------------------------------------------------------
# (e)'s child: one peer, one process

FILL = """
def fill(n, s, pg):
    ps = []
    for _ in range(n):
        p = {alloc}
        {touch}
        ps.append(p)
    return ps

def drain(ps):
    for i in range(len(ps)):
        {free}
    ps.clear()
"""


def rss_child(name: str, total: int) -> None:
    import psutil

    mod = P.build()
    heap = None
    if name == "goheap":
        import goheap

        heap = goheap.Heap()
        peer = P.goheap_peers(mod, heap)[0]
    else:
        found, skipped = P.discover(mod, {name})
        if not found:
            raise SystemExit(f"{name}: {skipped}")
        peer = found[0]
    if peer.before:
        peer.before()
    ns = dict(peer.ns)
    exec(FILL.format(alloc=peer.alloc, touch=peer.touch, free=peer.free_stmt("ps[i]")), ns)
    proc = psutil.Process()
    block = 64 * KiB
    gc.collect()
    out: dict[str, Any] = {"peer": name, "bytes": total, "block": block,
                           "release": peer.release_label or peer.release}
    out["rss_before"] = proc.memory_info().rss
    t = time.perf_counter()
    ps = ns["fill"](total // block, block, P.OS_PAGE)
    out["rss_allocated"] = proc.memory_info().rss
    ns["drain"](ps)
    gc.collect()
    out["rss_freed"] = proc.memory_info().rss
    if peer.release:
        exec(peer.release, ns)
    out["rss_released"] = proc.memory_info().rss
    out["seconds"] = time.perf_counter() - t
    if heap is not None:
        st = heap.stats()
        out["heap_stats"] = {k: v for k, v in vars(st).items() if isinstance(v, int)} \
            if hasattr(st, "__dict__") else str(st)
        heap.close()
    print(json.dumps(out))


# ---------------------------------------------------------------------------------------------
# Output: table, JSON, PNG


def machine_info(bench: Bench) -> dict[str, Any]:
    import cffi

    info: dict[str, Any] = {
        "python": sys.version, "platform": platform.platform(), "machine": platform.machine(),
        "cpus": os.cpu_count(), "os_page_size": P.OS_PAGE, "libc": " ".join(platform.libc_ver()),
        "cffi": cffi.__version__, "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "libraries": P.library_paths(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        info["memory_bytes"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError):
        pass
    for mod in ("numpy", "pyarrow", "psutil", "goheap", "matplotlib", "tqdm"):
        m = sys.modules.get(mod)
        if m is None:
            try:
                m = __import__(mod)
            except Exception:
                continue
        info[mod] = getattr(m, "__version__", "?")
    try:
        import psutil

        info["threads_in_process"] = psutil.Process().num_threads()
    except ImportError:
        pass
    for pkg in ("libjemalloc2", "libmimalloc2.0", "libtcmalloc-minimal4"):
        try:
            v = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", pkg],
                               capture_output=True, text=True, timeout=10)
            if v.returncode == 0:
                info[pkg] = v.stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            pass
    try:
        info["git_commit"] = subprocess.run(["git", "-C", str(HERE), "rev-parse", "HEAD"],
                                            capture_output=True, text=True,
                                            timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return info


def print_case_table(wl: dict[str, Any], ratio_key: str = "ratio") -> None:
    print(f"\n{wl['title']}  [{wl['unit']}: median ±spread, ratio]")
    names: list[str] = []
    for case in wl["cases"]:
        names += [n for n in case["rows"] if n not in names]
    header = f"{'':22}" + "".join(f"{case['case']:>22}" for case in wl["cases"])
    print(header)
    for name in names:
        cells = []
        for case in wl["cases"]:
            row = case["rows"].get(name)
            if row is None:
                cells.append(f"{'-':>22}")
                continue
            ratio = row.get(ratio_key)
            r = f"{ratio:5.2f}x" if ratio is not None else "      "
            cells.append(f"{fmt_ns(row['median']):>9} ±{row['spread_pct']:2.0f}% {r}")
        print(f"{name:22}" + "".join(cells))
    extra = [k for k in next(iter(wl["cases"][0]["rows"].values()), {})
             if k.startswith("ratio_vs_") and not k.endswith("spread_pct")]
    for k in extra:
        base = k[len("ratio_vs_"):]
        print(f"  ratio to {base}:")
        for n in names:
            if n != base:
                print(f"  {n:20}" + "".join(
                    f"{case['rows'][n][k]:>21.2f}x" if k in case["rows"].get(n, {})
                    else f"{'-':>22}" for case in wl["cases"]))


def print_table(results: dict[str, Any]) -> None:
    wls = results["workloads"]
    for key in ("a", "b", "c", "d_rt", "d_batch", "d_flat", "d_spans", "f", "g"):
        if key in wls and wls[key]["cases"]:
            print_case_table(wls[key])
    if "d_spans" in wls and wls["d_spans"]["cases"]:
        print("  goheap cost vs fewest free spans: " + ", ".join(
            f"{c['case']}: {c['rows']['goheap']['vs_fewest']:.2f}x" for c in wls["d_spans"]["cases"]))
    if "e" in wls:
        e = wls["e"]
        print(f"\n{e['title']}  [MiB; ratio to cffi-libc after free / after release]")
        print(f"{'':22}{'before':>10}{'allocated':>11}{'freed':>10}{'released':>10}"
              f"{'freed x':>9}{'rel. x':>9}  release call")
        for name, r in e["rows"].items():
            print(f"{name:22}{r['rss_before'] / MiB:10.1f}{r['rss_allocated'] / MiB:11.1f}"
                  f"{r['rss_freed'] / MiB:10.1f}{r['rss_released'] / MiB:10.1f}"
                  f"{r.get('rss_freed_ratio', float('nan')):9.2f}"
                  f"{r.get('rss_released_ratio', float('nan')):9.2f}  {r['release'] or '-'}")
    print("\nTargets (never loosened; a failing target is reported, not hidden):")
    for t in results["targets"]:
        v = t["value"]
        if v is None:
            shown = "n/a"
        elif t["workload"] == "e":
            shown = f"{v:+.1%}"
        else:
            shown = f"{v:.2f}x"
        info = f"  [{t['info']}]" if t["info"] else ""
        print(f"  {t['status']:4}  {t['target']:52} {shown:>8}  {t['detail']}{info}")
    for s in results.get("skipped", []):
        print(f"  skipped {s['peer']}: {s['reason']}")


def plot(results: dict[str, Any], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"matplotlib is not installed ({e}); no PNG"
    wls = results["workloads"]
    bar_keys = [k for k in ("a", "b", "c", "f", "g") if k in wls and wls[k]["cases"]]
    line_keys = [k for k in ("d_rt", "d_batch", "d_spans") if k in wls and wls[k]["cases"]]
    panels = len(bar_keys) + len(line_keys) + (1 if "e" in wls and wls["e"]["rows"] else 0)
    if panels == 0:
        return "nothing to plot"
    cols = 2
    rows = (panels + 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(16, 4.6 * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    palette = [*plt.get_cmap("tab10").colors, *plt.get_cmap("Dark2").colors]
    all_names: list[str] = []
    for k in bar_keys + line_keys:
        for case in wls[k]["cases"]:
            all_names += [n for n in case["rows"] if n not in all_names and "goheap" not in n]
    color: dict[str, Any] = {n: palette[i % len(palette)] for i, n in enumerate(all_names)}
    color.update({"goheap": "black", "goheap zero=False": "dimgray", "goheap efence": "crimson"})
    i = 0
    for k in bar_keys:
        ax = flat[i]
        i += 1
        wl = wls[k]
        names: list[str] = []
        for case in wl["cases"]:
            names += [n for n in case["rows"] if n not in names]
        width = 0.85 / max(1, len(names))
        for j, n in enumerate(names):
            xs, ys = [], []
            for ci, case in enumerate(wl["cases"]):
                if n in case["rows"] and case["rows"][n].get("ratio") is not None:
                    xs.append(ci + (j - len(names) / 2 + 0.5) * width)
                    ys.append(case["rows"][n]["ratio"])
            ax.bar(xs, ys, width, label=n, color=color.get(n))
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xticks(range(len(wl["cases"])), [c["case"] for c in wl["cases"]], fontsize=8)
        ax.set_title(wl["title"], fontsize=9)
        ax.set_ylabel("ratio to reference (log)")
        ax.legend(fontsize=6, ncol=3)
    for k in line_keys:
        ax = flat[i]
        i += 1
        wl = wls[k]
        names = list(wl["cases"][0]["rows"])
        for n in names:
            pts = [(x, c["rows"][n]["median"]) for x, c in zip(wl["x"], wl["cases"], strict=True)
                   if n in c["rows"]]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=n,
                    color=color.get(n), linewidth=2.5 if n.startswith("goheap") else 1.2)
        interleaved = wls.get("d_flat")
        if interleaved and k in ("d_rt", "d_batch"):
            case = interleaved["cases"][0 if k == "d_rt" else 1]
            ax.plot(interleaved["x"],
                    [case["rows"][fmt_size(x)]["median"] for x in interleaved["x"]],
                    linestyle="--", marker="s", color="black",
                    label="goheap, one heap per size, interleaved")
        ax.set_xscale("log")
        ax.set_ylim(bottom=0)  # linear from zero: flat must look flat, a rise must show
        ax.set_xlabel("free spans" if k == "d_spans" else "live heap (bytes)")
        ax.set_ylabel(wl["unit"])
        ax.set_title(wl["title"], fontsize=9)
        ax.legend(fontsize=7)
    if "e" in wls and wls["e"]["rows"]:
        ax = flat[i]
        i += 1
        rows_e = wls["e"]["rows"]
        stages = ("rss_before", "rss_allocated", "rss_freed", "rss_released")
        width = 0.2
        for j, st in enumerate(stages):
            ax.bar([x + (j - 1.5) * width for x in range(len(rows_e))],
                   [r[st] / MiB for r in rows_e.values()], width, label=st[4:])
        ax.set_xticks(range(len(rows_e)), list(rows_e), rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("RSS (MiB)")
        ax.set_title(wls["e"]["title"], fontsize=9)
        ax.legend(fontsize=7)
    for ax in flat[i:]:
        ax.axis("off")
    counts = {st: sum(t["status"] == st for t in results["targets"])
              for st in ("PASS", "FAIL", "SKIP")}
    status = ", ".join(f"{n} {st}" for st, n in counts.items() if n)
    fig.suptitle(f"goheap benchmarks ({'quick' if results['config']['quick'] else 'full'} run, "
                 f"{results.get('date', '')}): targets {status}", fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return None


def markdown(results: dict[str, Any]) -> str:
    """The README's summary of a results file: targets, then every ratio to the reference."""
    m = results.get("machine", {})
    out = [f"Run of {results.get('date', '?')} at commit {m.get('git_commit', '?')[:10]} "
           f"({'quick' if results['config']['quick'] else 'full'}; {m.get('cpu', '?')}, "
           f"{m.get('cpus', '?')} CPUs, Python {m.get('python', '?').split()[0]}).", "",
           "| target | measured | limit | status |", "|---|---|---|---|"]
    for t in results["targets"]:
        v = t["value"]
        shown = "n/a" if v is None else (f"{v:+.1%}" if t["workload"] == "e" else f"{v:.2f}x")
        limit = f"{t['limit']:.0%}" if t["workload"] == "e" else f"{t['limit']}x"
        out.append(f"| {t['target']} | {shown} | {limit} | {t['status']} |")
    for key in ("a", "b", "c", "d_flat", "d_spans", "f", "g"):
        wl = results["workloads"].get(key)
        if not wl or not wl["cases"]:
            continue
        ref = "C-loop glibc" if key == "g" else "cffi-libc"
        out += ["", f"**{wl['title']}**: median, ratio to {ref}", "",
                "| | " + " | ".join(c["case"] for c in wl["cases"]) + " |",
                "|---" * (len(wl["cases"]) + 1) + "|"]
        names: list[str] = []
        for case in wl["cases"]:
            names += [n for n in case["rows"] if n not in names]
        for n in names:
            cells = [f"{fmt_ns(c['rows'][n]['median'])} {c['rows'][n]['ratio']:.2f}x"
                     if n in c["rows"] else "-" for c in wl["cases"]]
            out.append(f"| {n} | " + " | ".join(cells) + " |")
    e = results["workloads"].get("e")
    if e and e["rows"]:
        out += ["", f"**{e['title']}** (MiB)", "",
                "| | before | allocated | freed | released | release call |",
                "|---|---|---|---|---|---|"]
        for n, r in e["rows"].items():
            out.append(f"| {n} | {r['rss_before'] / MiB:.1f} | {r['rss_allocated'] / MiB:.1f} | "
                       f"{r['rss_freed'] / MiB:.1f} | {r['rss_released'] / MiB:.1f} | "
                       f"{r['release'] or '-'} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="about 30 s instead of about 5 min")
    ap.add_argument("--only", type=lambda s: set(s.split(",")),
                    help="comma-separated workloads among a,b,c,d,e,f,g")
    ap.add_argument("--repeats", type=int, help="repeats per case (default 15, quick 5)")
    ap.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    ap.add_argument("--out", type=Path, default=RESULTS, help="directory for latest.json/png")
    ap.add_argument("--markdown", type=Path, metavar="JSON",
                    help="print the README summary of a results file and exit")
    ap.add_argument("--rss-child", help=argparse.SUPPRESS)
    ap.add_argument("--rss-bytes", type=int, default=GiB, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
        return 0
    P.ensure_static_tls()
    if args.rss_child:
        rss_child(args.rss_child, args.rss_bytes)
        return 0
    # numpy's BLAS pool would add idle OS threads, which make cffi's GIL release dearer for
    # every peer that releases it; numpy.empty needs no BLAS.
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    cfg = Config.make(args.quick, args.repeats)
    bench = Bench(cfg, args)
    results = bench.run()
    results["config"] = {k: v for k, v in vars(cfg).items()}
    results["machine"] = machine_info(bench)
    results["date"] = time.strftime("%Y-%m-%d %H:%M:%S %z")
    print_table(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    why = plot(results, args.out / "latest.png")
    print(f"\nwrote {args.out / 'latest.json'}" + (f"; no PNG: {why}" if why else
                                                    f" and {args.out / 'latest.png'}"))
    print(f"total {results['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
