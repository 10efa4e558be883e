"""(f) efence: every object its own span, faulted on free, against normal mode and the C tools.

See benchmarks/run.py for the layout of the suite.

Heap(efence=True) trades speed for catching use-after-free; this shows what it costs, next to
the two page-guarding debug allocators a C programmer would reach for, Debian's Electric Fence
(libefence) and DUMA (libduma), called through the benchmark's C table like every C peer
(peers.load_efence_peers: their settings are in each row's note). Rows:

- ``goheap efence``: ``Heap(efence=True)`` as it comes (no guard page, nothing recycled);
- ``goheap efence guard``: ``guard="after"``, a faulted unit right after the object, which is
  Electric Fence's and DUMA's default layout (their guard page follows the block); this row is
  the one judged against Electric Fence, like for like;
- ``goheap sample:1000``: ``Heap(efence_sample=1000)`` (issue 15), about one allocation in 1,000
  an efence object, judged against normal mode. The heap's ``stats().efence_sampled`` after the
  run is recorded with the row, so the figure is known to include sampled objects.

Ratios are to cffi-libc, to goheap in normal mode, and to Electric Fence.
"""

from __future__ import annotations

from typing import Any

import harness as H
import peers as P
import targets as T

from workloads.b_random_batch import batch_case

KEY = "f"

SIZES = (8, 512, 4096, 32768)

EFENCE = "cffi-efence"
GUARD = "goheap efence guard"
SAMPLED = "goheap sample:1000"
SAMPLE_N = 1000

# Issue 15: goheap's efence malloc+free no dearer than Electric Fence's, same run.
TARGET_VS_EFENCE = 1.0
# Issue 15: small malloc+free with efence_sample=1000 within 10% of normal mode, same run.
TARGET_SAMPLED = 1.1


def steps(bench: H.Bench) -> int:
    return (len(SIZES) + 1) * bench.cfg.repeats


def sampled_heap() -> tuple[Any, str | None]:
    """Heap(efence_sample=1000), or (None, why not): the option is feature-detected."""
    import goheap

    try:
        h = goheap.Heap(efence_sample=SAMPLE_N)
    except TypeError as e:
        return None, f"Heap(efence_sample=) is not in this goheap (issue 15): {e}"
    try:
        h.free(h.malloc(64))
        h.stats().efence_sampled  # noqa: B018  (the counter the row is checked with)
    except Exception as e:
        h.close()
        return None, f"Heap(efence_sample={SAMPLE_N}) failed: {type(e).__name__}: {e}"
    return h, None


def run(bench: H.Bench) -> None:
    if bench.heap is None:
        bench.note(f"(f) efence: skipped: {bench.goheap_skip}")
        return
    import goheap

    try:
        fence = goheap.Heap(efence=True)
        fence.free(fence.malloc(64))
        guarded = goheap.Heap(efence=True, guard="after")
        guarded.free(guarded.malloc(64))
    except Exception as e:
        bench.note(f"(f) efence: skipped: Heap(efence=True) failed: {type(e).__name__}: {e}")
        return
    normal = goheap.Heap()
    heaps = [fence, guarded, normal]
    chosen = [
        bench.by_name[H.REF],
        P.goheap_peers(bench.mod, normal)[0],
        P.goheap_peers(bench.mod, fence, "goheap efence")[0],
        P.goheap_peers(bench.mod, guarded, GUARD)[0],
    ]
    c_peers, skipped = P.load_efence_peers(bench.mod)
    for name, why in skipped:
        bench.note(f"(f) efence: skipped {name}: {why}")
    bench.skipped += skipped
    chosen += c_peers
    bench.results.setdefault("peer_notes", {}).update({p.name: p.note for p in c_peers})
    for p in c_peers:
        bench.note(f"(f) efence: {p.name}: {p.note}")
    sampled, why_not_sampled = sampled_heap()
    if sampled is None:
        bench.note(f"(f) efence: skipped {SAMPLED}: {why_not_sampled}")
        bench.skipped.append((SAMPLED, str(why_not_sampled)))
    else:
        heaps.append(sampled)
        chosen.append(P.goheap_peers(bench.mod, sampled, SAMPLED)[0])
    bases = (H.REF, "goheap", EFENCE)
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
        sample_record = None
        if sampled is not None:
            st = sampled.stats()
            sample_record = {"efence_sampled": st.efence_sampled, "mallocs": st.mallocs}
    finally:
        for h in heaps:
            h.close()
    bench.record(
        "f",
        "(f) efence (every object its own span, faulted on free) vs normal mode, "
        "Electric Fence and DUMA",
        "ns per op",
        cases,
        sampled=sample_record,
    )
    judge(bench, cases, sample_record, why_not_sampled)


def judge(
    bench: H.Bench,
    cases: list[dict],
    sample_record: dict[str, int] | None,
    why_not_sampled: str | None,
) -> None:
    efence_missing = next(
        (why for name, why in bench.skipped if name == EFENCE), "Electric Fence not measured"
    )
    for case in cases:
        plain = T.row_ratio(case, "goheap efence", EFENCE, H.REF)
        T.at_most(
            bench,
            f"(f) {case['case']} goheap efence <= {TARGET_VS_EFENCE}x Electric Fence",
            "f",
            T.row_ratio(case, GUARD, EFENCE, H.REF),
            TARGET_VS_EFENCE,
            'Heap(efence=True, guard="after") vs libefence malloc+free (its defaults), '
            "both through Python",
            f"no guard {plain:.2f}x" if plain is not None else "",
            why_missing=efence_missing,
        )
    for case in cases[: len(SIZES)]:
        why = why_not_sampled
        if sample_record is not None and sample_record["efence_sampled"] == 0:
            why = (
                f"stats().efence_sampled stayed 0 over {sample_record['mallocs']:,} mallocs: "
                "no object was sampled, so the row is not sampled efence"
            )
        value = None if why else T.row_ratio(case, SAMPLED, "goheap", H.REF)
        info = ""
        if sample_record and not why:
            info = (
                f"{sample_record['efence_sampled']:,} sampled in "
                f"{sample_record['mallocs']:,} mallocs over the whole (f) run"
            )
        T.at_most(
            bench,
            f"(f) {case['case']} efence_sample={SAMPLE_N} <= {TARGET_SAMPLED}x normal mode",
            "f",
            value,
            TARGET_SAMPLED,
            f"Heap(efence_sample={SAMPLE_N}) vs Heap() malloc+free (zeroed), same run",
            info,
            why_missing=why or "goheap not measured",
        )
