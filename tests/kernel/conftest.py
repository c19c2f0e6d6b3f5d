"""The kernel tier: real namespaces, overlays and cgroups, as root.  Every test runs under the leak
check; the busybox layer and image and ``spawn`` are its shared fixtures (tests/kernel_fixtures.py)."""

from __future__ import annotations

from tests.kernel_fixtures import busybox_image, busybox_layer, leak_check, spawn  # noqa: F401 -- fixtures
