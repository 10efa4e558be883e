"""A small C extension that misbehaves on purpose, compiled with cffi in API mode.

The tests of NumPy buffers under efence (test_numpy_overrun.py, test_pytest_plugin.py)
need C code that touches memory Python cannot: an off-by-one loop writing one
element past an array, and a pointer kept after its array was freed.  ``build``
compiles it once per test session into a folder that child processes put on
sys.path (``import _gh_cext``).
"""

from __future__ import annotations

import pathlib

NAME = "_gh_cext"

CDEF = """
void fill(double *a, size_t n);
void fill_one_past(double *a, size_t n);
void keep(double *a);
void write_kept(void);
"""

SOURCE = r"""
#include <stddef.h>

/* a[0..n) = 1.0: the correct loop. */
void fill(double *a, size_t n)
{
    for (size_t i = 0; i < n; i++)
        a[i] = 1.0;
}

/* The off-by-one bug: i <= n also writes a[n], one element past the end. */
void fill_one_past(double *a, size_t n)
{
    for (size_t i = 0; i <= n; i++)
        a[i] = 1.0;
}

/* A pointer C keeps after Python let go of its array (a dangling cache). */
static double *kept;

void keep(double *a)
{
    kept = a;
}

void write_kept(void)
{
    if (kept != NULL)
        kept[1] = 1.0;
}
"""


def build(folder: pathlib.Path) -> pathlib.Path:
    """Compile the extension into ``folder`` (made if missing); returns it."""
    import cffi

    folder.mkdir(parents=True, exist_ok=True)
    ffibuilder = cffi.FFI()
    ffibuilder.cdef(CDEF)
    ffibuilder.set_source(NAME, SOURCE, extra_compile_args=["-O1"])
    ffibuilder.compile(tmpdir=str(folder), verbose=False)
    return folder
