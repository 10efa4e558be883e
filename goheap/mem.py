"""The OS layer: Go's SysAlloc, SysReserve, SysMap, SysUnused, SysUsed, SysFault, SysFree.

See goheap/malloc.py for the overview.

Region states (the vocabulary of Go's mem.go): *None* (not ours), *Reserved*
(address space, PROT_NONE, no RSS), *Prepared* (mapped but handed back to the
OS: contents undefined, no RSS), *Ready* (read-write).  Each method names its
transition.

The heap receives a ``SysMemory`` object instead of calling the OS itself, so
that tests can wrap it: fail the Nth call of a primitive, fail with a
probability, or return regions that are OS-page aligned but not heap-page
aligned (which a real 4 KiB-page kernel does, and which is the seed's bug).
``SysMemory(page_size=16384)`` simulates a machine with bigger OS pages on a
4 KiB one: every range it accepts must be whole simulated pages (C checks that
too) and every address it hands out is aligned to them.

Invariants: every range passed to the OS is a whole number of ``page_size``
pages at a ``page_size``-aligned address, or the call raises ValueError before
any syscall.  ``stats[cat]`` is the number of bytes mapped Ready or Prepared for
category ``cat`` (Go's ``*_sys`` counters); reservations are not counted.
"""

from __future__ import annotations

import errno as errno_mod
import random
import threading
from dataclasses import dataclass, field
from typing import Any

from goheap import _native
from goheap.errors import OutOfMemory

PRIMITIVES = ("alloc", "reserve", "map", "unused", "used", "fault", "free")

# Go's MStats categories that the OS layer charges.
SYS_STATS = ("heap_sys", "gc_sys", "other_sys", "mspan_sys", "mcache_sys")


@dataclass
class _Injection:
    nth: int | None  # fail exactly the nth call from now (1-based)
    probability: float  # or fail each call with this probability
    rng: random.Random
    err: int
    calls: int = 0
    failures: int = 0


@dataclass
class SysMemory:
    """The OS as the heap sees it.  Thread-safe; cheap to share between heaps."""

    page_size: int = 0  # 0: the real OS page size
    stats: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SYS_STATS, 0))
    calls: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PRIMITIVES, 0))
    trace: list[tuple[str, int, int]] | None = None  # (primitive, v, n) when enabled
    _inject: dict[str, _Injection] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    # Set while calls are injected or traced: C's efence path (_sys.c, the
    # efence quarantine) then leaves its system calls to Python, so that
    # every one is seen here.
    c_hooked: Any = field(default_factory=_native.new_flag, repr=False, compare=False)

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name == "trace":
            self._sync_hook()

    def _sync_hook(self) -> None:
        cell = self.__dict__.get("c_hooked")
        if cell is not None:
            cell[0] = int(bool(self._inject) or self.trace is not None)

    def __post_init__(self) -> None:
        self._sync_hook()
        real = _native.os_page_size()
        if self.page_size == 0:
            self.page_size = real
        ps = self.page_size
        if ps < real or ps & (ps - 1) or ps % real:
            raise ValueError(
                f"page_size {ps} must be a power of two and a multiple of the OS page {real}"
            )
        self.real_page_size = real

    # ---- fault injection (for testing and for users hunting OOM paths) -------------

    def inject(
        self,
        primitive: str,
        *,
        nth: int | None = None,
        probability: float = 0.0,
        seed: int = 0,
        err: int = errno_mod.ENOMEM,
    ) -> None:
        """Make ``primitive`` fail: its ``nth`` call from now, or each call with
        ``probability`` (seeded).  The failure happens before the syscall, so the
        OS state is exactly that of a real failure."""
        if primitive not in PRIMITIVES:
            raise ValueError(f"unknown primitive {primitive!r}; expected one of {PRIMITIVES}")
        if nth is None and not 0.0 < probability <= 1.0:
            raise ValueError("give nth >= 1 or 0 < probability <= 1")
        if nth is not None and nth < 1:
            raise ValueError("nth counts from 1")
        self._inject[primitive] = _Injection(nth, probability, random.Random(seed), err)
        self._sync_hook()

    def clear_injections(self) -> None:
        self._inject.clear()
        self._sync_hook()

    def injected_failures(self) -> int:
        return sum(i.failures for i in self._inject.values())

    def _enter(self, primitive: str, v: int, n: int) -> None:
        with self._lock:
            self.calls[primitive] += 1
            if self.trace is not None:
                self.trace.append((primitive, v, n))
            inj = self._inject.get(primitive)
            if inj is None:
                return
            inj.calls += 1
            fail = (
                inj.calls == inj.nth if inj.nth is not None else inj.rng.random() < inj.probability
            )
            if not fail:
                return
            inj.failures += 1
            if inj.nth is not None:
                del self._inject[primitive]
                self._sync_hook()
        where = f"sys_{primitive}(v={v:#x}, n={n:#x})"
        if inj.err == errno_mod.ENOMEM:
            raise OutOfMemory(f"{where}: out of memory (injected, errno {inj.err})")
        raise OSError(inj.err, f"{where}: injected failure")

    def _charge(self, stat: str | None, n: int) -> None:
        if stat is not None:
            with self._lock:
                self.stats[stat] += n

    @staticmethod
    def view(v: int, n: int) -> memoryview:
        """A writable byte view of [v, v+n), which must be Ready memory of ours."""
        return _native.view(v, n)

    # ---- the primitives ------------------------------------------------------------

    def round_up(self, n: int) -> int:
        """n rounded up to whole OS pages."""
        return -(-n // self.page_size) * self.page_size

    def sys_alloc(self, n: int, stat: str | None) -> int:
        """None -> Ready: n bytes of zeroed memory anywhere, OS-page aligned (only)."""
        self._enter("alloc", 0, n)
        v = _native.sys_alloc(n, self.page_size)
        self._charge(stat, n)
        return v

    def sys_reserve(self, hint: int, n: int, exact: bool = False) -> int:
        """None -> Reserved: n bytes of address space, OS-page aligned (only).
        ``hint`` is a hint unless ``exact``, when anything else is FileExistsError."""
        self._enter("reserve", hint, n)
        return _native.sys_reserve(hint, n, self.page_size, exact)

    def sys_map(self, v: int, n: int, stat: str | None) -> None:
        """Reserved -> Ready.  [v, v+n) must lie in a reservation of ours."""
        self._enter("map", v, n)
        _native.sys_map(v, n, self.page_size)
        self._charge(stat, n)

    def sys_unused(self, v: int, n: int) -> None:
        """Ready -> Prepared: the OS may take the pages (Linux: at once, reads give zero)."""
        self._enter("unused", v, n)
        _native.sys_unused(v, n, self.page_size)

    def sys_used(self, v: int, n: int) -> None:
        """Prepared -> Ready."""
        self._enter("used", v, n)
        _native.sys_used(v, n, self.page_size)

    def sys_fault(self, v: int, n: int) -> None:
        """Ready -> Reserved (efence): any touch faults, the range stays ours."""
        self._enter("fault", v, n)
        _native.sys_fault(v, n, self.page_size)

    def sys_free(self, v: int, n: int, stat: str | None) -> None:
        """any -> None.  ``stat`` is uncharged by n (None for reservations)."""
        self._enter("free", v, n)
        _native.sys_free(v, n, self.page_size)
        self._charge(stat, -n)
