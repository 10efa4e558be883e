"""Shared fixtures.  See tests/osview.py for the helpers that look at the real OS."""

from __future__ import annotations

import os
import sys

import pytest
from hypothesis import HealthCheck, settings

sys.path.insert(0, os.path.dirname(__file__))

settings.register_profile(
    "ci",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=False,
)
settings.register_profile("soak", parent=settings.get_profile("ci"), max_examples=2000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def sysmem():
    from goheap import mem

    return mem.SysMemory()


@pytest.fixture
def mprotect_faults():
    """efence faults with mprotect for this test, as on kernels before 6.13
    and on macOS, whatever this kernel has (the setting is process-wide)."""
    from goheap import _native

    was, _ = _native.guard_regions()
    _native.guard_regions(False)
    yield
    _native.guard_regions(was)


@pytest.fixture
def guard_markers():
    """efence faults with guard markers (MADV_GUARD_INSTALL) for this test;
    skipped where the kernel has none."""
    from goheap import _native

    was, kernel = _native.guard_regions()
    if not kernel:
        pytest.skip("no guard markers (MADV_GUARD_INSTALL, Linux 6.13+) here")
    _native.guard_regions(True)
    yield
    _native.guard_regions(was)


def pytest_report_header(config):
    from goheap import _native

    on, kernel = _native.guard_regions()
    how = "guard markers" if on else "mprotect" + (" (markers off)" if kernel else "")
    return f"goheap: OS page {_native.os_page_size()} bytes; efence faults with {how}"
