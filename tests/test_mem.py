"""The OS layer on real memory: every primitive proven by what the kernel did."""

from __future__ import annotations

import errno
import sys

import pytest
from osview import died_of_fault, is_mapped, perms_over, real_accounting, resident, run_child

from goheap import _native, mem
from goheap.errors import OutOfMemory

MiB = 1 << 20
GiB = 1 << 30
REAL_PAGE = _native.os_page_size()
# One write per 4 KiB faults in every page on any kernel, including a
# simulated big-page one whose real pages are smaller than it says.
TOUCH = 4096
PAGE_SIZES = sorted({REAL_PAGE, 16384, 65536} - {p for p in (16384, 65536) if p < REAL_PAGE})

pytestmark = pytest.mark.pagesize


@pytest.fixture(params=PAGE_SIZES, ids=lambda p: f"os{p // 1024}k")
def m(request):
    return mem.SysMemory(page_size=request.param)


@real_accounting
def test_mem_reserve_is_prot_none_and_costs_no_rss(m):
    v = m.sys_reserve(0, 4 * GiB)
    try:
        assert v % m.page_size == 0
        assert perms_over(v, 4 * GiB) == {"---p"}
        assert resident(v, 4 * GiB) == 0
        assert m.stats == dict.fromkeys(mem.SYS_STATS, 0)
    finally:
        m.sys_free(v, 4 * GiB, None)


def test_mem_map_gives_zeroed_writable_memory(m):
    v = m.sys_reserve(0, 64 * MiB)
    try:
        n = 4 * m.page_size
        m.sys_map(v + m.page_size, n, "heap_sys")
        assert perms_over(v + m.page_size, n) == {"rw-p"}
        assert perms_over(v, m.page_size) == {"---p"}
        buf = _native.view(v + m.page_size, n)
        assert buf.tobytes() == bytes(n)
        buf[:] = b"\xab" * n
        assert _native.view(v + m.page_size, n).tobytes() == b"\xab" * n
        assert m.stats["heap_sys"] == n
    finally:
        m.sys_free(v, 64 * MiB, None)


@pytest.mark.skipif(sys.platform != "linux", reason="MADV_FREE_REUSABLE footprint is soft on macOS")
def test_mem_unused_drops_rss_and_reads_zero(m):
    n = 64 * MiB
    v = m.sys_alloc(n, "heap_sys")
    try:
        buf = _native.view(v, n)
        assert resident(v, n) == 0
        for off in range(0, n, TOUCH):
            buf[off] = 0x5A
        assert resident(v, n) == n
        m.sys_unused(v, n)
        assert resident(v, n) == 0
        assert buf[0] == 0 and buf[n - 1] == 0 and buf.tobytes().count(0) == n
        m.sys_used(v, n)
        buf[0] = 1
        assert buf[0] == 1
    finally:
        m.sys_free(v, n, "heap_sys")
    assert m.stats["heap_sys"] == 0


@pytest.mark.parametrize("touch", ["read", "write"])
def test_mem_fault_kills_a_toucher_with_sigsegv(touch, m):
    code = f"""
        from goheap import mem, _native
        m = mem.SysMemory(page_size={m.page_size})
        n = 4 * m.page_size
        v = m.sys_alloc(n, None)
        _native.view(v, n)[:] = b"x" * n
        m.sys_fault(v + m.page_size, m.page_size)
        # neighbours still work
        _native.view(v, m.page_size)[0] = 1
        _native.view(v + 2 * m.page_size, m.page_size)[0] = 1
        print("alive", flush=True)
        b = _native.view(v + m.page_size, m.page_size)
        if "{touch}" == "read":
            print(b[m.page_size - 1])
        else:
            b[0] = 7
        print("survived", flush=True)
    """
    proc = run_child(code)
    assert "alive" in proc.stdout
    assert "survived" not in proc.stdout
    assert died_of_fault(proc), (proc.returncode, proc.stderr)


def test_mem_fault_keeps_address_space_and_drops_pages(m):
    n = 16 * MiB
    v = m.sys_alloc(n, None)
    try:
        buf = _native.view(v, n)
        for off in range(0, n, TOUCH):
            buf[off] = 1
        assert resident(v, n) == n  # precondition: the pages are resident
        m.sys_fault(v, n)
        assert perms_over(v, n) == {"---p"}
        assert resident(v, n) == 0
    finally:
        m.sys_free(v, n, None)


def test_mem_free_removes_the_mapping(m):
    v = m.sys_alloc(8 * m.page_size, "other_sys")
    assert is_mapped(v, 8 * m.page_size)
    m.sys_free(v, 8 * m.page_size, "other_sys")
    assert perms_over(v, 8 * m.page_size) == {""}
    assert m.stats["other_sys"] == 0


def test_mem_impossible_alloc_is_memoryerror_and_process_goes_on(m):
    with pytest.raises(MemoryError) as e:
        m.sys_alloc(1 << 50, "heap_sys")  # 1 PiB
    assert isinstance(e.value, OutOfMemory)
    assert "sys_alloc" in str(e.value) and "0x4000000000000" in str(e.value)
    assert "errno 12" in str(e.value)
    assert m.stats["heap_sys"] == 0
    v = m.sys_alloc(m.page_size, None)
    m.sys_free(v, m.page_size, None)


@real_accounting
def test_mem_rlimit_as_gives_memoryerror_in_a_child():
    proc = run_child(
        """
        import resource, psutil
        from goheap import mem
        m = mem.SysMemory()
        vms = psutil.Process().memory_info().vms
        resource.setrlimit(resource.RLIMIT_AS, (vms + (64 << 20), vms + (64 << 20)))
        for call in (lambda: m.sys_reserve(0, 1 << 30), lambda: m.sys_alloc(256 << 20, None)):
            try:
                call()
            except MemoryError as e:
                print("MemoryError:", e)
            else:
                raise SystemExit("no MemoryError")
        v = m.sys_alloc(1 << 20, None)  # small requests still work
        m.sys_free(v, 1 << 20, None)
        print("ok")
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("MemoryError:") == 2 and "ok" in proc.stdout


@pytest.mark.parametrize("bad", ["zero", "short", "misaligned_v", "misaligned_n"])
@pytest.mark.parametrize("prim", ["map", "unused", "used", "fault", "free"])
def test_mem_refuses_partial_pages_before_any_syscall(m, prim, bad):
    ps = m.page_size
    v = m.sys_reserve(0, 16 * ps)
    try:
        m.sys_map(v, 8 * ps, None)
        before = perms_over(v, 16 * ps)
        args = {
            "zero": (v, 0),
            "short": (v, ps // 2),
            "misaligned_v": (v + ps // 2, ps),
            "misaligned_n": (v, ps + ps // 2),
        }[bad]
        call = getattr(m, f"sys_{prim}")
        extra = (None,) if prim in ("map", "free") else ()
        with pytest.raises(ValueError, match="rejected"):
            call(*args, *extra)
        assert perms_over(v, 16 * ps) == before
        assert is_mapped(v, 16 * ps)
    finally:
        m.sys_free(v, 16 * ps, None)


def test_mem_reserve_and_alloc_refuse_bad_lengths(m):
    for n in (0, m.page_size // 2, m.page_size + m.page_size // 2):
        with pytest.raises(ValueError):
            m.sys_reserve(0, n)
        with pytest.raises(ValueError):
            m.sys_alloc(n, None)


def test_mem_exact_reserve_lands_exactly_or_not_at_all(m):
    n = 8 * m.page_size
    v = m.sys_reserve(0, 4 * n)
    try:
        m.sys_free(v + 2 * n, 2 * n, None)  # a hole at the top
        w = m.sys_reserve(v + 2 * n, n, exact=True)
        assert w == v + 2 * n
        with pytest.raises(FileExistsError):
            m.sys_reserve(v, n, exact=True)  # occupied by our first reservation
        assert perms_over(v + 3 * n, n) == {""}
    finally:
        m.sys_free(v, 3 * n, None)


def test_mem_simulated_pages_align_every_address():
    for ps in (16384, 65536):
        if ps < REAL_PAGE:
            continue
        m = mem.SysMemory(page_size=ps)
        vs = [m.sys_reserve(0, ps) for _ in range(8)] + [m.sys_alloc(ps, None) for _ in range(8)]
        assert all(v % ps == 0 for v in vs)
        for v in vs:
            m.sys_free(v, ps, None)


def test_mem_page_size_must_be_a_multiple_of_the_real_one():
    with pytest.raises(ValueError):
        mem.SysMemory(page_size=REAL_PAGE * 3)
    if REAL_PAGE > 4096:
        with pytest.raises(ValueError):
            mem.SysMemory(page_size=4096)


def test_mem_inject_nth_fails_before_the_syscall(m):
    v = m.sys_reserve(0, 16 * m.page_size)
    m.inject("map", nth=2)
    m.sys_map(v, m.page_size, "heap_sys")
    with pytest.raises(OutOfMemory, match="injected"):
        m.sys_map(v + m.page_size, m.page_size, "heap_sys")
    assert perms_over(v + m.page_size, m.page_size) == {"---p"}
    assert m.stats["heap_sys"] == m.page_size
    m.sys_map(v + m.page_size, m.page_size, "heap_sys")  # third call: injection is spent
    assert m.injected_failures() == 0 or m.calls["map"] == 3
    m.sys_free(v, 16 * m.page_size, None)


def test_mem_inject_probability_is_seeded_and_can_raise_oserror(m):
    def run():
        mm = mem.SysMemory(page_size=m.page_size)
        mm.inject("alloc", probability=0.5, seed=7, err=errno.EACCES)
        out = []
        for _ in range(40):
            try:
                v = mm.sys_alloc(mm.page_size, None)
            except OSError as e:
                assert e.errno == errno.EACCES
                out.append(0)
            else:
                mm.sys_free(v, mm.page_size, None)
                out.append(1)
        return out

    a, b = run(), run()
    assert a == b and 0 < sum(a) < 40


def test_native_hot_calls_keep_the_gil():
    # build_ffi.py redefines cffi's GIL-release macros; this guards that trick.
    assert _native.gil_held_in_call()
