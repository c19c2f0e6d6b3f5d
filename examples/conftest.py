"""The examples run real containers: under the kernel tier's leak check (tests/kernel_fixtures.py)."""

from __future__ import annotations

from tests.kernel_fixtures import leak_check  # noqa: F401 -- autouse fixture
