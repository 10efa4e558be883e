"""NumPy arrays on a goheap heap (issue 15 item 1): goheap.numpy_allocator and the NEP 49
handler in goheap/_nphandler.c.

Every claim is checked on the heap itself -- ``lookup`` finds an array's data, ``stats``
counts it, ``check()`` passes -- and on NumPy's side (``get_handler_name``).  What could
crash, or what must see the arena unmapped, runs in a child process and is judged by
/proc/self/maps (osview).  The handler's C functions are also called directly through
ctypes (``CFUNCTYPE`` calls drop the GIL, as NumPy may), from the struct the capsule holds.
"""

from __future__ import annotations

import asyncio
import contextvars
import ctypes
import gc
import os
import pickle
import sys
import textwrap
import threading
import tracemalloc

import pytest
from osview import died_of_fault, perms_over, run_child

import goheap
from goheap.numpy_handler import handler_name

np = pytest.importorskip("numpy")

HERE = os.path.dirname(os.path.abspath(__file__))
MiB = 1 << 20


@pytest.fixture
def heap():
    h = goheap.Heap(arena_size=1 << 30)
    yield h
    gc.collect()
    if not h._closed:
        h.check()
        h.close()


def on_heap(h: goheap.Heap, a) -> bool:  # type: ignore[no-untyped-def]
    """a owns its data, it starts an object of h, and NumPy says h's handler made it."""
    r = h.lookup(a.ctypes.data)
    return (
        a.flags.owndata
        and r is not None
        and r[0] == a.ctypes.data
        and r[1] >= a.nbytes
        and handler_name(a) == "goheap"
    )


def live_objects(h: goheap.Heap) -> int:
    gc.collect()
    return h.stats().heap_objects


# ---- every creation route lands on the heap and leaves it -----------------------------

STRUCT = np.dtype([("key", "<i4"), ("val", "<f8"), ("tag", "S3")])


def structured_sort():  # type: ignore[no-untyped-def]
    # Scrambled by arithmetic: np.random keeps an array of its own cached
    # (made under the handler, alive after the test).
    s = np.zeros(500, dtype=STRUCT)
    s["key"] = np.arange(500) * 7919 % 50
    s["val"] = np.arange(500) * 104729 % 997 / 997
    return np.sort(s, order=["key", "val"])


ROUTES = {
    "zeros": lambda: np.zeros(1000),
    "empty": lambda: np.empty((30, 40), dtype=np.int32),
    "ones": lambda: np.ones(5000, dtype=np.complex128),
    "arithmetic": lambda: np.arange(2000.0) * 2 + np.arange(2000.0),
    "copy": lambda: np.arange(7000).copy(),
    "concatenate": lambda: np.concatenate([np.arange(100), np.arange(50000)]),
    "astype": lambda: np.arange(9000).astype(np.float32),
    "fromiter_unsized": lambda: np.fromiter((i * i for i in range(20000)), dtype=np.int64),
    "fromstring_sep": lambda: np.fromstring(" ".join(map(str, range(30000))), sep=" "),
    "structured_sort": structured_sort,
    "argsort": lambda: np.argsort(np.arange(3000)[::-1], kind="stable"),
    # Unpickling allocates for an object array; a numeric one is a view of the
    # pickle's bytes (test_numpy_pickled_numbers_are_views_until_copied).
    "pickle_objects": lambda: pickle.loads(pickle.dumps(np.array([1, "x", None] * 300))),
    "frombuffer_copy": lambda: np.frombuffer(b"x" * 40000, dtype=np.uint8).copy(),
}

EXPECTED = {
    "zeros": lambda a: not a.any(),
    "ones": lambda a: (a == 1).all(),
    "arithmetic": lambda a: (a == np.arange(2000.0) * 3).all(),
    "copy": lambda a: (a == np.arange(7000)).all(),
    "concatenate": lambda a: a.size == 50100 and a[100:].sum() == sum(range(50000)),
    "astype": lambda a: (a == np.arange(9000)).all(),
    "fromiter_unsized": lambda a: (a == np.arange(20000) ** 2).all(),
    "fromstring_sep": lambda a: (a == np.arange(30000)).all(),
    "structured_sort": lambda a: (np.diff(a["key"]) >= 0).all(),
    "argsort": lambda a: (a == np.arange(3000)[::-1]).all(),
    "pickle_objects": lambda a: a.dtype == object and list(a[:3]) == [1, "x", None],
    "frombuffer_copy": lambda a: (a == ord("x")).all(),
}


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_numpy_route_lands_on_heap_and_leaves_when_collected(heap, route):
    before = live_objects(heap)
    with goheap.numpy_allocator(heap):
        a = ROUTES[route]()
    assert on_heap(heap, a), (route, heap.lookup(a.ctypes.data), handler_name(a))
    assert EXPECTED.get(route, lambda a: True)(a), route
    assert live_objects(heap) == before + 1, "temporaries went back to the heap"
    v = a.ctypes.data
    del a
    assert live_objects(heap) == before
    assert heap.lookup(v) is None
    heap.check()


def test_numpy_pickled_numbers_are_views_until_copied(heap):
    with goheap.numpy_allocator(heap):
        for protocol in (2, pickle.HIGHEST_PROTOCOL):
            a = pickle.loads(pickle.dumps(np.arange(4321.0), protocol=protocol))
            assert handler_name(a) is None and heap.lookup(a.ctypes.data) is None
            b = a.copy()
            assert on_heap(heap, b) and (b == np.arange(4321.0)).all()


def test_numpy_structured_sort_temporaries_go_through_the_handler(heap):
    # NumPy's generic sort allocates and frees scratch buffers through the
    # handler: the heap counts them, and they are all freed again.
    st0 = heap.stats()
    with goheap.numpy_allocator(heap):
        a = structured_sort()
    st1 = heap.stats()
    assert st1.mallocs - st0.mallocs > 2
    assert st1.heap_objects - st0.heap_objects == 1
    assert on_heap(heap, a)


def test_numpy_views_have_no_handler_and_keep_the_base(heap):
    with goheap.numpy_allocator(heap):
        a = np.arange(10000.0)
    row = a[10:20]
    assert handler_name(row) is None and not row.flags.owndata
    base = a.ctypes.data
    del a
    gc.collect()
    assert heap.lookup(base) is not None, "the view still holds the base array"
    assert (row == np.arange(10.0, 20.0)).all()
    del row
    gc.collect()
    assert heap.lookup(base) is None


def test_numpy_arrays_outside_the_block_are_untouched(heap):
    before = live_objects(heap)
    a = np.ones(1000)
    with goheap.numpy_allocator(heap):
        b = np.ones(1000)
    c = a + b  # after the block: NumPy's default, whatever its inputs
    assert handler_name(a) == handler_name(c) == "default_allocator"
    assert heap.lookup(a.ctypes.data) is None and heap.lookup(c.ctypes.data) is None
    assert on_heap(heap, b)
    assert handler_name() == "default_allocator"
    del b
    assert live_objects(heap) == before


def test_numpy_zeros_is_zero_on_reused_memory(heap):
    # calloc on memory a previous array dirtied: every size kind.
    for n in (3, 100, 4000, 40000, 600000):
        with goheap.numpy_allocator(heap):
            dirty = np.full(n, -1, dtype=np.int64)
            addr = dirty.ctypes.data
            del dirty
            z = np.zeros(n, dtype=np.int64)
        assert on_heap(heap, z) and not z.any(), n
        if n * 8 > 16:
            assert z.ctypes.data == addr, "same size again: the freed object is reused"


@pytest.mark.pagesize
@pytest.mark.parametrize(
    "nbytes", [1, 8, 15, 16, 17, 1024, 32 * 1024, 32 * 1024 + 1, 4 * MiB, 4 * MiB + 1]
)
def test_numpy_sizes_across_small_and_large_are_aligned(heap, nbytes):
    with goheap.numpy_allocator(heap):
        a = np.empty(nbytes, dtype=np.uint8)
        a[:] = 0xA5
    assert on_heap(heap, a)
    assert a.ctypes.data % 16 == 0, "NumPy expects malloc's 16-byte alignment"
    size = heap.lookup(a.ctypes.data)[1]
    assert size >= max(nbytes, 16)
    if nbytes > goheap.MAX_SMALL_SIZE:
        assert a.ctypes.data % goheap.PAGE_SIZE == 0  # a span of its own
    else:
        assert size == goheap.class_to_size[goheap.size_to_class(max(nbytes, 16))]
    assert (a == 0xA5).all()


# ---- realloc ----------------------------------------------------------------------------


@pytest.mark.pagesize
def test_numpy_resize_reallocs_on_the_heap_and_keeps_contents(heap):
    # Small -> same class (in place) -> large -> larger -> small: the kept
    # prefix survives every step, the grown tail reads as zero (ndarray.resize).
    with goheap.numpy_allocator(heap):
        a = np.arange(5, dtype=np.int64)
    n_prev = 5
    for n in (6, 500, 5000, 100000, 700000, 30, 3):
        a.resize(n, refcheck=False)
        assert on_heap(heap, a), n
        keep = min(n, n_prev)
        assert (a[:keep] == np.arange(keep)).all(), n
        assert not a[n_prev:].any(), n
        a[:] = np.arange(n)
        n_prev = n
    heap.check()
    del a
    assert live_objects(heap) == 0


def test_numpy_resize_in_place_keeps_the_address(heap):
    with goheap.numpy_allocator(heap):
        a = np.zeros(20, dtype=np.uint8)  # a 32-byte object
    v = a.ctypes.data
    a.resize(30, refcheck=False)  # still the 32-byte class
    assert a.ctypes.data == v
    with goheap.numpy_allocator(heap):
        b = np.zeros(40000, dtype=np.uint8)  # 5 heap pages
    w = b.ctypes.data
    b.resize(36000, refcheck=False)  # still needs more than half of them
    assert b.ctypes.data == w and on_heap(heap, b)


def test_numpy_resize_after_the_block_uses_the_arrays_own_handler(heap):
    with goheap.numpy_allocator(heap):
        a = np.arange(100.0)
    assert handler_name() == "default_allocator"
    a.resize(200000, refcheck=False)
    assert on_heap(heap, a) and (a[:100] == np.arange(100.0)).all()


def test_numpy_fromstring_reallocs_without_the_gil_on_a_cold_heap():
    # np.fromstring(sep=) grows its buffer by realloc inside
    # NPY_BEGIN_ALLOW_THREADS: the moves miss on a fresh heap and take the GIL
    # themselves (PyGILState_Ensure).  A second thread keeps the GIL busy.
    with goheap.Heap(arena_size=1 << 30) as h:
        stop = threading.Event()

        def spin() -> None:
            while not stop.is_set():
                sum(range(200))

        t = threading.Thread(target=spin)
        t.start()
        try:
            text = " ".join(map(str, range(200000)))
            with goheap.numpy_allocator(h):
                a = np.fromstring(text, sep=" ", dtype=np.int64)
        finally:
            stop.set()
            t.join()
        assert on_heap(h, a) and (a == np.arange(200000)).all()
        del a
        assert live_objects(h) == 0
        h.check()


# ---- contexts, nesting, threads ---------------------------------------------------------


def test_numpy_blocks_nest_and_restore_what_they_replaced(heap):
    with goheap.Heap(arena_size=1 << 28) as inner_heap:
        cm = goheap.numpy_allocator(heap)
        with cm as got:
            assert got is heap
            a = np.ones(10)
            with goheap.numpy_allocator(inner_heap):
                b = np.ones(10)
                with cm:  # the same object again, nested: re-entrant
                    c = np.ones(10)
                d = np.ones(10)
            e = np.ones(10)
        f = np.ones(10)
        assert [on_heap(heap, x) for x in (a, c, e)] == [True] * 3
        assert [on_heap(inner_heap, x) for x in (b, d)] == [True] * 2
        assert handler_name(f) == "default_allocator"
        del b, d
        gc.collect()
        inner_heap.check()


def test_numpy_exit_out_of_order_is_refused(heap):
    with goheap.Heap(arena_size=1 << 28) as other:
        outer, inner = goheap.numpy_allocator(heap), goheap.numpy_allocator(other)
        outer.__enter__()
        inner.__enter__()
        with pytest.raises(RuntimeError, match="innermost first"):
            outer.__exit__(None, None, None)
        assert on_heap(other, np.ones(3)), "a refused exit changes nothing"
        inner.__exit__(None, None, None)
        outer.__exit__(None, None, None)
        assert handler_name() == "default_allocator"
        with pytest.raises(RuntimeError):
            outer.__exit__(None, None, None)


def test_numpy_handler_is_per_context(heap):
    cm = goheap.numpy_allocator(heap)
    ctx = contextvars.copy_context()
    ctx.run(cm.__enter__)  # installed in the copy only
    assert handler_name() == "default_allocator"
    a = ctx.run(np.ones, 100)
    assert on_heap(heap, a)
    with cm:
        inherited = contextvars.copy_context().run(np.ones, 100)  # a copy inherits
    assert on_heap(heap, inherited)
    ctx.run(cm.__exit__, None, None, None)
    assert ctx.run(handler_name) == "default_allocator"


def test_numpy_asyncio_tasks_keep_their_own_heaps(heap):
    async def work(h: goheap.Heap, out: list) -> None:  # type: ignore[type-arg]
        with goheap.numpy_allocator(h):
            for i in range(20):
                out.append(np.full(50 + i, i))
                await asyncio.sleep(0)  # the other task runs in between

    async def main(h2: goheap.Heap) -> tuple[list, list]:  # type: ignore[type-arg]
        x: list = []  # type: ignore[type-arg]
        y: list = []  # type: ignore[type-arg]
        await asyncio.gather(work(heap, x), work(h2, y))
        return x, y

    with goheap.Heap(arena_size=1 << 28) as h2:
        xs, ys = asyncio.run(main(h2))
        assert all(on_heap(heap, a) for a in xs)
        assert all(on_heap(h2, a) for a in ys)
        del xs, ys
        gc.collect()
        h2.check()
    assert handler_name() == "default_allocator"


def test_numpy_new_threads_start_with_numpys_default(heap):
    seen = []
    inherit = getattr(sys.flags, "thread_inherit_context", 0)  # 3.14+: may inherit
    with goheap.numpy_allocator(heap):
        t = threading.Thread(target=lambda: seen.append(handler_name(np.ones(10))))
        t.start()
        t.join()
    assert seen == ["goheap" if inherit else "default_allocator"]


def test_numpy_four_threads_allocate_under_one_handler(heap):
    cm = goheap.numpy_allocator(heap)  # one object, entered by each thread itself
    errors: list[BaseException] = []
    kept: list = []  # type: ignore[type-arg]
    barrier = threading.Barrier(4)

    def work(k: int) -> None:
        try:
            barrier.wait()
            with cm:
                mine = []
                for i in range(300):
                    n = (1, 7, 300, 5000, 50000)[(i + k) % 5]
                    a = np.full(n, k * 1000 + i, dtype=np.int64)
                    if i % 3 == 0:
                        a.resize(n + 17, refcheck=False)
                    mine.append(a)
                    if len(mine) > 20:
                        mine.pop(0)
                for a in mine:
                    assert on_heap(heap, a)
                    assert (a[:1] >= k * 1000).all()
                kept.extend(mine)
            assert handler_name() == "default_allocator"
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert live_objects(heap) == len(kept) == 4 * 20
    heap.check()
    kept.clear()
    assert live_objects(heap) == 0
    heap.check()


# ---- misuse and refusals ----------------------------------------------------------------


def test_numpy_allocator_refuses_a_closed_heap_and_non_heaps():
    h = goheap.Heap(arena_size=1 << 28)
    cm = goheap.numpy_allocator(h)
    h.close()
    with pytest.raises(goheap.HeapClosed):
        goheap.numpy_allocator(h)
    with pytest.raises(goheap.HeapClosed):
        cm.__enter__()
    assert handler_name() == "default_allocator"
    with pytest.raises(TypeError):
        goheap.numpy_allocator(object())  # type: ignore[arg-type]


def test_numpy_heap_closed_inside_the_block_gives_memoryerror(heap):
    hooked = []
    old_hook = sys.unraisablehook
    sys.unraisablehook = hooked.append
    try:
        with goheap.numpy_allocator(heap):
            a = np.ones(100)
            heap.close()
            with pytest.raises(MemoryError):
                np.ones(100)
    finally:
        sys.unraisablehook = old_hook
    assert [type(u.exc_value) for u in hooked] == [goheap.HeapClosed]
    assert "malloc(800)" in str(hooked[0].object)
    assert (a == 1).all(), "still mapped: the array holds the arena"


def test_numpy_free_the_heap_refuses_is_reported_not_fatal(heap):
    # Freeing an array's data behind NumPy's back, then dropping the array:
    # the handler's free is a double free, which must not kill NumPy.
    hooked = []
    old_hook = sys.unraisablehook
    sys.unraisablehook = hooked.append
    try:
        with goheap.numpy_allocator(heap):
            small, large = np.ones(100), np.ones(100000)
        vs = [small.ctypes.data, large.ctypes.data]
        for v in vs:
            heap.free(v)
        del small, large
        gc.collect()
    finally:
        sys.unraisablehook = old_hook
    assert [type(u.exc_value) for u in hooked] == [goheap.DoubleFree] * 2
    assert [f"free({v:#x})" in str(u.object) for u, v in zip(hooked, vs, strict=True)] == [
        True,
        True,
    ]
    heap.check()
    assert live_objects(heap) == 0


def test_numpy_tracemalloc_domain_still_sees_arrays(heap):
    domain = np.lib.tracemalloc_domain
    tracemalloc.start()
    try:
        with goheap.numpy_allocator(heap):
            a = np.empty(12345)
        snap = tracemalloc.take_snapshot().filter_traces([tracemalloc.DomainFilter(True, domain)])
        assert 12345 * 8 in [t.size for t in snap.traces]
        assert on_heap(heap, a)
        del a
        snap = tracemalloc.take_snapshot().filter_traces([tracemalloc.DomainFilter(True, domain)])
        assert 12345 * 8 not in [t.size for t in snap.traces]
    finally:
        tracemalloc.stop()


def test_numpy_traced_heap_leaves_arrays_to_numpys_domain():
    tracemalloc.start()
    try:
        with goheap.Heap(arena_size=1 << 28, trace=True) as h:
            with goheap.numpy_allocator(h):
                a, b = np.empty(1000), np.empty(100000)
            snap = tracemalloc.take_snapshot()
            ours = snap.filter_traces([tracemalloc.DomainFilter(True, goheap.TRACEMALLOC_DOMAIN)])
            numpys = snap.filter_traces([tracemalloc.DomainFilter(True, np.lib.tracemalloc_domain)])
            assert not ours.traces, "traced once, by NumPy"
            assert {8000, 800000} <= {t.size for t in numpys.traces}
            assert on_heap(h, a) and on_heap(h, b)
    finally:
        tracemalloc.stop()


@pytest.mark.pagesize
def test_numpy_efence_heap_arrays_get_their_own_pages():
    with goheap.Heap(arena_size=1 << 30, efence=True) as h:
        with goheap.numpy_allocator(h):
            a = np.arange(100, dtype=np.int64)
            b = np.arange(3000, dtype=np.int64)
        assert on_heap(h, a) and on_heap(h, b)
        page = h.os_page_size
        assert a.ctypes.data // page != b.ctypes.data // page, "pages of their own"
        a.resize(5000, refcheck=False)  # efence objects always move
        assert on_heap(h, a) and (a[:100] == np.arange(100)).all()
        del a, b
        gc.collect()
        st = h.stats()
        assert st.heap_objects == 0 and st.efence_faulted > 0
        h.check()


@pytest.mark.pagesize
def test_numpy_efence_align_1_puts_the_byte_past_the_end_on_the_guard():
    # On an efence heap the handler asks for exactly what NumPy asked (no
    # 16-byte minimum): with align=1 an array ends where its guard page starts.
    def ends_at_guard(h: goheap.Heap, a, n: int) -> bool:  # type: ignore[no-untyped-def]
        base, size = h.lookup(a.ctypes.data)
        return (
            (base, size) == (a.ctypes.data, n)
            and perms_over(base, size) == {"rw-p"}
            and perms_over(base + size, 1) == {"---p"}
        )

    with goheap.Heap(arena_size=1 << 30, efence=True, align=1, guard="after") as h:
        with goheap.numpy_allocator(h):
            a = np.arange(13, dtype=np.uint8)
            b = np.zeros(5, dtype=np.uint8)
        assert ends_at_guard(h, a, 13) and ends_at_guard(h, b, 5) and not b.any()
        a.resize(29, refcheck=False)  # an unaligned efence object: Heap.realloc moves it
        assert ends_at_guard(h, a, 29) and (a[:13] == np.arange(13)).all()
        del a, b
        gc.collect()
        assert h.stats().heap_objects == 0
        h.check()


# ---- the handler struct itself, called as NumPy calls it --------------------------------


class Allocator(ctypes.Structure):
    _fields_ = [
        ("ctx", ctypes.c_void_p),
        ("malloc", ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)),
        (
            "calloc",
            ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t),
        ),
        (
            "realloc",
            ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t),
        ),
        ("free", ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)),
    ]


class Handler(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char * 127),
        ("version", ctypes.c_uint8),
        ("allocator", Allocator),
    ]


def handler_struct(h: goheap.Heap) -> Handler:
    with goheap.numpy_allocator(h):
        cap = goheap.numpy_handler._numpy().get_handler()
    get = ctypes.pythonapi.PyCapsule_GetPointer
    get.restype, get.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    return Handler.from_address(get(cap, b"mem_handler"))


def test_numpy_handler_struct_is_neps_layout(heap):
    hs = handler_struct(heap)
    assert ctypes.sizeof(Handler) == 128 + 5 * ctypes.sizeof(ctypes.c_void_p)
    assert hs.name == b"goheap" and hs.version == 1
    assert hs.allocator.ctx and all(
        ctypes.cast(getattr(hs.allocator, f), ctypes.c_void_p).value
        for f in ("malloc", "calloc", "realloc", "free")
    )
    with goheap.numpy_allocator(heap):
        assert goheap.numpy_handler._numpy().get_handler() is heap._numpy_handler, "cached"


def test_numpy_handler_functions_without_the_gil(heap):
    # ctypes' CFUNCTYPE calls release the GIL, as NumPy may: misses (a cold
    # heap, large objects) take it themselves.
    al = handler_struct(heap).allocator
    ctx = al.ctx
    al.free(ctx, None, 123)  # free(NULL): nothing, whatever size it says
    assert al.calloc(ctx, 1 << 62, 16) is None, "nelem * elsize overflows"
    ptrs = []
    for n in (0, 1, 24, 3000, 32 * 1024 + 1, 2 * MiB):
        p = al.malloc(ctx, n)
        assert p and p % 16 == 0 and heap.lookup(p)[0] == p, n
        ctypes.memset(p, 0x5A, max(n, 1))
        ptrs.append((p, n))
    for p, n in ptrs:
        q = al.realloc(ctx, p, 2 * n + 100)
        assert heap.lookup(q)[0] == q
        assert ctypes.string_at(q, max(n, 1)) == b"\x5a" * max(n, 1), n
        al.free(ctx, q, 7)  # a wrong size hint changes nothing
    z = al.calloc(ctx, 1000, 8)
    assert ctypes.string_at(z, 8000) == bytes(8000)
    r = al.realloc(ctx, None, 40)  # realloc(NULL) is malloc
    assert heap.lookup(r)[0] == r
    al.free(ctx, z, 0)
    al.free(ctx, r, 0)
    assert live_objects(heap) == 0
    heap.check()


# ---- lifetime: arrays outliving their block, their heap, the Heap object ---------------


CHILD_HELPERS = """
import gc, goheap, numpy as np
from osview import perms_over

def heap_ranges(h):
    return list(h._h.reservations) + list(h._h.spanalloc.chunks)

def mapped(ranges):
    return all("" not in perms_over(v, n) for v, n in ranges)

def unmapped(ranges):
    return all(perms_over(v, n) == {""} for v, n in ranges)
"""


def check_child(code: str) -> str:
    code = f"import sys; sys.path.insert(0, {HERE!r})\n{CHILD_HELPERS}" + textwrap.dedent(code)
    proc = run_child(code, timeout=120)
    assert not died_of_fault(proc), proc.stderr[-3000:]
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.pagesize
def test_numpy_arrays_outlive_close_and_unmap_with_the_last():
    out = check_child(
        """
        h = goheap.Heap(arena_size=1 << 28)
        ranges = heap_ranges(h)
        with goheap.numpy_allocator(h):
            small = np.arange(100.0)
            large = np.arange(300000.0)
        h.close()
        assert mapped(ranges)
        small += 1                      # still readable and writable
        assert small[99] == 100.0 and large[-1] == 299999.0
        try:                            # growing needs the heap: refused, nothing lost
            large.resize(400000, refcheck=False)
        except MemoryError:
            pass
        else:
            raise AssertionError("resize on a closed heap")
        assert large[-1] == 299999.0
        del small                       # frees through the handler: a closed heap, nothing to do
        gc.collect()
        assert mapped(ranges), "large still holds the arena"
        del large
        gc.collect()
        assert unmapped(ranges), "the last array is gone: nothing of the heap stays mapped"
        print("OK")
        """
    )
    assert out.strip() == "OK"


@pytest.mark.pagesize
def test_numpy_arrays_outlive_the_heap_object():
    out = check_child(
        """
        def make():
            h = goheap.Heap(arena_size=1 << 28)
            with goheap.numpy_allocator(h):
                a = np.full(50000, 7, dtype=np.int64)
            return a, heap_ranges(h)

        a, ranges = make()              # the Heap is garbage: __del__ closed it
        gc.collect()
        assert mapped(ranges) and (a == 7).all()
        b = a[::2]                      # a view keeps the owner, which keeps the arena
        del a
        gc.collect()
        assert mapped(ranges) and (b == 7).all()
        del b
        gc.collect()
        assert unmapped(ranges)
        print("OK")
        """
    )
    assert out.strip() == "OK"


def test_numpy_close_with_no_array_left_unmaps_at_once():
    # The cached capsule holds the arena owner; close() drops it, so a heap
    # whose arrays are all gone unmaps at close, as any heap does.
    out = check_child(
        """
        h = goheap.Heap(arena_size=1 << 28)
        ranges = heap_ranges(h)
        with goheap.numpy_allocator(h):
            a = np.ones(1000)
        del a
        h.close()
        assert unmapped(ranges)
        print("OK")
        """
    )
    assert out.strip() == "OK"


def test_numpy_allocator_without_numpy_says_so():
    out = check_child(
        """
        import sys
        sys.modules["numpy"] = None      # import numpy now raises ImportError
        import goheap
        h = goheap.Heap(arena_size=1 << 28)
        try:
            goheap.numpy_allocator(h)
        except ImportError as e:
            print(type(e).__name__, e.name, "|", e)
        h.close()
        """
    )
    assert out.startswith("ImportError numpy |")
    assert "needs NumPy (>= 1.22)" in out
