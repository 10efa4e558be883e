"""The pytest plugin (goheap/pytest_plugin.py), run as users run it: inner pytest
sessions through ``pytester``.

Sessions that only parse options run in this process; every session that makes
a heap, installs the fault reporter or may crash runs in a subprocess
(``runpytest_subprocess``), so this process keeps its own handlers.
"""

from __future__ import annotations

import importlib.util
import pathlib
import re
import signal
import sys

import pytest

from goheap.pytest_plugin import ENV, Mode, parse_mode

pytest_plugins = ["pytester"]

# Imported here, not only in the inner sessions: an in-process pytester run
# unloads the modules it imported, and NumPy's C core cannot be loaded twice.
np = pytest.importorskip("numpy")

SUMMARY = re.compile(
    r"^goheap: --goheap=(\S+): (\d+) mallocs, (\d+) frees, peak (\d+) bytes, (\d+) efence objects"
)


@pytest.fixture(autouse=True)
def _no_mode_from_outside(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)  # the inner sessions' mode comes from each test


def summary_of(result):
    """The (mode, mallocs, frees, peak, efence) of an inner session's one summary line."""
    lines = [ln for ln in result.outlines if SUMMARY.match(ln)]
    assert len(lines) == 1, result.stdout.str()
    m = SUMMARY.match(lines[0])
    assert m is not None
    return m.group(1), *(int(g) for g in m.groups()[1:])


# ---- the option ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "mode"),
    [
        ("normal", Mode("normal")),
        ("efence", Mode("efence")),
        ("sample:1", Mode("sample", 1)),
        ("sample:100", Mode("sample", 100)),
        (" efence ", Mode("efence")),
        ("off", None),
        ("", None),
    ],
)
def test_parse_mode(text, mode):
    assert parse_mode(text) == mode
    if mode is not None:
        assert parse_mode(str(mode)) == mode  # str() gives back the option's value


@pytest.mark.parametrize(
    "text",
    ["bogus", "Efence", "sample", "sample:", "sample:0", "sample:-3", "sample:x", "normal,efence"],
)
def test_parse_mode_refuses(text):
    with pytest.raises(ValueError, match="expected normal, efence, sample:N"):
        parse_mode(text)


def test_heap_options_are_heap_arguments():
    assert Mode("efence").heap_options()["efence"] is True
    assert Mode("efence").heap_options()["guard"] == "after"
    assert Mode("efence").heap_options()["quarantine"] > 0  # bounded: vm.max_map_count
    assert Mode("sample", 7).heap_options()["efence_sample"] == 7
    assert Mode("normal").heap_options() == {"efence": False, "efence_sample": 0}


@pytest.mark.parametrize("value", ["bogus", "sample:0", "sample:"])
def test_bad_value_is_a_usage_error(pytester, value):
    pytester.makepyfile("def test_nothing():\n    pass\n")
    result = pytester.runpytest(f"--goheap={value}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: goheap: --goheap={value}: expected normal, efence*"])


def test_bad_env_and_ini_values_name_their_source(pytester, monkeypatch):
    pytester.makepyfile("def test_nothing():\n    pass\n")
    pytester.makeini("[pytest]\ngoheap = sample:zero\n")
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--goheap=sample:zero: expected*(from ini option 'goheap')"])
    monkeypatch.setenv(ENV, "guarded")
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*--goheap=guarded: expected*(from {ENV})"])


INERT = """
import numpy as np
from goheap import numpy_handler

def test_default_allocator(goheap_heap):
    assert goheap_heap is None
    assert numpy_handler.handler_name(np.zeros(10)) == "default_allocator"
"""


def test_inert_by_default(pytester):
    pytester.makepyfile(INERT)
    result = pytester.runpytest()
    result.assert_outcomes(passed=1)
    assert not any(ln.startswith("goheap:") for ln in result.outlines)


def test_off_and_no_goheap_switch_it_off(pytester, monkeypatch):
    pytester.makepyfile(INERT)
    pytester.makeini("[pytest]\ngoheap = efence\n")
    pytester.runpytest("--goheap=off").assert_outcomes(passed=1)  # the command line wins
    monkeypatch.setenv(ENV, "off")
    pytester.runpytest().assert_outcomes(passed=1)  # so does the environment
    monkeypatch.setenv(ENV, "efence")
    result = pytester.runpytest("-p", "no:goheap", "-p", "no:cacheprovider")
    # Unloaded: no option, no fixture, no summary, whatever the environment says.
    result.stdout.fnmatch_lines(["*fixture 'goheap_heap' not found*"])
    assert not any(ln.startswith("goheap:") for ln in result.outlines)


def test_without_numpy_it_is_a_usage_error(pytester):
    # The inner session cannot import NumPy (None in sys.modules makes
    # "import numpy" raise ImportError, as if it were not installed).
    pytester.makeconftest("import sys\nsys.modules['numpy'] = None\n")
    pytester.makepyfile("def test_nothing():\n    pass\n")
    result = pytester.runpytest_subprocess("--goheap=normal")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["ERROR: goheap: --goheap=normal puts NumPy's array data*pip install numpy*"]
    )
    assert pytester.runpytest_subprocess().ret == 0  # inert: NumPy is not needed


# ---- sessions on a heap (subprocesses) -------------------------------------------------

MiB = 1 << 20

ON_THE_HEAP = """
import atexit

import numpy as np
from goheap import numpy_handler

KEPT = [np.ones(MiB)]  # made at collection: the session's heap is already installed


def test_arrays_land_on_the_heap(goheap_heap):
    made = {
        "zeros": np.zeros(10),
        "empty": np.empty((3, 4)),
        "arithmetic": np.arange(1000.0) * 2,
        "concatenate": np.concatenate([np.ones(5), np.ones(7)]),
        "copy": np.ones(100).copy(),
    }
    for how, a in made.items():
        assert numpy_handler.handler_name(a) == "goheap", how
        assert goheap_heap.lookup(a.ctypes.data) == (a.ctypes.data, goheap_heap.usable_size(a.ctypes.data)), how
    KEPT.append(np.ones(MiB))


# After pytest returned: the session's heap is closed, its handler gone, and
# the arrays made on it are still there to read, write and free.
atexit.register(lambda: print("after the session:", sum(float((a * 2).sum()) for a in KEPT)))
""".replace("MiB", str(MiB))


def run_on_heap(pytester, *args):
    pytester.makepyfile(ON_THE_HEAP)
    result = pytester.runpytest_subprocess(*args, timeout=120)
    result.assert_outcomes(passed=1)
    assert result.ret == 0
    result.stdout.fnmatch_lines([f"after the session: {4.0 * MiB}"])
    summary = summary_of(result)
    # Every mode keeps pytest's fd capture: the fault reporter writes to its
    # own copy of the real stderr (the crash tests below see its line).
    result.stdout.fnmatch_lines(["goheap: NumPy array data on a goheap heap (--goheap=*)"])
    return summary


def test_normal_session_puts_arrays_on_the_heap(pytester):
    mode, mallocs, frees, peak, efence = run_on_heap(pytester, "--goheap=normal")
    assert mode == "normal"
    assert mallocs >= 7  # the arrays above, at least
    assert frees <= mallocs - 2  # two 8 MiB arrays were still live at the summary
    assert peak >= 2 * 8 * MiB
    assert efence == 0


def test_efence_session_guards_every_array(pytester):
    mode, mallocs, _, peak, efence = run_on_heap(pytester, "--goheap=efence")
    assert mode == "efence"
    assert efence == mallocs >= 7
    assert peak >= 2 * 8 * MiB


def test_sampled_session_counts_its_efence_objects(pytester):
    # 1 in 1: every allocation sampled.  (sample:100 on NumPy's suite samples
    # about 1% of them: README "The pytest plugin", make numpy-suite.)
    mode, mallocs, _, _, efence = run_on_heap(pytester, "--goheap=sample:1")
    assert mode == "sample:1"
    assert efence == mallocs >= 7


def test_summary_goes_to_stderr_without_a_terminal(pytester):
    pytester.makepyfile(ON_THE_HEAP)
    result = pytester.runpytest_subprocess("--goheap=normal", "-p", "no:terminal", timeout=120)
    assert result.ret == 0
    assert [ln for ln in result.errlines if SUMMARY.match(ln)], result.stderr.str()


def test_xdist_workers_heaps_are_added_up(pytester):
    pytest.importorskip("xdist")
    pytester.makepyfile(ON_THE_HEAP)
    result = pytester.runpytest_subprocess("--goheap=sample:1", "-n", "2", timeout=120)
    result.assert_outcomes(passed=1)
    _, mallocs, _, peak, efence = summary_of(result)
    assert efence == mallocs >= 7  # the worker that ran the test, counted by the controller
    assert peak >= 2 * 8 * MiB
    result.stdout.fnmatch_lines(["goheap: --goheap=sample:1: * (in 2 xdist workers)"])


GIVE_BACK = """
import sys

sys.path.insert(0, {tests!r})
import numpy as np
from osview import heap_resident

from goheap.pytest_plugin import SCAVENGE_ABOVE


def test_a_big_array():
    a = np.ones(32 << 20)  # 256 MiB, touched, freed when the test returns
    assert a.sum() == 32 << 20


def test_its_pages_went_back(goheap_heap):
    st = goheap_heap.stats()
    assert st.heap_idle - st.heap_released <= SCAVENGE_ABOVE
    assert heap_resident(goheap_heap) < SCAVENGE_ABOVE + (16 << 20)  # mincore: not resident
"""


def test_freed_memory_goes_back_to_the_os_between_tests(pytester):
    # As with NumPy's allocator (glibc munmaps a large block at free): a later
    # test must not see less free memory because goheap kept a span resident.
    pytester.makepyfile(GIVE_BACK.format(tests=str(pathlib.Path(__file__).resolve().parent)))
    result = pytester.runpytest_subprocess("--goheap=normal", timeout=120)
    result.assert_outcomes(passed=2)


LONG_SUITE = """
from goheap.efence import mapping_count
from goheap.pytest_plugin import EFENCE_QUARANTINE
import numpy as np


def test_many_arrays(goheap_heap):
    before = mapping_count()
    for i in range(20000):
        a = np.zeros(16 + i % 64)  # made and freed: faulted, then recycled
    st = goheap_heap.stats()
    assert st.efence_deleted > 0
    assert st.efence_faulted <= EFENCE_QUARANTINE
    assert mapping_count() - before < 1000
"""


def test_efence_quarantine_keeps_a_long_session_bounded(pytester):
    # More freed arrays than the quarantine holds: the oldest are recycled, so
    # neither faulted bytes nor kernel mappings grow with the session.
    pytester.makepyfile(LONG_SUITE)
    result = pytester.runpytest_subprocess("--goheap=efence", timeout=300)
    result.assert_outcomes(passed=1)


def test_env_and_ini_choose_the_mode(pytester, monkeypatch):
    pytester.makeini("[pytest]\ngoheap = sample:7\n")
    assert run_on_heap(pytester)[0] == "sample:7"
    monkeypatch.setenv(ENV, "normal")
    assert run_on_heap(pytester)[0] == "normal"  # the environment wins over the ini file
    assert run_on_heap(pytester, "--goheap=efence")[0] == "efence"  # the command line over both


# ---- C code misbehaving in a test: a named fault, the test named -----------------------

C_BUG = """
import sys

sys.path.insert(0, {ext!r})
import numpy as np
from _gh_cext import ffi, lib


def test_fill_one_past():
    a = np.zeros(16)
    lib.fill_one_past(ffi.from_buffer("double[]", a), a.size)
    assert a.sum() == 16


def test_write_kept():
    a = np.zeros(16)
    p = ffi.from_buffer("double[]", a)
    lib.keep(p)
    del p, a
    lib.write_kept()
"""


@pytest.fixture(scope="module")
def ext(tmp_path_factory):
    import cext

    return cext.build(tmp_path_factory.mktemp("cext"))


@pytest.mark.parametrize(
    ("test", "kind"), [("test_fill_one_past", "overrun"), ("test_write_kept", "use-after-free")]
)
@pytest.mark.parametrize("mode", ["efence", "sample:1"])
def test_c_bug_dies_with_goheaps_line_and_the_tests_name(pytester, ext, test, kind, mode):
    path = pytester.makepyfile(C_BUG.format(ext=str(ext)))
    result = pytester.runpytest_subprocess(f"--goheap={mode}", f"{path}::{test}", timeout=120)
    assert result.ret in (-signal.SIGSEGV, -signal.SIGBUS), result.stderr.str()
    result.stderr.fnmatch_lines(
        [f"goheap: {kind}*", "Fatal Python error: *", f'  File "*{path.name}", line * in {test}']
    )


def test_c_bug_passes_silently_without_the_plugin(pytester, ext):
    pytester.makepyfile(C_BUG.format(ext=str(ext)))
    result = pytester.runpytest_subprocess(timeout=120)
    result.assert_outcomes(passed=2)  # the corruption goes unseen


# ---- NumPy's own tests -----------------------------------------------------------------


def load_numpy_suite():
    """benchmarks/numpy_suite.py (make numpy-suite), which is not a package."""
    path = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "numpy_suite.py"
    spec = importlib.util.spec_from_file_location("numpy_suite", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_numpy_subset_has_the_same_outcomes_under_sampled_efence():
    # A few hundred of NumPy's own tests (creation, resize, sort, file I/O,
    # pickling ...), each with the same outcome with and without the plugin:
    # goheap's handler breaks nothing, and efence objects raise no false alarm.
    # The whole modules: make numpy-suite (README "The pytest plugin").
    suite = load_numpy_suite()
    off = suite.run("off", list(suite.QUICK), suite.QUICK_K, [])
    sampled = suite.run("sample:10", list(suite.QUICK), suite.QUICK_K, [])
    assert off.count("passed") >= 300, off.tail
    assert sampled.returncode == off.returncode, sampled.tail
    assert suite.differences(off, sampled) == []


# ---- README "Catch a buffer overrun in a C extension" ----------------------------------

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def readme_example():
    """The section's test file and the output it shows."""
    text = README.read_text()
    section = text.split("### Catch a buffer overrun in a C extension", 1)[1].split("\n### ", 1)[0]
    source = re.search(r"^```py\n(.*?)^```", section, re.S | re.M)
    shown = re.search(r"^```text\n(.*?)^```", section, re.S | re.M)
    assert source and shown
    return source.group(1), shown.group(1).splitlines()


def masked(line):
    """A line with what changes from run to run (addresses, folders, times, and
    the span's page count, which follows the OS page) masked."""
    line = re.sub(r"0x[0-9a-f]+", "0x?", line)
    line = re.sub(r"\+\d+ pages?", "+? pages", line)
    line = re.sub(r'File "[^"]*/([^/"]+)"', r'File "\1"', line)
    return re.sub(r"in [0-9.]+s", "in ?s", line)


def test_readme_overrun_example_prints_what_the_readme_shows(pytester):
    pytest.importorskip("cffi")
    source, shown = readme_example()
    pytester.makepyfile(test_overrun=source)
    quiet = pytester.runpytest_subprocess("-q", "test_overrun.py", timeout=120)
    quiet.assert_outcomes(passed=1)  # silent corruption
    caught = pytester.runpytest_subprocess("-q", "--goheap=efence", "test_overrun.py", timeout=120)
    assert caught.ret == -signal.SIGSEGV
    out = {masked(ln) for ln in quiet.outlines + caught.outlines + caught.errlines}
    checked = [
        ln
        for ln in shown
        if ln.startswith(("goheap:", "Fatal Python error", "1 passed"))
        or ("test_overrun.py" in ln and ln.startswith("  File"))
    ]
    assert len(checked) == 4
    for ln in checked:
        assert masked(ln) in out, (ln, quiet.stdout.str(), caught.stderr.str())
