"""Which Python functions of the goheap package run: the proof that a path stays in C.

A frame counts when its code lives in the installed package's folder.  Matching
"goheap" anywhere in the file name would also count the tests themselves (a
list comprehension in a test) whenever the checkout's path says goheap, as
CI's clone does.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import goheap

PACKAGE_DIR = os.path.dirname(os.path.abspath(goheap.__file__)) + os.sep


@contextmanager
def goheap_python_calls() -> Iterator[list[str]]:
    """Yields the list the names of goheap's Python functions called inside
    the block are appended to."""
    called: list[str] = []

    def prof(frame, event, arg):
        if event == "call" and frame.f_code.co_filename.startswith(PACKAGE_DIR):
            called.append(frame.f_code.co_name)

    sys.setprofile(prof)
    try:
        yield called
    finally:
        sys.setprofile(None)
