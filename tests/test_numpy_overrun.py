"""C code overrunning and using after free a NumPy buffer: silent on NumPy's own
allocator, a named fault on a goheap efence heap.

Each case runs in a child process (it may die): the child puts NumPy's array
data on a heap (``goheap.numpy_allocator``), then a cffi-compiled function
(tests/cext.py) writes one float64 past a 16-element array, or through a
pointer it kept after the array was freed.  Under ``Heap(efence=True)`` and
``Heap(efence_sample=1)`` the child dies of SIGSEGV at that write, and goheap's
fault reporter has named the address and the array; under NumPy's default
allocator the same write lands in malloc's padding or freed memory and nobody
notices.
"""

from __future__ import annotations

import re
import textwrap

import pytest
from osview import died_of_fault, run_child

np = pytest.importorskip("numpy")

import cext  # noqa: E402  (after the NumPy skip: it is needed only with NumPy)

pytestmark = pytest.mark.pagesize

# The plugin's efence heap (goheap/pytest_plugin.py): guard page after each
# object, right-aligned to 8 bytes, so the element past a float64 array is the
# first byte of the guard.
EFENCE = {"efence": True, "guard": "after", "align": 8}
SAMPLED = {"efence_sample": 1}  # every allocation sampled: always an efence object
HEAPS = {"efence": EFENCE, "sample1": SAMPLED}

# Each body makes a 16-element float64 array (128 bytes: a multiple of every
# alignment, so the byte after it is the guard's first) and prints its address.
OVERRUN = """
a = np.zeros(16)
print(f"array {a.ctypes.data:#x} {a.nbytes}", flush=True)
lib.fill_one_past(ffi.from_buffer("double[]", a), a.size)
"""
USE_AFTER_FREE = """
a = np.zeros(16)
print(f"array {a.ctypes.data:#x} {a.nbytes}", flush=True)
p = ffi.from_buffer("double[]", a)
lib.keep(p)
del p, a  # the array is freed: on efence its pages are faulted now
lib.write_kept()
"""
CLEAN = """
a = np.zeros(16)
print(f"array {a.ctypes.data:#x} {a.nbytes}", flush=True)
lib.fill(ffi.from_buffer("double[]", a), a.size)
assert a.sum() == 16
b = np.ones(1000) + a.sum()  # more arrays, freed and reused as usual
assert b.sum() == 17 * 1000
print("handler", goheap.numpy_handler.handler_name(a), flush=True)
"""


@pytest.fixture(scope="module")
def ext(tmp_path_factory):
    return cext.build(tmp_path_factory.mktemp("cext"))


def run_numpy_child(ext, heap, body):
    """Run ``body`` in a child, inside numpy_allocator(Heap(**heap)) (heap None:
    NumPy's own allocator); the child prints "survived" if it lives on."""
    code = f"""
import contextlib, sys
sys.path.insert(0, {str(ext)!r})
import numpy as np
import goheap
import goheap.numpy_handler
from _gh_cext import ffi, lib
opts = {heap!r}
ctx = contextlib.nullcontext() if opts is None else goheap.numpy_allocator(goheap.Heap(**opts))
with ctx:
{textwrap.indent(body.strip(), "    ")}
print("survived", flush=True)
"""
    return run_child(code)


def array_of(out):
    m = re.search(r"array (0x[0-9a-f]+) (\d+)", out)
    assert m, out
    return int(m.group(1), 16), int(m.group(2))


def report_line(err, kind):
    """goheap's fault report: the one line starting ``goheap: <kind>``."""
    lines = [ln for ln in err.splitlines() if ln.startswith(f"goheap: {kind}")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("heap", HEAPS)
def test_overrun_faults_at_the_write_and_names_the_array(ext, heap):
    r = run_numpy_child(ext, HEAPS[heap], OVERRUN)
    assert died_of_fault(r), (r.returncode, r.stdout, r.stderr)
    assert "survived" not in r.stdout
    base, size = array_of(r.stdout)
    line = report_line(r.stderr, "overrun")
    # The faulting address is the element past the end; the object is the array.
    assert f" at {base + size:#x}: " in line, line
    assert f"past object {base:#x} ({size} bytes)" in line, line


@pytest.mark.parametrize("heap", HEAPS)
def test_use_after_free_faults_and_names_the_array(ext, heap):
    r = run_numpy_child(ext, HEAPS[heap], USE_AFTER_FREE)
    assert died_of_fault(r), (r.returncode, r.stdout, r.stderr)
    base, size = array_of(r.stdout)
    line = report_line(r.stderr, "use-after-free")
    assert f" at {base + 8:#x}: 8 bytes into object {base:#x} ({size} bytes)" in line, line


@pytest.mark.parametrize("body", [OVERRUN, USE_AFTER_FREE], ids=["overrun", "use-after-free"])
def test_numpys_own_allocator_does_not_notice(ext, body):
    r = run_numpy_child(ext, None, body)
    assert r.returncode == 0, r.stderr
    assert "survived" in r.stdout
    assert "goheap:" not in r.stderr


@pytest.mark.parametrize("heap", HEAPS)
def test_clean_code_passes_on_efence(ext, heap):
    r = run_numpy_child(ext, HEAPS[heap], CLEAN)
    assert r.returncode == 0, r.stderr
    assert "handler goheap" in r.stdout  # the array was on the efence heap
    assert "survived" in r.stdout
    assert "goheap:" not in r.stderr
