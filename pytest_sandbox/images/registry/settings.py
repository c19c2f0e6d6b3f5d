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

The lists are parsed with every other setting, once, by :mod:`pytest_sandbox.config` (the pytest
plugin needs them checked at configure time, without importing the registry client); what a
client is given is ``Settings.registries``.  This module names them for the registry package.
"""

from __future__ import annotations

import os

from ...config import (
    DOCKER_HUB,
    DOCKER_HUB_ALIASES,
    DOCKER_HUB_API,
    INSECURE_ENV,
    INSECURE_HINT,
    MIRRORS_ENV,
    RegistrySettings,
    canonical_registry,
    mirror_host,
)
from ...config import check_registry_host as check_host

__all__ = [
    "DOCKER_HUB",
    "DOCKER_HUB_ALIASES",
    "DOCKER_HUB_API",
    "INSECURE_ENV",
    "INSECURE_HINT",
    "MIRRORS_ENV",
    "RegistrySettings",
    "canonical_registry",
    "check_host",
    "docker_config_path",
    "mirror_host",
]


def docker_config_path() -> str:
    root = os.environ.get("DOCKER_CONFIG") or os.path.join(os.path.expanduser("~"), ".docker")
    return os.path.join(root, "config.json")
