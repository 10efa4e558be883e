"""Fork while another thread hammers the heap: the child must not inherit a held lock.

jemalloc's test_fork_multithreaded, GWP-ASan's atfork handlers: a thread may be
inside malloc (holding the heap's RLock, or the C spinlock) at the instant of
fork.  The child has only the forking thread, so a lock held by another thread
would stay held forever.  goheap re-creates its locks in the child
(os.register_at_fork in malloc.py).  The whole test runs in a child process so
that a hang or crash is a failure, not a dead test run.
"""

from __future__ import annotations

from osview import run_child

FORKS = 50

CHILD = r"""
import os, sys, threading, time, signal
import goheap

h = goheap.Heap(arena_size=1 << 30)
stop = threading.Event()
ops = [0]

def hammer():
    live = []
    i = 0
    while not stop.is_set():
        n = (24, 200, 5000, 40000, 1 << 20)[i % 5]
        live.append(h.malloc(n))
        if len(live) > 64:
            h.free(live.pop(0))
        if i % 97 == 0:
            h.scavenge()  # long slow path under the RLock
        i += 1
    for v in live:
        h.free(v)
    ops[0] = i

t = threading.Thread(target=hammer)
t.start()
time.sleep(0.05)
bad = 0
for k in range(FORKS):
    pid = os.fork()
    if pid == 0:
        signal.alarm(5)  # a child stuck on an inherited lock dies of SIGALRM
        try:
            vs = [h.malloc(n) for n in (8, 100, 3000, 50000, 2 << 20)]
            for v in vs:
                h.view(v, 8)[:] = b"childown"
            for v in vs:
                assert h.view(v, 8).tobytes() == b"childown"
                h.free(v)
            h.check()
            h.scavenge()
            os._exit(0)
        except BaseException as e:
            sys.stderr.write(f"child {k}: {e!r}\n")
            os._exit(3)
    t0 = time.monotonic()
    _, status = os.waitpid(pid, 0)
    took = time.monotonic() - t0
    if status != 0 or took > 5:
        bad += 1
        print(f"fork {k}: status {status:#x} after {took:.2f}s", flush=True)
stop.set()
t.join()
h.check()
print(f"forks={FORKS} bad={bad} parent_ops={ops[0]}")
sys.exit(1 if bad else 0)
"""


def test_fork_50_times_while_a_thread_hammers_the_heap():
    proc = run_child(f"FORKS = {FORKS}\n" + CHILD, timeout=300)
    print(proc.stdout[-2000:])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"forks={FORKS} bad=0" in proc.stdout
