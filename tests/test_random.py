"""Hypothesis state machines: the page heap against a page model, and the
object heap with a distinct pattern in every live object.  check() and the
MStats identities after every step."""

from __future__ import annotations

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    rule,
    run_state_machine_as_test,
)

import goheap
from goheap import _native, mem
from goheap.mheap import PAGE_SIZE, MHeap
from goheap.mspan import SpanState

MiB = 1 << 20
REAL_PAGE = _native.os_page_size()

# ---- spans -----------------------------------------------------------------------------

NPAGES = st.sampled_from([1, 1, 2, 3, 4, 7, 8, 16, 31, 127, 128, 129, 200, 513])


class SpanMachine(RuleBasedStateMachine):
    """MHeap alloc/free/scavenge; the model is the set of live page ranges."""

    os_page = REAL_PAGE

    def __init__(self) -> None:
        super().__init__()
        self.h = MHeap(mem.SysMemory(page_size=self.os_page), arena_size=256 * MiB)
        self.live: dict[int, int] = {}  # start -> npages

    spans = Bundle("spans")

    @rule(target=spans, npages=NPAGES)
    def alloc(self, npages):
        with self.h.lock:
            s = self.h.alloc_span_locked(npages)
        assert s.npages == npages and s.state == SpanState.IN_USE
        for start, n in self.live.items():
            assert s.end <= start or start + n * PAGE_SIZE <= s.start, "overlap"
        self.live[s.start] = npages
        return s

    @rule(s=consumes(spans))
    def free(self, s):
        del self.live[s.start]
        with self.h.lock:
            self.h.free_span_locked(s)

    @rule()
    def scavenge(self):
        with self.h.lock:
            released = self.h.scavenge_locked(float("inf"), 0)
        assert released % self.h.os_page_size == 0

    steps = 0

    @invariant()
    def consistent(self):
        type(self).steps += 1
        with self.h.lock:
            inuse, idle = self.h.check_locked()
        assert inuse == sum(self.live.values()) * PAGE_SIZE
        assert self.h.heap_released <= idle

    def teardown(self):
        with self.h.lock:
            self.h.close_locked()


def run_counted(machine, examples: int, steps: int) -> int:
    machine.steps = 0
    run_state_machine_as_test(
        machine, settings=settings(max_examples=examples, stateful_step_count=steps, deadline=None)
    )
    return machine.steps


def test_random_spans_against_a_page_model():
    assert run_counted(SpanMachine, 60, 100) >= 2000


class SpanMachine64K(SpanMachine):
    os_page = max(65536, REAL_PAGE)


def test_random_spans_on_64k_os_pages():
    assert run_counted(SpanMachine64K, 15, 60) >= 300


# ---- objects ---------------------------------------------------------------------------

BOUNDARY_SIZES = sorted(
    {n for c in goheap.class_to_size[1:] for n in (c - 1, c, c + 1)}
    | {p * PAGE_SIZE + d for p in (127, 128, 129) for d in (-1, 0, 1)}
    | {0}
)


class ObjectMachine(RuleBasedStateMachine):
    """Public malloc/free/scavenge with a pattern written into every live object."""

    def __init__(self) -> None:
        super().__init__()
        self.h = goheap.Heap(arena_size=512 * MiB)
        self.live: dict[int, tuple[int, int]] = {}  # addr -> (size, tag)
        self.tag = 0

    objs = Bundle("objs")

    def _pattern(self, off: int, n: int, tag: int) -> bytes:
        """Bytes that depend on the tag and the offset, so overlapping probes agree."""
        return bytes((tag * 131 + (off + j) * 7) % 251 for j in range(n))

    def _probe(self, p: int, n: int) -> list[tuple[int, int]]:
        """Where the pattern is written and checked: head, middle and tail."""
        k = min(n, 64)
        return sorted({(0, k), (max(0, n // 2 - k // 2), k), (n - k, k)}) if n else []

    @rule(target=objs, size=st.sampled_from(BOUNDARY_SIZES), zero=st.booleans())
    def malloc(self, size, zero):
        p = self.h.malloc(size, zero=zero)
        usable = self.h.usable_size(p)
        assert usable >= size and p % (16 if size >= 16 else 8) == 0
        if zero:
            for off, k in self._probe(size, size):
                assert self.h.view(p + off, k).tobytes() == bytes(k)
        self.tag += 1
        for off, k in self._probe(size, size):
            self.h.view(p + off, k)[:] = self._pattern(off, k, self.tag)
        assert p not in self.live
        self.live[p] = (size, self.tag)
        return p

    def _verify(self, p):
        size, tag = self.live[p]
        for off, k in self._probe(size, size):
            assert self.h.view(p + off, k).tobytes() == self._pattern(off, k, tag), (hex(p), size)

    @rule(p=consumes(objs))
    def free(self, p):
        self._verify(p)
        del self.live[p]
        self.h.free(p)

    @rule()
    def scavenge(self):
        self.h.scavenge()

    steps = 0

    @invariant()
    def consistent(self):
        type(self).steps += 1
        self.h.check()
        s = self.h.stats()
        assert not s.identity_errors()
        assert s.heap_objects == len(self.live)

    def teardown(self):
        for p in list(self.live):
            self._verify(p)
            self.h.free(p)
        self.h.check()
        self.h.close()


def test_random_objects_with_patterns():
    assert run_counted(ObjectMachine, 80, 100) >= 3000
