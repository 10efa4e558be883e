"""README.md's python code blocks run, in order, each in a fresh namespace: the docs cannot rot."""

from __future__ import annotations

import contextlib
import io
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), re.S | re.M)


def test_readme_has_the_tour():
    assert len(BLOCKS) >= 5  # usage, blocks, tracemalloc, efence, stats


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_block_runs(i):
    if "import pyarrow" in BLOCKS[i]:
        pytest.importorskip("pyarrow")  # an optional extra, as in tests/test_block.py
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(BLOCKS[i], f"README.md block {i}", "exec"), {"__name__": "__readme__"})


def test_readme_tracemalloc_names_the_readme_line():
    block = next(b for b in BLOCKS if "tracemalloc" in b)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block, "README.md", "exec"), {"__name__": "__readme__"})
    line = 1 + next(n for n, s in enumerate(block.splitlines()) if "h.ndarray" in s)
    assert out.getvalue().split() == [str(256 * 256 * 4), f"README.md:{line}"]
