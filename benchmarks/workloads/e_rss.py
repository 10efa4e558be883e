"""(e) RSS: a large amount in 64 KiB blocks, each OS page written, freed, then given back.

See benchmarks/run.py for the layout of the suite.

Memory is the one workload that needs processes: each peer runs in a child of its own
(``run.py --rss-child NAME``), so RSS figures are not shared. The child reports RSS before the
allocation, once everything is allocated and written, after the frees, and after the peer's own
"give it back" call (scavenge(), malloc_trim, jemalloc purge, mi_collect, tcmalloc
ReleaseFreeMemory, release_unused). A peer's twin (goheap zero=False, glibc calloc) is the same
memory through another entry point and is not run again.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import harness as H
import peers as P

KEY = "e"

TARGET_RSS = 0.05  # issue 6: RSS after scavenge within 5% of the RSS before the allocation

RUN_PY = Path(__file__).resolve().parent.parent / "run.py"


def measured(bench: H.Bench) -> list[P.Peer]:
    return [p for p in bench.peers if p.twin_of is None]


def steps(bench: H.Bench) -> int:
    return len(measured(bench))


def run(bench: H.Bench) -> None:
    c = bench.cfg
    rows: dict[str, Any] = {}
    for p in measured(bench):
        row = rss_of(bench, p.name)
        if row is not None:
            rows[p.name] = row
        bench.progress.step(f"e rss {p.name}")
    if H.REF in rows:
        for row in rows.values():
            for k in ("rss_freed", "rss_released"):
                row[f"{k}_ratio"] = row[k] / rows[H.REF][k]
    bench.results["workloads"]["e"] = {
        "title": f"(e) RSS: {H.fmt_size(c.rss_bytes)} in 64 KiB blocks, each OS page written, "
        "freed, then given back",
        "unit": "bytes",
        "rows": rows,
    }
    g = rows.get("goheap")
    name = f"(e) RSS after scavenge within {TARGET_RSS:.0%} of before"
    if g is None:
        bench.target(name, "e", None, TARGET_RSS, bench.goheap_skip or "goheap child failed", None)
        return
    dev = (g["rss_released"] - g["rss_before"]) / g["rss_before"]
    bench.target(
        name,
        "e",
        dev,
        TARGET_RSS,
        f"before {g['rss_before'] / H.MiB:.1f} MiB, after scavenge "
        f"{g['rss_released'] / H.MiB:.1f} MiB",
        abs(dev) <= TARGET_RSS,
        "quick run: 256 MiB, not 1 GiB" if c.quick else "",
    )


def rss_of(bench: H.Bench, name: str) -> dict[str, Any] | None:
    cmd = [
        sys.executable,
        str(RUN_PY),
        "--rss-child",
        name,
        "--rss-bytes",
        str(bench.cfg.rss_bytes),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        bench.note(f"(e) {name}: child timed out")
        return None
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        bench.note(f"(e) {name}: child failed (exit {proc.returncode}): {tail}")
        return None
    return json.loads(lines[-1])


# ---------------------------------------------------------------------------------------------
# The child: one peer, one process

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


def child(name: str, total: int) -> None:
    """Run in the child process: fill, free and release with one peer; print one JSON line."""
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
    block = 64 * H.KiB
    gc.collect()
    out: dict[str, Any] = {
        "peer": name,
        "bytes": total,
        "block": block,
        "release": peer.release_label or peer.release,
    }
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
        out["heap_stats"] = (
            {k: v for k, v in vars(st).items() if isinstance(v, int)}
            if hasattr(st, "__dict__")
            else str(st)
        )
        heap.close()
    print(json.dumps(out))
