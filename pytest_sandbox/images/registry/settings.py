"""Registry settings: which registries are insecure (plain http), which mirrors are tried first.

As daemon.json's ``insecure-registries`` and ``registry-mirrors``:

- Insecure registries -- ini ``sandbox_insecure_registries`` or ``$PYTEST_SANDBOX_INSECURE_REGISTRIES``,
  comma-separated ``host[:port]`` (an entry without a port matches every port of that host) or
  CIDR ranges.  Only those are reached over plain http (https is tried first, unverified, as
  Docker does); every other registry is https with certificate checks.  Unlike Docker, loopback
  addresses are not insecure by default: list them.
- Mirrors -- ini ``sandbox_registry_mirrors`` or ``$PYTEST_SANDBOX_REGISTRY_MIRRORS``,
  comma-separated.  ``MIRROR`` mirrors Docker Hub (as daemon.json); ``ORIGIN=MIRROR`` mirrors the
  registry ``ORIGIN`` (as containerd's hosts.toml).  Reads try the mirrors first, in order, and
  fall back to the origin; pushes go to the origin only.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass

from ...core.errors import InvalidSpecError

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
DOCKER_HUB_ALIASES = frozenset({DOCKER_HUB, "index.docker.io", DOCKER_HUB_API})
INSECURE_ENV = "PYTEST_SANDBOX_INSECURE_REGISTRIES"
MIRRORS_ENV = "PYTEST_SANDBOX_REGISTRY_MIRRORS"
INSECURE_HINT = (
    "list it as insecure: ini `sandbox_insecure_registries = {host}` or "
    "PYTEST_SANDBOX_INSECURE_REGISTRIES={host} (comma-separated, as daemon.json's insecure-registries)"
)

_HOST = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")


def _split_list(raw: str) -> list[str]:
    return [item.strip() for item in raw.replace("\n", ",").split(",") if item.strip()]


def _host_only(host: str) -> str:
    """``host[:port]`` -> ``host`` (brackets of an IPv6 literal removed)."""
    if host.startswith("["):
        return host[1 : host.index("]")]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def check_host(host: str, what: str) -> str:
    if not _HOST.fullmatch(host):
        raise InvalidSpecError(
            f"{what}: {host!r} is not a registry host",
            hint="expected host[:port], e.g. registry.example.com or 127.0.0.1:5000",
        )
    return host


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
    check_host(host, what)
    if scheme == "http" and not settings.is_insecure(host):
        raise InvalidSpecError(
            f"{what}: mirror http://{host} is plain http but {host} is not an insecure registry",
            hint=INSECURE_HINT.format(host=host),
        )
    return host


@dataclass(frozen=True)
class RegistrySettings:
    """Which registries are reached over plain http, and which mirrors are tried first."""

    insecure: tuple[str, ...] = ()
    #: (origin registry, mirror host) pairs, in the order they are tried.
    mirrors: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, insecure: str = "", mirrors: str = "", *, source: str = "") -> RegistrySettings:
        """Parse the comma-separated lists of the ini keys / environment variables."""
        insecure_list: list[str] = []
        for entry in _split_list(insecure):
            what = source or INSECURE_ENV
            if "/" in entry:
                try:
                    ipaddress.ip_network(entry, strict=False)
                except ValueError:
                    raise InvalidSpecError(
                        f"{what}: {entry!r} is neither host[:port] nor a CIDR range"
                    ) from None
                insecure_list.append(entry)
            else:
                insecure_list.append(check_host(entry.removeprefix("http://"), what))
        insecure_only = cls(tuple(insecure_list))
        mirror_list: list[tuple[str, str]] = []
        for entry in _split_list(mirrors):
            what = source or MIRRORS_ENV
            origin, sep, mirror = entry.partition("=")
            if not sep:
                origin, mirror = DOCKER_HUB, entry
            origin = canonical_registry(check_host(origin.strip(), what))
            mirror_list.append((origin, mirror_host(mirror.strip(), insecure_only, what)))
        return cls(insecure_only.insecure, tuple(mirror_list))

    @classmethod
    def from_env(cls) -> RegistrySettings:
        return cls.parse(os.environ.get(INSECURE_ENV, ""), os.environ.get(MIRRORS_ENV, ""))

    def is_insecure(self, host: str) -> bool:
        name = _host_only(host)
        try:
            ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(name)
        except ValueError:
            ip = None
        for entry in self.insecure:
            if "/" in entry:
                if ip is not None and ip in ipaddress.ip_network(entry, strict=False):
                    return True
            elif entry == host or (entry == _host_only(entry) and entry == name):
                return True
        return False

    def mirrors_for(self, registry: str) -> list[str]:
        registry = canonical_registry(registry)
        return [mirror for origin, mirror in self.mirrors if origin == registry]


_configured: RegistrySettings | None = None


def configure(*, insecure: str = "", mirrors: str = "") -> None:
    """Set the settings from the ini keys (the pytest plugin calls this; the CLI uses the env)."""
    global _configured
    env = RegistrySettings.from_env()
    parsed = RegistrySettings.parse(insecure, mirrors, source="sandbox_insecure_registries/mirrors")
    _configured = RegistrySettings(
        parsed.insecure if insecure.strip() else env.insecure,
        parsed.mirrors if mirrors.strip() else env.mirrors,
    )


def current_settings() -> RegistrySettings:
    """The ini keys' settings if the plugin set them, else the environment's."""
    return _configured if _configured is not None else RegistrySettings.from_env()


def canonical_registry(registry: str) -> str:
    """Docker Hub's aliases (index.docker.io, registry-1.docker.io) -> ``docker.io``."""
    return DOCKER_HUB if registry in DOCKER_HUB_ALIASES else registry


def docker_config_path() -> str:
    root = os.environ.get("DOCKER_CONFIG") or os.path.join(os.path.expanduser("~"), ".docker")
    return os.path.join(root, "config.json")
