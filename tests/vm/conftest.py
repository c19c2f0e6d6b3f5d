"""The cgroup v2 tier (run in a pure-v2 VM by .ci/vm-tests): the kernel tier's fixtures and leak
check (tests/kernel_fixtures.py)."""

from __future__ import annotations

from tests.kernel_fixtures import busybox_image, busybox_layer, leak_check, spawn  # noqa: F401 -- fixtures
