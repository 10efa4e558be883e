"""Proves, on the real kernel underneath, that pageshim enforces big-page rules.

Run by lanes/pagesize.sh under LD_PRELOAD=pageshim.so PAGESHIM_SIZE=N before
the suite: if the shim is not loaded, or lets a misaligned call through, the
lane stops here instead of reporting a green suite that never saw big pages.
Every check goes through libc by symbol (ctypes), as goheap's extension does,
and verifies the effect in /proc/self/maps or by reading the memory back.
Not collected by pytest (no test_ prefix); run it as a script.
"""

import ctypes
import errno
import mmap
import os
import resource
import subprocess
import sys
import tempfile

PROT_NONE, PROT_READ, PROT_WRITE = 0, 1, 2
MAP_PRIVATE, MAP_ANONYMOUS, MAP_FIXED = 0x02, 0x20, 0x10
MAP_FIXED_NOREPLACE = 0x100000
MADV_DONTNEED = 4
MREMAP_MAYMOVE = 1
HOST_PAGE = 4096

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
libc.mremap.restype = ctypes.c_void_p
libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int]
for name in ("munmap", "mprotect", "madvise"):
    fn = getattr(libc, name)
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int][: 2 if name == "munmap" else 3]
libc.mincore.restype = ctypes.c_int
libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
MAP_FAILED = ctypes.c_void_p(-1).value

checks = 0
failures: list[str] = []


def check(cond: bool, what: str) -> None:
    global checks
    checks += 1
    if not cond:
        failures.append(what)
        print(f"FAIL: {what}", file=sys.stderr)


def anon(length: int, addr: int = 0, flags: int = 0) -> int:
    p = libc.mmap(
        addr or None, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | flags, -1, 0
    )
    return -1 if p == MAP_FAILED else p


def einval(rc: int) -> bool:
    return rc == -1 and ctypes.get_errno() == errno.EINVAL


def mapping_of(addr: int) -> tuple[int, int, str] | None:
    """The /proc/self/maps line containing addr: (start, end, perms)."""
    with open("/proc/self/maps") as f:
        for line in f:
            rng, perms = line.split()[:2]
            lo, hi = (int(x, 16) for x in rng.split("-"))
            if lo <= addr < hi:
                return lo, hi, perms
    return None


def main() -> int:
    want = int(os.environ["PAGESHIM_SIZE"])
    P = want

    # 1. every way Python asks for the page size sees the fake one
    check(os.sysconf("SC_PAGESIZE") == P, f"sysconf(_SC_PAGESIZE) = {os.sysconf('SC_PAGESIZE')}")
    check(os.sysconf("SC_PAGE_SIZE") == P, "sysconf(_SC_PAGE_SIZE)")
    check(mmap.PAGESIZE == P and mmap.ALLOCATIONGRANULARITY == P, "mmap.PAGESIZE")
    check(resource.getpagesize() == P, "getpagesize()")

    # 2. non-fixed mmap: aligned to P, length rounded up to P (the whole P is mapped)
    addrs = [anon(3 * HOST_PAGE) for _ in range(32)]
    check(
        all(a != -1 and a % P == 0 for a in addrs), f"mmap alignment: {[hex(a) for a in addrs[:4]]}"
    )
    m = mapping_of(addrs[0])
    check(m is not None and m[0] <= addrs[0] and m[1] >= addrs[0] + P, f"mmap length rounded: {m}")
    ctypes.memset(addrs[0] + P - 1, 7, 1)  # the last byte of the fake page is writable
    for a in addrs:
        check(libc.munmap(a, 3 * HOST_PAGE) == 0, "munmap of a whole (rounded) mapping")
    hinted = anon(P, addr=addrs[5] + HOST_PAGE)  # misaligned hint: the kernel rounds it up
    check(hinted != -1 and hinted % P == 0, f"hinted mmap aligned: {hinted:#x}")
    libc.munmap(hinted, P)

    # 3. misaligned ranges are refused with EINVAL, as on a real big-page kernel
    base = anon(8 * P)
    check(base != -1, "mmap 8 pages")
    for off in (HOST_PAGE, 8192, P // 2):
        if off % P == 0:
            continue
        check(einval(libc.munmap(base + off, HOST_PAGE)), f"munmap at +{off:#x} -> EINVAL")
        check(
            einval(libc.mprotect(base + off, 8192, PROT_NONE)), f"mprotect at +{off:#x} -> EINVAL"
        )
        check(
            einval(libc.madvise(base + off, 8192, MADV_DONTNEED)), f"madvise at +{off:#x} -> EINVAL"
        )
        check(
            anon(HOST_PAGE, base + off, MAP_FIXED) == -1 and ctypes.get_errno() == errno.EINVAL,
            f"mmap MAP_FIXED at +{off:#x} -> EINVAL",
        )
        check(
            anon(HOST_PAGE, base + off, MAP_FIXED_NOREPLACE) == -1
            and ctypes.get_errno() == errno.EINVAL,
            f"MAP_FIXED_NOREPLACE at +{off:#x} -> EINVAL",
        )
        # the refused calls really changed nothing
        check(
            mapping_of(base + off) is not None and mapping_of(base + off)[2].startswith("rw"),
            f"refused calls left +{off:#x} mapped read-write",
        )
    with tempfile.TemporaryFile() as f:
        f.truncate(2 * P)
        r = libc.mmap(None, HOST_PAGE, PROT_READ, MAP_PRIVATE, f.fileno(), HOST_PAGE)
        check(
            r == MAP_FAILED and ctypes.get_errno() == errno.EINVAL,
            "file mmap at offset 4K -> EINVAL",
        )

    # 4. aligned calls succeed and act on whole fake pages
    check(libc.mprotect(base + P, 8192, PROT_NONE) == 0, "aligned mprotect succeeds")
    m = mapping_of(base + P)
    check(
        m is not None and m[0] == base + P and m[1] == base + 2 * P and m[2].startswith("---"),
        f"mprotect(8K) covered exactly one fake page: {m}",
    )
    ctypes.memset(base + 2 * P, 0x5A, P)
    check(libc.madvise(base + 2 * P, 8192, MADV_DONTNEED) == 0, "aligned madvise succeeds")
    tail = ctypes.string_at(base + 3 * P - 16, 16)
    check(tail == bytes(16), "madvise(DONTNEED, 8K) zeroed the whole fake page")
    vec = ctypes.create_string_buffer(8)
    ctypes.memset(base + 4 * P + P - 1, 1, 1)  # touch only the last host page of page 4
    libc.madvise(base + 5 * P, P, MADV_DONTNEED)
    check(
        libc.mincore(base + 4 * P, 2 * P, vec) == 0 and vec.raw[:2] == b"\x01\x00",
        f"mincore: one byte per fake page {vec.raw[:2]!r}",
    )
    check(einval(libc.mincore(base + HOST_PAGE, P, vec)), "misaligned mincore -> EINVAL")
    check(
        libc.munmap(base + 6 * P, 1) == 0
        and mapping_of(base + 6 * P) is None
        and mapping_of(base + 7 * P) is not None,
        "munmap(1 byte) removed exactly one fake page",
    )
    q = anon(3 * P)  # growing its first page in place is blocked by the rest: it must move
    grown = libc.mremap(q, P, 64 * P, MREMAP_MAYMOVE)
    check(
        grown not in (None, MAP_FAILED, q) and grown % P == 0,
        f"mremap that moves lands aligned: {grown}",
    )

    # 5. psutil-style RSS (statm pages x page size) agrees with VmRSS (kB, unscaled)
    with open("/proc/self/statm") as f:
        rss_pages = int(f.read().split()[1])
    with open("/proc/self/status") as f:
        vmrss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    check(vmrss <= rss_pages * P < vmrss + 64 * P, f"statm rss {rss_pages}x{P} vs VmRSS {vmrss}")

    # 6. children inherit it (the suite runs crash tests in subprocesses)
    out = subprocess.run(
        [sys.executable, "-c", "import os; print(os.sysconf('SC_PAGESIZE'))"],
        capture_output=True,
        text=True,
        check=False,
    )
    check(out.stdout.strip() == str(P), f"child sees {out.stdout.strip()!r} ({out.stderr[-200:]})")

    if failures:
        print(
            f"pageshim selftest at {P}: {len(failures)} of {checks} checks FAILED", file=sys.stderr
        )
        return 1
    print(f"pageshim selftest at {P}: all {checks} checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
