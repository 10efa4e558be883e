"""efence, shown: a use-after-free and an overrun caught at the faulting write.

See goheap/malloc.py for the overview and goheap/efence.py for the policy.

Built on the public API only.  Each bug is committed by a forked child process,
standing in for a C extension that writes through a stale or off-by-one
pointer; the child dies of SIGSEGV, and its last words (the fault reporter's
"goheap: use-after-free at 0x...: ..." line on stderr) give the faulting
address.  The parent still holds the very same heap (fork copied it), so it can ask
``Heap.explain`` what that address is.  Everything printed is read back from
the kernel (/proc/self/maps, wait status) or the heap, never typed in.

``cost()`` measures what efence costs per malloc+free against a normal heap,
in the same process, as the median of repeated timeit runs; ``tour()`` prints
it with the bounded-quarantine figures.
"""

from __future__ import annotations

import ctypes
import os
import signal
import statistics
import sys
import timeit
from collections.abc import Callable

import goheap
from goheap.efence import fault_address, guard_marked, report_faults

KiB, MiB = 1 << 10, 1 << 20


def _maps_lines(v: int, n: int) -> list[str]:
    try:
        with open("/proc/self/maps") as f:
            lines = f.readlines()
    except OSError:
        return ["    (no /proc/self/maps on this OS)"]
    out = []
    for line in lines:
        lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
        if hi > v and lo < v + n:
            out.append("    " + " ".join(line.split()[:2]))
            # Guard markers fault without a protection maps could show.
            near = guard_marked(max(lo, v - MiB), min(hi, v + n + MiB)) or []
            for a, b in near:
                if a < v + n and b > v:
                    out.append(f"      {a:x}-{b:x} guard-marked (/proc/self/pagemap): faults")
    return out or ["    (nothing mapped)"]


def crash_in_child(addr: int, write: bool = True) -> tuple[str, str]:
    """Fork a child that touches one byte at addr (as buggy C code would) with
    the fault reporter installed.  Returns (how it died, its stderr)."""
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        try:
            os.close(r)
            os.dup2(w, 2)
            report_faults()
            if write:
                ctypes.memset(addr, 0x21, 1)
            else:
                ctypes.string_at(addr, 1)
        finally:
            os._exit(0)  # reached only if the touch did not fault
    os.close(w)
    with os.fdopen(r, "r", errors="replace") as f:
        err = f.read()
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        how = f"died of {signal.Signals(os.WTERMSIG(status)).name}"
    else:
        how = f"exited with status {os.WEXITSTATUS(status)} (nothing caught it)"
    return how, err


def _show_crash(h: goheap.Heap, addr: int, what: str) -> int | None:
    print(f"child: {what} at {addr:#x} ...")
    how, err = crash_in_child(addr)
    print(f"child {how}; its stderr: {err.strip() or '(nothing)'}")
    seen = fault_address(err)
    if seen is not None:
        print(f"parent: h.explain({seen:#x})")
        print(f"    {h.explain(seen)}")
    return seen


def use_after_free() -> int | None:
    """A write into a freed object; returns the faulting address the child reported."""
    print("Heap(efence=True): every object on OS pages of its own; free() keeps the span")
    print("(state FAULTED, still in the spans table) and makes its pages fault: guard")
    print("markers where the kernel has them (Linux 6.13+), else PROT_NONE.")
    with goheap.Heap(arena_size=1 << 30, efence=True) as h:
        p = h.malloc(64)
        h.view(p)[:5] = b"hello"
        print(f"malloc(64) -> {p:#x}, usable {h.usable_size(p)}; wrote b'hello'")
        print("\n".join(_maps_lines(p, 1)))
        h.free(p)
        print(f"free({p:#x}): the kernel now says")
        print("\n".join(_maps_lines(p, 1)))
        st = h.stats()
        print(f"stats: heap_alloc {st.heap_alloc}, efence_faulted {st.efence_faulted} B")
        return _show_crash(h, p + 8, "a stale pointer writes 1 byte at offset 8")


def overrun() -> int | None:
    """A one-byte overrun past a guarded object; returns the reported address."""
    print("Heap(efence=True, guard=True, align=1): the object ends where an inaccessible")
    print("guard page begins (Electric Fence's EF_ALIGNMENT=1), so the first byte past it faults.")
    with goheap.Heap(arena_size=1 << 30, efence=True, guard=True, align=1) as h:
        p = h.malloc(13)
        h.view(p)[:] = b"thirteen byte"
        print(f"malloc(13) -> {p:#x}, usable {h.usable_size(p)}; all 13 bytes written, no fault")
        print("\n".join(_maps_lines(p, 14)))
        return _show_crash(h, p + 13, "an off-by-one loop writes byte [13]")


def _pair(h: goheap.Heap, size: int) -> Callable[[], None]:
    m, f = h.malloc, h.free

    def pair() -> None:
        f(m(size))

    return pair


def cost(size: int = 100, number: int = 2000, repeat: int = 7) -> dict[str, float]:
    """Seconds per malloc(size)+free, median of ``repeat`` timeit runs of
    ``number`` pairs each, for a normal heap, efence, and efence with a 1 MiB
    quarantine, interleaved in this process; plus the ratios."""
    normal = goheap.Heap(arena_size=1 << 30)
    plain = goheap.Heap(arena_size=16 << 30, efence=True)
    quar = goheap.Heap(arena_size=1 << 30, efence=True, quarantine=MiB)
    heaps = {"normal": normal, "efence": plain, "efence_quarantine": quar}
    runs: dict[str, list[float]] = {k: [] for k in heaps}
    try:
        for _ in range(repeat):
            for name, h in heaps.items():
                t = timeit.timeit(_pair(h, size), number=number)
                runs[name].append(t / number)
    finally:
        for h in heaps.values():
            h.close()
    out = {k: statistics.median(v) for k, v in runs.items()}
    out["ratio_efence"] = out["efence"] / out["normal"]
    out["ratio_efence_quarantine"] = out["efence_quarantine"] / out["normal"]
    return out


def quarantine_figures(cycles: int = 20_000, quarantine: int = MiB) -> dict[str, int]:
    """Run cycles x (malloc(100), free) under a quarantine; the heap's address
    space, its read-write bytes in /proc/self/maps (less the guard-marked pages
    /proc/self/pagemap shows), and the faulted bytes."""
    with goheap.Heap(arena_size=16 << 30, efence=True, quarantine=quarantine) as h:
        for _ in range(cycles):
            h.free(h.malloc(100))
        st = h.stats()
        rw = 0
        try:
            with open("/proc/self/maps") as f:
                for line in f:
                    rng, perms = line.split()[:2]
                    lo, hi = (int(x, 16) for x in rng.split("-"))
                    a, b = max(lo, h.arena_start), min(hi, h.arena_end)
                    if a < b and perms != "---p":
                        marked = guard_marked(a, b) or []
                        rw += b - a - sum(y - x for x, y in marked)
        except OSError:
            rw = -1
        h.check()
        return dict(
            cycles=cycles,
            arena_bytes=h.arena_used - h.arena_start,
            arena_rw_bytes=rw,
            faulted=st.efence_faulted,
            deleted=st.efence_deleted,
        )


def tour() -> None:
    """The narrated efence section of ``python -m goheap demo``."""
    print("-- 1. use after free " + "-" * 45)
    use_after_free()
    print("\n-- 2. one-byte overrun " + "-" * 43)
    overrun()
    print("\n-- 3. bounded quarantine (the seed's MHeap_DeleteSpan) " + "-" * 11)
    q = quarantine_figures()
    print(
        f"Heap(efence=True, quarantine=1 MiB): {q['cycles']} x malloc(100)+free -> the arena "
        f"uses {q['arena_bytes'] / MiB:.1f} MiB,"
    )
    print(
        f"{q['arena_rw_bytes'] / MiB:.1f} MiB of it read-write (maps less guard markers); "
        f"{q['faulted'] / KiB:.0f} KiB still faulted (the newest frees), "
        f"{q['deleted']} spans recycled."
    )
    print("Trade-off: a use-after-free older than the quarantine is no longer caught.")
    print("\n-- 4. what it costs " + "-" * 46)
    c = cost()
    print(
        f"malloc(100)+free: normal {c['normal'] * 1e6:.2f} us, efence {c['efence'] * 1e6:.2f} us "
        f"(x{c['ratio_efence']:.0f}), efence+quarantine {c['efence_quarantine'] * 1e6:.2f} us "
        f"(x{c['ratio_efence_quarantine']:.0f}); median of 7 timeit runs each, this process."
    )
    print("The price is syscalls: every free is an mprotect and an madvise, every object a span.")


if __name__ == "__main__":
    tour()
