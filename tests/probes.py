"""Test probes: the internals of pytest_sandbox that tests legitimately look at, in one place.

Tests use the public API (``import pytest_sandbox``) to do things, and the modules they test
(``pytest_sandbox.core.units`` in test_units.py...) by their public names.  What the public API
hides on purpose -- the launcher's pid and log, the runtime's state directory and owner tag, the
hub network namespace, module-private helpers of the cgroup code -- tests reach only through this
module: when an internal moves or is renamed, this file is the one to fix, and the tests keep
their words.

Each probe says what it is for.  The runtime is this process's (one per process, per xdist worker),
the one every ``Sandbox()`` and fixture uses; the probes that ask for the launcher start it if it
is not running yet, the others never do.  Importing this module starts nothing (the unit tier
imports it for the cgroup helpers).

Code that runs in a child process (the snippets a crash or xdist test writes for a child pytest
session) cannot import ``tests``: it calls ``pytest_sandbox.runtime.get_runtime()`` itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import pytest

# Module-private helpers of the cgroup code that the pure tests pin down (tests/unit).
from pytest_sandbox.host.cgroups import _fs as cgroup_fs
from pytest_sandbox.host.cgroups._common import check_leaf, check_owner, requested

if TYPE_CHECKING:
    import ipaddress

    from filelock import FileLock

    from pytest_sandbox import Container
    from pytest_sandbox.images.store import Store
    from pytest_sandbox.launcher.client import LauncherClient
    from pytest_sandbox.launcher.protocol import Hello, R, Request
    from pytest_sandbox.net.forward import Forwarder
    from pytest_sandbox.net.netlink import Hub
    from pytest_sandbox.net.netthread import NetThread
    from pytest_sandbox.net.networks import Networks
    from pytest_sandbox.runtime import Runtime

__all__ = [
    "V1_CONTROLLERS",
    "after_netns_lookup",
    "bytes_read",
    "cgroup_backend_name",
    "cgroup_fs",
    "cgroup_root",
    "check_leaf",
    "check_owner",
    "closed_runtime",
    "container_netns_fd",
    "forwarder_closed",
    "forwarders",
    "hub",
    "launcher_client",
    "launcher_fd",
    "launcher_info",
    "launcher_log_path",
    "launcher_pid",
    "launcher_pid_if_started",
    "launcher_remove",
    "my_leases",
    "net_thread_id",
    "netlink",
    "networks",
    "new_runtime",
    "owner",
    "record_launcher_requests",
    "requested",
    "runtime",
    "spare_links",
    "state_dir",
    "store_lock",
    "uid_base",
    "upper_dir",
    "use_data_root",
]

V1_CONTROLLERS = cgroup_fs.V1_CONTROLLERS  # the controllers a v1 hierarchy's mount options may name


# -- the runtime: state directory, owner, settings ----------------------------------------------


def runtime() -> Runtime:
    """This process's runtime, for ``Sandbox(runtime=...)`` and the probes below (not started)."""
    from pytest_sandbox.runtime import get_runtime

    return get_runtime()


def state_dir() -> str:
    """Where this session's containers keep their upper layers and logs (may not exist yet)."""
    return runtime().state_dir


def upper_dir(container: Container, index: int = 0) -> str:
    """A container's upper directory (overlay ``index``), as the host reads it: through the
    launcher's fd of the container's writable tmpfs (host/rootfs.ContainerDirs)."""
    from pytest_sandbox.host.rootfs import ContainerDirs

    return ContainerDirs(container.dir).upper(index)


def owner() -> str:
    """This process's owner tag (``psbx-<pid>-<start>``): names its cgroup group, state, leases."""
    return runtime().owner


def uid_base() -> int:
    """The first host uid of the containers' id range, as configured."""
    return runtime().settings.uid_base


def cgroup_root() -> str:
    """The cgroup filesystem root this session uses."""
    return runtime().settings.cgroup_root


def new_runtime(**settings: Any) -> Runtime:
    """A second runtime with this one's settings but ``settings`` changed (cgroup_root=...); the
    caller closes it.  For tests of how a session behaves on another host layout."""
    from pytest_sandbox.runtime import Runtime

    return Runtime(dataclasses.replace(runtime().settings, **settings))


def closed_runtime() -> Runtime:
    """A runtime marked closed as after the session's end, without removing this session's state
    directory: objects used after teardown must refuse to make anything new."""
    from pytest_sandbox.runtime import Runtime

    rt = Runtime()
    rt.closed = True
    return rt


def use_data_root(monkeypatch: pytest.MonkeyPatch, root: str) -> None:
    """Make ``root`` the data root of the images the test loads, pulls and tags (the store)."""
    from pytest_sandbox.runtime import current_settings

    settings = dataclasses.replace(current_settings(), data_root=root)
    # Where Image.load/pull/tag read the session's settings.
    monkeypatch.setattr("pytest_sandbox.image.current_settings", lambda: settings)


# -- the launcher -------------------------------------------------------------------------------


def launcher_info() -> Hello:
    """What the launcher found at start (``idmap``, ``uid_base``, ``cgroup``); starts it."""
    return runtime().info()


def launcher_pid() -> int:
    """The launcher's pid, started if need be."""
    rt = runtime()
    rt.info()
    pid = rt.client.pid
    assert pid is not None
    return pid


def launcher_pid_if_started() -> int | None:
    """The launcher's pid if it runs, None if not (never starts it: the leak check's view)."""
    return runtime().client.pid


def launcher_fd() -> int:
    """The fd of this process's end of the launcher's socket (-1 if none): part of the session."""
    return runtime().client.fileno()


def launcher_log_path() -> str:
    """The launcher's log (its stderr), where it writes what went wrong on its side."""
    return runtime().client.log_path


def launcher_client() -> LauncherClient:
    """The client of this process's launcher, for the tests that drive the protocol directly."""
    return runtime().client


def launcher_remove(container_id: str) -> None:
    """Send the launcher a ``remove`` for ``container_id`` directly (bypassing any handle); wait for it."""
    launcher_client().remove(container_id).result(10)


def launcher_send_raw(frame: Callable[[int], bytes]) -> Future[None]:
    """Send the launcher the bytes ``frame(rid)`` as they are, as a request with id ``rid``: the
    future fails with the error the launcher replies, if it replies (for the tests of frames the
    launcher must refuse without dying).  Never checked or encoded by the client."""
    from pytest_sandbox.launcher.protocol import ShutdownRequest

    client = launcher_client()
    launcher_info()
    future: Future[None] = Future()
    with client._lock:
        rid, client._next_rid = client._next_rid, client._next_rid + 1
        client._pending[rid] = (ShutdownRequest(), future)  # a reply decodes as nothing
        sock = client._sock
    assert sock is not None
    with client._send_lock:
        sock.sendall(frame(rid))
    return future


def record_launcher_requests(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Start the launcher, then record the name of every operation sent to it during the test."""
    client = launcher_client()
    launcher_info()  # started now: its own files are part of any "before"
    sent: list[str] = []
    real_request = client.request

    def recording_request(request: Request[R], **kwargs: Any) -> Future[R]:
        sent.append(request.op.value)
        return real_request(request, **kwargs)

    monkeypatch.setattr(client, "request", recording_request)
    return sent


def cgroup_backend_name() -> str:
    """``v1``, ``v2`` or ``none``: the cgroup backend the launcher detected (starts it)."""
    return launcher_info().cgroup


# -- private networks ---------------------------------------------------------------------------


def networks() -> Networks:
    """This process's private networks (the hub namespace is made on first use)."""
    return runtime().networks


def hub() -> Hub:
    """The hub network namespace (``link_names()``, ``fd``, ``sysctls()``), made on first use."""
    return networks().hub


def spare_links() -> set[str]:
    """The hub's links of namespaces made ahead for a network's next start (not leaks)."""
    return networks().spare_links()


def my_leases() -> list[ipaddress.IPv4Network]:
    """The subnets this process holds leases on."""
    return networks().leases.mine()


def netlink() -> NetThread:
    """The psbx-net thread's handle: the one thread that enters namespaces and talks netlink."""
    return networks().net


def net_thread_id() -> int | None:
    """The kernel thread id of the psbx-net thread."""
    return netlink()._thread.native_id


# -- a container's networking, the store's lock -------------------------------------------------


def forwarders(container: Container) -> dict[int, Forwarder]:
    """A container's published ports: container port -> the forwarder relaying to it."""
    return container._forwarders


def container_netns_fd(container: Container) -> int | None:
    """The fd of the container's network namespace held by this process (None: loopback only)."""
    attached = container._attached
    return None if attached is None else attached.netns_fd


def forwarder_closed(forwarder: Forwarder) -> bool:
    """Whether the forwarder has let go of its listener and namespace reference."""
    return forwarder._closed


def after_netns_lookup(
    monkeypatch: pytest.MonkeyPatch, container: Container, then: Callable[[], None]
) -> None:
    """Run ``then`` right after the container's next namespace lookup (the first step of
    ``address()``), to open the window between that lookup and what follows."""
    real = container._netns

    def lookup_then() -> int:
        fd = real()
        then()
        return fd

    monkeypatch.setattr(container, "_netns", lookup_then)


def store_lock(store: Store) -> FileLock:
    """The store-wide write lock (held by remove() and prune() while they delete)."""
    return store._lock()


# -- this process -------------------------------------------------------------------------------


def bytes_read() -> int:
    """This process's read()/pread() bytes so far (``rchar``), whatever the page cache holds."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))
