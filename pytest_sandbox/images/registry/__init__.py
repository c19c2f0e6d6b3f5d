"""OCI distribution (registry) client: the protocol, and pull/push between a registry and the store.

Split by concern: :mod:`.settings` (insecure registries, mirrors), :mod:`.auth` (Docker's
credentials, token and Basic challenges), :mod:`.http` (one endpoint: TLS, redirects, timeouts,
typed errors), :mod:`.client` (:class:`RegistryClient`: manifests and blobs through the mirrors),
:mod:`.transfer` (:func:`pull` and :func:`push`).  The names below are the package's interface.
"""

from __future__ import annotations

from .auth import docker_config_path, docker_credentials, parse_challenge
from .client import MAX_CONFIG_BYTES, MAX_MANIFEST_BYTES, Manifest, RegistryClient
from .http import DEFAULT_TIMEOUT
from .settings import (
    DOCKER_HUB,
    DOCKER_HUB_API,
    INSECURE_ENV,
    MIRRORS_ENV,
    RegistrySettings,
)
from .transfer import PullResult, PushResult, TransferProgress, pull, push, registry_repository

__all__ = [
    "DEFAULT_TIMEOUT",
    "DOCKER_HUB",
    "DOCKER_HUB_API",
    "INSECURE_ENV",
    "MAX_CONFIG_BYTES",
    "MAX_MANIFEST_BYTES",
    "MIRRORS_ENV",
    "Manifest",
    "PullResult",
    "PushResult",
    "RegistryClient",
    "RegistrySettings",
    "TransferProgress",
    "docker_config_path",
    "docker_credentials",
    "parse_challenge",
    "pull",
    "push",
    "registry_repository",
]
