"""Blocks: the buffer protocol on real goheap memory, NumPy, and lifetimes (block.py)."""

from __future__ import annotations

import gc
import subprocess
import sys
import warnings

import pytest

import goheap
from goheap import block as block_mod

np = pytest.importorskip("numpy")


@pytest.fixture
def heap():
    with goheap.Heap(arena_size=1 << 30) as h:
        yield h
        h.check()


def test_block_buffer_is_the_object_zero_copy(heap):
    b = heap.alloc(100)
    assert b.size == len(b) == 100 and heap.usable_size(b.addr) == 112
    m = memoryview(b)
    assert m.nbytes == 100 and not m.readonly
    assert (m.format, m.itemsize, m.ndim, m.shape) == ("B", 1, 1, (100,))
    m[:5] = b"hello"  # through the exported buffer ...
    assert heap.view(b.addr, 5).tobytes() == b"hello"  # ... into the heap object itself
    assert bytes(b)[:6] == b"hello\0" and b[1] == ord("e") and b[0:3] == b"hel"
    b[95:] = b"world"
    assert bytes(heap.view(b.addr))[95:100] == b"world"
    del m


def test_block_numpy_frombuffer_round_trip(heap):
    b = heap.alloc(8 * 16)
    a = np.frombuffer(b, dtype=np.float64)
    a[:] = np.arange(16)
    assert a.ctypes.data == b.addr  # zero-copy: the array's data is the goheap object
    raw = heap.view(b.addr).tobytes()[: 8 * 16]
    assert np.array_equal(np.frombuffer(raw, dtype=np.float64), np.arange(16))


def test_block_ndarray_lives_on_the_heap_and_keeps_the_object_alive(heap):
    before = heap.stats()
    a = heap.ndarray((3, 4), np.int32)
    assert a.shape == (3, 4) and a.dtype == np.int32 and not a.any()
    a[...] = np.arange(12).reshape(3, 4)
    base, size = heap.lookup(a.ctypes.data)
    assert base == a.ctypes.data and size >= 48
    row = a[1]  # a view: keeps the object alive after `a` is gone
    del a
    gc.collect()
    assert heap.stats().heap_objects == before.heap_objects + 1
    assert list(row) == [4, 5, 6, 7]
    del row
    gc.collect()
    after = heap.stats()
    assert after.heap_objects == before.heap_objects and after.frees == before.frees + 1


def test_block_ndarray_zero_size_and_bad_shape(heap):
    assert heap.ndarray(0).size == 0
    with pytest.raises(ValueError):
        heap.ndarray((2, -1))


def test_block_gc_frees_exactly_once(heap):
    frees = heap.stats().frees
    b = heap.alloc(5000)
    addr = b.addr
    del b
    gc.collect()
    assert heap.stats().frees == frees + 1
    assert heap.lookup(addr) is None
    gc.collect()
    assert heap.stats().frees == frees + 1


def test_block_explicit_free_then_gc_never_double_frees(heap):
    frees = heap.stats().frees
    b = heap.alloc(64)
    b.free()
    b.free()  # repeatable, like file.close()
    assert b.freed
    del b
    gc.collect()
    assert heap.stats().frees == frees + 1


def test_block_context_manager_frees_at_exit(heap):
    frees = heap.stats().frees
    with heap.alloc(200_000) as b:  # a large object
        b[0] = 7
        addr = b.addr
    assert b.freed and heap.lookup(addr) is None
    assert heap.stats().frees == frees + 1


@pytest.mark.parametrize("op", ["bytes", "index", "slice", "assign", "len", "view", "addr", "with"])
def test_block_freed_raises_before_touching_memory(heap, op):
    b = heap.alloc(32)
    b.free()
    ops = {
        "bytes": lambda: bytes(b),
        "index": lambda: b[0],
        "slice": lambda: b[0:4],
        "assign": lambda: b.__setitem__(0, 1),
        "len": lambda: len(b),
        "view": lambda: b.view,
        "addr": lambda: b.addr,
        "with": lambda: b.__enter__(),
    }
    with pytest.raises(ValueError, match=r"freed goheap\.Block"):
        ops[op]()


def test_block_after_heap_close_stays_usable_and_free_says_closed(heap):
    h = goheap.Heap(arena_size=1 << 28)
    b = h.alloc(16)
    b[0:5] = b"hello"
    h.close()
    assert bytes(b)[:5] == b"hello"  # still mapped: the Block holds the arena owner
    b[5] = 33
    with pytest.raises(goheap.HeapClosed):
        b.free()
    with pytest.raises(ValueError, match=r"freed goheap\.Block"):
        bytes(b)  # free() counted: the object is gone for the Block too
    del b
    gc.collect()


def test_block_finalizer_after_close_is_quiet(heap, capsys):
    h = goheap.Heap(arena_size=1 << 28)
    b = h.alloc(16)
    h.close()
    del b
    gc.collect()
    assert "Exception ignored" not in capsys.readouterr().err


def test_block_free_under_a_live_export_raises_buffererror(heap):
    b = heap.alloc(48)
    m = memoryview(b)
    with pytest.raises(BufferError, match="1 exported"):
        b.free()
    assert not b.freed and heap.lookup(b.addr) is not None
    a = np.frombuffer(b, dtype=np.uint8)  # NumPy holds an export too
    m.release()
    with pytest.raises(BufferError, match="1 exported"):
        b.free()
    del a
    b.free()
    assert b.freed and heap.lookup(b._addr) is None


@pytest.mark.parametrize(
    "op", ["memoryview", "bytes", "frombuffer", "index", "slice", "assign", "view", "len"]
)
def test_block_every_access_after_free_raises_valueerror(heap, op):
    b = heap.alloc(64)
    b.free()
    ops = {
        "memoryview": lambda: memoryview(b),
        "bytes": lambda: bytes(b),
        "frombuffer": lambda: np.frombuffer(b, dtype=np.uint8),
        "index": lambda: b[0],
        "slice": lambda: b[2:9],
        "assign": lambda: b.__setitem__(slice(0, 2), b"xy"),
        "view": lambda: b.view,
        "len": lambda: len(b),
    }
    with pytest.raises(ValueError, match=r"freed goheap\.Block"):
        ops[op]()


def test_block_identity_equality_hash_and_repr(heap):
    b, c = heap.alloc(8), heap.alloc(8)
    assert b == b and b != c and hash(b) == hash(b) and len({b, c}) == 2
    assert repr(b) == f"<goheap.Block 8 bytes at {b.addr:#x}>"
    b.free()
    assert repr(b) == "<goheap.Block 8 bytes freed>"


@pytest.mark.parametrize("how", ["pickle", "copy", "deepcopy"])
def test_block_cannot_be_copied_or_pickled(heap, how):
    import copy
    import pickle

    b = heap.alloc(8)
    do = {"pickle": pickle.dumps, "copy": copy.copy, "deepcopy": copy.deepcopy}[how]
    with pytest.raises(TypeError, match=r"goheap\.Block.*free twice"):
        do(b)


@pytest.mark.parametrize("make", ["block", "base", "exporter"])
def test_block_types_cannot_be_instantiated_from_python(heap, make):
    exporter = memoryview(heap.view(heap.malloc(8))).obj
    cls = {"block": goheap.Block, "base": block_mod.BlockBase, "exporter": type(exporter)}[make]
    with pytest.raises(TypeError):
        cls()
    with pytest.raises(TypeError):
        cls.__new__(cls)


def test_block_ndarray_without_numpy_says_so(tmp_path):
    # A child where `import numpy` fails: the message must name the fix.
    code = (
        "import sys; sys.modules['numpy'] = None\n"
        "import goheap\n"
        "h = goheap.Heap(arena_size=1 << 28)\n"
        "try:\n    h.ndarray(4)\nexcept ImportError as e:\n    print('IMPORTERROR', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "IMPORTERROR" in out.stdout and "pip install numpy" in out.stdout


# ---- Heap.ndarray as np.empty takes it, and Arrow (issue 16) -----------------------------


@pytest.mark.parametrize(
    "shape,want",
    [
        (4, (4,)),
        (np.int64(4), (4,)),
        (np.uint8(3), (3,)),
        ((2, 3), (2, 3)),
        ((np.int32(2), 3), (2, 3)),
        ([2, np.int64(3), 4], (2, 3, 4)),
        ((), ()),
        (np.array([2, 5]), (2, 5)),
    ],
)
def test_block_ndarray_takes_the_shapes_np_empty_takes(heap, shape, want):
    a = heap.ndarray(shape, np.int16)
    assert a.shape == want == np.empty(shape, np.int16).shape and not a.any()
    if a.size:
        assert heap.lookup(a.ctypes.data)[0] == a.ctypes.data


@pytest.mark.parametrize("shape,exc", [((2, -1), ValueError), (2.0, TypeError),
                                       ((2, "3"), TypeError), (None, TypeError)])  # fmt: skip
def test_block_ndarray_refuses_what_np_empty_refuses(heap, shape, exc):
    before = heap.stats()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            np.empty(shape)
    except exc:
        pass
    else:  # NumPy < 2.3 took None for () with a DeprecationWarning
        pytest.skip(f"NumPy {np.__version__} accepts shape {shape!r}")
    with pytest.raises(exc):
        heap.ndarray(shape)
    assert heap.stats().mallocs == before.mallocs


def test_block_ndarray_order_and_zero(heap):
    f = heap.ndarray((3, 4), np.float32, order="F")
    assert f.flags.f_contiguous and not f.flags.c_contiguous and f.strides == (4, 12)
    assert heap.lookup(f.ctypes.data)[0] == f.ctypes.data
    with pytest.raises(ValueError, match="order"):
        heap.ndarray(3, order="K")
    b = heap.alloc(4096)
    b[:] = b"\xff" * 4096
    addr = b.addr
    b.free()
    dirty = heap.ndarray(512, np.uint64, zero=False)  # the same class: the object just freed
    assert dirty.ctypes.data == addr and dirty[1:].any()  # np.empty: not cleared
    clean = heap.ndarray(512, np.uint64)
    assert not clean.any()


def test_block_arrow_py_buffer_is_zero_copy(heap):
    pa = pytest.importorskip("pyarrow")
    b = heap.alloc(256, align=64)  # Arrow's preferred buffer alignment
    buf = pa.py_buffer(b)
    assert buf.address == b.addr and buf.size == 256 and buf.address % 64 == 0
    b[0:5] = b"arrow"
    assert buf.to_pybytes()[:5] == b"arrow"  # the same memory, seen through Arrow
    with pytest.raises(BufferError):
        b.free()  # Arrow holds an export
    del buf
    b.free()


def test_block_arrow_array_of_a_heap_ndarray_is_zero_copy(heap):
    pa = pytest.importorskip("pyarrow")
    a = heap.ndarray(1000, np.int64)
    a[:] = np.arange(1000)
    arr = pa.array(a)
    assert arr.buffers()[1].address == a.ctypes.data  # Arrow's values buffer is goheap's object
    a[7] = -1
    assert arr[7].as_py() == -1
    before = heap.stats().frees
    del a
    gc.collect()
    assert heap.stats().frees == before  # Arrow keeps the object alive
    assert arr.sum().as_py() == sum(range(1000)) - 8
    del arr
    gc.collect()
    assert heap.stats().frees == before + 1
