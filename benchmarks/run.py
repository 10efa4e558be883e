#!/usr/bin/env python3
"""goheap against what a Python user would pick instead: side by side, in one run, as ratios.

Usage: ``python benchmarks/run.py [--quick] [--only a,b,...] [--repeats N]`` (``make bench``,
``make bench-quick``). Prints a table with PASS/FAIL per target and writes
``benchmarks/results/latest.json`` and ``latest.png`` (a quick run: ``results/quick/``; a run
with ``--only``: ``results/partial/``; ``--out`` chooses). The exit status is 1 when a target FAILs
(STRETCH FAIL and SKIP do not count), after everything has been written.

The suite, one module per concern (benchmarks/ is not a package; this script puts it on sys.path):

- ``harness.py``: the configuration, the timing templates and runners, calibration, the
  interleaving of peers within a repeat, medians and paired ratios, and ``Bench``, the state a
  workload is handed. Its docstring is the design note: why thread CPU time, why interleave, why
  not pyperf.
- ``peers.py`` (with ``bench_peers.c``/``.h``): every allocator behind one call shape, the cffi
  module they go through, and the references: glibc malloc+free ("cffi-libc") and glibc
  calloc+free ("cffi-libc calloc") through that module.
- ``workloads/``: one module per workload, found by ``workloads.discover()``: (a) round trip of
  one size, 8 B..4 MiB; (b) random batches; (c) large objects written; (d) scaling with the live
  heap, and large malloc+free against 10..100,000 free spans; (e) RSS; (f) efence, with
  Electric Fence and DUMA, and sampled efence; (g) the C loop; (h) distinct large sizes; (i)
  np.empty under goheap's NumPy handler. Each declares its cases and its targets; a new workload
  is one small file there.
- ``targets.py``: judging a measured value against a limit, and the statuses.
- ``report.py``: the printed tables, ``--markdown`` (the README's summary), the PNG.

Figures are measured, never typed in: the workload modules hold targets (limits), no results.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import harness as H  # noqa: E402  (benchmarks/ is not a package; run.py runs as a script)
import peers as P  # noqa: E402
import report  # noqa: E402
import targets as T  # noqa: E402
import workloads  # noqa: E402

RESULTS = HERE / "results"


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="about a minute instead of about 5 min")
    ap.add_argument(
        "--only",
        type=lambda s: set(s.split(",")),
        help=f"comma-separated workloads among {','.join(workloads.keys())}",
    )
    ap.add_argument("--repeats", type=int, help="repeats per case (default 15, quick 5)")
    ap.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    ap.add_argument(
        "--out",
        type=Path,
        help=f"directory for latest.json/png (default {RESULTS}, quick runs {RESULTS / 'quick'},"
        f" --only runs {RESULTS / 'partial'}: a quick or partial run never overwrites the full"
        " run's figures the README shows)",
    )
    ap.add_argument(
        "--markdown",
        type=Path,
        metavar="JSON",
        help="print the README summary of a results file and exit",
    )
    ap.add_argument("--rss-child", help=argparse.SUPPRESS)
    ap.add_argument("--rss-bytes", type=int, default=H.GiB, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.out is None:
        if args.quick:
            args.out = RESULTS / "quick"
        elif args.only:
            args.out = RESULTS / "partial"
        else:
            args.out = RESULTS
    unknown = (args.only or set()) - set(workloads.keys())
    if unknown:
        ap.error(f"--only: no workload {','.join(sorted(unknown))}")
    return args


def run(cfg: H.Config, args: argparse.Namespace) -> dict:
    """Every selected workload, in order, on one Bench; the results dictionary."""
    t0 = time.time()
    bench = H.Bench(cfg, args.only)
    chosen = [m for m in workloads.discover() if bench.want(m.KEY)]
    bench.progress = H.Progress(sum(m.steps(bench) for m in chosen), not args.no_progress)
    for name, why in bench.skipped:
        bench.note(f"skipped {name}: {why}")
    for mod in chosen:
        mod.run(bench)
    bench.progress.close()
    if bench.heap is not None:
        bench.heap.close()
    results = bench.results
    results["skipped"] = [{"peer": n, "reason": r} for n, r in bench.skipped]
    # Peers a workload loaded for itself (f's Electric Fence and DUMA) leave their notes here.
    results["peers"] = {p.name: p.note for p in bench.peers} | results.pop("peer_notes", {})
    results["seconds"] = time.time() - t0
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.markdown:
        print(report.markdown(json.loads(args.markdown.read_text())))
        return 0
    P.ensure_static_tls()
    if args.rss_child:
        from workloads import e_rss

        e_rss.child(args.rss_child, args.rss_bytes)
        return 0
    # numpy's BLAS pool would add idle OS threads, which make cffi's GIL release dearer for
    # every peer that releases it; numpy.empty needs no BLAS.
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    cfg = H.Config.make(args.quick, args.repeats)
    results = run(cfg, args)
    results["config"] = dict(vars(cfg))
    results["machine"] = report.machine_info()
    results["date"] = time.strftime("%Y-%m-%d %H:%M:%S %z")
    report.print_table(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    why = report.plot(results, args.out / "latest.png")
    print(
        f"\nwrote {args.out / 'latest.json'}"
        + (f"; no PNG: {why}" if why else f" and {args.out / 'latest.png'}")
    )
    print(f"total {results['seconds']:.0f} s")
    failing = T.failed(results["targets"])
    if failing:
        print(f"{len(failing)} target(s) FAIL: exit status 1")
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
