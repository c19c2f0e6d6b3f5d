"""Settings: every knob pytest_sandbox has, in one frozen value resolved once (stdlib + core only).

Each setting comes from the first of: a command-line option, an ini key, an environment variable,
its default (the table :data:`SETTINGS`, and the README's "Configuration" section, list them with
the daemon.json key each corresponds to).  Who resolves them:

- the pytest plugin, at configure time, from its options, the ini file and the environment; the
  result is kept on ``config.stash`` and the session's runtime is created from it;
- the ``pytest-sandbox`` command, from its options (``--data-root``, ``--insecure-registry``,
  ``--registry-mirror``) and the environment;
- ``Sandbox()``, ``Image.load()``... outside pytest: :meth:`Settings.from_env`.

There is no module state here: a :class:`Settings` is a value handed to what needs it (the
runtime, the store, the registry client).  A value of the wrong form raises
:class:`~pytest_sandbox.core.errors.SettingsError` naming its source and the expected form.

Kept cheap to import (the plugin imports it at every pytest start): ``ipaddress`` and
``tempfile`` are imported by the functions that need them, on first use, and the small value
types are NamedTuples (a frozen dataclass costs ~0.8 ms to define, a NamedTuple ~0.1 ms).
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from .core.errors import InvalidSpecError, SettingsError
from .core.naming import ID_RANGE, OWNER_UID_BASE, OWNER_UID_COUNT, overlaps_owner_uids

if TYPE_CHECKING:
    import ipaddress

#: A raw value as a source gives it: a string, or lines (an ini ``linelist``, a repeated option).
Raw = str | Sequence[str] | None

DEFAULT_UID_BASE = 1_000_000_000
DEFAULT_CGROUP_ROOT = "/sys/fs/cgroup"
DEFAULT_POOL = "base=10.243.0.0/16,size=24"
DEFAULT_LOG_MAX_SIZE = 64 << 20
DEFAULT_LOG_MAX_FILE = 1  # Docker's json-file default: one file, started over when full
MIN_LOG_MAX_SIZE = 4 << 10
MAX_LOG_FILES = 100
DEFAULT_PIDS_LIMIT = 2048  # podman's default (containers.conf pids_limit)
DEFAULT_WRITABLE_SIZE = 1 << 30
DEFAULT_MAX_LAYER_SIZE = 4 << 30
DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
DOCKER_HUB_ALIASES = frozenset({DOCKER_HUB, "index.docker.io", DOCKER_HUB_API})
INSECURE_ENV = "PYTEST_SANDBOX_INSECURE_REGISTRIES"
MIRRORS_ENV = "PYTEST_SANDBOX_REGISTRY_MIRRORS"
INSECURE_HINT = (
    "list it as insecure: ini `sandbox_insecure_registries = {host}` or "
    "PYTEST_SANDBOX_INSECURE_REGISTRIES={host} (comma-separated, as daemon.json's insecure-registries)"
)

# Patterns, not compiled ones: ``re`` compiles (and caches) them on first use, not at every start.
_POOL = r"base=([0-9./]+),size=(\d+)"
_HOST = r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?"


# --------------------------------------------------------------------------------------------
# the table


class Setting(NamedTuple):
    """One row of the table: a :class:`Settings` field and where its value may come from."""

    name: str  #: the Settings field
    ini: str  #: ini key ("" when there is none)
    option: str  #: pytest command-line option ("" when there is none)
    env: str  #: environment variable
    default: str  #: the default, as the README and ``--help`` describe it
    docker: str  #: the daemon.json key it corresponds to
    expected: str  #: the form a value takes (error messages, help)
    help: str
    linelist: bool = False  #: an ini value of several lines


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "data_root",
        "sandbox_data_root",
        "--sandbox-data-root",
        "PYTEST_SANDBOX_DATA_ROOT",
        "$XDG_CACHE_HOME/pytest-sandbox, else ~/.cache/pytest-sandbox",
        "data-root",
        "a directory path",
        "where images (the store) and the host base are kept",
    ),
    Setting(
        "state_dir",
        "sandbox_state_dir",
        "--sandbox-state-dir",
        "PYTEST_SANDBOX_STATE_DIR",
        "/dev/shm when it is a writable tmpfs, else the temporary directory",
        "exec-root",
        "a directory path",
        "where containers' writable layers and logs go (psbx-<pid>-<start>/ below it)",
    ),
    Setting(
        "uid_base",
        "sandbox_uid_base",
        "--sandbox-uid-base",
        "PYTEST_SANDBOX_UID_BASE",
        str(DEFAULT_UID_BASE),
        "userns-remap (the subordinate id range)",
        f"a host uid from 1 to {(1 << 32) - 1 - ID_RANGE}",
        f"first host uid of the containers' id range ({ID_RANGE} ids: container uid 0 is this one)",
    ),
    Setting(
        "cgroup_root",
        "sandbox_cgroup_root",
        "--sandbox-cgroup-root",
        "PYTEST_SANDBOX_CGROUP_ROOT",
        DEFAULT_CGROUP_ROOT,
        "exec-opts native.cgroupdriver=cgroupfs / cgroup-parent",
        "a directory path",
        "where the cgroup hierarchies are mounted (containers' groups go under pytest-sandbox/ there)",
    ),
    Setting(
        "address_pools",
        "sandbox_address_pools",
        "--sandbox-address-pools",
        "PYTEST_SANDBOX_ADDRESS_POOLS",
        DEFAULT_POOL,
        "default-address-pools",
        "'base=A.B.C.D/N,size=M' (a private range), several separated by spaces or lines",
        "subnets for sandbox.network(), as Docker's default-address-pools",
        linelist=True,
    ),
    Setting(
        "insecure_registries",
        "sandbox_insecure_registries",
        "--sandbox-insecure-registries",
        INSECURE_ENV,
        "none (every registry is https with certificate checks)",
        "insecure-registries",
        "host[:port] or CIDR, comma-separated",
        "registries reached over plain http (https tried first, unverified, as Docker does)",
    ),
    Setting(
        "registry_mirrors",
        "sandbox_registry_mirrors",
        "--sandbox-registry-mirrors",
        MIRRORS_ENV,
        "none",
        "registry-mirrors",
        "MIRROR (of Docker Hub) or ORIGIN=MIRROR, comma-separated; a mirror is [http[s]://]host[:port]",
        "mirrors tried before the registry for reads, in order",
    ),
    Setting(
        "log_max_size",
        "sandbox_log_max_size",
        "--sandbox-log-max-size",
        "PYTEST_SANDBOX_LOG_MAX_SIZE",
        "64m",
        "log-opts.max-size",
        "a size from 4k: bytes, or a number with k, m or g, e.g. 64m (as Docker's max-size)",
        "size at which a container's log file (each of stdout, stderr) is rotated; logs() returns at most "
        "this much of each stream",
    ),
    Setting(
        "log_max_file",
        "sandbox_log_max_file",
        "--sandbox-log-max-file",
        "PYTEST_SANDBOX_LOG_MAX_FILE",
        str(DEFAULT_LOG_MAX_FILE),
        "log-opts.max-file",
        f"a number of files from 1 to {MAX_LOG_FILES}",
        "log files kept per stream, the current one included (1: the file starts over when full)",
    ),
    Setting(
        "pids_limit",
        "sandbox_pids_limit",
        "--sandbox-pids-limit",
        "PYTEST_SANDBOX_PIDS_LIMIT",
        str(DEFAULT_PIDS_LIMIT),
        "(none; podman's containers.conf pids_limit)",
        "an int of at least 2, or -1 for no limit",
        "the pids limit of a container that sets no pids= (where the pids controller exists)",
    ),
    Setting(
        "writable_size",
        "sandbox_writable_size",
        "--sandbox-writable-size",
        "PYTEST_SANDBOX_WRITABLE_SIZE",
        "1g",
        "storage-opts overlay2.size",
        "a size: bytes, or '512m', '2g'",
        "bound of a container's writable layer and of its /tmp when it sets neither writable_size= "
        "nor memory= (each is a tmpfs of that size, charged to the container's memory cgroup)",
    ),
    Setting(
        "max_layer_size",
        "sandbox_max_layer_size",
        "--sandbox-max-layer-size",
        "PYTEST_SANDBOX_MAX_LAYER_SIZE",
        "4g",
        "(none)",
        "a size: bytes, or '512m', '2g'",
        "largest layer commit() or a build run step may capture (the files' apparent sizes)",
    ),
    Setting(
        "seccomp",
        "sandbox_seccomp",
        "--sandbox-seccomp",
        "PYTEST_SANDBOX_SECCOMP",
        "default",
        "seccomp-profile",
        "'default', 'unconfined', or the path of a .json profile in Docker's format",
        "the seccomp filter of containers that give no seccomp= (default: Docker's default profile)",
    ),
    Setting(
        "trace_file",
        "",
        "",
        "PYTEST_SANDBOX_TRACE",
        "off",
        "(none: Docker has debug, not a timing trace)",
        "a file path",
        "append a timing trace of every container start to this file (bench/trace_report.py reads it); "
        "environment only, so that the launcher and the containers' processes see it too",
    ),
)

SETTINGS_BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}


# --------------------------------------------------------------------------------------------
# address pools (daemon.json's default-address-pools)


class AddressPool(NamedTuple):
    """A base range cut into subnets of ``size`` bits: Docker's ``base=10.243.0.0/16,size=24``."""

    base: ipaddress.IPv4Network
    size: int

    def subnets(self) -> Iterator[ipaddress.IPv4Network]:
        return self.base.subnets(new_prefix=self.size)

    def __str__(self) -> str:
        return f"base={self.base},size={self.size}"


def _lines(raw: Raw) -> list[str]:
    return [raw] if isinstance(raw, str) else [str(x) for x in raw or ()]


def parse_address_pools(raw: str | Iterable[str], *, what: str) -> tuple[AddressPool, ...]:
    """``"base=10.243.0.0/16,size=24"``, several separated by whitespace or newlines."""
    import ipaddress

    items = [x for entry in _lines(raw if isinstance(raw, str) else list(raw)) for x in entry.split()]
    pools = []
    for item in items:
        m = re.fullmatch(_POOL, item)
        if not m:
            raise InvalidSpecError(f"{what}: {item!r}: expected 'base=A.B.C.D/N,size=M', e.g. {DEFAULT_POOL}")
        try:
            base = ipaddress.IPv4Network(m.group(1))
        except ValueError as e:
            raise InvalidSpecError(f"{what}: {item!r}: {e}") from None
        size = int(m.group(2))
        if not base.prefixlen <= size <= 29:
            raise InvalidSpecError(
                f"{what}: {item!r}: size must be between the base's prefix ({base.prefixlen}) and 29 "
                "(a /29 holds 5 containers)"
            )
        if not base.is_private:
            raise InvalidSpecError(f"{what}: {item!r}: {base} is not a private range (RFC 1918 or similar)")
        pools.append(AddressPool(base, size))
    if not pools:
        raise InvalidSpecError(f"{what}: no pool given; e.g. {DEFAULT_POOL}")
    return tuple(pools)


def default_address_pools() -> tuple[AddressPool, ...]:
    return parse_address_pools(DEFAULT_POOL, what="default")


# --------------------------------------------------------------------------------------------
# registries (daemon.json's insecure-registries and registry-mirrors)


def split_list(raw: str) -> list[str]:
    return [item.strip() for item in raw.replace("\n", ",").split(",") if item.strip()]


def host_only(host: str) -> str:
    """``host[:port]`` -> ``host`` (brackets of an IPv6 literal removed)."""
    if host.startswith("["):
        return host[1 : host.index("]")]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def check_registry_host(host: str, what: str) -> str:
    if not re.fullmatch(_HOST, host):
        raise InvalidSpecError(
            f"{what}: {host!r} is not a registry host",
            hint="expected host[:port], e.g. registry.example.com or 127.0.0.1:5000",
        )
    return host


def canonical_registry(registry: str) -> str:
    return DOCKER_HUB if registry in DOCKER_HUB_ALIASES else registry


def mirror_host(entry: str, settings: RegistrySettings, what: str) -> str:
    """A mirror as daemon.json writes it (``https://host[:port]`` or bare) -> its host.

    ``http://`` is accepted only for a host in the insecure list (the scheme then follows it).
    """
    scheme, sep, rest = entry.partition("://")
    if not sep:
        scheme, rest = "", entry
    if scheme not in ("", "http", "https"):
        raise InvalidSpecError(f"{what}: {entry!r}: a mirror is http(s)://host[:port] or host[:port]")
    host = rest.rstrip("/")
    if "/" in host:
        raise InvalidSpecError(f"{what}: {entry!r}: a mirror URL has no path (host[:port] only)")
    check_registry_host(host, what)
    if scheme == "http" and not settings.is_insecure(host):
        raise InvalidSpecError(
            f"{what}: mirror http://{host} is plain http but {host} is not an insecure registry",
            hint=INSECURE_HINT.format(host=host),
        )
    return host


class RegistrySettings(NamedTuple):
    """Which registries are reached over plain http, and which mirrors are tried first."""

    insecure: tuple[str, ...] = ()
    #: (origin registry, mirror host) pairs, in the order they are tried.
    mirrors: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(
        cls, insecure: str = "", mirrors: str = "", *, source: str = "", mirrors_source: str = ""
    ) -> RegistrySettings:
        """Parse the comma-separated lists of the ini keys / options / environment variables.

        ``source`` names where ``insecure`` came from (and ``mirrors`` too, unless
        ``mirrors_source`` does) in error messages.
        """
        import ipaddress

        insecure_list: list[str] = []
        what = source or INSECURE_ENV
        for entry in split_list(insecure):
            if "/" in entry:
                try:
                    ipaddress.ip_network(entry, strict=False)
                except ValueError:
                    raise InvalidSpecError(
                        f"{what}: {entry!r} is neither host[:port] nor a CIDR range"
                    ) from None
                insecure_list.append(entry)
            else:
                insecure_list.append(check_registry_host(entry.removeprefix("http://"), what))
        insecure_only = cls(tuple(insecure_list))
        mirror_list: list[tuple[str, str]] = []
        what = mirrors_source or source or MIRRORS_ENV
        for entry in split_list(mirrors):
            origin, sep, mirror = entry.partition("=")
            if not sep:
                origin, mirror = DOCKER_HUB, entry
            origin = canonical_registry(check_registry_host(origin.strip(), what))
            mirror_list.append((origin, mirror_host(mirror.strip(), insecure_only, what)))
        return cls(insecure_only.insecure, tuple(mirror_list))

    @classmethod
    def from_env(cls) -> RegistrySettings:
        return Settings.from_env().registries

    def is_insecure(self, host: str) -> bool:
        import ipaddress

        name = host_only(host)
        try:
            ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(name)
        except ValueError:
            ip = None
        for entry in self.insecure:
            if "/" in entry:
                if ip is not None and ip in ipaddress.ip_network(entry, strict=False):
                    return True
            elif entry == host or (entry == host_only(entry) and entry == name):
                return True
        return False

    def mirrors_for(self, registry: str) -> list[str]:
        registry = canonical_registry(registry)
        return [mirror for origin, mirror in self.mirrors if origin == registry]


# --------------------------------------------------------------------------------------------
# the other values


def parse_uid_base(raw: str, *, what: str) -> int:
    """A host uid that can start the containers' id range; never 0 (container root = host root)."""
    top = (1 << 32) - 1 - ID_RANGE
    if not raw.strip().isdigit() or not 0 < int(raw) <= top:
        raise InvalidSpecError(f"{what}={raw!r}: expected a host uid from 1 to {top} (the range's first id)")
    if overlaps_owner_uids(int(raw)):
        raise InvalidSpecError(
            f"{what}={raw!r}: the range {raw}-{int(raw) + ID_RANGE - 1} overlaps the host uids that own "
            f"containers' user namespaces ({OWNER_UID_BASE}-{OWNER_UID_BASE + OWNER_UID_COUNT - 1}): "
            "choose a uid_base outside them"
        )
    return int(raw)


def parse_log_max_size(raw: str, *, what: str) -> int:
    """daemon.json's ``log-opts`` ``max-size``: ``"64m"``; at least 4 KiB."""
    from .core.units import parse_size  # its patterns compile on import: not at every pytest start

    size = parse_size(raw.strip(), what=what)
    if size < MIN_LOG_MAX_SIZE:
        raise InvalidSpecError(f"{what}={raw!r}: a log file must be allowed at least 4k")
    return size


def parse_log_max_file(raw: str, *, what: str) -> int:
    """daemon.json's ``log-opts`` ``max-file``: how many files a stream keeps, the current one included."""
    if not raw.strip().isdigit() or not 1 <= int(raw) <= MAX_LOG_FILES:
        raise InvalidSpecError(f"{what}={raw!r}: expected a number of files from 1 to {MAX_LOG_FILES}")
    return int(raw)


def parse_path(raw: str, *, what: str) -> str:
    path = raw.strip()
    if "\0" in path:
        raise InvalidSpecError(f"{what}={raw!r}: expected a path (it has a NUL byte)")
    return os.path.abspath(os.path.expanduser(path))


def default_data_root(env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    cache = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "pytest-sandbox")


def default_state_dir() -> str:
    """Where containers' writable layers and logs go: a tmpfs if there is one.

    On a tmpfs, creating and deleting a container's directories costs ~0.1 ms instead of ~1 ms on
    ext4, and what a container writes is charged to its memory cgroup (as its /tmp is) -- the
    behaviour BenchExec recommends for reproducible limits.  The setting ``state_dir`` moves it,
    e.g. to disk for tests that write gigabytes.
    """
    shm = "/dev/shm"
    try:
        if os.statvfs(shm).f_bfree > 0 and os.access(shm, os.W_OK) and _is_tmpfs(shm):
            return shm
    except OSError:
        pass
    import tempfile

    return tempfile.gettempdir()


def _is_tmpfs(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if fields[4] == path and fields[sep + 1] == "tmpfs":
                return True
    return False


# --------------------------------------------------------------------------------------------
# the settings


@dataclass(frozen=True)
class Settings:
    """Every setting of pytest_sandbox (see :data:`SETTINGS`); fields default to the defaults."""

    data_root: str = field(default_factory=default_data_root)
    state_dir: str = field(default_factory=default_state_dir)
    uid_base: int = DEFAULT_UID_BASE
    cgroup_root: str = DEFAULT_CGROUP_ROOT
    address_pools: tuple[AddressPool, ...] = field(default_factory=default_address_pools)
    insecure_registries: tuple[str, ...] = ()
    #: (origin registry, mirror host) pairs, in the order they are tried.
    registry_mirrors: tuple[tuple[str, str], ...] = ()
    trace_file: str | None = None
    log_max_size: int = DEFAULT_LOG_MAX_SIZE
    log_max_file: int = DEFAULT_LOG_MAX_FILE
    pids_limit: int | None = DEFAULT_PIDS_LIMIT  # None: no default pids limit (the setting's -1)
    writable_size: int = DEFAULT_WRITABLE_SIZE
    max_layer_size: int = DEFAULT_MAX_LAYER_SIZE
    seccomp: str = "default"  #: what ``seccomp=`` defaults to: "default", "unconfined" or a path

    @property
    def registries(self) -> RegistrySettings:
        return RegistrySettings(self.insecure_registries, self.registry_mirrors)

    @property
    def store_root(self) -> str:
        """The image store: ``<data root>/store``."""
        return os.path.join(self.data_root, "store")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """The environment's settings, else the defaults (what ``Sandbox()`` uses outside pytest)."""
        return cls.resolve(env=os.environ if env is None else env)

    @classmethod
    def resolve(
        cls,
        *,
        options: Mapping[str, Raw] | None = None,
        ini: Mapping[str, Raw] | None = None,
        env: Mapping[str, str] | None = None,
        option_names: Mapping[str, str] | None = None,
    ) -> Settings:
        """Each setting from the first source that gives it: option > ini > environment > default.

        ``options`` and ``ini`` are keyed by field name (``data_root``...); ``option_names`` says
        how the caller spells its options in messages (default: the pytest plugin's
        ``--sandbox-...``).  A value of the wrong form raises SettingsError naming its source.
        """
        env = os.environ if env is None else env
        chosen: dict[str, tuple[str, str]] = {}  # field -> (raw text, where it came from)
        for s in SETTINGS:
            candidates = (
                ((options or {}).get(s.name), (option_names or {}).get(s.name, s.option)),
                ((ini or {}).get(s.name), s.ini),
                (env.get(s.env), s.env),
            )
            for raw, source in candidates:
                text = "\n".join(_lines(raw)).strip()
                if text:
                    chosen[s.name] = (text, source)
                    break
        values: dict[str, Any] = {"data_root": default_data_root(env)}  # $XDG_CACHE_HOME of ``env``
        for name, parse in _PARSERS.items():
            if name in chosen:
                text, source = chosen[name]
                values[name] = _parsed(parse, text, source, name)
        if "insecure_registries" in chosen or "registry_mirrors" in chosen:
            values.update(_registries(chosen))
        return cls(**values)


def _core(module: str) -> Any:  # imported on first use: config is imported at every pytest start
    return importlib.import_module(f"{__package__}.core.{module}")


def _parsed(parse: Callable[[str, str], Any], text: str, source: str, name: str) -> Any:
    try:
        return parse(text, source)
    except InvalidSpecError as e:
        raise _settings_error(e, source, name) from None


def _settings_error(e: InvalidSpecError, source: str, name: str) -> SettingsError:
    return SettingsError(e.message, source=source, expected=SETTINGS_BY_NAME[name].expected, hint=e.hint)


def _registries(chosen: Mapping[str, tuple[str, str]]) -> dict[str, Any]:
    """Both lists together: an ``http://`` mirror must be in the insecure list."""
    insecure, insecure_source = chosen.get("insecure_registries", ("", INSECURE_ENV))
    mirrors, mirrors_source = chosen.get("registry_mirrors", ("", MIRRORS_ENV))
    try:
        parsed = RegistrySettings.parse(
            insecure, mirrors, source=insecure_source, mirrors_source=mirrors_source
        )
    except InvalidSpecError as e:
        in_mirrors = mirrors_source and e.message.startswith(mirrors_source)
        name = "registry_mirrors" if in_mirrors else "insecure_registries"
        raise _settings_error(e, chosen[name][1], name) from None
    return {"insecure_registries": parsed.insecure, "registry_mirrors": parsed.mirrors}


_PARSERS: dict[str, Callable[[str, str], Any]] = {
    "data_root": lambda raw, what: parse_path(raw, what=what),
    "state_dir": lambda raw, what: parse_path(raw, what=what),
    "uid_base": lambda raw, what: parse_uid_base(raw, what=what),
    "cgroup_root": lambda raw, what: parse_path(raw, what=what),
    "address_pools": lambda raw, what: parse_address_pools(raw, what=what),
    "trace_file": lambda raw, what: parse_path(raw, what=what),
    "log_max_size": lambda raw, what: parse_log_max_size(raw, what=what),
    "log_max_file": lambda raw, what: parse_log_max_file(raw, what=what),
    "pids_limit": lambda raw, what: _core("limits").parse_pids_setting(raw, what=what),
    "writable_size": lambda raw, what: _core("limits").parse_size_setting(raw, what=what),
    "max_layer_size": lambda raw, what: _core("limits").parse_size_setting(raw, what=what),
    "seccomp": lambda raw, what: _core("seccomp").parse_setting(raw, what=what),
}
