"""pytest_sandbox: real, daemonless, isolated containers for every pytest test.

    from pytest_sandbox import Image

    def test_isolated(sandbox):
        r = sandbox.run(["sh", "-c", "hostname; id -u"], hostname="box")
        assert r.stdout.split() == [b"box", b"0"]

Outside pytest, ``with Sandbox() as sb: sb.run([...])`` does the same.

Importing this package is cheap (PEP 562): a public name's module is imported the first time the
name is used, so that the pytest plugin (loaded by every pytest run) and the launcher (started
from this package with ``python -I -S``) pull in nothing they do not need.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what mypy and IDEs see: the same names, imported eagerly
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
        LayerTooLargeError,
        NetworkError,
        ReadinessError,
        RegistryError,
        RootRequiredError,
        SandboxError,
        SandboxTimeoutError,
        SeccompUnavailableError,
        SetupError,
        UserNotFoundError,
    )
    from .core.limits import Limits
    from .core.spec import BindMount
    from .host.cgroups.base import CgroupStats
    from .image import Image
    from .net.networks import Network
    from .sandbox import Sandbox

#: public name -> the module that defines it (relative to this package)
_MODULES: dict[str, str] = {
    "BindMount": ".core.spec",
    "BuildError": ".core.errors",
    "CgroupStats": ".host.cgroups.base",
    "CgroupUnavailableError": ".core.errors",
    "CommandNotExecutableError": ".core.errors",
    "CommandNotFoundError": ".core.errors",
    "Container": ".container",
    "ContainerNotRunningError": ".core.errors",
    "ContainerStateError": ".core.errors",
    "Image": ".image",
    "ImageNotFoundError": ".core.errors",
    "InvalidSignalError": ".core.errors",
    "InvalidSpecError": ".core.errors",
    "LauncherError": ".core.errors",
    "LayerError": ".core.errors",
    "LayerNotADirectoryError": ".core.errors",
    "LayerNotFoundError": ".core.errors",
    "LayerTarError": ".core.errors",
    "LayerTooLargeError": ".core.errors",
    "Limits": ".core.limits",
    "Network": ".net.networks",
    "NetworkError": ".core.errors",
    "ReadinessError": ".core.errors",
    "RegistryError": ".core.errors",
    "Result": ".container",
    "RootRequiredError": ".core.errors",
    "Sandbox": ".sandbox",
    "SandboxError": ".core.errors",
    "SandboxTimeoutError": ".core.errors",
    "SeccompUnavailableError": ".core.errors",
    "SetupError": ".core.errors",
    "UserNotFoundError": ".core.errors",
}

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
    "LayerTooLargeError",
    "Limits",
    "Network",
    "NetworkError",
    "ReadinessError",
    "RegistryError",
    "Result",
    "RootRequiredError",
    "Sandbox",
    "SandboxError",
    "SandboxTimeoutError",
    "SeccompUnavailableError",
    "SetupError",
    "UserNotFoundError",
]


def __getattr__(name: str) -> Any:
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # the next lookup is a plain module attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
