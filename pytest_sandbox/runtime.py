"""Process-wide state: the launcher client, the host base, the networks, crash sweeps.

One :class:`Runtime` per process (per xdist worker), created from a
:class:`~pytest_sandbox.config.Settings`: by the pytest plugin at session start (its options, ini
and environment), else on first use from the environment; closed at the end of the session (or at
interpreter exit when used as a library).  Its state directory ``<state_dir>/psbx-<pid>-<start>``
holds the containers' upper layers and logs; at start it sweeps the state directories and cgroups
of *dead* owners (a previous run killed with SIGKILL), never those of a live one (another session
running now).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import threading
from typing import TYPE_CHECKING

from .config import Settings
from .core import naming
from .core.errors import NetworkError, RootRequiredError, SetupError

# Imported where they are used: the pytest plugin opens a runtime at every session start (before
# collection, so that an Image.pull() at a module's top level gets the session's settings), and
# a session that starts no container must not pay for the launcher client, the cgroup code or
# the networks (bench/plugin_import.py).
if TYPE_CHECKING:
    from .core.layerstack import LayerStack
    from .core.spec import OverlaySpec
    from .host.hostbase import HostLayout
    from .launcher.client import LauncherClient
    from .launcher.logs import LogLimits
    from .launcher.protocol import Hello
    from .net.networks import Networks


def require_root() -> None:
    """A RootRequiredError (a SetupError) unless we are root (checked before anything is made)."""
    if os.geteuid() != 0:
        raise RootRequiredError(
            f"pytest_sandbox needs root to create containers (running as uid {os.geteuid()})",
            call="geteuid",
            hint="run pytest as root (CI runners, a container or VM where you are root); rootless mode "
            "(a single-uid map and delegated cgroups) is not supported yet",
        )


class Runtime:
    """The launcher, the host base, the networks and the state directory of one process."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings.from_env()
        self.pid = os.getpid()
        self.owner = naming.owner_tag()
        # Canonical: files in it are bind sources (a networked container's /etc/hosts), and a bind
        # source may hold no symlink (core/spec, host/bindsource).
        self.state_dir = os.path.join(os.path.realpath(self.settings.state_dir), self.owner)
        self._lock = threading.Lock()
        self._client: LauncherClient | None = None
        self._skeleton: tuple[str, HostLayout] | None = None
        self._swept = False
        self._networks: Networks | None = None
        self.closed = False

    @property
    def client(self) -> LauncherClient:
        """The launcher client (made on first use; the launcher itself starts on the first request)."""
        with self._lock:
            if self._client is None:
                from .launcher import trace
                from .launcher.client import LauncherClient

                if self.settings.trace_file:
                    trace.enable(self.settings.trace_file)
                self._client = LauncherClient(
                    state_dir=self.state_dir,
                    owner=self.owner,
                    uid_base=self.settings.uid_base,
                    cgroup_root=self.settings.cgroup_root,
                    log_limits=self.log_limits,
                )
            return self._client

    @property
    def log_limits(self) -> LogLimits:
        """How large containers' log files grow, and how many each stream keeps (``log-opts``)."""
        from .launcher.logs import LogLimits

        return LogLimits(self.settings.log_max_size, self.settings.log_max_file)

    def info(self) -> Hello:
        """Start the launcher if needed; what it found (idmap support, cgroup backend)."""
        require_root()
        self._sweep_once()
        return self.client.hello()

    def overlays(self, stack: LayerStack) -> tuple[OverlaySpec, ...]:
        from .host.overlays import plan_overlays

        if not stack.host:
            return plan_overlays(stack, None)
        from .host.hostbase import ensure_skeleton

        with self._lock:
            if self._skeleton is None:
                self._skeleton = ensure_skeleton(self.settings.data_root)
        return plan_overlays(stack, self._skeleton)

    @property
    def networks(self) -> Networks:
        """This process's private networks (the hub namespace is made on first use)."""
        from .net.networks import Networks

        with self._lock:
            if self._networks is None:
                if self.closed:  # made now, they would never be closed: a thread, a hub, a lease
                    raise NetworkError("this runtime is closed (the session has ended)")
                self._networks = Networks(self.settings.address_pools, owner=self.owner)
            return self._networks

    def container_dir(self, container_id: str) -> str:
        return os.path.join(self.state_dir, naming.container_dir_name(container_id))

    def _sweep_once(self) -> None:
        from .host.cgroups import detect

        with self._lock:
            if self._swept:
                return
            self._swept = True
        with contextlib.suppress(OSError):
            sweep_state_dirs(self.settings.state_dir)
        # cgroup groups of dead owners (the launcher of a SIGKILLed run may have died too); a
        # failure here (a task stuck in D state) must not stop this session: the next one retries.
        with contextlib.suppress(OSError):
            detect(self.settings.cgroup_root).sweep()

    def close(self) -> None:
        """Stop the launcher (which removes every container, cgroup and state directory)."""
        self.closed = True
        with self._lock:
            client = self._client
        if client is not None:
            client.close()
        if self._networks is not None:
            self._networks.close()
        if not os.path.lexists(self.state_dir):  # nothing was started: nothing to import for it
            return
        from .host.cleanup import remove_tree

        with contextlib.suppress(OSError):
            remove_tree(self.state_dir)


def sweep_state_dirs(parent: str) -> list[str]:
    """Remove ``psbx-<pid>-<start>`` state directories whose owner process is gone."""
    from .host.cleanup import remove_tree

    removed: list[str] = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        if naming.parse_owner_tag(name) and not naming.owner_alive(name):
            path = os.path.join(parent, name)
            try:
                remove_tree(path)
            except OSError:
                continue  # not ours to fix now; the next session tries again
            removed.append(path)
    return removed


_runtime: Runtime | None = None
_runtime_lock = threading.Lock()


def _live(rt: Runtime | None) -> Runtime | None:
    """``rt`` if it is this process's and open (a fork, or a closed session, gets a new one)."""
    return rt if rt is not None and rt.pid == os.getpid() and not rt.closed else None


def open_runtime(settings: Settings) -> Runtime:
    """This process's runtime, created from ``settings`` (the pytest plugin opens it at session start).

    The open runtime if it has these settings; if it has others, a SetupError: its launcher,
    state directory and networks were made with them.
    """
    global _runtime
    with _runtime_lock:
        rt = _live(_runtime)
        if rt is None:
            rt = _runtime = Runtime(settings)
        elif rt.settings != settings:
            raise SetupError(
                "a sandbox runtime with other settings is already open in this process",
                hint="one process runs one session's settings; run the other session in a subprocess "
                "(pytester's runpytest_subprocess)",
            )
        return rt


def runtime_if_open() -> Runtime | None:
    """This process's open runtime, if there is one (creates nothing)."""
    with _runtime_lock:
        return _live(_runtime)


def get_runtime() -> Runtime:
    """This process's runtime: the open one, else one created from :meth:`Settings.from_env`."""
    global _runtime
    with _runtime_lock:
        rt = _live(_runtime)
        if rt is None:
            rt = _runtime = Runtime(Settings.from_env())
        return rt


def current_settings() -> Settings:
    """The settings in effect: the open runtime's (in a pytest session: its options, ini, env),
    else the environment's.  Creates nothing."""
    rt = runtime_if_open()
    return rt.settings if rt is not None else Settings.from_env()


def shutdown_runtime() -> None:
    global _runtime
    with _runtime_lock:
        rt, _runtime = _runtime, None
    if rt is not None and rt.pid == os.getpid():
        rt.close()


atexit.register(shutdown_runtime)
