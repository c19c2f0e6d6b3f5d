"""Project-wide test setup, for every tier: strict skips in CI, and the markers.

With ``PYTEST_SANDBOX_STRICT=1`` (set by .ci/run and .ci/vm-tests), a skipped test is reported as
a failure: in CI every test of the tier being run must run (as root, every kernel-level test; as
an unprivileged user, every unit test).  This file needs nothing but pytest: the leak check and the
busybox fixtures belong to the kernel tiers (tests/kernel_fixtures.py, imported by the conftest.py
of tests/kernel, tests/vm and examples), never to tests/unit.
"""

from __future__ import annotations

import os
from collections.abc import Generator

import pytest

STRICT = os.environ.get("PYTEST_SANDBOX_STRICT") == "1"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "no_leak_check: skip the per-test leak check (the test checks itself)")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if STRICT and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.longrepr = f"skipped in strict mode (PYTEST_SANDBOX_STRICT=1): {reason}"
    return report
