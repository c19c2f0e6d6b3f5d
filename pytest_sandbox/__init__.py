"""pytest_sandbox: real, daemonless, isolated containers for every pytest test.

    from pytest_sandbox import Image

    def test_isolated(sandbox):
        r = sandbox.run(["sh", "-c", "hostname; id -u"], hostname="box")
        assert r.stdout.split() == [b"box", b"0"]

Outside pytest, ``with Sandbox() as sb: sb.run([...])`` does the same.
"""

from .container import Container, Result
from .core.errors import (
    BuildError,
    CgroupUnavailableError,
    CommandNotExecutableError,
    CommandNotFoundError,
    ContainerNotRunningError,
    ContainerStateError,
    ImageNotFoundError,
    InvalidSignalError,
    InvalidSpecError,
    LauncherError,
    LayerError,
    LayerNotADirectoryError,
    LayerNotFoundError,
    LayerTarError,
    NetworkError,
    ReadinessError,
    SandboxError,
    SandboxTimeoutError,
    SetupError,
    UserNotFoundError,
)
from .core.limits import Limits
from .core.spec import BindMount
from .host.cgroups.base import CgroupStats
from .image import Image
from .net.networks import Network
from .sandbox import Sandbox

__all__ = [
    "BindMount",
    "BuildError",
    "CgroupStats",
    "CgroupUnavailableError",
    "CommandNotExecutableError",
    "CommandNotFoundError",
    "Container",
    "ContainerNotRunningError",
    "ContainerStateError",
    "Image",
    "ImageNotFoundError",
    "InvalidSignalError",
    "InvalidSpecError",
    "LauncherError",
    "LayerError",
    "LayerNotADirectoryError",
    "LayerNotFoundError",
    "LayerTarError",
    "Limits",
    "Network",
    "NetworkError",
    "ReadinessError",
    "Result",
    "Sandbox",
    "SandboxError",
    "SandboxTimeoutError",
    "SetupError",
    "UserNotFoundError",
]
