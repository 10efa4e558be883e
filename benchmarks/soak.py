"""Soak (issue 8; `make soak`, minutes, not in CI).

Mixed malloc/free with a live set that rises from 0 to --peak (2 GiB) and falls
back to 0, --cycles times, with a scavenge() every --scavenge-every operations.
Every object is written whole (memset), so RSS is real.  RSS (psutil), heap_inuse and heap_released are sampled
every --sample-every operations; the summary is printed and the plot written to
benchmarks/results/soak.png.

The RSS margin, measured right after each scavenge (when every idle page has
gone back to the OS): ``margin = rss - rss_at_start - heap_inuse``.  Allowed:
``-(10% of heap_inuse + 64 MiB) <= margin <= metadata + 64 MiB``, metadata =
gc_sys + other_sys + mspan_sys (mapped, but resident only where touched).  Low
side: pages of in-use spans no object has touched yet are not resident; high
side: released pages really left (else RSS would carry the idle heap).  64 MiB:
the interpreter's own heap moves by tens of MiB over a run.  Exit 1 on failure.

--ops defaults to 10,000,000.  The Python rate is printed; `--ops` lower it if
the run takes longer than you want (about 10 minutes is the aim).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import random
import sys
import time

import psutil

import goheap

MiB = 1 << 20


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ops", type=int, default=10_000_000)
    ap.add_argument("--peak", type=int, default=2048 * MiB)
    ap.add_argument("--cycles", type=int, default=3)
    ap.add_argument("--scavenge-every", type=int, default=250_000)
    ap.add_argument("--sample-every", type=int, default=25_000)
    ap.add_argument("--seed", type=int, default=8)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "soak.png"))
    a = ap.parse_args()

    proc = psutil.Process()
    rng = random.Random(a.seed)
    h = goheap.Heap(arena_size=8 << 30)
    rss0 = proc.memory_info().rss
    live: list[tuple[int, int]] = []
    live_bytes = 0
    samples: list[tuple[int, int, int, int, int]] = []  # op, rss, inuse, released, live
    margins: list[tuple[int, int, int, int]] = []  # op, margin, heap_inuse, metadata
    memset = ctypes.memset
    period = a.ops / a.cycles
    t0 = time.monotonic()
    nmalloc = nfree = 0

    for op in range(a.ops):
        phase = (op % period) / period
        target = a.peak * (2 * phase if phase < 0.5 else 2 - 2 * phase)
        if live_bytes < target or not live:
            if rng.random() < 0.03:
                n = rng.choice((40_000, 256 * 1024, MiB, 4 * MiB))
            else:
                n = 16 << rng.randrange(9)  # 16 B .. 4 KiB
            v = h.malloc(n, zero=False)
            memset(v, 0x5A, n)
            live.append((v, n))
            live_bytes += n
            nmalloc += 1
        else:
            i = rng.randrange(len(live))
            live[i], live[-1] = live[-1], live[i]
            v, n = live.pop()
            h.free(v)
            live_bytes -= n
            nfree += 1
        if op % a.scavenge_every == a.scavenge_every - 1:
            h.scavenge()
            st = h.stats()
            meta = st.gc_sys + st.other_sys + st.mspan_sys
            margin = proc.memory_info().rss - rss0 - st.heap_inuse
            margins.append((op, margin, st.heap_inuse, meta))
        if op % a.sample_every == 0:
            st = h.stats()
            samples.append(
                (op, proc.memory_info().rss - rss0, st.heap_inuse, st.heap_released, live_bytes)
            )
            if op and op % (a.sample_every * 40) == 0:
                rate = op / (time.monotonic() - t0)
                print(
                    f"{op:>10,} ops  {rate:,.0f} ops/s  live {live_bytes / MiB:8.1f} MiB  "
                    f"rss {samples[-1][1] / MiB:8.1f} MiB",
                    flush=True,
                )

    for v, _ in live:
        h.free(v)
    h.check()
    elapsed = time.monotonic() - t0
    st = h.stats()
    assert st.heap_objects == 0
    ok = all(-(inuse // 10 + 64 * MiB) <= m <= meta + 64 * MiB for _, m, inuse, meta in margins)
    worst = min(margins, key=lambda m: m[1])
    peak_rss = max(s[1] for s in samples)
    print(
        f"soak: {a.ops:,} ops ({nmalloc:,} malloc, {nfree:,} free) in {elapsed:.0f} s "
        f"= {a.ops / elapsed:,.0f} ops/s; peak live {max(s[4] for s in samples) / MiB:.0f} MiB, "
        f"peak RSS growth {peak_rss / MiB:.0f} MiB"
    )
    print(
        f"soak: RSS - heap_inuse after {len(margins)} scavenges: "
        f"min {worst[1] / MiB:+.1f} MiB (at heap_inuse {worst[2] / MiB:.0f} MiB), "
        f"max {max(m[1] for m in margins) / MiB:+.1f} MiB, metadata up to "
        f"{max(m[3] for m in margins) / MiB:.0f} MiB; allowed "
        f"[-(10% + 64 MiB), metadata + 64 MiB]: {'ok' if ok else 'FAIL'}"
    )

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("soak: matplotlib missing, no plot")
    else:
        os.makedirs(os.path.dirname(a.out), exist_ok=True)
        xs = [s[0] / 1e6 for s in samples]
        fig, ax = plt.subplots(figsize=(10, 5))
        for k, label in (
            (1, "RSS growth"),
            (2, "heap_inuse"),
            (3, "heap_released"),
            (4, "live bytes"),
        ):
            ax.plot(xs, [s[k] / MiB for s in samples], label=label, lw=1)
        ax.set_xlabel("operations (millions)")
        ax.set_ylabel("MiB")
        ax.set_title(f"goheap soak: {a.ops:,} ops, scavenge every {a.scavenge_every:,}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(a.out, dpi=100)
        print(f"soak: plot {a.out}")
    h.close()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
