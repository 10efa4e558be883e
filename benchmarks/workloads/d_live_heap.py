"""(d) Scaling with the live heap: a small round trip and a small batch from 1 MiB to 4 GiB live.

See benchmarks/run.py for the layout of the suite.

Two measurements. The lockstep curves (d_rt, d_batch) grow every C allocator's live heap and one
goheap heap together and sample them at each size. The flatness target is judged on d_flat
instead, which drift cannot fake: one goheap heap per live size, all alive at once, and every
repeat samples all of them (and cffi-libc) in a shuffled order. The lockstep curves cannot do
that for the peers, whose heap is the process's own and only grows.

The live heap is 1/64 random 8..1024 B objects, the rest 256 KiB blocks that are never written
(address space, not RSS), so 4 GiB live fits a machine with less memory than that.
"""

from __future__ import annotations

import random

import harness as H
import peers as P
import targets as T

KEY = "d"

TARGET_FLAT = 1.5  # issue 6: slowest / fastest goheap cost from 1 MiB to 4 GiB live


def steps(bench: H.Bench) -> int:
    n = len(bench.cfg.live_sizes)
    return (2 * n + (2 if bench.heap is not None else 0)) * bench.cfg.repeats


def run(bench: H.Bench) -> None:
    if bench.heap is None:
        bench.note(f"(d) scaling: goheap skipped ({bench.goheap_skip}); peers measured alone")
    lockstep(bench)
    if bench.heap is not None:
        flat(bench)
    else:
        bench.target(
            f"(d) flat within {TARGET_FLAT}x, 1 MiB..4 GiB live",
            "d",
            None,
            TARGET_FLAT,
            bench.goheap_skip or "",
            None,
        )


def grow(peer: P.Peer, keep: list[int], grown: list[int], rng: random.Random, target: int) -> None:
    """Bring peer's live heap to `target` bytes: 1/64 in random 8..1024 B objects, the rest in
    256 KiB blocks, which stay untouched (address space, not RSS). grown is [small bytes, block
    bytes] so far."""
    malloc = peer.ns["malloc"]
    while grown[0] < target // 64:
        s = rng.randint(8, 1024)
        keep.append(malloc(s))
        grown[0] += s
    while grown[0] + grown[1] + 256 * H.KiB <= target:
        keep.append(malloc(256 * H.KiB))
        grown[1] += 256 * H.KiB


def lockstep(bench: H.Bench) -> None:
    """Cost of a 64 B malloc+free, and of a cache-resident random batch, while every allocator
    carries the same growing live heap."""
    c = bench.cfg
    heap = None
    allocs = [p for p in bench.peers if p.kind == "c"]
    if bench.heap is not None:
        import goheap

        heap = goheap.Heap()
        allocs.append(P.goheap_peers(bench.mod, heap)[0])
    live: dict[str, list[int]] = {p.name: [] for p in allocs}
    grown = {p.name: [0, 0] for p in allocs}  # small bytes, block bytes
    rngs = {p.name: random.Random(c.seed) for p in allocs}
    bsizes, border = H.random_batch(c.cache_n, c.seed + 1)
    rt = {p.name: H.round_trip_runner(p, 64) for p in allocs}
    batch = {p.name: H.batch_runner(p, bsizes, border) for p in allocs}
    counts: dict[str, int] = {}
    cases_rt, cases_batch = [], []
    for target in c.live_sizes:
        for p in allocs:
            grow(p, live[p.name], grown[p.name], rngs[p.name], target)
        if not counts:  # the same loop counts at every size, calibrated on the smallest
            counts = {k: H.calibrate(r, c.sample_ns) for k, r in rt.items()}
        extra = {k: {"live_bytes": sum(g)} for k, g in grown.items()}
        label = H.fmt_size(target)
        cases_rt.append(bench.measure(f"d {label}", rt, (H.REF,), count=counts, extra=extra))
        cases_batch.append(
            bench.measure(f"d {label}", batch, (H.REF,), ops=c.cache_n, count=10, extra=extra)
        )
    for p in allocs:
        for a in live[p.name]:
            p.ns["free"](a)
    if heap is not None:
        heap.close()
    x = list(c.live_sizes)
    bench.record(
        "d_rt",
        "(d) 64 B malloc+free as the live heap grows",
        "ns per op",
        cases_rt,
        x=x,
        summary=False,
    )
    bench.record(
        "d_batch",
        f"(d) {c.cache_n} random objects x 10 passes as the live heap grows",
        "ns per object",
        cases_batch,
        x=x,
        summary=False,
    )


def flat(bench: H.Bench) -> None:
    """d_flat and the flatness targets: one goheap heap per live size, interleaved."""
    import goheap

    c = bench.cfg
    bsizes, border = H.random_batch(c.cache_n, c.seed + 1)
    heaps, rt, batch = [], {}, {}
    try:
        for target in c.live_sizes:
            heap = goheap.Heap()
            heaps.append(heap)
            peer = P.goheap_peers(bench.mod, heap)[0]
            grow(peer, [], [0, 0], random.Random(c.seed), target)
            rt[H.fmt_size(target)] = H.round_trip_runner(peer, 64)
            batch[H.fmt_size(target)] = H.batch_runner(peer, bsizes, border)
        rt[H.REF] = H.round_trip_runner(bench.by_name[H.REF], 64)
        batch[H.REF] = H.batch_runner(bench.by_name[H.REF], bsizes, border)
        count = H.calibrate(rt[H.fmt_size(c.live_sizes[0])], c.sample_ns)
        cases = [
            bench.measure("d 64 B round trip", rt, (H.REF,), count=count),
            bench.measure(f"d {c.cache_n:,} random x 10", batch, (H.REF,), ops=c.cache_n, count=10),
        ]
    finally:
        for heap in heaps:
            heap.close()
    bench.record(
        "d_flat",
        "(d) goheap, one heap per live size, all sizes interleaved in every repeat",
        "ns per op",
        cases,
        x=list(c.live_sizes),
        draw="overlay",
    )
    span = f"{H.fmt_size(c.live_sizes[0])}..{H.fmt_size(c.live_sizes[-1])}"
    for case in cases:
        value = T.flatness([case["rows"][H.fmt_size(x)]["median"] for x in c.live_sizes])
        T.at_most(
            bench,
            f"(d) {case['case']} flat within {TARGET_FLAT}x, 1 MiB..4 GiB",
            "d",
            value,
            TARGET_FLAT,
            f"slowest/fastest goheap median over {span} live",
            "quick run: stops at 256 MiB" if c.quick else "",
        )
