"""pytest_sandbox: real, daemonless, isolated containers for every pytest test.

    from pytest_sandbox import Image

    def test_isolated(sandbox):
        r = sandbox.run(["sh", "-c", "hostname; id -u"], hostname="box")
        assert r.stdout.split() == [b"box", b"0"]

Outside pytest, ``with Sandbox() as sb: sb.run([...])`` does the same.
"""

from .cgroups.base import CgroupStats
from .container import Container, Result
from .errors import (
    CgroupUnavailableError,
    CommandNotExecutableError,
    CommandNotFoundError,
    ContainerNotRunningError,
    ContainerStateError,
    InvalidSignalError,
    InvalidSpecError,
    LauncherError,
    LayerError,
    LayerNotADirectoryError,
    LayerNotFoundError,
    ReadinessError,
    SandboxError,
    SandboxTimeoutError,
    SetupError,
    UserNotFoundError,
)
from .image import Image
from .limits import Limits
from .sandbox import Sandbox
from .spec import BindMount

__all__ = [
    "BindMount",
    "CgroupStats",
    "CgroupUnavailableError",
    "CommandNotExecutableError",
    "CommandNotFoundError",
    "Container",
    "ContainerNotRunningError",
    "ContainerStateError",
    "Image",
    "InvalidSignalError",
    "InvalidSpecError",
    "LauncherError",
    "LayerError",
    "LayerNotADirectoryError",
    "LayerNotFoundError",
    "Limits",
    "ReadinessError",
    "Result",
    "Sandbox",
    "SandboxError",
    "SandboxTimeoutError",
    "SetupError",
    "UserNotFoundError",
]
