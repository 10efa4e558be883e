"""What the OS really did: /proc/self/maps, resident pages, and crashes in child processes.

Tests use these instead of trusting goheap's own bookkeeping."""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass

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
    """/proc/self/maps, with the guard-marked pages of anonymous mappings split
    out as "---p" (see guard_runs): a page that faults on every touch is
    PROT_NONE to every test, however the kernel was told."""
    out = []
    markers = _markers_possible()
    with open("/proc/self/maps") as f:
        lines = list(f)  # all of it first: scanning pagemap below allocates
    for line in lines:
        fields = line.split()
        rng, perms = fields[:2]
        lo, hi = (int(x, 16) for x in rng.split("-"))
        anon = len(fields) < 6 or fields[5].startswith("[")
        if markers and anon and perms != "---p" and hi - lo <= _GUARD_SCAN_MAX:
            pos = lo
            for a, b in guard_runs(lo, hi):
                if a > pos:
                    out.append(Mapping(pos, a, perms))
                out.append(Mapping(a, b, "---p"))
                pos = b
            if pos < hi:
                out.append(Mapping(pos, hi, perms))
        else:
            out.append(Mapping(lo, hi, perms))
    return out


# Guard markers (Linux 6.13+ MADV_GUARD_INSTALL, what goheap's efence uses
# where the kernel has them) fault like PROT_NONE but leave the mapping's
# protection alone, so /proc/self/maps does not show them; /proc/self/pagemap
# has a bit per page (6.15+).  Mappings larger than _GUARD_SCAN_MAX are not
# scanned (ASan's shadow is terabytes of read-write mapping).
PM_GUARD_REGION = 1 << 58
_GUARD_SCAN_MAX = 8 << 30
_GUARD_BYTE = 7 if sys.byteorder == "little" else 0  # the byte of a word holding bit 58
_GUARD_TABLE = bytes(1 if b & (PM_GUARD_REGION >> 56) else 0 for b in range(256))


def _kernel_page() -> int:
    """The kernel's page (AT_PAGESZ): pagemap counts in it, also under the
    page-size shim, which changes what sysconf says."""
    with open("/proc/self/auxv", "rb") as f:
        raw = f.read()
    words = memoryview(raw).cast("L")
    for i in range(0, len(words) - 1, 2):
        if words[i] == 6:  # AT_PAGESZ
            return int(words[i + 1])
    return os.sysconf("SC_PAGE_SIZE")


@functools.cache
def _markers_possible() -> bool:
    from goheap import _native

    return _native.guard_regions()[1]


def guard_runs(lo: int, hi: int) -> list[tuple[int, int]]:
    """The runs of guard-marked pages in [lo, hi), from /proc/self/pagemap."""
    page = _kernel_page()
    lo, hi = lo - lo % page, hi
    n = -(-(hi - lo) // page)
    flags = bytearray()
    with open("/proc/self/pagemap", "rb", buffering=0) as f:
        f.seek(lo // page * 8)
        while len(flags) < n:  # in pieces: no big buffer mapped mid-test
            raw = f.read(min(n - len(flags), 8192) * 8)
            if not raw:
                break
            flags += raw[_GUARD_BYTE::8].translate(_GUARD_TABLE)
    runs, i = [], flags.find(1)
    while i >= 0:
        j = flags.find(0, i)
        j = len(flags) if j < 0 else j
        runs.append((lo + i * page, min(lo + j * page, hi)))
        i = flags.find(1, j)
    return runs


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


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)
_libc.mincore.restype = ctypes.c_int
_MINCORE_CHUNK = 1 << 30  # bounds the vector at 256 Ki entries per call
_LOW_BIT = bytes(b & 1 for b in range(256))  # the other bits of a mincore byte are undefined


def resident(v: int, n: int) -> int:
    """Bytes of [v, v+n) the kernel holds resident, by mincore(2) over the mapped
    parts of the range (gaps count zero).

    Unlike the process's RSS (psutil) this counts only the range, whatever else
    the process (an ASan runtime, the interpreter) has resident.  The unit is the OS page as
    this process sees it: under tests/pageshim a fake page is resident when any
    of its host pages is, which is what it would cost on a kernel of that page."""
    page = os.sysconf("SC_PAGE_SIZE")
    lo, hi = v & ~(page - 1), v + n
    total = 0
    for m in sorted(mappings(), key=lambda m: m.start):
        a, b = max(lo, m.start), min(hi, m.end)
        while a < b:
            k = min(b - a, _MINCORE_CHUNK)
            vec = ctypes.create_string_buffer((k + page - 1) // page)
            if _libc.mincore(a, k, vec) != 0:
                e = ctypes.get_errno()
                if e == errno.ENOMEM:  # unmapped since mappings() was read
                    break
                raise OSError(e, f"mincore({a:#x}, {k}): {os.strerror(e)}")
            total += vec.raw[: (k + page - 1) // page].translate(_LOW_BIT).count(1) * page
            a += k
    return total


def heap_resident(h) -> int:  # type: ignore[no-untyped-def]
    """Resident bytes of a heap's own reservation: its spans table, GC bitmap and
    arena ([h.spans, h.arena_end)), nothing else of the process."""
    return resident(h.spans, h.arena_end - h.spans)


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
