"""The pytest layer: fixtures, marker, options, report sections (the only module importing pytest).

Fixtures give a :class:`~pytest_sandbox.sandbox.Sandbox` handle per scope, the way ``tmp_path``
has ``tmp_path_factory``: ``sandbox`` (function), ``sandbox_class``, ``sandbox_module``,
``sandbox_package`` and ``sandbox_session``.  Every container started through a handle is removed
when its scope ends.  ``@pytest.mark.sandbox(memory="64m", ...)`` sets default options for the
``sandbox`` fixture of that test.  When a test fails, the output of the containers it started is
added to the report.
"""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator
from typing import Any

import pytest

from . import hookspecs
from .container import Container
from .core.errors import InvalidSpecError
from .host.cgroups import detect
from .net.ipam import parse_address_pools
from .runtime import (
    DEFAULT_UID_BASE,
    RuntimeConfig,
    configure,
    default_data_root,
    parse_uid_base,
    shutdown_runtime,
)
from .sandbox import Sandbox

_SANDBOXES = pytest.StashKey[list[Sandbox]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("sandbox", "pytest_sandbox: isolated containers from the kernel")
    group.addoption(
        "--sandbox-data-root",
        default=None,
        help="where images and the host base are stored (default: $PYTEST_SANDBOX_DATA_ROOT or "
        "~/.cache/pytest-sandbox), like daemon.json's data-root",
    )
    parser.addini("sandbox_data_root", "where images and the host base are stored", default="")
    parser.addini(
        "sandbox_state_dir", "where containers' writable layers and logs go (default /dev/shm)", default=""
    )
    parser.addini(
        "sandbox_uid_base",
        f"first host uid of the containers' id range (default {DEFAULT_UID_BASE})",
        default="",
    )
    parser.addini("sandbox_cgroup_root", "where the cgroup hierarchies are mounted", default="/sys/fs/cgroup")
    parser.addini(
        "sandbox_insecure_registries",
        "registries reached over plain http: host[:port] or CIDR, comma-separated (as daemon.json's "
        "insecure-registries; default $PYTEST_SANDBOX_INSECURE_REGISTRIES)",
        default="",
    )
    parser.addini(
        "sandbox_registry_mirrors",
        "registry mirrors tried first, comma-separated: MIRROR (of Docker Hub) or ORIGIN=MIRROR "
        "(default $PYTEST_SANDBOX_REGISTRY_MIRRORS)",
        default="",
    )
    parser.addini(
        "sandbox_address_pools",
        "subnets for sandbox.network(), as Docker's default-address-pools: 'base=10.243.0.0/16,size=24' "
        "(several separated by spaces or lines)",
        type="linelist",
        default=[],
    )


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    pluginmanager.add_hookspecs(hookspecs)


def _config_value(config: pytest.Config, option: str | None, ini: str) -> str:
    value = config.getoption(option) if option else None
    return str(value or config.getini(ini) or "")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "sandbox(**options): default options (memory=, cpus=, pids=, env=, ...) for the `sandbox` fixture",
    )
    data_root = _config_value(config, "sandbox_data_root", "sandbox_data_root")
    uid_base = _config_value(config, None, "sandbox_uid_base")
    kwargs: dict[str, Any] = {"cgroup_root": config.getini("sandbox_cgroup_root") or "/sys/fs/cgroup"}
    if data_root:
        kwargs["data_root"] = os.path.abspath(os.path.expanduser(data_root))
    state_dir = config.getini("sandbox_state_dir")
    if state_dir:
        kwargs["state_parent"] = os.path.abspath(os.path.expanduser(str(state_dir)))
    try:
        if uid_base:
            kwargs["uid_base"] = parse_uid_base(uid_base, what="sandbox_uid_base")
        pools = config.getini("sandbox_address_pools")
        if pools:
            kwargs["address_pools"] = parse_address_pools(pools, what="sandbox_address_pools")
        configure(RuntimeConfig(**kwargs))
        insecure = config.getini("sandbox_insecure_registries")
        mirrors = config.getini("sandbox_registry_mirrors")
        if insecure or mirrors:
            from .images import registry

            registry.configure(insecure=str(insecure), mirrors=str(mirrors))
    except InvalidSpecError as e:
        raise pytest.UsageError(str(e)) from None


def pytest_unconfigure(config: pytest.Config) -> None:
    shutdown_runtime()


def pytest_report_header(config: pytest.Config) -> str:
    backend = detect(config.getini("sandbox_cgroup_root") or "/sys/fs/cgroup")
    data_root = _config_value(config, "sandbox_data_root", "sandbox_data_root") or default_data_root()
    return f"sandbox: cgroup {backend.describe()}; data root {data_root}"


def _handle(request: pytest.FixtureRequest, defaults: dict[str, Any] | None = None) -> Iterator[Sandbox]:
    hook = request.config.hook

    def started(container: Container) -> None:
        hook.pytest_sandbox_container_started(container=container, request=request)

    sandbox = Sandbox(defaults=defaults, on_start=started)
    request.node.stash.setdefault(_SANDBOXES, []).append(sandbox)
    try:
        yield sandbox
    finally:
        sandbox.close()


@pytest.fixture
def sandbox(request: pytest.FixtureRequest) -> Iterator[Sandbox]:
    """A sandbox handle for this test; its containers are removed when the test ends."""
    defaults: dict[str, Any] = {}
    for marker in reversed(list(request.node.iter_markers("sandbox"))):
        if marker.args:
            raise pytest.UsageError("@pytest.mark.sandbox takes keyword arguments only, e.g. memory='64m'")
        defaults.update(marker.kwargs)
    yield from _handle(request, defaults)


@pytest.fixture(scope="class")
def sandbox_class(request: pytest.FixtureRequest) -> Iterator[Sandbox]:
    """A sandbox handle shared by a test class."""
    yield from _handle(request)


@pytest.fixture(scope="module")
def sandbox_module(request: pytest.FixtureRequest) -> Iterator[Sandbox]:
    """A sandbox handle shared by a module's tests."""
    yield from _handle(request)


@pytest.fixture(scope="package")
def sandbox_package(request: pytest.FixtureRequest) -> Iterator[Sandbox]:
    """A sandbox handle shared by a package's tests."""
    yield from _handle(request)


@pytest.fixture(scope="session")
def sandbox_session(request: pytest.FixtureRequest) -> Iterator[Sandbox]:
    """A sandbox handle for the whole session (per xdist worker)."""
    yield from _handle(request)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed and call.when == "call":
        for sandbox in item.stash.get(_SANDBOXES, []):
            for container in sandbox.containers:
                report.sections.append(
                    (f"sandbox {container.name} {list(container.spec.process.argv)}", container.log_tail(50))
                )
            for result in sandbox.results:
                report.sections.append(
                    (
                        f"sandbox run {list(result.argv)} -> exit {result.exit_code}",
                        (result.stdout + result.stderr).decode(errors="replace")[-4000:],
                    )
                )
    return report
