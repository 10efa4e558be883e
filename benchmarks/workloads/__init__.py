"""The workloads, one module each, found by discover(): a new workload is one small file here.

See benchmarks/run.py for the layout of the suite.

A workload module defines:

- ``KEY``: the letter ``--only`` selects it by (two modules may share one: (d) has two);
- ``steps(bench) -> int``: how many progress steps its run() reports (one per repeat of a case);
- ``run(bench) -> None``: measure its cases, record them with ``bench.record()`` under its
  results key (the letter, or the letter and a suffix: ``d_rt``), and judge its targets.

Its docstring says what it measures and why. Its limits are module constants next to the code
that judges them (benchmarks/targets.py has the helpers). Modules run in the order of their file
names, which start with the letter; report.py draws any workload it has not seen before as bars
per case, or as curves when the record carries ``x`` (one value per case).
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType


def discover() -> list[ModuleType]:
    """Every workload module in this package, in file-name order."""
    mods = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"{__name__}.{info.name}")
        for attr in ("KEY", "steps", "run"):
            if not hasattr(mod, attr):
                raise SystemExit(f"benchmarks/workloads/{info.name}.py has no {attr}")
        mods.append(mod)
    return mods


def keys() -> list[str]:
    """The letters --only accepts."""
    return sorted({m.KEY for m in discover()})
