"""Hooks pytest_sandbox calls; implement them in a conftest.py or a plugin."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from .container import Container


def pytest_sandbox_container_started(container: Container, request: pytest.FixtureRequest) -> None:
    """Called after a container started through a fixture handle is running.

    ``request`` is the fixture request of the handle's fixture (``sandbox``, ``sandbox_session``...).
    Use it to log, to register extra checks, or to attach the container to your own reporting.
    """
