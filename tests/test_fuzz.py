"""Fuzzing the public API with a Hypothesis state machine, bad input included.

The model: address -> (size, fill byte) of every live object.  Rules allocate
(sizes concentrated on class boundaries and the 32 KiB small/large edge), free,
write and re-verify, scavenge -- and throw garbage: random ints and interior
pointers as addresses, double frees, huge/negative/non-int sizes, views out of
bounds, frees of addresses inside a free span.  After every step: the right
exception type came back, no live object changed, no two overlap, check()
passes, and the stats agree with the model.

The allocator must never crash: the C core validates every address against the
arena and the bitmap.  So that a crash is a failing test rather than a dead
pytest, the state machine runs in a child pytest (GOHEAP_FUZZ_CHILD=1) and the
parent asserts that child's exit status; a SIGSEGV shows as a negative code.
Steps: HYPOTHESIS_PROFILE and GOHEAP_FUZZ_EXAMPLES (default 60 x 60 steps).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    precondition,
    rule,
)

import goheap
from goheap import mem
from goheap.sizeclasses import class_to_size

CHILD = os.environ.get("GOHEAP_FUZZ_CHILD") == "1"
# Fewer programs where every step is emulated (the arm64 and kernel lanes).
EMULATED = os.environ.get("GOHEAP_LANE") == "qemu-user" or os.sysconf("SC_PAGE_SIZE") > 4096
EXAMPLES = int(os.environ.get("GOHEAP_FUZZ_EXAMPLES", "15" if EMULATED else "60"))
STEPS = 60

# Simulated OS pages bigger than the real one (at 64 KiB, none).
BIG_PAGES = [p for p in (16384, 65536) if p > os.sysconf("SC_PAGE_SIZE")]
BOUNDARY_SIZES = sorted({max(0, c + d) for c in class_to_size[1:] for d in (-1, 0, 1)})
sizes = st.one_of(
    st.sampled_from(BOUNDARY_SIZES),
    st.integers(0, 64),
    st.sampled_from([32767, 32768, 32769, 8192 * 127, 8192 * 128, 8192 * 129]),
    st.integers(32769, 3 << 20),
)
BAD_SIZES = [-1, -(1 << 70), 1 << 62, 1 << 64, (1 << 63) - 1, 2**200, 1.5, "8", None, b"x"]


class HeapMachine(RuleBasedStateMachine):
    objs = Bundle("objs")

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[int, int]] = {}  # v -> (usable size, fill)
        self.freed: set[int] = set()

    @initialize(
        efence=st.sampled_from([False, False, False, True]),
        page=st.sampled_from([None, None, *BIG_PAGES]),
    )
    def open(self, efence, page):
        # page: the OS page the heap believes in (simulated 16/64 KiB), so the
        # large cache, growth and scavenging run against big-page rounding too.
        self.efence = efence
        sysmem = mem.SysMemory(page_size=page) if page else None
        self.h = goheap.Heap(arena_size=1 << 30, efence=efence, sysmem=sysmem)

    def teardown(self) -> None:
        for v in list(self.live):
            self.h.free(v)
        self.h.check()
        assert self.h.stats().heap_objects == 0
        self.h.close()
        with pytest.raises(goheap.HeapClosed):
            self.h.malloc(8)
        with pytest.raises(goheap.HeapClosed):
            self.h.free(next(iter(self.freed), 1 << 40))
        with pytest.raises(goheap.HeapClosed):
            self.h.check()

    def fill(self, v: int) -> None:
        n, b = self.live[v]
        self.h.view(v, n)[:] = bytes([b]) * n

    @rule(target=objs, n=sizes, b=st.integers(1, 255), zero=st.booleans())
    def malloc(self, n, b, zero):
        if self.h.stats().heap_alloc + n > 256 << 20:
            n = 100
        v = self.h.malloc(n, zero=zero)
        assert v not in self.live
        u = self.h.usable_size(v)
        assert u >= n
        assert v % (16 if n >= 16 else 8) == 0 or self.efence
        if zero:
            assert self.h.view(v, u).tobytes() == bytes(u)
        if self.efence:
            assert v not in self.freed  # efence never reuses an address
        self.freed.discard(v)
        self.live[v] = (u, b)
        self.fill(v)
        return v

    @rule(v=consumes(objs))
    def free(self, v):
        self.h.free(v)
        del self.live[v]
        self.freed.add(v)

    @precondition(lambda self: self.freed)
    @rule(data=st.data())
    def double_free(self, data):
        v = data.draw(st.sampled_from(sorted(self.freed)))
        if v in self.live:
            return
        with pytest.raises(goheap.InvalidFree):
            self.h.free(v)

    @rule(v=objs, delta=st.sampled_from([1, 4, 8, 16, -1, -8, -16]))
    def interior_free(self, v, delta):
        if v not in self.live or (v + delta) in self.live:
            return
        with pytest.raises(goheap.InvalidFree):
            self.h.free(v + delta)

    @rule(addr=st.one_of(st.integers(-(1 << 70), 1 << 70), st.integers(0, 1 << 48)))
    def random_address(self, addr):
        if addr in self.live:
            return
        if (isinstance(addr, int) and addr < 0) or addr >= 1 << 64:
            with pytest.raises((goheap.InvalidFree, ValueError, OverflowError)):
                self.h.free(addr)
        else:
            with pytest.raises(goheap.InvalidFree):
                self.h.free(addr)
        r = self.h.lookup(addr) if 0 <= addr < 1 << 64 else None
        if r is not None:
            base, n = r
            assert base in self.live and base <= addr < base + n

    @rule(data=st.data())
    def arena_address(self, data):
        """An address inside the arena: live start, interior, free span, metadata."""
        h = self.h
        # Bounds may not depend on run-time addresses (Hypothesis replays draws).
        off = data.draw(st.integers(0, 1 << 28))
        addr = h.bitmap + off % max(8, h.arena_used + (1 << 20) - h.bitmap)
        if addr in self.live:
            return
        r = h.lookup(addr)
        if r is not None:
            assert r[0] in self.live and r[0] <= addr < r[0] + r[1]
        with pytest.raises(goheap.InvalidFree):
            h.free(addr)
        assert isinstance(h.explain(addr), str)

    @rule(n=st.sampled_from(BAD_SIZES))
    def bad_size(self, n):
        with pytest.raises((TypeError, ValueError, goheap.OutOfMemory)):
            self.h.malloc(n)

    @rule(bad=st.sampled_from([None, "0x10", 1.0, b"\x00"]))
    def bad_address_type(self, bad):
        with pytest.raises((TypeError, goheap.InvalidFree)):
            self.h.free(bad)

    @rule(v=objs, off=st.integers(0, 1 << 20), n=st.integers(-5, 1 << 21))
    def view_bounds(self, v, off, n):
        if v not in self.live:
            return
        u = self.live[v][0]
        if off < u and 0 <= n <= u - off:
            assert len(self.h.view(v + off, n)) == n
        elif off < u:
            with pytest.raises(ValueError):
                self.h.view(v + off, n)

    @rule(v=objs, b=st.integers(1, 255))
    def rewrite(self, v, b):
        if v in self.live:
            self.live[v] = (self.live[v][0], b)
            self.fill(v)

    @rule()
    def scavenge(self):
        assert self.h.scavenge() >= 0

    @invariant()
    def consistent(self):
        COUNTS["steps"] += 1
        h = self.h
        h.check()
        spans = sorted(self.live.items())
        for (v, (n, b)), nxt in zip(spans, [*spans[1:], (None, None)], strict=False):
            assert h.view(v, n).tobytes() == bytes([b]) * n, f"{v:#x} changed"
            if nxt[0] is not None:
                assert v + n <= nxt[0], "live objects overlap"
        st_ = h.stats()
        assert st_.heap_objects == len(self.live)
        assert st_.heap_alloc == sum(n for n, _ in self.live.values()) or self.efence


COUNTS = {"steps": 0}

if CHILD:
    import atexit

    atexit.register(lambda: print(f"\nfuzz steps checked: {COUNTS['steps']}", flush=True))
    HeapMachine.TestCase.settings = settings(
        max_examples=EXAMPLES,
        stateful_step_count=STEPS,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    TestHeapMachine = HeapMachine.TestCase


@pytest.mark.pagesize
@pytest.mark.skipif(CHILD, reason="the parent half")
def test_fuzz_state_machine_in_a_child_never_crashes():
    env = dict(os.environ, GOHEAP_FUZZ_CHILD="1", PYTHONFAULTHANDLER="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            __file__,
            "-k",
            "TestHeapMachine",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    out = proc.stdout[-6000:] + proc.stderr[-4000:]
    if proc.returncode < 0:
        pytest.fail(f"fuzz child died of {signal.Signals(-proc.returncode).name}:\n{out}")
    assert proc.returncode == 0, out
    assert "1 passed" in proc.stdout, out
    steps = int(proc.stdout.split("fuzz steps checked:")[1].split()[0])
    print(f"{EXAMPLES} programs, {steps} steps checked")
    assert steps >= EXAMPLES * 5
