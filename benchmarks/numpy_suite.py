"""NumPy's own test suite under the goheap pytest plugin (issue 15 item 5; ``make numpy-suite``).

NumPy's tests ship inside its wheel.  This runs the same modules three times --
without the plugin, with ``--goheap=normal`` (every array on a goheap heap) and
with ``--goheap=sample:100`` (about one allocation in 100 an efence object) --
and prints each run's passed/failed/skipped counts, wall and CPU seconds, and
the ratios to the run without the plugin.  The plugin must change no result: a
test that fails only under goheap is either a goheap bug or a false positive
of efence, and either one fails this script (exit status 1), naming the tests.

    python benchmarks/numpy_suite.py                      # the four modules of the issue
    python benchmarks/numpy_suite.py --quick              # a few hundred tests, seconds
    python benchmarks/numpy_suite.py --modes normal efence numpy._core.tests.test_numeric

Each run is a fresh ``python -m pytest --pyargs ...`` in an empty folder (no
ini file of this project applies), its outcomes read from a JUnit XML report.
CPU seconds are the child's user+system time: on a shared machine they move
less than the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

MODULES = (
    "numpy._core.tests.test_multiarray",
    "numpy._core.tests.test_numeric",
    "numpy._core.tests.test_ufunc",
    "numpy.random",
)
# --quick (and the check in make test, tests/test_pytest_plugin.py): creation,
# resize (realloc), methods (sort, partition: the handler's temporaries), text and file I/O
# (fromfile/fromstring with sep=: a realloc without the GIL), structured dtypes, pickling.
QUICK = ("numpy._core.tests.test_multiarray",)
QUICK_K = "TestMethods or TestCreation or TestResize or TestPickling or TestIO or TestStructured or TestFromBuffer"
MODES = ("off", "normal", "sample:100")


@dataclass
class Run:
    mode: str
    wall: float = 0.0
    cpu: float = 0.0
    outcomes: dict[str, str] = field(default_factory=dict)  # test id -> passed/failed/...
    returncode: int = 0
    tail: str = ""

    def count(self, outcome: str) -> int:
        return sum(1 for o in self.outcomes.values() if o == outcome)


def outcomes_of(xml_path: str) -> dict[str, str]:
    """Each test's outcome in a JUnit XML report: passed, failed, error or skipped
    (xfail and xpass are reported by pytest as skipped and passed)."""
    out: dict[str, str] = {}
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        tid = f"{case.get('classname')}::{case.get('name')}"
        kinds = {child.tag for child in case}
        if "failure" in kinds:
            outcome = "failed"
        elif "error" in kinds:
            outcome = "error"
        elif "skipped" in kinds:
            outcome = "skipped"
        else:
            outcome = "passed"
        # A test both failing and erroring in teardown appears twice: keep the worst.
        if out.get(tid) not in ("failed", "error"):
            out[tid] = outcome
    return out


def run(mode: str, modules: list[str], k: str | None, extra: list[str]) -> Run:
    """One pytest run over ``modules`` under ``mode`` ("off": no plugin)."""
    with tempfile.TemporaryDirectory(prefix="goheap-numpy-suite.") as tmp:
        xml = os.path.join(tmp, "report.xml")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
        cmd += ["--junitxml", xml, "-o", "junit_family=xunit2"]
        cmd += ["-p", "no:goheap"] if mode == "off" else [f"--goheap={mode}"]
        if k:
            cmd += ["-k", k]
        cmd += [*extra, "--pyargs", *modules]
        env = dict(os.environ)
        env.pop("GOHEAP_PYTEST", None)
        env.pop("PYTEST_ADDOPTS", None)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        r = Run(mode, wall, cpu, returncode=proc.returncode)
        r.tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
        if os.path.exists(xml):
            r.outcomes = outcomes_of(xml)
        return r


def table(runs: list[Run]) -> str:
    base = runs[0]
    rows = [
        "| run | passed | failed | errors | skipped | wall s | wall ratio | CPU s | CPU ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        name = "no plugin" if r.mode == "off" else f"--goheap={r.mode}"
        rows.append(
            f"| {name} | {r.count('passed')} | {r.count('failed')} | {r.count('error')} | "
            f"{r.count('skipped')} | {r.wall:.1f} | {r.wall / base.wall:.2f}x | "
            f"{r.cpu:.1f} | {r.cpu / base.cpu:.2f}x |"
        )
    return "\n".join(rows)


def differences(base: Run, r: Run) -> list[str]:
    """Tests whose outcome under ``r`` is not the one without the plugin."""
    diffs = []
    for tid in sorted(set(base.outcomes) | set(r.outcomes)):
        a, b = base.outcomes.get(tid, "absent"), r.outcomes.get(tid, "absent")
        if a != b:
            diffs.append(f"{tid}: {a} without the plugin, {b} with --goheap={r.mode}")
    return diffs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("modules", nargs="*", help=f"test modules or packages (default: {MODULES})")
    ap.add_argument(
        "--modes", nargs="+", default=list(MODES), help="runs; 'off' first is the baseline"
    )
    ap.add_argument("--quick", action="store_true", help=f"only {QUICK} -k '{QUICK_K}'")
    ap.add_argument("-k", dest="k", default=None, help="pytest -k expression for every run")
    ap.add_argument("--json", help="also write the runs' counts and times to this file")
    ap.add_argument("--pytest-arg", action="append", default=[], help="passed on to every run")
    args = ap.parse_args(argv)
    modules = args.modules or list(QUICK if args.quick else MODULES)
    k = args.k or (QUICK_K if args.quick and not args.modules else None)
    modes = args.modes if args.modes[0] == "off" else ["off", *args.modes]

    runs = []
    for mode in modes:
        print(f"numpy-suite: {' '.join(modules)} under {mode} ...", flush=True)
        r = run(mode, modules, k, args.pytest_arg)
        print(
            f"  {r.wall:.1f} s wall, {r.cpu:.1f} s CPU, exit {r.returncode}\n  {r.tail}", flush=True
        )
        if not r.outcomes:
            print(f"numpy-suite: the {mode} run reported no test (exit {r.returncode})")
            return 1
        runs.append(r)
    print()
    print(table(runs))
    bad = [d for r in runs[1:] for d in differences(runs[0], r)]
    for d in bad:
        print("DIFFERENT:", d)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                [
                    {
                        "mode": r.mode,
                        "wall": r.wall,
                        "cpu": r.cpu,
                        "returncode": r.returncode,
                        **{o: r.count(o) for o in ("passed", "failed", "error", "skipped")},
                    }
                    for r in runs
                ],
                f,
                indent=1,
            )
    print(
        f"numpy-suite: {'no' if not bad else len(bad)} test(s) with a different outcome "
        "under the plugin"
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
