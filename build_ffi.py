"""Build goheap's C core as the cffi extension ``goheap._ffi`` (out-of-line API mode).

The module is deliberately not called ``goheap._sys``: cffi writes its generated
source to ``<module path>.c`` and would overwrite the hand-written goheap/_sys.c.

GIL policy.  cffi wraps every call in Py_BEGIN/END_ALLOW_THREADS.  Dropping and
retaking the GIL costs about a third of a small malloc+free round trip
(shared/reference/peers.md), so the preamble redefines those macros to keep the
GIL for every call; the OS primitives, which may block in the kernel (madvise of
a large range, page faults under mmap), are reached through ghpy_sys_* wrappers
that release it explicitly.  The C core takes its own per-heap lock, so it stays
correct on a free-threaded CPython where there is no GIL to keep.  The trick
relies on the preamble being emitted before cffi's wrappers; tests/test_native.py
guards it (ghpy_gil_held).
"""

from __future__ import annotations

import os
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
PKG = HERE / "goheap"

PREAMBLE = r"""
#include "_sys.h"

/* Keep the GIL around cffi calls (see build_ffi.py). */
#undef Py_BEGIN_ALLOW_THREADS
#undef Py_END_ALLOW_THREADS
#define Py_BEGIN_ALLOW_THREADS {
#define Py_END_ALLOW_THREADS }

/* The OS primitives release the GIL: they may block in the kernel. */
#define GHPY_NOGIL(call) do { PyThreadState *ts_ = PyEval_SaveThread(); r = (call); \
                              PyEval_RestoreThread(ts_); } while (0)
static int ghpy_sys_pagesize(size_t *out) { return gh_sys_pagesize(out); }
static int ghpy_sys_alloc(size_t n, size_t pg, uintptr_t *out)
{ int r; GHPY_NOGIL(gh_sys_alloc(n, pg, out)); return r; }
static int ghpy_sys_reserve(uintptr_t hint, size_t n, size_t pg, int exact, uintptr_t *out)
{ int r; GHPY_NOGIL(gh_sys_reserve(hint, n, pg, exact, out)); return r; }
static int ghpy_sys_map(uintptr_t v, size_t n, size_t pg)
{ int r; GHPY_NOGIL(gh_sys_map(v, n, pg)); return r; }
static int ghpy_sys_unused(uintptr_t v, size_t n, size_t pg)
{ int r; GHPY_NOGIL(gh_sys_unused(v, n, pg)); return r; }
static int ghpy_sys_used(uintptr_t v, size_t n, size_t pg)
{ int r; GHPY_NOGIL(gh_sys_used(v, n, pg)); return r; }
static int ghpy_sys_fault(uintptr_t v, size_t n, size_t pg)
{ int r; GHPY_NOGIL(gh_sys_fault(v, n, pg)); return r; }
static int ghpy_sys_free(uintptr_t v, size_t n, size_t pg)
{ int r; GHPY_NOGIL(gh_sys_free(v, n, pg)); return r; }

static int ghpy_gil_held(void) { return PyGILState_Check(); }
static uintptr_t ghpy_fastpath_alloc_fn(void) { return (uintptr_t)&gh_mcache_alloc; }
static uintptr_t ghpy_fastpath_free_fn(void) { return (uintptr_t)&gh_mcache_free; }
"""

# Strict by default; GOHEAP_CFLAGS adds to it (make sanitize passes the
# sanitizer flags this way).
# -fvisibility=hidden: only the module's init function is exported (Python
# marks it so), so the handler's and Python glue's calls into the fast path
# are direct calls, not trips through the PLT.
CFLAGS = [
    "-std=c11",
    "-O2",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-fno-strict-aliasing",
    "-fvisibility=hidden",
]
CFLAGS += os.environ.get("GOHEAP_CFLAGS", "").split()
LDFLAGS = os.environ.get("GOHEAP_LDFLAGS", "").split()

ffibuilder = FFI()
ffibuilder.cdef((PKG / "_sys.cdef").read_text())
ffibuilder.set_source(
    "goheap._ffi",
    PREAMBLE,
    sources=["goheap/_sys.c", "goheap/_pyfast.c", "goheap/_nphandler.c"],
    include_dirs=["goheap"],
    extra_compile_args=CFLAGS,
    extra_link_args=LDFLAGS,
    # PyGILState_Check (the GIL test) and PyTraceMalloc_Track are outside the
    # limited API; goheap ships one wheel per CPython version anyway.
    py_limited_api=False,
    # cffi >= 2.0 derives this from py_limited_api=False; older cffi (Debian
    # bookworm's 1.15, trixie's 1.17) needs it spelled out.
    define_macros=[("_CFFI_NO_LIMITED_API", None)],
)

if __name__ == "__main__":
    # Never compile into the source tree (see the module docstring).
    ffibuilder.compile(tmpdir=str(HERE / "build" / "cffi"), verbose=True)
