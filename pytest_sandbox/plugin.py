"""The pytest layer: fixtures, marker, options, report sections (the only module importing pytest).

Fixtures give a :class:`~pytest_sandbox.sandbox.Sandbox` handle per scope, the way ``tmp_path``
has ``tmp_path_factory``: ``sandbox`` (function), ``sandbox_class``, ``sandbox_module``,
``sandbox_package`` and ``sandbox_session``.  Every container started through a handle is removed
when its scope ends.  ``@pytest.mark.sandbox(memory="64m", ...)`` sets default options for the
``sandbox`` fixture of that test.  When a test fails, the output of the containers it started is
added to the report.

Settings (:mod:`pytest_sandbox.config`) are resolved once, at configure time, from the options,
the ini file and the environment, and kept on ``config.stash``; a bad value is a
``pytest.UsageError`` (exit code 4).  The session's runtime is created from them at session start.

A pytest run that uses no sandbox should pay almost nothing for this plugin (``bench/
plugin_import.py``): at module level it imports only pytest, the hook specs and the settings;
the runtime, the sandbox and the cgroup code are imported by the hooks and fixtures that use them.
"""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator
from typing import TYPE_CHECKING, Any

import pytest

from . import hookspecs
from .config import SETTINGS, Setting, Settings
from .core.errors import SettingsError

if TYPE_CHECKING:
    from .container import Container
    from .runtime import Runtime
    from .sandbox import Sandbox

#: The session's settings, resolved at configure time.
SETTINGS_KEY = pytest.StashKey[Settings]()
#: The runtime this session uses, and whether this session opened it (and closes it at its end).
_RUNTIME: pytest.StashKey[tuple[Runtime, bool]] = pytest.StashKey()
_SANDBOXES: pytest.StashKey[list[Sandbox]] = pytest.StashKey()
_PACKAGE_SANDBOX: pytest.StashKey[Sandbox] = pytest.StashKey()


def _dest(setting: Setting) -> str:
    return "sandbox_" + setting.name


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("sandbox", "pytest_sandbox: isolated containers from the kernel")
    for s in SETTINGS:
        where = f"default: ${s.env}, else {s.default}; as daemon.json's {s.docker}"
        if s.option:
            group.addoption(
                s.option, dest=_dest(s), default=None, metavar="VALUE", help=f"{s.help} ({where})"
            )
        if s.ini and s.linelist:
            parser.addini(s.ini, f"{s.help}: {s.expected} ({where})", type="linelist", default=[])
        elif s.ini:
            parser.addini(s.ini, f"{s.help}: {s.expected} ({where})", type="string", default="")


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    pluginmanager.add_hookspecs(hookspecs)


def resolve_settings(config: pytest.Config) -> Settings:
    """The settings of this session: option > ini > environment > default (a UsageError if bad)."""
    try:
        return Settings.resolve(
            options={s.name: config.getoption(_dest(s)) for s in SETTINGS if s.option},
            ini={s.name: config.getini(s.ini) for s in SETTINGS if s.ini},
            env=os.environ,
        )
    except SettingsError as e:
        hint = f"\n  hint: {e.hint}" if e.hint else ""
        raise pytest.UsageError(
            f"pytest_sandbox: bad setting {e.source}: {e.message}\n  expected: {e.expected}{hint}"
        ) from None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "sandbox(**options): default options (memory=, cpus=, pids=, env=, ...) for the `sandbox` fixture",
    )
    config.stash[SETTINGS_KEY] = resolve_settings(config)


def _open_runtime(config: pytest.Config) -> tuple[Runtime, bool]:
    """The process's runtime, created from this session's settings if none is open.

    A session run inside another one (pytester's in-process ``runpytest``, which also moves
    $HOME, hence the default data root) finds the outer one's open and shares it, with its
    settings, and leaves it open at its end.  A runtime of its own would have the same owner tag
    (the process's), so the same state directory and cgroups: closing it would remove the outer
    session's.
    """
    from .runtime import open_runtime, runtime_if_open

    outer = runtime_if_open()
    if outer is not None:
        return outer, False
    return open_runtime(config.stash[SETTINGS_KEY]), True


def _runtime(config: pytest.Config) -> Runtime:
    runtime, _ = config.stash.get(_RUNTIME, (None, False))
    if runtime is None or runtime.closed or runtime.pid != os.getpid():  # closed by a test: a new one
        config.stash[_RUNTIME] = _open_runtime(config)
        runtime, _ = config.stash[_RUNTIME]
    return runtime


def pytest_sessionstart(session: pytest.Session) -> None:
    # Before collection: an Image.pull() at a test module's top level uses the session's data root
    # and registries.  Cheap: the runtime starts its launcher only when a container is asked for.
    _runtime(session.config)


def pytest_unconfigure(config: pytest.Config) -> None:
    _, opened = config.stash.get(_RUNTIME, (None, False))
    if opened:  # whichever runtime the process has now (a test may have replaced it)
        from .runtime import shutdown_runtime

        shutdown_runtime()


def pytest_report_header(config: pytest.Config) -> str:
    from .host.cgroups import detect

    settings = config.stash[SETTINGS_KEY]
    return f"sandbox: cgroup {detect(settings.cgroup_root).describe()}; data root {settings.data_root}"


def _new_sandbox(request: pytest.FixtureRequest, defaults: dict[str, Any] | None = None) -> Sandbox:
    from .sandbox import Sandbox

    hook = request.config.hook

    def started(container: Container) -> None:
        hook.pytest_sandbox_container_started(container=container, request=request)

    return Sandbox(defaults=defaults, on_start=started, runtime=_runtime(request.config))


def _handle(request: pytest.FixtureRequest, defaults: dict[str, Any] | None = None) -> Iterator[Sandbox]:
    sandbox = _new_sandbox(request, defaults)
    request.node.stash.setdefault(_SANDBOXES, []).append(sandbox)
    try:
        yield sandbox
    finally:
        sandbox.close()


class _InvalidSandboxMarker(pytest.Collector):
    """Stands in for a test whose ``sandbox`` marker is wrong: collecting it is an error naming that
    test, reported before any test runs, as a bad ``parametrize`` is (the session stops after
    collection unless ``--continue-on-collection-errors``; the module's other tests are kept)."""

    def __init__(self, *, message: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.message = message

    def collect(self) -> list[pytest.Item | pytest.Collector]:
        raise self.CollectError(self.message)


def _marker_problem(item: pytest.Item) -> str | None:
    """What is wrong with a ``sandbox`` marker of this test (the options run() would refuse), if anything."""
    markers = list(item.iter_markers("sandbox"))
    if not markers:
        return None
    from .core.errors import InvalidSpecError
    from .core.spec import check_defaults

    for marker in markers:
        given = [repr(a) for a in marker.args] + [f"{k}={v!r}" for k, v in marker.kwargs.items()]
        shown = f"@pytest.mark.sandbox({', '.join(given)})"
        if marker.args:
            return f"{shown}: takes keyword arguments only, e.g. memory='64m'"
        try:
            check_defaults(marker.kwargs)
        except InvalidSpecError as e:
            return f"{shown}: {e}"
    return None


def _checked(node: pytest.Item | pytest.Collector) -> pytest.Item | pytest.Collector:
    problem = _marker_problem(node) if isinstance(node, pytest.Item) else None
    if problem is None or node.parent is None:  # an item made by pytest_pycollect_makeitem has one
        return node
    return _InvalidSandboxMarker.from_parent(node.parent, name=node.name, message=f"{node.nodeid}: {problem}")


@pytest.hookimpl(wrapper=True)
def pytest_pycollect_makeitem(
    collector: pytest.Module | pytest.Class, name: str, obj: object
) -> Generator[None, Any, Any]:
    """A marker's options are checked when its test is collected, not at its first run()."""
    made = yield
    if isinstance(made, list):
        return [_checked(node) for node in made]
    return made if made is None else _checked(made)


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


@pytest.fixture(scope="module")
def sandbox_package(request: pytest.FixtureRequest) -> Sandbox:
    """A sandbox handle shared by a package's tests (a directory with ``__init__.py``; tests outside
    any package share one for the session), closed when the package's last test has run.

    Module-scoped, each module getting its package's handle: pytest caches a package-scoped fixture
    of a plugin for the whole session (``get_scope_package`` looks for the package defining it).
    """
    chain = request.node.listchain()
    node = next((n for n in reversed(chain) if isinstance(n, pytest.Package)), request.session)
    sandbox = node.stash.get(_PACKAGE_SANDBOX, None)
    if sandbox is None:
        sandbox = node.stash[_PACKAGE_SANDBOX] = _new_sandbox(request)
        node.addfinalizer(sandbox.close)  # the package's teardown (it is on the setup stack now)
    return sandbox


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
        from .core.terminal import output_text

        for sandbox in item.stash.get(_SANDBOXES, []):
            for container in sandbox.containers:
                report.sections.append(
                    (f"sandbox {container.name} {list(container.spec.process.argv)}", _log_tail(container))
                )
            for result in sandbox.results:
                report.sections.append(
                    (
                        f"sandbox run {list(result.argv)} -> exit {result.exit_code}",
                        output_text((result.stdout + result.stderr)[-4000:]),  # escaped: no raw ESC
                    )
                )
    return report


def _log_tail(container: Container) -> str:
    """The tail of a container's output for the report: bounded, escaped, and never an
    INTERNALERROR -- a report that cannot read it says so."""
    try:
        return container.log_tail(50)
    except Exception as e:
        return f"(cannot read its output: {type(e).__name__}: {e})"
