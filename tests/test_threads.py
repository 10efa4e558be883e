"""Threads on one heap: mimalloc's test-stress shape, cookies checked at every free.

Each thread allocates objects of power-of-two word counts (1..16 words, rarely
x100 or x1000, so large objects and refills happen too), writes its cookie into
every byte (first and last word: an id naming thread and serial; the rest: one
byte derived from it), and swaps objects with the other threads through a shared
transfer array, so most frees are of objects another thread allocated.  Every
free first verifies the whole object.  Threads are recreated each round so the
objects they leave in the array outlive them.  At the end the stats must equal
what the threads counted, exactly, and ``check()`` must pass.

GOHEAP_STRESS_THREADS (default 8) and GOHEAP_STRESS_SCALE (default 1) scale it:
the default does >= 200,000 heap operations.

Free-threaded CPython (3.13t/3.14t): not available on this machine -- see
README's reliability section and the issue-8 report: Debian 12 ships only 3.11,
Debian 13's python3.13-nogil is 3.13t, which cffi 2.0 does not support (it
supports 3.14t), and PyPI ships no interpreters.  The C core takes its own lock
in every call (goheap/_sys.c), which is what a GIL-less build would rely on.
"""

from __future__ import annotations

import os
import random
import sys
import threading
from collections import Counter

import pytest

import goheap

THREADS = int(os.environ.get("GOHEAP_STRESS_THREADS", "8"))
SCALE = int(os.environ.get("GOHEAP_STRESS_SCALE", "1"))
SLOTS = 1000
ROUNDS = 5


def cookie_bytes(cookie: int, n: int) -> bytes:
    """The contents of an object carrying cookie: id words at both ends."""
    if n < 8:
        return cookie.to_bytes(8, "little")[:n]
    fill = bytes([cookie & 0xFF | 1]) * (n - 16) if n >= 16 else b""
    head = cookie.to_bytes(8, "little")
    return head + fill + (head if n >= 16 else b"")


class Stress:
    def __init__(self, h: goheap.Heap, nthreads: int, ops_per_thread: int) -> None:
        self.h = h
        self.nthreads = nthreads
        self.ops_per_thread = ops_per_thread
        self.slots: list[tuple[int, int, int] | None] = [None] * SLOTS
        self.slot_locks = [threading.Lock() for _ in range(64)]
        self.counts: Counter = Counter()
        self.counts_lock = threading.Lock()
        self.errors: list[str] = []
        self.serial = 0

    def size(self, rng: random.Random) -> int:
        n = 8 << rng.randrange(5)  # 1..16 words
        r = rng.random()
        if r < 0.002:
            n *= 1000  # up to 128 KB: large objects
        elif r < 0.02:
            n *= 100
        return n

    def alloc(self, tid: int, rng: random.Random, c: Counter) -> tuple[int, int, int]:
        n = self.size(rng)
        v = self.h.malloc(n, zero=rng.random() < 0.5)
        c["malloc"] += 1
        cookie = (tid + 1) << 48 | (v >> 3 & ((1 << 48) - 1))
        self.h.view(v, n)[:] = cookie_bytes(cookie, n)
        return v, n, cookie

    def verify_free(self, obj: tuple[int, int, int], c: Counter) -> None:
        v, n, cookie = obj
        got = self.h.view(v, n).tobytes()
        if got != cookie_bytes(cookie, n):
            self.errors.append(f"object {v:#x}+{n} (cookie {cookie:#x}) was changed")
        self.h.free(v)
        c["free"] += 1

    def swap(self, i: int, obj: tuple[int, int, int] | None) -> tuple[int, int, int] | None:
        with self.slot_locks[i % len(self.slot_locks)]:
            old = self.slots[i]
            self.slots[i] = obj
            return old

    def worker(self, tid: int, seed: int, gun: threading.Barrier) -> None:
        rng = random.Random(seed)
        c: Counter = Counter()
        mine: list[tuple[int, int, int]] = []
        gun.wait()
        try:
            target = self.ops_per_thread * (tid % 8 + 1) // 4
            while c["malloc"] + c["free"] < target:
                r = rng.random()
                if r < 0.5 or not mine:
                    mine.append(self.alloc(tid, rng, c))
                elif r < 0.75:
                    # Free one of ours (random position), verifying it.
                    j = rng.randrange(len(mine))
                    mine[j], mine[-1] = mine[-1], mine[j]
                    self.verify_free(mine.pop(), c)
                else:
                    # Hand one over; free what the other thread left there.
                    got = self.swap(rng.randrange(SLOTS), mine.pop())
                    if got is not None:
                        self.verify_free(got, c)
            # Leave part of our objects in the array for the next round's threads.
            for obj in mine:
                got = self.swap(rng.randrange(SLOTS), obj)
                if got is not None:
                    self.verify_free(got, c)
        except Exception as e:
            self.errors.append(f"thread {tid}: {e!r}")
        with self.counts_lock:
            self.counts.update(c)

    def run(self, rounds: int) -> None:
        for r in range(rounds):
            gun = threading.Barrier(self.nthreads)
            ts = [
                threading.Thread(target=self.worker, args=(t, r * 1000 + t, gun))
                for t in range(self.nthreads)
            ]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            assert not self.errors, self.errors[:5]
        c: Counter = Counter()
        for i in range(SLOTS):
            obj = self.swap(i, None)
            if obj is not None:
                self.verify_free(obj, c)
        self.counts.update(c)
        assert not self.errors, self.errors[:5]


@pytest.fixture
def fast_switch():
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # many more interleavings of the Python wrappers
    yield
    sys.setswitchinterval(old)


def test_threads_stress_cookies_and_exact_stats(fast_switch):
    with goheap.Heap(arena_size=4 << 30) as h:
        before = h.stats()
        # Per thread, ops_per_thread * (tid % 8 + 1) / 4: 9 * ops_per_thread for 8 threads.
        s = Stress(h, THREADS, ops_per_thread=4500 * SCALE)
        s.run(ROUNDS)
        total = s.counts["malloc"] + s.counts["free"]
        print(f"threads={THREADS} rounds={ROUNDS} operations={total}")
        assert total >= 200_000 * SCALE * THREADS // 8
        assert s.counts["malloc"] == s.counts["free"]
        st = h.stats()
        assert st.mallocs - before.mallocs == s.counts["malloc"]
        assert st.frees - before.frees == s.counts["free"]
        assert st.heap_objects == 0 and st.heap_alloc == 0
        h.check()


@pytest.mark.parametrize("with_check", [False, True], ids=["stats-scavenge", "check"])
def test_threads_check_and_stats_run_beside_allocating_threads(fast_switch, with_check):
    """stats(), scavenge() and check() from one thread while others allocate.

    check() freezes the C fast paths while it walks (they fall back to the slow
    path and wait for the heap lock), and a large free is marked and undone
    only under that lock, so every check() sees one consistent heap."""
    with goheap.Heap(arena_size=1 << 30) as h:
        s = Stress(h, 4, ops_per_thread=3000)
        stop = threading.Event()
        problems: list[str] = []

        def inspector() -> None:
            n = 0
            while not stop.is_set():
                try:
                    if with_check:
                        h.check()
                    st = h.stats()
                    assert not st.identity_errors(), st.identity_errors()
                    if n % 5 == 0:
                        h.scavenge()
                except Exception as e:
                    problems.append(repr(e))
                    return
                n += 1

        t = threading.Thread(target=inspector)
        t.start()
        try:
            s.run(2)
        finally:
            stop.set()
            t.join()
        assert not problems, problems[:3]
        h.check()
        assert h.stats().heap_objects == 0


def test_threads_double_free_race_exactly_one_wins():
    """Two threads free the same objects: exactly one free of each succeeds,
    the other gets DoubleFree (or InvalidFree once the slot is reused)."""
    with goheap.Heap(arena_size=1 << 30) as h:
        for _ in range(20):
            objs = [h.malloc(48) for _ in range(500)]
            wins = Counter()
            gun = threading.Barrier(2)

            def freer(k: int, objs=objs, wins=wins, gun=gun) -> None:
                gun.wait()
                for v in objs:
                    try:
                        h.free(v)
                        wins[k] += 1
                    except goheap.InvalidFree:
                        wins["refused"] += 1

            ts = [threading.Thread(target=freer, args=(k,)) for k in range(2)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            assert wins[0] + wins[1] == len(objs) and wins["refused"] == len(objs)
            h.check()
        assert h.stats().heap_objects == 0
