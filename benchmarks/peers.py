"""The peers: what a Python user would pick instead of goheap, each behind one call shape.

Design note. A peer is described by small pieces of Python source (an allocation expression in
``s``, a statement that frees ``p``, a statement that touches every OS page of ``p``) plus the names
they use. harness.py pastes those pieces into its timing loops, the way ``timeit`` pastes a
statement into its template, so each peer is timed as a user would write it: ``free(malloc(s))``
for an allocator that hands out integer addresses, ``bytearray(s)`` dropped by reference counting
for the Python objects, ``m.close()`` for mmap. No peer pays for a wrapper function the others do
not.

The C allocators come from a small cffi API-mode module that this file builds at run time into
``benchmarks/_build/`` (source: bench_peers.c / bench_peers.h). glibc through that module is the
reference, "cffi-libc": it is stock cffi (the GIL is released around each call, as any cffi user
gets), one argument in, an integer out. glibc's calloc(1, n) through the same module, "cffi-libc
calloc", is the reference for zeroed memory: goheap's malloc zeroes by default, so it is judged
against calloc, and ``malloc(n, zero=False)`` against malloc. jemalloc, mimalloc and tcmalloc go
through the same module, dlopen'ed with RTLD_LOCAL from Debian's packages, so their call cost
matches glibc's and the process's own malloc is not replaced. A peer that is not installed is
skipped with a reason that says how to install it; nothing is skipped silently.

Electric Fence and DUMA, the page-guarding debug allocators, go through the same table but are
not general peers: a live heap of 100,000 objects would need 200,000 kernel mappings from them
(vm.max_map_count is 65,530 by default) and they cost tens of microseconds per call, so only
workload (f) loads them, with ``load_efence_peers()``. They are dlopen'ed with RTLD_DEEPBIND too
(bench_peers.c says why). Each runs with its own defaults, read back and recorded in its note,
except DUMA's DUMA_PROTECT_FREE: its default (-1) never reuses freed memory, so a loop of round
trips exhausts vm.max_map_count and DUMA aborts the process; the benchmark sets 0, freed memory
back to DUMA's pool, which is also Electric Fence's default (EF_PROTECT_FREE=0).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import mmap
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BUILD_DIR = HERE / "_build"
MODULE = "_bench_peers"
SOURCES = (HERE / "bench_peers.h", HERE / "bench_peers.c")
CFLAGS = ["-O2", "-Wall", "-Wextra", "-Werror"]

# Debian's shared libraries (package -> soname); the soname is what dlopen is given.
C_PEERS = {
    # name: (enum index in bench_peers.h, soname, Debian package)
    "cffi-jemalloc": (1, "libjemalloc.so.2", "libjemalloc2"),
    "cffi-mimalloc": (2, "libmimalloc.so.2", "libmimalloc2.0"),
    "cffi-tcmalloc": (3, "libtcmalloc_minimal.so.4", "libtcmalloc-minimal4"),
}
# The page-guarding debug allocators, for workload (f) only (same shape as C_PEERS).
EFENCE_PEERS = {
    "cffi-efence": (4, "libefence.so.0", "electric-fence"),
    "cffi-duma": (5, "libduma.so.0", "duma"),
}
C_PEER_INDEX = {
    "cffi-libc": 0,
    **{name: spec[0] for name, spec in (C_PEERS | EFENCE_PEERS).items()},
}
APT_HINT = "apt-get install -y libjemalloc2 libmimalloc2.0 libtcmalloc-minimal4"
EFENCE_APT_HINT = "apt-get install -y electric-fence duma"

RELEASE_LABEL = {  # what bp_release() calls for each C peer
    "libc": "malloc_trim(0)",
    "jemalloc": 'mallctl("arena.4096.purge")',
    "mimalloc": "mi_collect(true)",
    "tcmalloc": "MallocExtension_ReleaseFreeMemory()",
    "efence": "",  # neither debug allocator gives memory back on request
    "duma": "",
}

OS_PAGE = mmap.PAGESIZE
REFERENCE = "cffi-libc"
# glibc calloc(1, n) + free through the same module: the fair reference for goheap's zeroed malloc
# (its default), as REFERENCE is for malloc(n, zero=False).
CALLOC = "cffi-libc calloc"


@dataclass
class Peer:
    """One allocator as the timing templates see it."""

    name: str
    alloc: str  # expression in `s` (size) returning the allocation
    free: str  # statement freeing `{p}` (formatted with the place that holds it)
    touch: str  # statement writing one byte in each OS page of `p` (size `s`, step `pg`)
    ns: dict[str, Any] = field(default_factory=dict)
    release: str | None = None  # statement handing freed memory back to the OS, if the peer has one
    release_label: str = ""  # what that statement calls, for the table
    before: Callable[[], None] | None = None  # run before each timed run (pyarrow: pick the pool)
    min_size: int = 0  # smallest size the peer is meant for (mmap: large sizes only)
    kind: str = "python"  # "c" for the cffi-table peers, "goheap", "python"
    note: str = ""
    twin_of: str | None = None  # the peer this one is another entry point of (same memory)

    def free_stmt(self, place: str) -> str:
        return self.free.format(p=place)


# ---------------------------------------------------------------------------------------------
# The process the peers load into

# Debian's libjemalloc.so.2 uses initial-exec TLS, which dlopen can only place in glibc's small
# surplus of static TLS; in a Python process that surplus is often gone and dlopen fails with
# "cannot allocate memory in static TLS block". The tunable enlarges the surplus, and ld.so reads
# it only at process start, so the benchmark re-executes itself once with it set.
STATIC_TLS_TUNABLE = "glibc.rtld.optional_static_tls=16384"


def ensure_static_tls() -> None:
    """Re-exec this interpreter with STATIC_TLS_TUNABLE in GLIBC_TUNABLES unless it is there."""
    current = os.environ.get("GLIBC_TUNABLES", "")
    if "glibc.rtld.optional_static_tls" in current or not sys.platform.startswith("linux"):
        return
    env = dict(os.environ)
    env["GLIBC_TUNABLES"] = f"{current}:{STATIC_TLS_TUNABLE}" if current else STATIC_TLS_TUNABLE
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


# ---------------------------------------------------------------------------------------------
# Building the C module


def _cdef_text() -> str:
    """bench_peers.h without its preprocessor lines: the rest is plain declarations."""
    lines = SOURCES[0].read_text().splitlines()
    return "\n".join(line for line in lines if not line.lstrip().startswith("#"))


def _stamp() -> str:
    import cffi

    h = hashlib.sha256()
    for src in SOURCES:
        h.update(src.read_bytes())
    h.update(f"{cffi.__version__} {sys.version} {CFLAGS}".encode())
    return h.hexdigest()


def build(verbose: bool = False) -> Any:
    """Compile the module if its sources changed since the last build, then import it."""
    BUILD_DIR.mkdir(exist_ok=True)
    stamp_file = BUILD_DIR / f"{MODULE}.stamp"
    built = list(BUILD_DIR.glob(f"{MODULE}*.so"))
    if not built or not stamp_file.exists() or stamp_file.read_text() != _stamp():
        import cffi

        ffibuilder = cffi.FFI()
        ffibuilder.cdef(_cdef_text())
        ffibuilder.set_source(
            MODULE,
            '#include "bench_peers.h"',
            sources=[str(SOURCES[1])],
            include_dirs=[str(HERE)],
            extra_compile_args=CFLAGS,
        )
        for old in built:
            old.unlink()
        ffibuilder.compile(tmpdir=str(BUILD_DIR), verbose=verbose)
        stamp_file.write_text(_stamp())
    if str(BUILD_DIR) not in sys.path:
        sys.path.insert(0, str(BUILD_DIR))
    return importlib.import_module(MODULE)


# ---------------------------------------------------------------------------------------------
# Discovering the peers


def _c_peer(mod: Any, name: str) -> Peer:
    short = name.split("-", 1)[1]
    lib, idx = mod.lib, C_PEER_INDEX[name]
    return Peer(
        name=name,
        alloc="malloc(s)",
        free="free({p})",
        touch="touch(p, s, pg)",
        ns={
            "malloc": getattr(lib, f"bp_{short}_malloc"),
            "free": getattr(lib, f"bp_{short}_free"),
            "touch": lib.bp_touch_addr,
            "release_": lib.bp_release,
            "idx": idx,
        },
        release="release_(idx)" if RELEASE_LABEL[short] else None,
        release_label=RELEASE_LABEL[short],
        kind="c",
        note="glibc malloc/free through cffi API mode (the reference)"
        if short == "libc"
        else f"{short} from Debian's shared library, dlopen RTLD_LOCAL, same call shape",
    )


def _calloc_peer(mod: Any) -> Peer:
    ref = _c_peer(mod, REFERENCE)
    ref.ns["calloc"] = mod.lib.bp_libc_calloc
    return Peer(
        name=CALLOC,
        alloc="calloc(s)",
        free=ref.free,
        touch=ref.touch,
        ns=ref.ns,
        kind="c-calloc",
        note="glibc calloc(1, n)/free through cffi API mode (the reference for zeroed memory)",
        twin_of=REFERENCE,
    )


def load_c_peers(
    mod: Any, wanted: set[str] | None = None
) -> tuple[list[Peer], list[tuple[str, str]]]:
    peers, skipped = [], []
    if wanted is None or REFERENCE in wanted:
        peers.append(_c_peer(mod, REFERENCE))
    if wanted is None or CALLOC in wanted:
        peers.append(_calloc_peer(mod))
    for name, (idx, soname, package) in C_PEERS.items():
        if wanted is not None and name not in wanted:
            continue
        if mod.lib.bp_open(idx, soname.encode()) != 0:
            reason = mod.ffi.string(mod.lib.bp_error()).decode(errors="replace")
            if "No such file" in reason or "cannot open" in reason:
                reason += f" (install Debian's {package}: {APT_HINT})"
            skipped.append((name, reason))
            continue
        peers.append(_c_peer(mod, name))
    return peers, skipped


# Environment the debug allocators read when they start, set only while they load (their first
# malloc reads it) and restored after. setdefault semantics: a value the user exported wins.
# The banners change nothing but stderr. DUMA_PROTECT_FREE: see the module's docstring.
EFENCE_ENV = {
    "cffi-efence": {"EF_DISABLE_BANNER": "1"},
    "cffi-duma": {"DUMA_DISABLE_BANNER": "1", "DUMA_PROTECT_FREE": "0"},
}
# Electric Fence's settings, exported as ints: -1 before its first malloc, the values in force after.
EF_SETTINGS = (
    "EF_ALIGNMENT",
    "EF_PROTECT_BELOW",
    "EF_PROTECT_FREE",
    "EF_ALLOW_MALLOC_0",
    "EF_FILL",
)
DUMA_SETTINGS = ("DUMA_ALIGNMENT", "DUMA_PROTECT_BELOW", "DUMA_PROTECT_FREE", "DUMA_MAX_ALLOC")


def max_map_count() -> int | None:
    try:
        return int(Path("/proc/sys/vm/max_map_count").read_text())
    except (OSError, ValueError):
        return None


def _efence_settings(mod: Any, name: str, idx: int, set_env: dict[str, str]) -> str:
    """What a loaded debug allocator runs with, for its note: Electric Fence's values read back
    from the library; DUMA keeps its settings in a private struct, so the environment it read
    (what the benchmark set, what the user exported, or "default")."""
    if name == "cffi-efence":
        out = []
        for sym in EF_SETTINGS:
            v = mod.ffi.new("int *")
            if mod.lib.bp_peer_int(idx, sym.encode(), v) == 0:
                out.append(f"{sym}={v[0]}")
        return " ".join(out)
    return " ".join(
        f"{var}={set_env.get(var, os.environ.get(var, 'default'))}"
        + (" (set by the benchmark)" if var in set_env else "")
        for var in DUMA_SETTINGS
    )


# Run in a child: one byte written just past a 64-byte block of the peer must fault (64 is a
# multiple of both libraries' default alignment, so the byte is on the guard page).
OVERRUN_CHILD = """
import sys
sys.path.insert(0, {build!r})
import {module} as m
if m.lib.bp_open({idx}, {soname!r}) != 0:
    sys.exit("bp_open: " + m.ffi.string(m.lib.bp_error()).decode())
p = m.lib.bp_{short}_malloc(64)
m.lib.bp_touch_addr(p + 64, 1, 1)
"""


def overrun_problem(idx: int, soname: str, short: str) -> str | None:
    """None when an overrun of the peer's block faults in a child process, else what happened:
    a peer that does not guard would make (f) compare goheap with the wrong thing."""
    import signal
    import subprocess

    code = OVERRUN_CHILD.format(
        build=str(BUILD_DIR), module=MODULE, idx=idx, soname=soname.encode(), short=short
    )
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return "the overrun check's child did not finish in 60 s"
    if r.returncode in (-signal.SIGSEGV, -signal.SIGBUS):
        return None
    tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
    return f"a write one byte past a 64-byte block did not fault (exit {r.returncode}: {tail})"


def load_efence_peers(mod: Any) -> tuple[list[Peer], list[tuple[str, str]]]:
    """Electric Fence and DUMA as C peers (workload f), or (name, reason) for each that cannot
    load. Each is opened, started by one malloc+free under EFENCE_ENV, checked to hand out a
    pointer its own free takes back, and checked in a child to fault on an overrun."""
    peers, skipped = [], []
    for name, (idx, soname, package) in EFENCE_PEERS.items():
        set_env = {k: v for k, v in EFENCE_ENV[name].items() if k not in os.environ}
        os.environ.update(set_env)
        try:
            if mod.lib.bp_open(idx, soname.encode()) != 0:
                reason = mod.ffi.string(mod.lib.bp_error()).decode(errors="replace")
                if "No such file" in reason or "cannot open" in reason:
                    reason += f" (install Debian's {package}: {EFENCE_APT_HINT})"
                skipped.append((name, reason))
                continue
            problem = overrun_problem(idx, soname, name.split("-", 1)[1])
            if problem:
                skipped.append((name, f"{soname}: {problem}"))
                continue
            peer = _c_peer(mod, name)
            p = peer.ns["malloc"](64)
            if p == 0:
                skipped.append((name, f"{soname}: malloc(64) returned NULL"))
                continue
            peer.ns["free"](p)
        finally:
            for k in set_env:
                del os.environ[k]
        peer.note = (
            f"{soname} from Debian's {package}, dlopen RTLD_LOCAL|RTLD_DEEPBIND, same call shape, "
            "an overrun faults (checked in a child); "
            f"{_efence_settings(mod, name, idx, set_env)}; vm.max_map_count={max_map_count()}"
        )
        peers.append(peer)
    return peers, skipped


def _buffer_touch(mod: Any) -> dict[str, Any]:
    return {"touch": mod.lib.bp_touch, "from_buffer": mod.ffi.from_buffer}


def load_python_peers(
    mod: Any, wanted: set[str] | None = None
) -> tuple[list[Peer], list[tuple[str, str]]]:
    """pyarrow's pools, numpy.empty, bytearray, mmap: freed by dropping (or closing) the object."""
    peers, skipped = [], []

    def want(name: str) -> bool:
        return wanted is None or name in wanted

    buf = _buffer_touch(mod)
    drop = "{p} = None"
    if any(want(n) for n in ("pyarrow-system", "pyarrow-jemalloc", "pyarrow-mimalloc")):
        try:
            import pyarrow as pa
        except ImportError as e:
            for n in ("pyarrow-system", "pyarrow-jemalloc", "pyarrow-mimalloc"):
                skipped.append((n, f"pyarrow is not installed ({e}); pip install '.[bench]'"))
        else:
            for pool_name in ("system", "jemalloc", "mimalloc"):
                name = f"pyarrow-{pool_name}"
                if not want(name):
                    continue
                try:
                    pool = getattr(pa, f"{pool_name}_memory_pool")()
                except (NotImplementedError, AttributeError) as e:
                    skipped.append((name, f"this pyarrow build has no {pool_name} pool ({e})"))
                    continue
                peers.append(
                    Peer(
                        name=name,
                        alloc="allocate_buffer(s, pool)",
                        free=drop,
                        touch="touch_addr(p.address, s, pg)",
                        ns={
                            "allocate_buffer": pa.allocate_buffer,
                            "pool": pool,
                            "touch_addr": mod.lib.bp_touch_addr,
                        },
                        release="pool.release_unused()",
                        # allocate_buffer is given the pool, but pyarrow also allocates from the
                        # default pool internally: make it the same one while this peer runs.
                        before=functools.partial(pa.set_memory_pool, pool),
                        note=f"pyarrow {pa.__version__} allocate_buffer on the {pool_name} pool",
                    )
                )
    if want("numpy.empty"):
        try:
            import numpy as np
        except ImportError as e:
            skipped.append(("numpy.empty", f"numpy is not installed ({e}); pip install '.[bench]'"))
        else:
            peers.append(
                Peer(
                    name="numpy.empty",
                    alloc="empty(s, u8)",
                    free=drop,
                    touch="touch(from_buffer(p), s, pg)",
                    ns={"empty": np.empty, "u8": np.dtype(np.uint8), **buf},
                    note=f"numpy {np.__version__} empty(n, uint8), uninitialised",
                )
            )
    if want("bytearray"):
        peers.append(
            Peer(
                name="bytearray",
                alloc="bytearray(s)",
                free=drop,
                touch="touch(from_buffer(p), s, pg)",
                ns=dict(buf),
                note="bytearray(n): zero-filled, freed by refcount",
            )
        )
    if want("mmap"):
        peers.append(
            Peer(
                name="mmap",
                alloc="mmap(-1, s)",
                free="{p}.close()",
                touch="touch(from_buffer(p), s, pg)",
                ns={"mmap": mmap.mmap, **buf},
                min_size=32768,
                note="mmap.mmap(-1, n), closed explicitly; for large sizes only",
            )
        )
    return peers, skipped


def goheap_reason() -> str | None:
    """Why goheap cannot be benchmarked yet, or None when its public malloc/free work."""
    try:
        import goheap
    except Exception as e:  # an unbuilt extension raises ImportError or worse
        return f"import goheap failed: {type(e).__name__}: {e}"
    if not hasattr(goheap, "Heap"):
        return "goheap has no Heap yet"
    try:
        with goheap.Heap(arena_size=1 << 30) as h:
            p = h.malloc(64)
            h.free(p)
    except Exception as e:
        return f"goheap.Heap malloc/free failed: {type(e).__name__}: {e}"
    return None


def goheap_peers(mod: Any, h: Any, label: str = "goheap") -> list[Peer]:
    """goheap's public API, called as a user calls it (bound methods, default zeroing) and, as a
    second row, with zero=False, which is malloc's contract rather than calloc's."""
    ns = {
        "malloc": h.malloc,
        "free": h.free,
        "touch": mod.lib.bp_touch_addr,
        "scavenge": h.scavenge,
    }
    common = dict(free="free({p})", touch="touch(p, s, pg)", release="scavenge()", kind="goheap")
    return [
        Peer(
            name=label,
            alloc="malloc(s)",
            ns=dict(ns),
            note="public h.malloc(s) / h.free(p), zeroed memory (the default)",
            **common,
        ),
        Peer(
            name=f"{label} zero=False",
            alloc="malloc(s, zero=False)",
            ns=dict(ns),
            note="h.malloc(s, zero=False): uninitialised, like malloc",
            twin_of=label,
            **common,
        ),
    ]


def discover(mod: Any, wanted: set[str] | None = None) -> tuple[list[Peer], list[tuple[str, str]]]:
    """Every non-goheap peer that can run here, and (name, reason) for each that cannot."""
    c_peers, c_skipped = load_c_peers(mod, wanted)
    py_peers, py_skipped = load_python_peers(mod, wanted)
    return c_peers + py_peers, c_skipped + py_skipped


def library_paths() -> dict[str, str]:
    """The files the loaded peer libraries came from (from /proc/self/maps), for the record."""
    paths: dict[str, str] = {}
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return paths
    for line in maps:
        parts = line.split()
        if len(parts) >= 6:
            base = os.path.basename(parts[5])
            for key in (
                "libjemalloc",
                "libmimalloc",
                "libtcmalloc_minimal",
                "libefence",
                "libduma",
                "libc.so",
                "libarrow.so",
            ):
                if base.startswith(key):
                    paths[key] = os.path.realpath(parts[5])
    return paths
