"""Targets: verdicts computed from measured ratios, never typed in.

See benchmarks/run.py for the layout of the suite.

Each workload module declares its own limits (as module constants, with the issue they come from)
and judges them with the helpers below after its cases are measured. A limit is never loosened
to make a run pass; a target whose row could not be measured is SKIP with the reason, never PASS.
A stretch target is printed STRETCH PASS/FAIL and does not change the exit status.

Statuses: PASS, FAIL, SKIP, STRETCH PASS, STRETCH FAIL.
"""

from __future__ import annotations

from typing import Any

import harness as H
from harness import Bench


def row_ratio(case: dict[str, Any], row: str, base: str, first_base: str) -> float | None:
    """The paired ratio of `row` to `base` in one case, or None when either was not measured."""
    r = case["rows"].get(row)
    if r is None or base not in case["rows"]:
        return None
    key = "ratio" if base == first_base else f"ratio_vs_{base}"
    return r.get(key)


def at_most(
    bench: Bench,
    name: str,
    workload: str,
    value: float | None,
    limit: float,
    detail: str,
    info: str = "",
    stretch: bool = False,
    why_missing: str = "",
) -> None:
    """value <= limit, or SKIP when value is None (why_missing says why)."""
    if value is None:
        bench.target(name, workload, None, limit, why_missing or detail, None, info, stretch)
        return
    bench.target(name, workload, value, limit, detail, value <= limit, info, stretch)


def nozero_and_zeroed(
    bench: Bench,
    case: dict[str, Any],
    prefix: str,
    workload: str,
    limits: tuple[float, float],
    what: str,
) -> None:
    """The pair of targets every issue-13 case carries: goheap's zero=False against glibc malloc
    and its zeroed default against glibc calloc (their fair references), each at most its limit."""
    missing = bench.goheap_skip or "goheap not measured"
    for row, base, ref, label, limit, detail in (
        (
            "goheap zero=False",
            H.REF,
            "cffi-libc",
            "zero=False",
            limits[0],
            f"h.malloc(n, zero=False)+free vs glibc malloc+free through cffi{what}",
        ),
        (
            "goheap",
            H.CALLOC,
            "cffi-libc calloc",
            "zeroed",
            limits[1],
            f"h.malloc(n)+free (zeroed) vs glibc calloc+free through cffi{what}",
        ),
    ):
        at_most(
            bench,
            f"{prefix} {label} <= {limit}x {ref}",
            workload,
            row_ratio(case, row, base, H.REF),
            limit,
            detail,
            why_missing=missing,
        )


def flatness(medians: list[float]) -> float:
    """Slowest over fastest: 1.0 is perfectly flat."""
    return max(medians) / min(medians)


def counts(targets: list[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in targets:
        out[t["status"]] = out.get(t["status"], 0) + 1
    return out


def failed(targets: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The targets that fail the run: FAIL, not STRETCH FAIL."""
    return [t for t in targets if t["status"] == "FAIL"]
