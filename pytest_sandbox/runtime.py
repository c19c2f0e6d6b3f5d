"""Process-wide state: configuration, the launcher client, the host base, crash sweeps.

One :class:`Runtime` per process (per xdist worker), created on first use and closed at the end of
the pytest session (or at interpreter exit when used as a library).  Its state directory
``/dev/shm/psbx-<pid>-<starttime>`` (see :func:`default_state_parent`) holds the containers'
upper layers and logs; at start it sweeps the state directories and cgroups of *dead* owners (a
previous run killed with SIGKILL), never those of a live one (another session running now).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import tempfile
import threading
from dataclasses import dataclass, field

from .core import naming
from .core.errors import InvalidSpecError, NetworkError, SetupError
from .core.layerstack import LayerStack
from .core.naming import ID_RANGE
from .core.spec import OverlaySpec
from .host.cgroups import detect
from .host.cleanup import remove_tree
from .host.hostbase import HostLayout, ensure_skeleton
from .host.overlays import plan_overlays
from .launcher import trace
from .launcher.client import LauncherClient
from .launcher.protocol import Hello
from .net.ipam import DEFAULT_POOLS, AddressPool, parse_address_pools
from .net.networks import Networks

DEFAULT_UID_BASE = 1_000_000_000


def require_root() -> None:
    """Raise a SetupError that says so unless we are root (checked before anything is made)."""
    if os.geteuid() != 0:
        raise SetupError(
            f"pytest_sandbox needs root to create containers (running as uid {os.geteuid()})",
            call="geteuid",
            hint="run pytest as root (CI runners, a container or VM where you are root); rootless mode "
            "(a single-uid map and delegated cgroups) is not supported yet",
        )


def default_data_root() -> str:
    env = os.environ.get("PYTEST_SANDBOX_DATA_ROOT")
    if env:
        return os.path.abspath(env)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "pytest-sandbox")


def parse_uid_base(raw: str, *, what: str) -> int:
    """A host uid that can start the containers' id range; never 0 (container root = host root)."""
    top = (1 << 32) - 1 - ID_RANGE
    if not raw.strip().isdigit() or not 0 < int(raw) <= top:
        raise InvalidSpecError(f"{what}={raw!r}: expected a host uid from 1 to {top} (the range's first id)")
    return int(raw)


def default_uid_base() -> int:
    """First host uid of the containers' id range: ``$PYTEST_SANDBOX_UID_BASE`` or 10**9."""
    raw = os.environ.get("PYTEST_SANDBOX_UID_BASE", "")
    return parse_uid_base(raw, what="PYTEST_SANDBOX_UID_BASE") if raw else DEFAULT_UID_BASE


def default_state_parent() -> str:
    """Where containers' writable layers and logs go: a tmpfs if there is one.

    On a tmpfs, creating and deleting a container's directories costs ~0.1 ms instead of ~1 ms on
    ext4, and what a container writes is charged to its memory cgroup (as its /tmp is) -- the
    behaviour BenchExec recommends for reproducible limits.  ``$PYTEST_SANDBOX_STATE_DIR`` (ini
    ``sandbox_state_dir``) moves it, e.g. to disk for tests that write gigabytes.
    """
    env = os.environ.get("PYTEST_SANDBOX_STATE_DIR")
    if env:
        return os.path.abspath(env)
    shm = "/dev/shm"
    try:
        if os.statvfs(shm).f_bfree > 0 and os.access(shm, os.W_OK) and _is_tmpfs(shm):
            return shm
    except OSError:
        pass
    return tempfile.gettempdir()


def _is_tmpfs(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if fields[4] == path and fields[sep + 1] == "tmpfs":
                return True
    return False


def default_address_pools() -> tuple[AddressPool, ...]:
    """Subnets for ``sandbox.network()``: ``$PYTEST_SANDBOX_ADDRESS_POOLS`` or 10.243.0.0/16 in /24s."""
    raw = os.environ.get("PYTEST_SANDBOX_ADDRESS_POOLS", "")
    return parse_address_pools(raw, what="PYTEST_SANDBOX_ADDRESS_POOLS") if raw.strip() else DEFAULT_POOLS


@dataclass(frozen=True)
class RuntimeConfig:
    data_root: str = field(default_factory=default_data_root)
    state_parent: str = field(default_factory=default_state_parent)
    uid_base: int = field(default_factory=default_uid_base)
    cgroup_root: str = "/sys/fs/cgroup"
    address_pools: tuple[AddressPool, ...] = field(default_factory=default_address_pools)


class Runtime:
    def __init__(self, config: RuntimeConfig | None = None) -> None:
        self.config = config or RuntimeConfig()
        self.pid = os.getpid()
        self.owner = naming.owner_tag()
        self.state_dir = os.path.join(self.config.state_parent, self.owner)
        self.client = LauncherClient(
            state_dir=self.state_dir,
            owner=self.owner,
            uid_base=self.config.uid_base,
            cgroup_root=self.config.cgroup_root,
        )
        self._lock = threading.Lock()
        self._skeleton: tuple[str, HostLayout] | None = None
        self._swept = False
        self._networks: Networks | None = None
        self.closed = False
        trace.enable()  # only if $PYTEST_SANDBOX_TRACE names a file

    def info(self) -> Hello:
        """Start the launcher if needed; what it found (idmap support, cgroup backend)."""
        require_root()
        self._sweep_once()
        return self.client.hello()

    def overlays(self, stack: LayerStack) -> tuple[OverlaySpec, ...]:
        if not stack.host:
            return plan_overlays(stack, None)
        with self._lock:
            if self._skeleton is None:
                self._skeleton = ensure_skeleton(self.config.data_root)
        return plan_overlays(stack, self._skeleton)

    @property
    def networks(self) -> Networks:
        """This process's private networks (the hub namespace is made on first use)."""
        with self._lock:
            if self._networks is None:
                if self.closed:  # made now, they would never be closed: a thread, a hub, a lease
                    raise NetworkError("this runtime is closed (the session has ended)")
                self._networks = Networks(self.config.address_pools, owner=self.owner)
            return self._networks

    def container_dir(self, container_id: str) -> str:
        return os.path.join(self.state_dir, naming.container_dir_name(container_id))

    def _sweep_once(self) -> None:
        with self._lock:
            if self._swept:
                return
            self._swept = True
        with contextlib.suppress(OSError):
            sweep_state_dirs(self.config.state_parent)
        # cgroup groups of dead owners (the launcher of a SIGKILLed run may have died too); a
        # failure here (a task stuck in D state) must not stop this session: the next one retries.
        with contextlib.suppress(OSError):
            detect(self.config.cgroup_root).sweep()

    def close(self) -> None:
        """Stop the launcher (which removes every container, cgroup and state directory)."""
        self.closed = True
        self.client.close()
        if self._networks is not None:
            self._networks.close()
        with contextlib.suppress(OSError):
            remove_tree(self.state_dir)


def sweep_state_dirs(parent: str) -> list[str]:
    """Remove ``psbx-<pid>-<start>`` state directories whose owner process is gone."""
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
_config: RuntimeConfig | None = None


def configure(config: RuntimeConfig) -> None:
    """Set the configuration the next runtime is created with (the pytest plugin calls this)."""
    global _config
    _config = config


def current_config() -> RuntimeConfig:
    """The configuration in effect: what :func:`configure` set, else the runtime's, else defaults."""
    with _runtime_lock:
        if _config is not None:
            return _config
        if _runtime is not None and not _runtime.closed and _runtime.pid == os.getpid():
            return _runtime.config
    return RuntimeConfig()


def get_runtime() -> Runtime:
    """This process's runtime, created on first use (a fork gets its own)."""
    global _runtime
    with _runtime_lock:
        if _runtime is None or _runtime.pid != os.getpid() or _runtime.closed:
            _runtime = Runtime(_config)
        return _runtime


def shutdown_runtime() -> None:
    global _runtime
    with _runtime_lock:
        rt, _runtime = _runtime, None
    if rt is not None and rt.pid == os.getpid():
        rt.close()


atexit.register(shutdown_runtime)
