"""The C fault reporter (issue 15 item 3), proven in child processes.

Every touch that faults runs in a fresh interpreter (``run_child``): the child
builds the heap, prints what the parent needs to know (addresses, spans) on
stdout, then commits the bug.  The parent checks how the child died (the
kernel's word: SIGSEGV or SIGBUS) and the reporter's one line on stderr,
field by field, against what the child printed -- nothing is typed in.

The efence cases run once per OS page size: the real one and simulated 16 KiB
and 64 KiB pages, where the span geometry (and so the line) changes.
"""

from __future__ import annotations

import re
import signal

import pytest
from osview import died_of_fault, run_child

from goheap import _native
from goheap.efence import fault_address, fault_kind

KiB = 1 << 10
REAL_PAGE = _native.os_page_size()
PAGE_SIZES = sorted(
    {REAL_PAGE, 16 * KiB, 64 * KiB} - {p for p in (16 * KiB, 64 * KiB) if p < REAL_PAGE}
)

LINE = re.compile(
    r"goheap: (?P<kind>[a-z -]+) at (?P<addr>0x[0-9a-f]+): (?P<n>\d+) bytes? "
    r"(?P<rel>past|before|into) object (?P<base>0x[0-9a-f]+) \((?P<size>\d+) bytes?\), "
    r"span (?P<start>0x[0-9a-f]+)\+(?P<npages>\d+) pages?$",
    re.M,
)

# The child's preamble: a heap on the page size asked for, and `show(p)`,
# which prints the object's base, size and span for the parent.
PRELUDE = """
import ctypes, faulthandler, os, signal, sys
import goheap
from goheap import mem

def heap(page, **kw):
    kw.setdefault("arena_size", 1 << 30)
    return goheap.Heap(sysmem=mem.SysMemory(page_size=page), **kw)

def show(h, p):
    s = h._h.lookup(p)
    print(p, h.usable_size(p) if h.lookup(p) else s.elemsize, s.start, s.npages, flush=True)
"""


@pytest.fixture(params=PAGE_SIZES, ids=lambda p: f"os{p // KiB}k")
def page(request):
    return request.param


def crash(body: str, env: dict[str, str] | None = None):
    proc = run_child(PRELUDE + body, env=env)
    return proc


def shown(proc) -> tuple[int, int, int, int]:
    """What the child's show() printed: (base, size, span start, npages)."""
    p, size, start, npages = (int(x) for x in proc.stdout.split()[:4])
    return p, size, start, npages


def the_line(proc) -> re.Match[str]:
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("goheap:")]
    assert len(lines) == 1, proc.stderr
    m = LINE.match(lines[0])
    assert m is not None, lines[0]
    return m


def assert_line(proc, kind, addr, n, rel, obj):
    p, size, start, npages = obj
    m = the_line(proc)
    assert m["kind"] == kind
    assert int(m["addr"], 16) == addr
    assert (int(m["n"]), m["rel"]) == (n, rel)
    assert (int(m["base"], 16), int(m["size"])) == (p, size)
    assert (int(m["start"], 16), int(m["npages"])) == (start, npages)
    assert fault_address(proc.stderr) == addr and fault_kind(proc.stderr) == kind


# ---- the kinds -------------------------------------------------------------------------------


@pytest.mark.pagesize
def test_fault_report_overrun_past_a_right_aligned_object(page):
    proc = crash(f"""
h = heap({page}, efence=True, guard=True, align=1)
p = h.malloc(13)
show(h, p)
ctypes.memset(p + 13, 1, 1)  # the first byte past it: the guard's first byte
""")
    assert died_of_fault(proc), proc
    obj = shown(proc)
    p, size, start, npages = obj
    assert size == 13 and (p + 13) % page == 0  # right-aligned against its guard
    assert_line(proc, "overrun", p + 13, 1, "past", obj)
    # The span is the object's data pages plus one guard unit.
    assert npages * 8 * KiB == (p + 13 - start) + max(page, 8 * KiB)


@pytest.mark.pagesize
def test_fault_report_overrun_further_into_the_guard(page):
    proc = crash(f"""
h = heap({page}, efence=True, guard=True)
p = h.malloc(100)
show(h, p)
ctypes.string_at(p + 112 + 300, 1)  # a read 301 bytes past the usable size
""")
    assert died_of_fault(proc), proc
    obj = shown(proc)
    assert obj[1] == 112
    assert_line(proc, "overrun", obj[0] + 412, 301, "past", obj)


@pytest.mark.pagesize
def test_fault_report_use_after_free(page):
    proc = crash(f"""
h = heap({page}, efence=True)
p = h.malloc(100)
show(h, p)
h.free(p)
ctypes.memset(p + 40, 1, 1)
""")
    assert died_of_fault(proc), proc
    obj = shown(proc)
    assert_line(proc, "use-after-free", obj[0] + 40, 40, "into", obj)


@pytest.mark.pagesize
def test_fault_report_use_after_free_before_the_object(page):
    # guard="after" puts the object at the end of its pages: the bytes before
    # it are on its span, faulted with it at free.
    proc = crash(f"""
h = heap({page}, efence=True, guard=True)
p = h.malloc(64)
show(h, p)
h.free(p)
ctypes.string_at(p - 8, 1)
""")
    assert died_of_fault(proc), proc
    obj = shown(proc)
    assert_line(proc, "use-after-free", obj[0] - 8, 8, "before", obj)


@pytest.mark.pagesize
def test_fault_report_underrun_into_a_guard_before(page):
    proc = crash(f"""
h = heap({page}, efence=True, guard="before")
p = h.malloc(20)
show(h, p)
ctypes.memset(p - 1, 1, 1)
""")
    assert died_of_fault(proc), proc
    obj = shown(proc)
    assert_line(proc, "underrun", obj[0] - 1, 1, "before", obj)


@pytest.mark.pagesize
def test_fault_report_large_sampled_object(page):
    proc = crash(f"""
h = heap({page}, efence_sample=1)
p = h.malloc(100_000)
show(h, p)
ctypes.memset(p + 100_000, 1, 1)
""")
    assert died_of_fault(proc), proc
    obj = shown(proc)
    assert obj[1] == 100_000
    assert_line(proc, "overrun", obj[0] + 100_000, 1, "past", obj)


def test_fault_report_wild_access_in_a_normal_heap():
    # A heap without efence is registered too: a fault on its pages (made
    # PROT_NONE here behind goheap's back) is named, though no efence object
    # is there.
    proc = crash(f"""
libc = ctypes.CDLL(None, use_errno=True)
libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
h = heap({REAL_PAGE})
goheap.install_fault_reporter()
p = h.malloc(64)
s = h._h.lookup(p)
print(p, s.start, s.npages, flush=True)
assert libc.mprotect(p & ~({REAL_PAGE} - 1), {REAL_PAGE}, 0) == 0
ctypes.string_at(p, 1)
""")
    assert died_of_fault(proc), proc
    p, start, npages = (int(x) for x in proc.stdout.split())
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("goheap:")]
    assert lines == [
        f"goheap: wild access at {p:#x}: no efence object there, span {start:#x}+{npages} "
        f"page{'s' if npages != 1 else ''}"
    ], proc.stderr


# ---- faults that are not goheap's ---------------------------------------------------------------

NOT_OURS = """
libc = ctypes.CDLL(None)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                      ctypes.c_long)
q = libc.mmap(None, 4096, 0, 0x22, -1, 0)  # PROT_NONE, MAP_PRIVATE|MAP_ANONYMOUS: not goheap's
print(q, flush=True)
"""


def test_fault_report_passes_a_foreign_fault_on_untouched():
    proc = crash(f"""
h = heap({REAL_PAGE}, efence=True)
p = h.malloc(10)
h.free(p)  # goheap has faulted pages of its own, too
{NOT_OURS}
ctypes.memset(q, 1, 1)
""")
    assert died_of_fault(proc), proc
    assert "goheap:" not in proc.stderr, proc.stderr
    assert proc.returncode == -signal.SIGSEGV  # the default action, as without goheap


def test_fault_report_foreign_fault_still_reaches_faulthandler():
    proc = crash(f"""
faulthandler.enable()
h = heap({REAL_PAGE}, efence_sample=1)
{NOT_OURS}
def touch_foreign():
    ctypes.memset(q, 1, 1)
touch_foreign()
""")
    assert died_of_fault(proc), proc
    assert "goheap:" not in proc.stderr
    assert "Fatal Python error: Segmentation fault" in proc.stderr
    assert "in touch_foreign" in proc.stderr


def test_fault_report_sent_signal_gets_no_line():
    # kill(2) is not a fault: no address to name, and it is passed on.
    proc = crash(f"""
h = heap({REAL_PAGE}, efence=True)
os.kill(os.getpid(), signal.SIGSEGV)
print("survived", flush=True)
""")
    assert proc.returncode == -signal.SIGSEGV, proc
    assert "goheap:" not in proc.stderr and "survived" not in proc.stdout


def test_fault_report_after_close_names_nothing():
    # Closing takes the heap out of the registry before its memory is
    # unmapped: a stale pointer into it then faults on nothing goheap owns.
    proc = crash(f"""
h = heap({REAL_PAGE}, efence=True)
p = h.malloc(100)
h.free(p)
h.close()
print(p, flush=True)
ctypes.memset(p, 1, 1)
""")
    assert died_of_fault(proc), proc
    assert "goheap:" not in proc.stderr, proc.stderr


def test_fault_report_finds_the_right_heap_among_several():
    proc = crash(f"""
hs = [heap({REAL_PAGE}, efence=True) for _ in range(3)]
ps = [h.malloc(48) for h in hs]
show(hs[1], ps[1])
hs[1].free(ps[1])
ctypes.memset(ps[1] + 8, 1, 1)
""")
    assert died_of_fault(proc), proc
    obj = shown(proc)
    assert_line(proc, "use-after-free", obj[0] + 8, 8, "into", obj)


# ---- chaining ------------------------------------------------------------------------------------


def test_fault_report_faulthandler_stack_follows_the_line():
    # pytest's order: faulthandler first, then a heap that installs the reporter.
    proc = crash(f"""
faulthandler.enable()
h = heap({REAL_PAGE}, efence=True)
p = h.malloc(32)
show(h, p)
h.free(p)
def use_after_free():
    ctypes.memset(p, 1, 1)
use_after_free()
""")
    assert died_of_fault(proc), proc
    err = proc.stderr
    line = err.index("goheap: use-after-free at")
    fatal = err.index("Fatal Python error: Segmentation fault")
    assert line < fatal, err
    assert "in use_after_free" in err[fatal:] and err.count("goheap:") == 1


def test_fault_report_installed_again_over_faulthandler():
    # The reporter first, faulthandler over it, then the reporter again:
    # faulthandler's "previous" is the reporter, which now chains to it.  One
    # line, one stack, and the process still dies (the cycle is broken).
    proc = crash(f"""
h = heap({REAL_PAGE}, efence=True)
from goheap import efence
assert efence.fault_reporter_installed()
faulthandler.enable()
assert not efence.fault_reporter_installed()
goheap.install_fault_reporter()
assert efence.fault_reporter_installed()
p = h.malloc(32)
h.free(p)
ctypes.memset(p, 1, 1)
""")
    assert died_of_fault(proc), proc
    err = proc.stderr
    assert err.count("goheap: use-after-free at") == 1, err
    assert err.count("Fatal Python error: Segmentation fault") == 1, err
    assert err.index("goheap:") < err.index("Fatal Python error")


def test_fault_report_install_is_idempotent():
    # Installed by two heaps and twice by hand: it must not chain to itself
    # (that would loop, or print the line again), and the default action ends it.
    proc = crash(f"""
a = heap({REAL_PAGE}, efence=True)
b = heap({REAL_PAGE}, efence_sample=1)
goheap.install_fault_reporter()
goheap.install_fault_reporter()
p = b.malloc(8)
show(b, p)
ctypes.memset(p + 8, 1, 1)
""")
    assert died_of_fault(proc), proc
    obj = shown(proc)
    assert_line(proc, "overrun", obj[0] + 8, 1, "past", obj)


def test_fault_report_ignored_signal_does_not_hide_a_real_fault():
    # SIG_IGN before: a sent SIGSEGV stays ignored, but a real fault cannot
    # be (re-running the instruction would fault forever): it is fatal.
    proc = crash(f"""
signal.signal(signal.SIGSEGV, signal.SIG_IGN)
h = heap({REAL_PAGE}, efence=True)
os.kill(os.getpid(), signal.SIGSEGV)
print("ignored", flush=True)
p = h.malloc(16)
h.free(p)
ctypes.memset(p, 1, 1)
""")
    assert "ignored" in proc.stdout
    assert died_of_fault(proc), proc
    assert proc.stderr.count("goheap: use-after-free") == 1, proc.stderr


def test_fault_reporter_state_in_process():
    # Installing in this process is harmless: it only adds a line before
    # whatever handler pytest has (faulthandler).
    import goheap

    goheap.install_fault_reporter()
    assert _native.fault_reporter_installed()
    goheap.install_fault_reporter()
    assert _native.fault_reporter_installed()


def test_fault_report_goes_to_the_file_it_was_given(tmp_path):
    # pytest's fd capture points fd 2 at a file that dies with the process:
    # the plugin hands the reporter a copy of the real stderr instead.
    out = tmp_path / "report"
    proc = crash(f"""
h = heap({REAL_PAGE}, efence=True, guard=True, align=1)
f = open({str(out)!r}, "w")
goheap.install_fault_reporter(file=f)
p = h.malloc(13)
show(h, p)
ctypes.memset(p + 13, 1, 1)
""")
    assert died_of_fault(proc), proc
    assert not any(ln.startswith("goheap:") for ln in proc.stderr.splitlines()), proc.stderr
    lines = out.read_text().splitlines()
    assert len(lines) == 1 and LINE.match(lines[0]), lines
    p = shown(proc)[0]
    assert fault_kind(lines[0]) == "overrun" and fault_address(lines[0]) == p + 13


def test_fault_report_refuses_a_closed_descriptor():
    import os

    import goheap

    before = goheap.efence.fault_reporter_fd()
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(ValueError, match="not an open file descriptor"):
        goheap.install_fault_reporter(file=w)
    assert goheap.efence.fault_reporter_fd() == before  # nothing changed
