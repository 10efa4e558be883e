"""The one door to C: the only importer of the compiled module ``goheap._ffi``.

See goheap/malloc.py for the overview.

C reports, Python decides: C functions return a status and this module turns a
failure into a documented exception (``ensure``).  Addresses cross the boundary
as ints.  Two kinds of C object do leave this module, both as opaque handles
that only C functions (and MSpan's field accessors) look inside: the per-heap
``gh_mheap`` struct and ``gh_mspan`` structs.
"""

from __future__ import annotations

import ctypes
import errno
import os
from typing import Any

from goheap._ffi import ffi, lib
from goheap.errors import OutOfMemory

PAGE_SHIFT: int = lib.GH_PAGE_SHIFT
PAGE_SIZE: int = lib.GH_PAGE_SIZE
MAX_SMALL_SIZE: int = lib.GH_MAX_SMALL_SIZE
NUM_SIZE_CLASSES: int = lib.GH_NUM_SIZE_CLASSES
BIT_ALLOCATED: int = lib.GH_BIT_ALLOCATED
BIT_BOUNDARY: int = lib.GH_BIT_BOUNDARY

OK: int = lib.GH_OK
EARG: int = lib.GH_EARG
EEXIST: int = lib.GH_EEXIST
MISS: int = lib.GH_MISS
EINVALID: int = lib.GH_EINVALID
EDOUBLE: int = lib.GH_EDOUBLE
ECORRUPT: int = lib.GH_ECORRUPT
EBUSY: int = lib.GH_EBUSY
FREED_LARGE: int = lib.GH_FREED_LARGE
EFENCE_GUARD_NONE: int = lib.GH_EFENCE_GUARD_NONE
EFENCE_GUARD_AFTER: int = lib.GH_EFENCE_GUARD_AFTER
EFENCE_GUARD_BEFORE: int = lib.GH_EFENCE_GUARD_BEFORE
EFR_LISTS: int = lib.GH_EFR_LISTS
MSPAN_IN_USE: int = lib.GH_MSPAN_IN_USE
MSPAN_FREE: int = lib.GH_MSPAN_FREE
MSPAN_LIST_HEAD: int = lib.GH_MSPAN_LIST_HEAD
MSPAN_DEAD: int = lib.GH_MSPAN_DEAD
MSPAN_FAULTED: int = lib.GH_MSPAN_FAULTED
MSPAN_CACHED: int = lib.GH_MSPAN_CACHED
LCACHE_MIN_PAGES: int = lib.GH_LCACHE_MIN_PAGES
LCACHE_MAX_PAGES: int = lib.GH_LCACHE_MAX_PAGES

# Statuses come back from the alloc fast path as -status, below any address.
STATUS_LIMIT = 4096

SPAN_STRUCT_SIZE: int = ffi.sizeof("gh_mspan")

_out_addr = ffi.new("uintptr_t *")
_out_size = ffi.new("size_t *")


class ArgumentRejected(ValueError):
    """C refused an argument before any syscall (misaligned, zero length ...)."""


def ensure(status: int, call: str, n: int = 0, v: int = 0) -> None:
    """Raise the documented exception for a failed C call; return on success.

    GH_EARG -> ValueError (ArgumentRejected); ENOMEM -> OutOfMemory (a
    MemoryError); any other errno -> OSError.  Messages name the call, the size,
    the address and the errno."""
    if status == OK:
        return
    where = f"{call}(v={v:#x}, n={n:#x})"
    if status == EARG:
        raise ArgumentRejected(f"{where}: argument rejected (misaligned, zero or out of range)")
    if status == EEXIST:
        raise FileExistsError(errno.EEXIST, f"{where}: address range already in use")
    if status < 0:
        raise OSError(errno.EINVAL, f"{where}: goheap status {status}")
    if status == errno.ENOMEM:
        raise OutOfMemory(f"{where}: out of memory (errno {status}, {os.strerror(status)})")
    raise OSError(status, f"{where}: {os.strerror(status)} (errno {status})")


# ---- OS layer ---------------------------------------------------------------


def os_page_size() -> int:
    ensure(lib.ghpy_sys_pagesize(_out_size), "sys_pagesize")
    return int(_out_size[0])


def sys_alloc(n: int, pagesize: int) -> int:
    out = ffi.new("uintptr_t *")
    ensure(lib.ghpy_sys_alloc(n, pagesize, out), "sys_alloc", n)
    return int(out[0])


def sys_reserve(hint: int, n: int, pagesize: int, exact: bool) -> int:
    out = ffi.new("uintptr_t *")
    ensure(lib.ghpy_sys_reserve(hint, n, pagesize, int(exact), out), "sys_reserve", n, hint)
    return int(out[0])


def sys_map(v: int, n: int, pagesize: int) -> None:
    ensure(lib.ghpy_sys_map(v, n, pagesize), "sys_map", n, v)


def sys_unused(v: int, n: int, pagesize: int) -> None:
    ensure(lib.ghpy_sys_unused(v, n, pagesize), "sys_unused", n, v)


def sys_used(v: int, n: int, pagesize: int) -> None:
    ensure(lib.ghpy_sys_used(v, n, pagesize), "sys_used", n, v)


def sys_fault(v: int, n: int, pagesize: int) -> None:
    ensure(lib.ghpy_sys_fault(v, n, pagesize), "sys_fault", n, v)


def sys_free(v: int, n: int, pagesize: int) -> None:
    ensure(lib.ghpy_sys_free(v, n, pagesize), "sys_free", n, v)


def guard_regions(on: bool | None = None) -> tuple[bool, bool]:
    """Whether efence faults with guard markers (Linux 6.13+ MADV_GUARD_INSTALL)
    instead of mprotect, and whether this kernel has them: (in use, available).
    ``on`` sets it for the whole process (tests run both ways); asking for
    markers the kernel lacks is OSError(ENOTSUP)."""
    on_p = ffi.new("int *")
    kernel_p = ffi.new("int *")
    ensure(lib.gh_sys_guards(-1 if on is None else int(on), on_p, kernel_p), "sys_guards")
    return bool(on_p[0]), bool(kernel_p[0])


def install_fault_reporter() -> None:
    """The C SIGSEGV/SIGBUS reporter (efence diagnosis): one "goheap: <kind> at
    0x<address>: ..." line for a fault in a registered heap, then the handler
    it replaced runs (see _sys.c's "Fault reporter").  Idempotent."""
    ensure(lib.gh_fault_reporter_install(), "fault_reporter_install")


def fault_reporter_set_fd(fd: int) -> None:
    """Send the reporter's lines to descriptor fd (ValueError if it is not open)."""
    if lib.gh_fault_reporter_set_fd(fd) != OK:
        raise ValueError(f"fault reporter: {fd} is not an open file descriptor")


def fault_reporter_fd() -> int:
    return int(lib.gh_fault_reporter_fd())


def fault_reporter_installed() -> bool:
    """Whether the reporter is SIGSEGV's and SIGBUS's handler right now."""
    return bool(lib.gh_fault_reporter_installed())


def fault_register(h: Any) -> bool:
    """Put heap h in the reporter's registry; False if the registry is full
    (GH_FAULT_MAX_HEAPS live heaps): then its faults get no goheap line.
    gh_mheap_close takes it out."""
    st = int(lib.gh_fault_register(h))
    if st not in (OK, EBUSY):
        ensure(st, "fault_register")
    return st == OK


FAULT_MAX_HEAPS: int = lib.GH_FAULT_MAX_HEAPS


# ---- sampled efence -------------------------------------------------------------


def efence_sample_init(h: Any, rate: int, seed: int) -> None:
    """Start (rate N >= 1) or stop (0) h's sampling countdown (_sys.c)."""
    ensure(lib.gh_efence_sample_init(h, rate, seed & ((1 << 64) - 1)), "efence_sample_init", rate)


def efence_sample_take(h: Any, tick: bool) -> bool:
    """Whether the allocation at hand is sampled: one sample C drew is used
    up.  tick: count it first (it never reached the fast path).  False on a
    closed heap (the caller's path raises HeapClosed)."""
    out = ffi.new("int *")
    return lib.gh_efence_sample_take(h, int(tick), out) == OK and bool(out[0])


def gil_held_in_call() -> bool:
    """For testing: whether a hot C call still holds the GIL (build_ffi.py)."""
    return bool(lib.ghpy_gil_held())


# ---- memory access ------------------------------------------------------------


def view(v: int, n: int, owner: Any = None) -> memoryview:
    """A writable byte view of [v, v+n) (format "B") that keeps ``owner`` (the
    heap's arena owner, for Heap.view) alive as long as it or any view cut
    from it lives, so a view used after ``close()`` reads mapped memory.  The
    caller vouches for the range, and without an owner for its lifetime."""
    return memoryview(block_new(block_base(), None, owner, v, n))


def read_word(v: int) -> int:
    return int(ctypes.c_uint64.from_address(v).value)


def write_word(v: int, x: int) -> None:
    ctypes.c_uint64.from_address(v).value = x


def memmove(dst: int, src: int, n: int) -> None:
    """Copy n bytes from src to dst (realloc); the caller owns both ranges."""
    if n:
        ctypes.memmove(dst, src, n)


def memclr(v: int, n: int) -> None:
    ensure(lib.gh_memclr(v, n), "memclr", n, v)


# ---- heap struct, spans, bitmap -------------------------------------------------


def new_mheap() -> Any:
    """A zeroed gh_mheap (owned by the returned handle; freed with it)."""
    return ffi.new("gh_mheap *")


def mheap_addr(h: Any) -> int:
    return int(ffi.cast("uintptr_t", h))


def span_at(addr: int) -> Any:
    """The gh_mspan struct at addr, as a handle MSpan reads its fields from."""
    return ffi.cast("gh_mspan *", addr)


NULL_SPAN = ffi.NULL


def ffi_addr(ptr: Any) -> int:
    """The address a C pointer holds, as an int."""
    return int(ffi.cast("uintptr_t", ptr))


def spans_set(h: Any, v: int, npages: int, s: Any) -> None:
    ensure(lib.gh_spans_set(h, v, npages, s), "spans_set", npages, v)


def spans_get(h: Any, v: int) -> int:
    out = ffi.new("uintptr_t *")
    ensure(lib.gh_spans_get(h, v, out), "spans_get", 0, v)
    return int(out[0])


def spans_mismatch(h: Any, v: int, npages: int, s: Any) -> int:
    out = ffi.new("uintptr_t *")
    ensure(lib.gh_spans_mismatch(h, v, npages, s, out), "spans_mismatch", npages, v)
    return int(out[0])


def bitmap_get(h: Any, v: int) -> int:
    out = ffi.new("uint64_t *")
    ensure(lib.gh_bitmap_get(h, v, out), "bitmap_get", 0, v)
    return int(out[0])


def bitmap_count(h: Any, v: int, n: int) -> tuple[int, int]:
    """(allocated bits, boundary bits) over [v, v+n)."""
    a = ffi.new("uint64_t *")
    b = ffi.new("uint64_t *")
    ensure(lib.gh_bitmap_count(h, v, n, a, b), "bitmap_count", n, v)
    return int(a[0]), int(b[0])


def bitmap_set(h: Any, v: int, set_bits: int, clear_bits: int) -> None:
    ensure(lib.gh_bitmap_set(h, v, set_bits, clear_bits), "bitmap_set", 0, v)


def bitmap_unmarkspan(h: Any, v: int, n: int) -> None:
    ensure(lib.gh_bitmap_unmarkspan(h, v, n), "unmarkspan", n, v)


def mheap_lookup(h: Any, v: int) -> tuple[int, int] | None:
    base = ffi.new("uintptr_t *")
    size = ffi.new("uintptr_t *")
    st = lib.gh_mheap_lookup(h, v, base, size)
    if st == EINVALID:
        return None
    ensure(st, "lookup", 0, v)
    return int(base[0]), int(size[0])


def mspan_carve(h: Any, s: Any, size: int) -> None:
    ensure(lib.gh_mspan_carve(h, s, size), "mspan_carve", size, int(s.start))


def mspan_check(h: Any, s: Any) -> tuple[int, int, int]:
    """(status, free objects, which rule broke) for one small span."""
    nfree = ffi.new("uint32_t *")
    what = ffi.new("uint32_t *")
    st = lib.gh_mspan_check(h, s, nfree, what)
    return int(st), int(nfree[0]), int(what[0])


def mcache_swap(h: Any, cl: int, s: Any) -> int:
    """Install s as class cl's cached span; return the address of the old one (or 0)."""
    out = ffi.new("uintptr_t *")
    ensure(lib.gh_mcache_swap(h, cl, s, out), "mcache_swap", cl)
    return int(out[0])


def mcentral_take_empty(h: Any, cl: int, max_n: int = 256) -> list[int]:
    """Unlink up to max_n spans of class cl with no live object from the C
    nonempty list; their struct addresses."""
    out = ffi.new("uintptr_t[]", max_n)
    n = ffi.new("uintptr_t *")
    ensure(lib.gh_mcentral_take_empty(h, cl, out, max_n, n), "mcentral_take_empty", cl)
    return [int(out[i]) for i in range(n[0])]


def mcentral_list(h: Any, cl: int, max_n: int) -> list[int] | None:
    """The struct addresses on class cl's nonempty list, or None if it is
    longer than max_n (a cycle)."""
    out = ffi.new("uintptr_t[]", max(max_n, 1))
    n = ffi.new("uintptr_t *")
    st = lib.gh_mcentral_list(h, cl, out, max_n, n)
    if st == ECORRUPT:
        return None
    ensure(st, "mcentral_list", cl)
    return [int(out[i]) for i in range(n[0])]


def large_free(h: Any, v: int) -> int:
    """Mark live large/efence object v free; OK, EDOUBLE or EINVALID."""
    st = int(lib.gh_large_free(h, v))
    if st not in (OK, EDOUBLE, EINVALID):
        ensure(st, "large_free", 0, v)
    return st


def large_account(h: Any, nalloc: int, alloc_bytes: int, nfree: int, free_bytes: int) -> None:
    """Count large objects handed out or freed by Python's paths (gh_large_account)."""
    ensure(lib.gh_large_account(h, nalloc, alloc_bytes, nfree, free_bytes), "large_account")


def efence_q_push(h: Any, s: Any) -> None:
    ensure(lib.gh_efence_q_push(h, s), "efence_q_push")


def efence_q_oldest(h: Any, npages: int) -> int:
    """The struct address of the oldest quarantined span of npages pages (0:
    of any length), or 0."""
    out = ffi.new("uintptr_t *")
    ensure(lib.gh_efence_q_oldest(h, npages, out), "efence_q_oldest", npages)
    return int(out[0])


def efence_q_unlink(h: Any, s: Any) -> None:
    ensure(lib.gh_efence_q_unlink(h, s), "efence_q_unlink")


def efence_q_list(h: Any) -> list[int] | None:
    """The quarantined spans' struct addresses, oldest first, or None if the
    list breaks one of its invariants (checked in C memory)."""
    out = ffi.new("uintptr_t[]", max(int(h.efq_nspans), 1))
    n = ffi.new("uintptr_t *")
    st = lib.gh_efence_q_list(h, out, len(out), n)
    if st == ECORRUPT:
        return None
    ensure(st, "efence_q_list")
    return [int(out[i]) for i in range(n[0])]


def efence_ready_put(h: Any, s: Any) -> None:
    ensure(lib.gh_efence_ready_put(h, s), "efence_ready_put")


def efence_ready_take(h: Any, units: int) -> int:
    """A ready span of units data units (0: any), taken off its list, or 0."""
    out = ffi.new("uintptr_t *")
    ensure(lib.gh_efence_ready_take(h, units, out), "efence_ready_take", units)
    return int(out[0])


def efence_q_drop(h: Any) -> int:
    """Give back now the pages of the faulted spans C has not dropped yet
    (gh_efence_q_drop); how many spans."""
    n = ffi.new("uintptr_t *")
    ensure(lib.gh_efence_q_drop(h, n), "efence_q_drop")
    return int(n[0])


def efence_ready_carve(
    h: Any, s: Any, units: int, npieces: int, spares: list[int], guards_done: bool = False
) -> tuple[int, int]:
    """Cut npieces ready spans of units data units off the top of fresh span
    s (gh_efence_ready_carve): (pieces listed, status).  Status: OK, MISS
    (C may not make the calls now: nothing done) or the errno of a guard
    the OS refused (s is then the rest, uncarved, and the spares after
    those used are unused).  guards_done: the caller faulted the guards."""
    # One conversion in C for the whole list (a cast per struct cost more);
    # owner keeps the array alive across the call.
    owner = ffi.new("uintptr_t[]", spares) if spares else None
    arr = ffi.cast("gh_mspan **", owner) if owner is not None else ffi.NULL
    made = ffi.new("uintptr_t *")
    flags = lib.GH_CARVE_GUARDS_DONE if guards_done else 0
    st = lib.gh_efence_ready_carve(h, s, units, npieces, arr, len(spares), flags, made)
    if st == EARG:
        ensure(st, "efence_ready_carve", units, int(ffi.cast("uintptr_t", s)))
    return int(made[0]), st


def efence_ready_list(h: Any) -> list[int] | None:
    """Every ready efence span's struct address, or None if the lists break
    one of their invariants (checked in C memory)."""
    out = ffi.new("uintptr_t[]", max(int(h.efr_nspans), 1))
    n = ffi.new("uintptr_t *")
    st = lib.gh_efence_ready_list(h, out, len(out), n)
    if st == ECORRUPT:
        return None
    ensure(st, "efence_ready_list")
    return [int(out[i]) for i in range(n[0])]


def new_flag() -> Any:
    """An int32_t cell C reads (the OS layer's "calls are hooked" flag)."""
    return ffi.new("int32_t *")


def lcache_list(h: Any) -> list[int] | None:
    """The struct addresses of every span in the large cache, or None if the
    cache breaks one of its invariants (checked in C memory)."""
    out = ffi.new("uintptr_t[]", max(int(h.lcache_nspans), 1))
    n = ffi.new("uintptr_t *")
    st = lib.gh_lcache_list(h, out, len(out), n)
    if st == ECORRUPT:
        return None
    ensure(st, "lcache_list")
    return [int(out[i]) for i in range(n[0])]


def lcache_flush(h: Any, max_n: int = 1024) -> list[int]:
    """Take up to max_n spans out of the large cache (IN_USE, ref 0, no bits):
    their struct addresses, for Python to free into the page heap."""
    out = ffi.new("uintptr_t[]", max_n)
    n = ffi.new("uintptr_t *")
    ensure(lib.gh_lcache_flush(h, out, max_n, n), "lcache_flush")
    return [int(out[i]) for i in range(n[0])]


def lcache_spare_put(h: Any, s: Any) -> None:
    """Lend C the DEAD span struct s for cutting cached spans."""
    ensure(lib.gh_lcache_spare_put(h, s), "lcache_spare_put")


def lcache_spare_take(h: Any, max_n: int = 1024) -> list[int]:
    """Take up to max_n spare structs back from C (DEAD): their addresses."""
    out = ffi.new("uintptr_t[]", max_n)
    n = ffi.new("uintptr_t *")
    ensure(lib.gh_lcache_spare_take(h, out, max_n, n), "lcache_spare_take")
    return [int(out[i]) for i in range(n[0])]


def object_size(h: Any, v: int) -> tuple[int, int, int]:
    """(status, usable size, size class) of the object starting at v: OK for a
    live one, else what free(v) would say (EINVALID, EDOUBLE, ECORRUPT)."""
    size = ffi.new("uintptr_t *")
    cl = ffi.new("uint32_t *")
    st = int(lib.gh_object_size(h, v, size, cl))
    if st not in (OK, EINVALID, EDOUBLE, ECORRUPT):
        ensure(st, "object_size", 0, v)
    return st, int(size[0]), int(cl[0])


def mheap_peak(h: Any, reset: bool = False) -> tuple[int, int]:
    """(live bytes, their peak) as C counts them; reset: the peak restarts now
    (the peak returned is the one it replaced)."""
    live = ffi.new("uint64_t *")
    peak = ffi.new("uint64_t *")
    ensure(lib.gh_mheap_peak(h, int(reset), live, peak), "mheap_peak")
    return int(live[0]), int(peak[0])


def mheap_freeze(h: Any, frozen: bool) -> None:
    ensure(lib.gh_mheap_freeze(h, int(frozen)), "mheap_freeze")


def mheap_close(h: Any) -> None:
    """Every later C call on h sees a closed heap (gh_mheap_close)."""
    ensure(lib.gh_mheap_close(h), "mheap_close")


def mcache_counts(h: Any) -> tuple[list[int], list[int]]:
    nm = ffi.new("uint64_t[]", NUM_SIZE_CLASSES)
    nf = ffi.new("uint64_t[]", NUM_SIZE_CLASSES)
    ensure(lib.gh_mcache_counts(h, nm, nf), "mcache_counts")
    return list(nm), list(nf)


# The hot calls, bound once (a lookup on lib per call costs ~13 ns).
mcache_alloc = lib.gh_mcache_alloc
mcache_alloc_nozero = lib.gh_mcache_alloc_nozero
mcache_alloc_unsampled = lib.gh_mcache_alloc_unsampled  # (h, size, zero): the slow path's
mcache_free = lib.gh_mcache_free


_fast_new: Any = None


def fast_methods(
    h: Any, slow_malloc: Any, slow_free: Any, slow_realloc: Any
) -> tuple[Any, Any, Any]:
    """malloc, free and realloc for heap h as builtin methods (goheap/_pyfast.c).
    ``slow_malloc(size, zero, status[, align])``, ``slow_free(v, status)`` and
    ``slow_realloc(v, size)`` are weakref.WeakMethod objects: the methods never
    keep the Heap alive."""
    global _fast_new
    if _fast_new is None:
        import goheap._ffi as ffi_module

        fn = ctypes.PyDLL(ffi_module.__file__).ghpy_fast_new
        fn.restype = ctypes.py_object
        fn.argtypes = [ctypes.c_void_p] + [ctypes.py_object] * 4
        _fast_new = fn
    fast = _fast_new(mheap_addr(h), h, slow_malloc, slow_free, slow_realloc)
    return fast.malloc, fast.free, fast.realloc


def fastpath_pointers() -> tuple[int, int]:
    """For the C-loop benchmark: addresses of gh_mcache_alloc and gh_mcache_free
    (signatures ``uintptr_t (*)(gh_mheap *, uintptr_t)`` and
    ``int (*)(gh_mheap *, uintptr_t)``)."""
    return int(lib.ghpy_fastpath_alloc_fn()), int(lib.ghpy_fastpath_free_fn())


# ---- Block (goheap/_pyfast.c) -------------------------------------------------

_block_api: tuple[Any, Any] | None = None


def _load_block_api() -> tuple[Any, Any]:
    global _block_api
    if _block_api is None:
        import goheap._ffi as ffi_module

        fn = ctypes.PyDLL(ffi_module.__file__).ghpy_block_api
        fn.restype = ctypes.py_object
        fn.argtypes = []
        _block_api = fn()
    return _block_api


def block_base() -> Any:
    """The C type goheap.Block derives from (its buffer, export count and
    freed flag); it cannot be instantiated from Python."""
    return _load_block_api()[0]


def block_new(cls: Any, heap: Any, owner: Any, v: int, n: int) -> Any:
    """A live ``cls`` (block_base() or a subclass) exporting [v, v+n), holding
    ``heap`` and ``owner``.  The caller vouches for the range."""
    return _load_block_api()[1](cls, heap, owner, v, n)


# ---- NumPy's data-memory handler (goheap/_nphandler.c) --------------------------

_numpy_api: tuple[Any, Any, Any, Any] | None = None


def numpy_handler_api() -> tuple[Any, Any, Any, Any]:
    """(new_handler, load_api, set_handler, get_handler): the C half of
    goheap/numpy_handler.py, as builtins (see _nphandler.c for each)."""
    global _numpy_api
    if _numpy_api is None:
        import goheap._ffi as ffi_module

        fn = ctypes.PyDLL(ffi_module.__file__).ghnp_api
        fn.restype = ctypes.py_object
        fn.argtypes = []
        _numpy_api = fn()
    return _numpy_api
