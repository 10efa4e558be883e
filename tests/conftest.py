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


def pytest_report_header(config):
    from goheap import _native

    return f"goheap: OS page {_native.os_page_size()} bytes"
