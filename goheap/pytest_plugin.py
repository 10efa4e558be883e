"""The pytest plugin: NumPy's array data on a goheap heap for a whole test session.

See goheap/malloc.py for the overview and goheap/numpy_handler.py for the NEP 49 handler.

    pytest --goheap=efence       every array on pages of its own, a guard page after it,
                                 faulted when freed: an overrun or a use-after-free by C
                                 code faults at the instruction that made it
    pytest --goheap=sample:100   about one allocation in 100 so (the rest on the normal
                                 path): cheap enough to leave on in CI
    pytest --goheap=normal       every array on a normal goheap heap (no guards)
    pytest --goheap=off          the default: the plugin does nothing

The mode may also come from the ``goheap`` ini key or the GOHEAP_PYTEST environment
variable; the command line wins over the environment, which wins over the ini file.
``-p no:goheap`` unloads the plugin.  A bad mode is a usage error (exit status 4).

What a session does (``pytest_configure``, after pytest's own faulthandler plugin):
make the heap, install goheap's fault reporter, then enter
``goheap.numpy_allocator(heap)`` for the rest of the session.  The order matters:
the reporter chains to whatever SIGSEGV handler was there when it was installed,
so installing it after ``faulthandler.enable()`` gives, on a goheap fault, first
goheap's line (``goheap: overrun ...``: address, offset, object) and then
faulthandler's Python stack, which names the test.  Installed before, the reporter
would only see faulthandler's re-raise.  At the end the terminal summary gets one
line, ``goheap: <mode>: N mallocs, ... peak B bytes, E efence objects ...``.

Lifetime.  Threads started by a test begin with NumPy's default handler on
Python <= 3.13 (NumPy keeps the handler in a context variable), so their arrays
are not on the heap.  Arrays made during the session may outlive it (a module
global, a cache): each keeps the handler it was made with, and the heap is
closed at ``pytest_unconfigure`` only because ``Heap.close()`` leaves mapped
whatever such an array can still reach (goheap/numpy_handler.py).
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from typing import Any

import pytest

ENV = "GOHEAP_PYTEST"
INI = "goheap"
# The efence heap's quarantine: freed objects stay faulted (a use-after-free
# faults) until this many bytes of newer ones are faulted after them, then their
# pages are recycled.  Faulted pages cost address space and a little of
# goheap's Python bookkeeping, not memory; without a bound a long suite makes
# millions of faulted spans and grows those books without end.  256 MiB keeps
# at least the last 16,384 small objects (8 KiB unit + 8 KiB guard each).
EFENCE_QUARANTINE = 256 << 20
# The efence heap's right alignment (Heap(efence=True, align=)): an object ends
# exactly at its guard page when its size is a multiple of this, so for every
# array of 8-byte elements (float64, int64, complex, pointers) the first
# element past the end faults.  Smaller elements may leave up to 7 bytes of
# padding before the guard.  8 keeps every array aligned as NumPy's default
# allocator would for 8-byte types, and the C free path sees every object.
EFENCE_ALIGN = 8

# Between tests, free heap memory beyond this much goes back to the OS
# (Heap.scavenge, Go's debug.FreeOSMemory).  goheap, like Go, keeps freed spans
# resident for scavenge_after (300 s) to reuse them; NumPy's allocator gives a
# large block back at once (glibc munmaps it).  Without this, a test that freed
# 8 GiB leaves it resident and the next test sees 8 GiB less MemAvailable:
# NumPy's test_huge_vectordot[complex128] skipped instead of passing
# (requires_memory) under the plugin.  64 MiB bounds that difference.  The
# trigger is a test whose peak exceeded the bytes live after it by more than
# that (the heap grows only when its free spans cannot serve, so idle memory
# comes from such swings): two reset_peak() calls, about 2 us, where a
# stats() per test cost 0.35 ms, 10% of test_numeric's CPU time.
SCAVENGE_ABOVE = 64 << 20
_MODE = re.compile(r"(normal|efence|off)|sample:(\d+)")


@dataclass(frozen=True)
class Mode:
    """A parsed ``--goheap`` value: ``name`` is normal, efence or sample;
    ``sample`` is N of sample:N (about one allocation in N is an efence object)."""

    name: str
    sample: int = 0

    def __str__(self) -> str:
        return f"sample:{self.sample}" if self.name == "sample" else self.name

    def heap_options(self) -> dict[str, Any]:
        """goheap.Heap's keyword arguments for this mode."""
        if self.name == "efence":
            return {
                "efence": True,
                "guard": "after",
                "align": EFENCE_ALIGN,
                "quarantine": EFENCE_QUARANTINE,
            }
        # Explicit, so GOHEAP_EFENCE and GOHEAP_EFENCE_SAMPLE (read by Heap()
        # when these are not given) do not change what the option said.
        return {"efence": False, "efence_sample": self.sample if self.name == "sample" else 0}


def parse_mode(text: str) -> Mode | None:
    """``--goheap``'s value as a Mode, or None for "off" (and "").  ValueError
    says what is accepted."""
    if not text.strip():
        return None
    m = _MODE.fullmatch(text.strip())
    if m is None or (m.group(2) is not None and int(m.group(2)) < 1):
        raise ValueError(
            f"--goheap={text}: expected normal, efence, sample:N (N >= 1, about one "
            "allocation in N guarded) or off"
        )
    if m.group(1) == "off":
        return None
    if m.group(1):
        return Mode(m.group(1))
    return Mode("sample", int(m.group(2)))


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("goheap", "goheap: NumPy array data on a goheap heap")
    group.addoption(
        "--goheap",
        action="store",
        dest="goheap",
        default=None,
        metavar="MODE",
        help="put NumPy's array data on a goheap heap for the session: normal, efence "
        "(guard pages: overruns and use-after-free fault at once), sample:N (about "
        f"one allocation in N guarded) or off (default; also ${ENV} or ini '{INI}')",
    )
    parser.addini(INI, f"goheap's --goheap mode when not on the command line or in ${ENV}")


def _mode_text(config: pytest.Config, opt: str | None) -> tuple[str, str]:
    """The mode's text and where it came from (for the usage error); ``opt``
    is --goheap's value, None when not given."""
    if opt is not None:
        return opt, "--goheap"
    env = os.environ.get(ENV)
    if env is not None:
        return env, ENV
    return str(config.getini(INI) or ""), f"ini option {INI!r}"


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    # trylast: after _pytest/faulthandler.py's pytest_configure enabled
    # faulthandler, so the reporter installed below chains to it.
    text, source = _mode_text(config, config.getoption("goheap"))
    try:
        mode = parse_mode(text)
    except ValueError as e:
        raise pytest.UsageError(f"goheap: {e} (from {source})") from None
    if mode is None:
        return
    session = GoheapSession(mode)
    config.pluginmanager.register(session, "goheap-session")


@pytest.fixture
def goheap_heap(request: pytest.FixtureRequest) -> Any:
    """The session's goheap.Heap, or None without --goheap: its ``lookup``
    finds the data of every NumPy array the test made in its own thread."""
    session = request.config.pluginmanager.get_plugin("goheap-session")
    return session.heap if session is not None else None


class GoheapSession:
    """The heap of one test session and the handler installed on it
    (registered as a plugin only when a mode is on)."""

    def __init__(self, mode: Mode) -> None:
        try:
            import numpy  # noqa: F401  (NumPy stays an optional dependency of goheap)
        except ImportError:
            raise pytest.UsageError(
                f"goheap: --goheap={mode} puts NumPy's array data on a goheap heap, "
                "but NumPy cannot be imported (pip install numpy)"
            ) from None
        import goheap

        self.mode = mode
        self.heap = goheap.Heap(**mode.heap_options())
        try:
            # The reporter writes with write(2) from the signal handler, and
            # during a test pytest's fd capture points fd 2 at a temporary
            # file that dies with the process.  Here, at configure, capture is
            # suspended and fd 2 is the real stderr: the reporter gets a copy
            # of it, as faulthandler does (so fd capture stays on).
            self._report_fd = os.dup(2)
            goheap.install_fault_reporter(file=self._report_fd)
            self._allocator = goheap.numpy_allocator(self.heap)
            self._allocator.__enter__()
        except BaseException:
            self.heap.close()
            raise
        self.reported = False
        self.workers: list[dict[str, int]] = []  # pytest-xdist: each worker's counts
        self.peak = 0  # the session's peak before the last reset_peak()

    def counts(self) -> dict[str, int]:
        """This process's heap in numbers: mallocs, frees, peak, efence objects."""
        st = self.heap.stats()
        efence = {"efence": st.mallocs, "sample": st.efence_sampled}.get(self.mode.name, 0)
        peak = max(self.peak, st.peak_alloc)
        return {"mallocs": st.mallocs, "frees": st.frees, "peak": peak, "efence": efence}

    def summary(self) -> str:
        """The session's one line: ``goheap: <mode>: N mallocs, ...``.  Under
        pytest-xdist the workers' heaps (the tests ran there) are added up,
        and the peak is the largest worker's."""
        c = self.counts()
        where = ""
        if self.workers:
            for k in ("mallocs", "frees", "efence"):
                c[k] = sum(w[k] for w in self.workers)
            c["peak"] = max(w["peak"] for w in self.workers)
            where = f" (in {len(self.workers)} xdist workers)"
        efence = f"{c['efence']} efence objects"
        if self.mode.name == "efence":
            efence += " (every allocation)"
        elif self.mode.name == "sample":
            efence += f" sampled (about 1 in {self.mode.sample})"
        return (
            f"goheap: --goheap={self.mode}: {c['mallocs']} mallocs, {c['frees']} frees, "
            f"peak {c['peak']} bytes, {efence}{where}"
        )

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item: pytest.Item) -> Any:
        try:
            yield
        finally:
            high = self.heap.reset_peak()  # the peak since the last test
            live = self.heap.reset_peak()  # the peak since the line above: the live bytes
            self.peak = max(self.peak, high)
            if high - live > SCAVENGE_ABOVE:
                self.heap.scavenge()

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        workeroutput = getattr(session.config, "workeroutput", None)
        if workeroutput is not None:  # an xdist worker: the controller prints the line
            workeroutput["goheap"] = self.counts()

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        counts = getattr(node, "workeroutput", {}).get("goheap")
        if counts is not None:
            self.workers.append(counts)

    def pytest_report_header(self) -> list[str]:
        return [f"goheap: NumPy array data on a goheap heap (--goheap={self.mode})"]

    @pytest.hookimpl(trylast=True)
    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        terminalreporter.write_line(self.summary())
        self.reported = True

    def pytest_unconfigure(self) -> None:
        if not self.reported:  # no terminal (-p no:terminal): stderr still gets the line
            sys.stderr.write(self.summary() + "\n")
        try:
            self._allocator.__exit__(None, None, None)
        finally:
            # Arrays made during the session may live on (module globals,
            # caches): close() unmaps nothing they can still reach.
            self.heap.close()
            import goheap

            goheap.install_fault_reporter(file=2)  # before its copy is closed
            os.close(self._report_fd)
