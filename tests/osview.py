"""What the OS really did: /proc/self/maps, RSS, and crashes in child processes.

Tests use these instead of trusting goheap's own bookkeeping."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import psutil
import pytest

FAULT_SIGNALS = (signal.SIGSEGV, signal.SIGBUS)

# Under qemu-user (lanes/arm64.sh) the emulator keeps its own per-page tables
# for every guest mapping, so a PROT_NONE reservation costs host RSS, and it
# ignores the guest's RLIMIT_AS/RLIMIT_DATA (it would starve qemu itself).
# Those two OS effects are tested natively, under the shim and in the kernel lanes.
real_accounting = pytest.mark.skipif(
    os.environ.get("GOHEAP_LANE") == "qemu-user",
    reason="qemu-user: reservations cost emulator RSS and RLIMIT_AS is not applied",
)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Mapping:
    start: int
    end: int
    perms: str


def mappings() -> list[Mapping]:
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            rng, perms = line.split()[:2]
            lo, hi = (int(x, 16) for x in rng.split("-"))
            out.append(Mapping(lo, hi, perms))
    return out


def perms_over(v: int, n: int) -> set[str]:
    """The set of protections covering [v, v+n); '' marks an unmapped gap."""
    seen: set[str] = set()
    pos = v
    for m in sorted(mappings(), key=lambda m: m.start):
        if m.end <= pos or m.start >= v + n:
            continue
        if m.start > pos:
            seen.add("")
        seen.add(m.perms)
        pos = m.end
    if pos < v + n:
        seen.add("")
    return seen


def is_mapped(v: int, n: int = 1) -> bool:
    return "" not in perms_over(v, n)


def rss() -> int:
    return psutil.Process().memory_info().rss


def run_child(
    code: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run Python code in a fresh interpreter (for anything that may crash)."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = ROOT + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env["PYTHONFAULTHANDLER"] = ""
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
    )


def died_of_fault(proc: subprocess.CompletedProcess[str]) -> bool:
    return proc.returncode in tuple(-s for s in FAULT_SIGNALS)
