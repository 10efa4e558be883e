"""The harness: timing loops, calibration, interleaving, summaries, and the run's shared state.

See benchmarks/run.py for the layout of the suite.

Design note. Every figure is a median over repeated samples, with its spread (median absolute
deviation, as a percentage of the median) and its ratio to the reference, glibc malloc/free called
through a cffi API-mode module ("cffi-libc"), measured in the same process in the same repeat.
Within one case the peers are interleaved: each repeat runs every peer once, in a freshly shuffled
order, so a slow minute on this shared two-core machine lands on all of them alike. A ratio is the
median of the per-repeat ratios (peer sample / reference sample of the same repeat), which cancels
the drift that both saw. Time is the thread's CPU time (CLOCK_THREAD_CPUTIME_ID, in Python and in
the C loops), not wall time: on a shared two-core machine a sample that loses the CPU to another
process would otherwise be charged for that process's work; page faults and syscalls made by the
allocator still count, as they run on our thread. Each peer's loop count is calibrated once (that
run is also the warm-up) so a sample lasts about the same time for every peer; gc is off while
timing, as in timeit. The loops are built from source templates like timeit's, with each peer's
own allocation expression pasted in, so nobody pays for a wrapper call the others do not.

Why not pyperf: pyperf's model is one benchmark per worker process, calibrated and compared across
separate runs. Here the comparison only means something when the peers share a process, a moment
and a state (the scaling workload builds a 4 GiB live heap once and measures five allocators
against it; the reference's cost depends on how many threads the process has), and the ratios must
be paired per repeat. pyperf's worker spawning and its system tuning (which wants to change CPU
settings on a machine other engineers share) would also not fit the five-minute budget. timeit's
ingredients (templates, calibrated loop counts, gc off, many repeats) with our own interleaving do.
Memory (workload e) is the exception that does need processes: each peer runs in a child of its own
so RSS figures are not shared.
"""

from __future__ import annotations

import gc
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import peers as P

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
REF = P.REFERENCE
CALLOC = P.CALLOC

# Round trips (a): the small sizes of issue 6 and, from issue 13, the large sizes a NumPy user
# allocates (40 KiB is the first size above MaxSmallSize that is not a whole number of pages).
RT_SIZES = (8, 64, 512, 4096, 32768, 40 * KiB, 64 * KiB, 256 * KiB, MiB, 4 * MiB)
# The C loop (g): goheap's C fast path serves small classes only; 1 MiB shows the peers' large path.
C_SIZES = (8, 64, 512, 4096, 32768, MiB)


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
    c_sizes: tuple[int, ...] = C_SIZES
    seed: int = 20140801

    @classmethod
    def make(cls, quick: bool, repeats: int | None) -> Config:
        if quick:
            return cls(
                quick=quick,
                repeats=repeats or 5,
                sample_ns=2_000_000,
                batch_n=100_000,
                batch_repeats=repeats or 3,
                cache_n=1000,
                cache_passes=100,
                rt_sizes=RT_SIZES,
                large_sizes=(64 * KiB, MiB, 16 * MiB),
                live_sizes=(MiB, 16 * MiB, 256 * MiB),
                free_spans=(10, 100, 1000, 10_000),
                rss_bytes=256 * MiB,
            )
        return cls(
            quick=quick,
            repeats=repeats or 15,
            sample_ns=5_000_000,
            batch_n=100_000,
            batch_repeats=repeats or 5,
            cache_n=1000,
            cache_passes=100,
            rt_sizes=RT_SIZES,
            large_sizes=(64 * KiB, 256 * KiB, MiB, 4 * MiB, 16 * MiB),
            live_sizes=(MiB, 4 * MiB, 16 * MiB, 64 * MiB, 256 * MiB, GiB, 4 * GiB),
            free_spans=(10, 100, 1000, 10_000, 100_000),
            rss_bytes=GiB,
        )


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
# Statistics and interleaving


def summarize(samples: list[float]) -> dict[str, Any]:
    med = statistics.median(samples)
    mad = statistics.median(abs(x - med) for x in samples)
    return {
        "median": med,
        "spread_pct": 100.0 * mad / med if med else 0.0,
        "min": min(samples),
        "max": max(samples),
        "samples": samples,
    }


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


def interleave(
    names: list[str],
    sample: Callable[[str], float],
    repeats: int,
    rng: random.Random,
    progress: Progress,
    label: str,
) -> dict[str, list[float]]:
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


def case_result(
    case: str,
    samples: dict[str, list[float]],
    bases: tuple[str, ...],
    extra: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One case's rows: each sample list summarized, with its paired ratio to every base present
    ("ratio" to the first, "ratio_vs_<base>" to the others)."""
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

# A round trip per size, the size changing every time (workload h).
CYCLE = """
def run(sizes, passes, timer=timer):
    t0 = timer()
    for _ in range(passes):
        for s in sizes:
            p = {alloc}
            {free}
    return timer() - t0
"""


def build_loop(template: str, peer: P.Peer, touch: bool = False) -> Callable[..., int]:
    src = template.format(
        alloc=peer.alloc,
        touch=peer.touch if touch else "pass",
        free=peer.free_stmt("ps[i]" if template is BATCH else "p"),
    )
    namespace = dict(peer.ns, timer=time.thread_time_ns)
    exec(compile(src, f"<{peer.name} loop>", "exec"), namespace)
    return namespace["run"]


# A runner is run(k) -> elapsed ns for k units of work; Bench.measure() divides by k * ops.
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


def cycle_runner(peer: P.Peer, sizes: list[int]) -> Runner:
    loop = build_loop(CYCLE, peer)

    def run(passes: int) -> int:
        if peer.before:
            peer.before()
        return loop(sizes, passes)

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


# ---------------------------------------------------------------------------------------------
# The run's shared state


class Bench:
    """What every workload module is handed: the configuration, the peers, the goheap heap the
    public-API peers use, the random source, and the results being built.

    A workload records its cases under results["workloads"][key] and its verdicts through
    target(); report.py reads nothing else."""

    def __init__(self, cfg: Config, only: set[str] | None) -> None:
        self.cfg = cfg
        self.only = only
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
        self.keep: list[Any] = []  # cffi objects the C loops point into
        self.progress = Progress(0, False)

    def want(self, key: str) -> bool:
        return self.only is None or key in self.only

    def note(self, text: str) -> None:
        self.progress.write(text)

    def record(self, key: str, title: str, unit: str, cases: list[Any], **more: Any) -> None:
        self.results["workloads"][key] = {"title": title, "unit": unit, "cases": cases, **more}

    def target(
        self,
        name: str,
        workload: str,
        value: float | None,
        limit: float,
        detail: str,
        passed: bool | None,
        info: str = "",
        stretch: bool = False,
    ) -> None:
        """Record one verdict. passed=None is SKIP (nothing to judge); a stretch target is
        reported as STRETCH PASS/FAIL and does not fail the run."""
        status = "SKIP" if passed is None else ("PASS" if passed else "FAIL")
        if stretch and passed is not None:
            status = f"STRETCH {status}"
        self.results["targets"].append(
            {
                "target": name,
                "workload": workload,
                "value": value,
                "limit": limit,
                "status": status,
                "detail": detail,
                "info": info,
                "stretch": stretch,
            }
        )

    def sample(
        self,
        label: str,
        runs: dict[str, Runner],
        ops: int = 1,
        count: int | dict[str, int] | None = None,
        repeats: int | None = None,
        target_ns: int | None = None,
    ) -> tuple[dict[str, list[float]], dict[str, int]]:
        """Interleaved samples of every runner, in ns per operation, and the loop counts used.
        With count=None each runner's count is calibrated (that run is the warm-up); otherwise
        each runs `count` units once untimed first."""
        if count is None:
            counts = {k: calibrate(r, target_ns or self.cfg.sample_ns) for k, r in runs.items()}
        else:
            counts = dict(count) if isinstance(count, dict) else dict.fromkeys(runs, count)
            for k, r in runs.items():
                r(counts[k])
        samples = interleave(
            list(runs),
            lambda k: runs[k](counts[k]) / (counts[k] * ops),
            repeats or self.cfg.repeats,
            self.rng,
            self.progress,
            label,
        )
        return samples, counts

    def measure(
        self,
        label: str,
        runs: dict[str, Runner],
        bases: tuple[str, ...],
        ops: int = 1,
        count: int | dict[str, int] | None = None,
        repeats: int | None = None,
        target_ns: int | None = None,
        extra: dict[str, dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """One case of a workload: sample() every runner, then summarize with ratios to bases.
        label is "<workload letter> <case name>"."""
        samples, counts = self.sample(label, runs, ops, count, repeats, target_ns)
        more = {k: {"count": counts[k], **(extra or {}).get(k, {})} for k in runs}
        return case_result(label.split(" ", 1)[1], samples, bases, more)

    def peers_for(self, size: int) -> list[P.Peer]:
        return [p for p in self.peers if size >= p.min_size]
