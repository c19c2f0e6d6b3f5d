"""OCI distribution (registry) client: the protocol, and pull/push between a registry and the store.

Stdlib only (``urllib``), so ``HTTPS_PROXY``/``HTTP_PROXY``/``NO_PROXY`` work as urllib reads them.

Protocol (the OCI distribution spec, as Docker's registry speaks it):

- ``GET /v2/`` pings a registry; a 401 with ``WWW-Authenticate: Bearer realm=..,service=..`` sends
  the client to the token server (``realm?service=..&scope=repository:NAME:pull[,push]``), with
  Basic credentials from ``~/.docker/config.json`` (or ``$DOCKER_CONFIG``) when it has some for
  the registry; a ``Basic`` challenge is answered with those credentials directly.  Tokens are
  cached per scope until they expire.  Credentials are never sent to a plain-http realm unless the
  registry itself is reached over plain http (listed as insecure), never over TLS whose
  certificate is unchecked to a host nobody listed as insecure (an insecure registry's token
  server is checked unless it is listed too), and ``Authorization`` goes to the registry's own
  host and scheme only: not on with a redirect (blob downloads are redirected to storage), not
  to an ``http://`` Location of an https registry.  A redirect from https to http is refused.
- Every request has a timeout (``timeout``, default 60 s, per connect and per read): a registry
  that accepts and then goes silent, or closes a body early, is a RegistryConnectionError (and
  the next mirror or the registry is tried).  Answers are capped: manifests 4 MiB, configs
  16 MiB, token answers 1 MiB, blobs their descriptor's size.  Messages never carry a URL's
  query (a storage backend's signed URL is a credential) nor a token.
- Manifests: OCI image manifests and Docker v2 schema 2 manifests; an OCI image index or a Docker
  manifest list is resolved to the entry for this host's platform (``linux/amd64`` on x86-64).
  A manifest's sha256 is checked against the digest it was asked for, and against
  ``Docker-Content-Digest``.
- Blobs are streamed to a file while their sha256 and size are computed; a blob that does not
  match its descriptor raises :class:`~pytest_sandbox.core.errors.RegistryDigestError` and nothing
  reaches the store.  Push uploads monolithically (``POST`` then ``PUT ?digest=``), skipping blobs
  the registry already has (``HEAD``).

Configuration (as daemon.json's ``insecure-registries`` and ``registry-mirrors``):

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

import base64
import contextlib
import http.client
import io
import ipaddress
import json
import os
import re
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, BinaryIO, TextIO, TypeVar

from ..core.errors import (
    InvalidSpecError,
    RegistryAuthError,
    RegistryConnectionError,
    RegistryDigestError,
    RegistryError,
    RegistryNotFoundError,
)
from ..core.imagemodel import canonical_json, sha256_digest
from ..core.reference import Reference, is_digest, parse_reference
from .manifest import (
    CHUNK,
    INDEX_TYPES,
    LAYER_TYPES,
    MANIFEST_TYPES,
    MEDIA_CONFIG,
    MEDIA_INDEX,
    MEDIA_LAYER_GZIP,
    MEDIA_MANIFEST,
    Descriptor,
    VerifiedReader,
    check_digest,
    config_from_record,
    gzip_blob,
    host_platform,
    loads_json,
    record_from_config,
    select_platform,
)
from .store import Store

if TYPE_CHECKING:
    from ..image import Image

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
DOCKER_HUB_ALIASES = frozenset({DOCKER_HUB, "index.docker.io", DOCKER_HUB_API})
MAX_MANIFEST_BYTES = 4 << 20  # containerd's limit
MAX_CONFIG_BYTES = 16 << 20
MAX_TOKEN_BYTES = 1 << 20
MAX_ERROR_BYTES = 4096
DEFAULT_TIMEOUT = 60.0
INSECURE_ENV = "PYTEST_SANDBOX_INSECURE_REGISTRIES"
MIRRORS_ENV = "PYTEST_SANDBOX_REGISTRY_MIRRORS"
INSECURE_HINT = (
    "list it as insecure: ini `sandbox_insecure_registries = {host}` or "
    "PYTEST_SANDBOX_INSECURE_REGISTRIES={host} (comma-separated, as daemon.json's insecure-registries)"
)

_HOST = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")
_REPOSITORY = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_CHALLENGE_PARAM = re.compile(r'(\w+)=(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))')

T = TypeVar("T")


# --------------------------------------------------------------------------------------------
# settings


def _split_list(raw: str) -> list[str]:
    return [item.strip() for item in raw.replace("\n", ",").split(",") if item.strip()]


def _host_only(host: str) -> str:
    """``host[:port]`` -> ``host`` (brackets of an IPv6 literal removed)."""
    if host.startswith("["):
        return host[1 : host.index("]")]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _check_host(host: str, what: str) -> str:
    if not _HOST.fullmatch(host):
        raise InvalidSpecError(
            f"{what}: {host!r} is not a registry host",
            hint="expected host[:port], e.g. registry.example.com or 127.0.0.1:5000",
        )
    return host


def _mirror_host(entry: str, settings: RegistrySettings, what: str) -> str:
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
    _check_host(host, what)
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
                insecure_list.append(_check_host(entry.removeprefix("http://"), what))
        insecure_only = cls(tuple(insecure_list))
        mirror_list: list[tuple[str, str]] = []
        for entry in _split_list(mirrors):
            what = source or MIRRORS_ENV
            origin, sep, mirror = entry.partition("=")
            if not sep:
                origin, mirror = DOCKER_HUB, entry
            origin = _canonical_registry(_check_host(origin.strip(), what))
            mirror_list.append((origin, _mirror_host(mirror.strip(), insecure_only, what)))
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
        registry = _canonical_registry(registry)
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


def _canonical_registry(registry: str) -> str:
    return DOCKER_HUB if registry in DOCKER_HUB_ALIASES else registry


# --------------------------------------------------------------------------------------------
# descriptors and manifests


@dataclass(frozen=True)
class Manifest:
    """A manifest or index as fetched: its media type, digest, exact bytes and parsed JSON."""

    media_type: str
    digest: str
    raw: bytes
    data: dict[str, Any]

    @classmethod
    def parse(cls, raw: bytes, content_type: str, what: str) -> Manifest:
        data = loads_json(raw, f"{what}: the manifest", RegistryError)
        if not isinstance(data, dict):
            raise RegistryError(f"{what}: the manifest is not a JSON object")
        media_type = data.get("mediaType") or content_type.split(";", maxsplit=1)[0].strip()
        if not media_type and isinstance(data.get("manifests"), list):
            media_type = MEDIA_INDEX
        if not media_type and "config" in data:
            media_type = MEDIA_MANIFEST
        if media_type not in MANIFEST_TYPES + INDEX_TYPES:
            hint = ""
            if data.get("schemaVersion") == 1:
                hint = "Docker schema 1 manifests are deprecated and not supported: push the image again"
            raise RegistryError(f"{what}: unsupported manifest type {media_type!r}", hint=hint)
        if data.get("schemaVersion") != 2:
            raise RegistryError(f"{what}: schemaVersion {data.get('schemaVersion')!r}, expected 2")
        return cls(str(media_type), sha256_digest(raw), raw, data)

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES

    @property
    def config(self) -> Descriptor:
        return Descriptor.from_json(self.data.get("config"), f"manifest {self.digest} config", RegistryError)

    @property
    def layers(self) -> tuple[Descriptor, ...]:
        layers = self.data.get("layers")
        if not isinstance(layers, list):
            raise RegistryError(f"manifest {self.digest}: 'layers' is not a list")
        return tuple(
            Descriptor.from_json(d, f"manifest {self.digest} layer {i}", RegistryError)
            for i, d in enumerate(layers)
        )

    @property
    def manifests(self) -> tuple[Descriptor, ...]:
        entries = self.data.get("manifests")
        if not isinstance(entries, list):
            raise RegistryError(f"index {self.digest}: 'manifests' is not a list")
        return tuple(
            Descriptor.from_json(d, f"index {self.digest} entry {i}", RegistryError)
            for i, d in enumerate(entries)
        )


# --------------------------------------------------------------------------------------------
# credentials


def docker_config_path() -> str:
    root = os.environ.get("DOCKER_CONFIG") or os.path.join(os.path.expanduser("~"), ".docker")
    return os.path.join(root, "config.json")


def docker_credentials(registry: str, path: str | None = None) -> tuple[str, str] | None:
    """(user, password) for ``registry`` from Docker's config.json ``auths``, if it has some.

    Credential helpers (``credsStore``/``credHelpers``) are not run.
    """
    path = path or docker_config_path()
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise RegistryAuthError(
            f"cannot read Docker credentials {path}: {e}", hint="fix or remove that file"
        ) from None
    auths = data.get("auths") if isinstance(data, dict) else None
    if not isinstance(auths, dict):
        return None
    wanted = {registry}
    if _canonical_registry(registry) == DOCKER_HUB:
        wanted |= DOCKER_HUB_ALIASES | {"https://index.docker.io/v1/"}
    for key, entry in auths.items():
        name = key.split("://", 1)[-1].split("/", 1)[0]
        if (key in wanted or name in wanted) and isinstance(entry, dict):
            if entry.get("auth"):
                try:
                    user, sep, password = base64.b64decode(entry["auth"]).decode().partition(":")
                except (ValueError, UnicodeDecodeError):
                    raise RegistryAuthError(
                        f"{path}: auths[{key!r}].auth is not base64 of user:password",
                        hint="log in again, or fix that entry",
                    ) from None
                if sep:
                    return user, password
            if entry.get("username") and entry.get("password"):
                return str(entry["username"]), str(entry["password"])
    return None


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="..",service=".."`` -> ("bearer", {"realm": .., "service": ..})."""
    scheme, _, rest = header.strip().partition(" ")
    params = {}
    for m in _CHALLENGE_PARAM.finditer(rest):
        value = m.group(2) if m.group(2) is not None else m.group(3)
        params[m.group(1).lower()] = re.sub(r"\\(.)", r"\1", value)
    return scheme.lower(), params


# --------------------------------------------------------------------------------------------
# one endpoint (a registry or a mirror)


def _error_detail(body: bytes) -> str:
    try:
        errors = json.loads(body).get("errors") or []
        return "; ".join(f"{e.get('code', '?')}: {e.get('message', '')}" for e in errors)
    except (ValueError, AttributeError, TypeError):
        return body[:200].decode("utf-8", "replace").strip()


def _redact(url: str) -> str:
    """A URL for a message: no query or fragment (a storage backend's signed URL is a credential)."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def _safe_read(resp: IO[bytes], n: int) -> bytes:
    """Up to ``n`` bytes of an error response's body; b"" if even that fails (it is only a detail)."""
    try:
        return resp.read(n)
    except (OSError, http.client.HTTPException):
        return b""


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    """Follows redirects (blob downloads go to a storage backend), but never from https to http.

    Credentials are added as unredirected headers, so they are not sent on with any redirect.
    """

    def redirect_request(  # noqa: PLR0917 -- urllib's signature
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: Any,
        newurl: str,
    ) -> urllib.request.Request | None:
        old, new = urllib.parse.urlsplit(req.full_url).scheme, urllib.parse.urlsplit(newurl).scheme
        if new not in ("http", "https") or (old == "https" and new != "https"):
            fp.close()
            raise RegistryConnectionError(
                f"{req.get_method()} {_redact(req.full_url)}: redirected to {_redact(newurl)}; "
                f"refusing to leave https for {new}",
                hint="the registry (or its storage backend) must redirect to https URLs",
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class _Body:
    """A response body, read through its endpoint: a body cut short is a RegistryConnectionError."""

    def __init__(self, ep: _Endpoint, resp: IO[bytes], url: str) -> None:
        self.ep = ep
        self.resp = resp
        self.url = url

    def read(self, n: int = -1, /) -> bytes:
        return self.ep.read(self.resp, n, self.url)


class _Endpoint:
    """One registry host: its scheme (https, or http when insecure), its auth state, its opener.

    Certificates are checked for every host but the insecure ones (``insecure`` for this host,
    ``insecure_host`` for others, e.g. a token server): credentials never go over unverified TLS
    to a host nobody listed.  Authorization is sent only to this host, over its own scheme.
    """

    def __init__(
        self,
        host: str,
        *,
        insecure: bool,
        timeout: float,
        credentials: tuple[str, str] | None,
        insecure_host: Callable[[str], bool] | None = None,
    ):
        self.host = host
        self.insecure = insecure
        self.timeout = timeout
        self.credentials = credentials
        self._insecure_host = insecure_host
        self.scheme: str | None = None if insecure else "https"
        self._tokens: dict[str, tuple[str, float]] = {}
        self._basic = False
        self._verified = urllib.request.build_opener(_RedirectHandler)
        unverified = ssl.create_default_context()
        unverified.check_hostname = False
        unverified.verify_mode = ssl.CERT_NONE
        self._unverified = urllib.request.build_opener(
            urllib.request.HTTPSHandler(context=unverified), _RedirectHandler
        )

    def __repr__(self) -> str:
        return f"<registry endpoint {self.scheme or '?'}://{self.host}>"

    @property
    def base(self) -> str:
        if self.scheme is None:
            self._detect_scheme()
        return f"{self.scheme}://{self.host}"

    def _detect_scheme(self) -> None:
        """An insecure registry: https (certificate unchecked) if it speaks it, else http (as Docker)."""
        try:
            self._open_raw(urllib.request.Request(f"https://{self.host}/v2/", method="GET")).close()
            self.scheme = "https"
        except urllib.error.HTTPError as e:
            e.close()
            self.scheme = "https"
        except (urllib.error.URLError, OSError, http.client.HTTPException):
            self.scheme = "http"

    def _skips_verification(self, url: str) -> bool:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "https":
            return False
        if parts.netloc == self.host:
            return self.insecure
        return self._insecure_host is not None and self._insecure_host(parts.netloc)

    def _open_raw(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        opener = self._unverified if self._skips_verification(req.full_url) else self._verified
        resp: http.client.HTTPResponse = opener.open(req, timeout=self.timeout)
        return resp

    def read(self, resp: IO[bytes], n: int, url: str) -> bytes:
        """``resp.read(n)``; a body cut short or a registry gone silent is a RegistryConnectionError."""
        try:
            data = resp.read(n)
        except (OSError, http.client.HTTPException) as e:
            raise self._connection_error("reading", url, e) from None
        missing = getattr(resp, "length", None)  # http.client returns short reads at an early EOF
        if len(data) < n and missing:
            raise RegistryConnectionError(
                f"reading {_redact(url)}: the connection closed with {missing} bytes of the body to come"
            )
        return data

    def _connection_error(self, what: str, url: str, e: BaseException) -> RegistryConnectionError:
        if isinstance(e, TimeoutError):
            return RegistryConnectionError(
                f"{what} {_redact(url)}: no answer within {self.timeout:g}s",
                hint=f"{self.host} (or a proxy on the way) accepted the connection, then went silent",
            )
        if isinstance(e, http.client.IncompleteRead):
            detail = f"the connection closed with {e.expected} bytes of the body to come"
        else:
            detail = str(e) or type(e).__name__
        return RegistryConnectionError(f"{what} {_redact(url)}: {detail}")

    # -- auth

    def _auth_header(self, scope: str) -> str | None:
        if self._basic and self.credentials:
            return "Basic " + base64.b64encode(":".join(self.credentials).encode()).decode()
        token = self._tokens.get(scope)
        if token and token[1] > time.monotonic():
            return "Bearer " + token[0]
        return None

    def _authenticate(self, challenge_header: str, scope: str) -> None:
        scheme, params = parse_challenge(challenge_header)
        if scheme == "basic":
            if not self.credentials:
                raise RegistryAuthError(
                    f"{self.host} asks for a user and password (Basic auth)",
                    status=401,
                    hint=f"add credentials for {self.host} to {docker_config_path()} (as docker login does)",
                )
            self._basic = True
            return
        if scheme != "bearer" or not params.get("realm"):
            raise RegistryAuthError(f"{self.host}: unsupported authentication challenge {challenge_header!r}")
        self._tokens[scope] = self._fetch_token(params, scope)

    def _fetch_token(self, params: dict[str, str], scope: str) -> tuple[str, float]:
        realm = params["realm"]
        parts = urllib.parse.urlsplit(realm)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise RegistryAuthError(f"{self.host}: token realm {realm!r} is not an http(s) URL")
        if parts.scheme == "http" and self.scheme != "http":
            raise RegistryAuthError(
                f"{self.host}: refusing a plain-http token realm {realm} for an https registry",
                hint="the registry's auth configuration should give an https realm",
            )
        query = [("service", params["service"])] if params.get("service") else []
        query += [("scope", s) for s in (params.get("scope") or scope).split(" ") if s]
        url = realm + ("&" if parts.query else "?") + urllib.parse.urlencode(query)
        req = urllib.request.Request(url, method="GET")
        if self.credentials:
            basic = base64.b64encode(":".join(self.credentials).encode()).decode()
            req.add_unredirected_header("Authorization", "Basic " + basic)
        try:
            with self._open_raw(req) as resp:
                body = self.read(resp, MAX_TOKEN_BYTES + 1, realm)
        except urllib.error.HTTPError as e:
            detail = _error_detail(_safe_read(e, MAX_ERROR_BYTES))
            e.close()
            raise RegistryAuthError(
                f"{self.host}: token server {parts.netloc} refused {scope}: HTTP {e.code} {detail}".rstrip(),
                status=e.code,
                hint=f"check the credentials for {self.host} in {docker_config_path()}"
                if self.credentials
                else f"this registry needs credentials: add them to {docker_config_path()} (docker login)",
            ) from None
        except RegistryError:
            raise
        except urllib.error.URLError as e:
            reason = e.reason
            hint = ""
            if isinstance(reason, ssl.SSLError) and "CERTIFICATE_VERIFY_FAILED" in str(reason):
                hint = (
                    f"the certificate of the token server {parts.netloc} is not trusted: add its CA to the "
                    f"system's trust store, or {INSECURE_HINT.format(host=parts.netloc)}"
                )
            raise RegistryConnectionError(
                f"{self.host}: token server {_redact(realm)} unreachable: {reason}", hint=hint
            ) from None
        except (OSError, http.client.HTTPException) as e:
            raise self._connection_error(f"{self.host}: token server", realm, e) from None
        if len(body) > MAX_TOKEN_BYTES:
            raise RegistryAuthError(
                f"{self.host}: the token server's answer is larger than {MAX_TOKEN_BYTES} bytes"
            )
        try:
            data = json.loads(body)
            token = data.get("token") or data.get("access_token")
            expires = float(data.get("expires_in") or 60)
        except (ValueError, AttributeError, TypeError):
            token, expires = None, 0.0
        if not isinstance(token, str) or not token:
            raise RegistryAuthError(f"{self.host}: the token server {parts.netloc} answered without a token")
        return token, time.monotonic() + max(expires - 5, 1)

    # -- requests

    def request(
        self,
        method: str,
        path: str,
        *,
        scope: str,
        headers: dict[str, str] | None = None,
        body: bytes | IO[bytes] | None = None,
        ok: Sequence[int] = (200,),
    ) -> http.client.HTTPResponse:
        """Send one request (``path`` is /v2/... or an absolute URL from a Location header).

        A 401 is answered once with the challenge's credentials.  Other statuses not in ``ok``
        raise the matching RegistryError; the response returned must be closed by the caller.
        """
        base = self.base
        url = path if "://" in path else base + path
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise RegistryError(f"{method} {_redact(url)}: {self.host} gave a URL that is not http(s)")
        if self.scheme == "https" and parts.scheme != "https":
            raise RegistryConnectionError(
                f"{method} {_redact(url)}: {self.host} is reached over https; refusing to go on over http",
                hint="the registry's Location header is not https: fix its configuration (its http.host)",
            )
        # Credentials go to this host over its own scheme only (never to a storage backend).
        same_host = parts.scheme == self.scheme and parts.netloc == self.host
        for attempt in range(2):
            req = urllib.request.Request(url, method=method, headers=dict(headers or {}))
            if isinstance(body, bytes):
                req.data = body
            elif body is not None:
                body.seek(0)
                req.data = body
            auth = self._auth_header(scope) if same_host else None
            if auth:
                req.add_unredirected_header("Authorization", auth)
            try:
                resp = self._open_raw(req)
            except urllib.error.HTTPError as e:
                status, resp_headers = e.code, e.headers
                detail = _error_detail(_safe_read(e, MAX_ERROR_BYTES)) if method != "HEAD" else ""
                e.close()
                if status == 401 and attempt == 0 and same_host:
                    challenge = resp_headers.get("WWW-Authenticate", "")
                    if challenge:
                        self._authenticate(challenge, scope)
                        continue
                raise self._http_error(method, url, status, detail) from None
            except ssl.SSLError as e:
                raise self._tls_error(url, e) from None
            except urllib.error.URLError as e:
                if isinstance(e.reason, ssl.SSLError):
                    raise self._tls_error(url, e.reason) from None
                raise RegistryConnectionError(
                    f"cannot reach {_redact(url)}: {e.reason}",
                    hint="is the registry running at that address? (HTTPS_PROXY/NO_PROXY are honoured)",
                ) from None
            except RegistryError:
                raise
            except (OSError, http.client.HTTPException) as e:
                raise self._connection_error(method, url, e) from None
            if resp.status not in ok:
                resp.close()
                raise self._http_error(method, url, resp.status, "")
            return resp
        raise AssertionError("unreachable")  # pragma: no cover

    def _tls_error(self, url: str, e: ssl.SSLError | OSError) -> RegistryConnectionError:
        reason = getattr(e, "reason", None) or str(e)
        if "CERTIFICATE_VERIFY_FAILED" in str(e):
            hint = (
                f"the certificate of {self.host} is not trusted: add its CA to the system's trust store, "
                f"or {INSECURE_HINT.format(host=self.host)}"
            )
        else:
            hint = f"if {self.host} serves plain http, {INSECURE_HINT.format(host=self.host)}"
        return RegistryConnectionError(f"{_redact(url)}: TLS handshake failed ({reason})", hint=hint)

    def _http_error(self, method: str, url: str, status: int, detail: str) -> RegistryError:
        message = f"{method} {_redact(url)}: HTTP {status}" + (f" ({detail})" if detail else "")
        if status in (401, 403):
            return RegistryAuthError(
                message,
                status=status,
                hint=f"check the credentials for {self.host} in {docker_config_path()} and that they may "
                "access this repository",
            )
        if status == 404:
            return RegistryNotFoundError(message, status=status)
        if status == 429:
            return RegistryError(message, status=status, hint="the registry rate-limits you: wait, or log in")
        return RegistryError(message, status=status)


# --------------------------------------------------------------------------------------------
# the client


ProgressFn = Callable[[int], None]


class RegistryClient:
    """A client of one registry (``host[:port]``; None or docker.io for Docker Hub), with its mirrors.

    ``insecure`` overrides the settings for this registry (None: as configured); ``mirrors`` replaces
    the configured mirrors (None: as configured).  Reads try the mirrors first, then the registry;
    writes go to the registry.
    """

    def __init__(
        self,
        host: str | None = None,
        *,
        insecure: bool | None = None,
        mirrors: Sequence[str] | None = None,
        settings: RegistrySettings | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        credentials: tuple[str, str] | None = None,
    ) -> None:
        settings = settings or current_settings()
        self.registry = _canonical_registry(host or DOCKER_HUB)
        api_host = DOCKER_HUB_API if self.registry == DOCKER_HUB else _check_host(self.registry, "registry")

        def endpoint(h: str, is_insecure: bool) -> _Endpoint:
            creds = (
                (credentials or docker_credentials(self.registry)) if h == api_host else docker_credentials(h)
            )
            return _Endpoint(
                h,
                insecure=is_insecure,
                timeout=timeout,
                credentials=creds,
                insecure_host=settings.is_insecure,
            )

        self.origin = endpoint(
            api_host, settings.is_insecure(self.registry) if insecure is None else insecure
        )
        mirror_hosts = settings.mirrors_for(self.registry) if mirrors is None else list(mirrors)
        self.mirrors = [
            endpoint(h, settings.is_insecure(h))
            for h in (_mirror_host(m, settings, "mirror") for m in mirror_hosts)
        ]
        self._preferred: _Endpoint | None = None
        #: The endpoints that answered reads, in order (which mirror served what).
        self.served_by: list[str] = []

    def __repr__(self) -> str:
        return f"RegistryClient({self.registry!r}, mirrors={[m.host for m in self.mirrors]!r})"

    def _read_endpoints(self) -> list[_Endpoint]:
        order = [*self.mirrors, self.origin]
        if self._preferred is not None:
            order.remove(self._preferred)
            order.insert(0, self._preferred)
        return order

    def _read(self, fn: Callable[[_Endpoint], T]) -> T:
        """Run ``fn`` on the mirrors, then the registry, until one answers.

        The endpoint that answered last is tried first next time (blobs come from where the
        manifest came from).  If none answers, the registry's own error is raised, naming what
        the mirrors said.
        """
        failures: list[tuple[_Endpoint, RegistryError]] = []
        for ep in self._read_endpoints():
            try:
                result = fn(ep)
            except RegistryError as e:
                failures.append((ep, e))
                continue
            self._preferred = ep
            self.served_by.append(ep.host)
            return result
        error = next(e for ep, e in failures if ep is self.origin)
        others = [f"{ep.host}: {e.message}" for ep, e in failures if ep is not self.origin]
        if others:
            error.message += " (also tried: " + "; ".join(others) + ")"
        raise error

    @staticmethod
    def _scope(repository: str, push: bool = False) -> str:
        if not _REPOSITORY.fullmatch(repository) or len(repository) > 255:
            raise InvalidSpecError(f"{repository!r} is not a repository name (lowercase, a-z0-9._-/)")
        return f"repository:{repository}:{'pull,push' if push else 'pull'}"

    # -- reads

    def ping(self) -> None:
        """``GET /v2/`` on the registry (not the mirrors); authenticates if it asks."""
        self.origin.request("GET", "/v2/", scope="registry:catalog:*").close()

    def get_manifest(self, repository: str, reference: str) -> Manifest:
        """The manifest or index ``repository:reference`` (a tag or a digest), checked."""
        scope = self._scope(repository)
        if reference.startswith("sha256:"):
            check_digest(reference, "manifest reference", RegistryError)
        elif not _TAG.fullmatch(reference):
            raise InvalidSpecError(f"{reference!r} is neither a tag nor a sha256 digest")
        what = f"{self.registry}/{repository}:{reference}"

        def fetch(ep: _Endpoint) -> Manifest:
            accept = ", ".join(MANIFEST_TYPES + INDEX_TYPES)
            with ep.request(
                "GET", f"/v2/{repository}/manifests/{reference}", scope=scope, headers={"Accept": accept}
            ) as resp:
                raw = ep.read(
                    resp, MAX_MANIFEST_BYTES + 1, f"{ep.base}/v2/{repository}/manifests/{reference}"
                )
                content_type = resp.headers.get("Content-Type", "")
                header_digest = resp.headers.get("Docker-Content-Digest", "")
            if len(raw) > MAX_MANIFEST_BYTES:
                raise RegistryDigestError(f"{what}: manifest larger than {MAX_MANIFEST_BYTES} bytes")
            manifest = Manifest.parse(raw, content_type, what)
            if reference.startswith("sha256:") and manifest.digest != reference:
                raise RegistryDigestError(f"{what}: manifest digest is {manifest.digest}, not {reference}")
            if is_digest(header_digest) and header_digest != manifest.digest:
                raise RegistryDigestError(
                    f"{what}: manifest digest is {manifest.digest}, the registry says {header_digest}"
                )
            return manifest

        return self._read(fetch)

    def resolve(self, repository: str, reference: str, want: tuple[str, str] | None = None) -> Manifest:
        """The image manifest for this platform: an index is followed to its matching entry."""
        manifest = self.get_manifest(repository, reference)
        if manifest.is_index:
            entry = select_platform(
                manifest.manifests, f"index {manifest.digest}", want, RegistryNotFoundError
            )
            manifest = self.get_manifest(repository, entry.digest)
            if manifest.is_index:
                raise RegistryError(
                    f"{repository}@{manifest.digest}: an index inside an index is not supported"
                )
        return manifest

    def fetch_blob(
        self, repository: str, desc: Descriptor, out: BinaryIO, progress: ProgressFn | None = None
    ) -> None:
        """Stream blob ``desc`` into ``out`` (from its current position), checking size and sha256.

        On a mismatch RegistryDigestError is raised; ``out`` then holds rejected bytes: callers
        write to a temporary file and drop it.
        """
        scope = self._scope(repository)
        check_digest(desc.digest, "blob", RegistryError)
        start = out.tell()

        def fetch(ep: _Endpoint) -> None:
            out.seek(start)
            out.truncate()
            path = f"/v2/{repository}/blobs/{desc.digest}"
            what = f"{ep.host}/{repository} blob {desc.digest}"
            with ep.request("GET", path, scope=scope) as resp:
                body = _Body(ep, resp, ep.base + path)
                reader = VerifiedReader(body, desc.digest, desc.size, what, RegistryDigestError)
                while chunk := reader.read(CHUNK):
                    out.write(chunk)
                    if progress is not None:
                        progress(reader.seen)

        self._read(fetch)

    def read_blob(self, repository: str, desc: Descriptor, limit: int = MAX_CONFIG_BYTES) -> bytes:
        """A small blob (an image config) in memory, checked like :meth:`fetch_blob`."""
        if desc.size > limit:
            raise RegistryDigestError(
                f"blob {desc.digest} is {desc.size} bytes, more than {limit} allowed here"
            )
        buf = io.BytesIO()
        self.fetch_blob(repository, desc, buf)
        return buf.getvalue()

    # -- writes (the registry itself, never a mirror)

    def has_blob(self, repository: str, digest: str) -> bool:
        try:
            self.origin.request(
                "HEAD",
                f"/v2/{repository}/blobs/{check_digest(digest, 'blob', RegistryError)}",
                scope=self._scope(repository, True),
            ).close()
        except RegistryNotFoundError:
            return False
        return True

    def push_blob(self, repository: str, digest: str, src: IO[bytes], size: int) -> bool:
        """Upload ``size`` bytes of ``src`` as blob ``digest``; False if the registry had it already."""
        scope = self._scope(repository, True)
        if self.has_blob(repository, digest):
            return False
        with self.origin.request(
            "POST", f"/v2/{repository}/blobs/uploads/", scope=scope, body=b"", ok=(202,)
        ) as resp:
            location = resp.headers.get("Location")
        if not location:
            raise RegistryError(f"{self.registry}: upload started without a Location header")
        url = urllib.parse.urljoin(self.origin.base + "/", location)
        url += ("&" if urllib.parse.urlsplit(url).query else "?") + urllib.parse.urlencode({"digest": digest})
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        self.origin.request("PUT", url, scope=scope, headers=headers, body=src, ok=(201, 204)).close()
        return True

    def put_manifest(self, repository: str, reference: str, raw: bytes, media_type: str) -> str:
        """Store a manifest under ``reference`` (a tag or its digest); returns its digest."""
        if not reference.startswith("sha256:") and not _TAG.fullmatch(reference):
            raise InvalidSpecError(f"{reference!r} is neither a tag nor a sha256 digest")
        digest = sha256_digest(raw)
        self.origin.request(
            "PUT",
            f"/v2/{repository}/manifests/{reference}",
            scope=self._scope(repository, True),
            headers={"Content-Type": media_type},
            body=raw,
            ok=(201, 200),
        ).close()
        return digest


# --------------------------------------------------------------------------------------------
# progress


class Progress:
    """Per-layer progress on a stream: a live line on a terminal, one line per layer otherwise."""

    def __init__(self, stream: TextIO | None = None, *, what: str = "") -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.what = what
        try:
            self.tty = self.stream.isatty()
        except (AttributeError, ValueError):
            self.tty = False

    def _write(self, text: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.stream.write(text)
            self.stream.flush()

    @contextlib.contextmanager
    def layer(
        self, index: int, count: int, digest: str, size: int, verb: str = "pull"
    ) -> Iterator[ProgressFn]:
        label = f"{verb} {self.what} layer {index}/{count} {digest[7:19]}"
        last = [0.0]

        def update(n: int) -> None:
            now = time.monotonic()
            if self.tty and now - last[0] > 0.1:
                last[0] = now
                pct = f" {100 * n // size:3d}%" if size else ""
                self._write(f"\r{label} {human_size(n)}/{human_size(size)}{pct}\x1b[K")

        start = time.monotonic()
        try:
            yield update
        except BaseException:
            if self.tty:
                self._write("\n")  # keep the partial line; the error is printed below it
            raise
        elapsed = time.monotonic() - start
        prefix, suffix = ("\r", "\x1b[K") if self.tty else ("", "")
        self._write(f"{prefix}{label} {human_size(size)} in {elapsed:.1f}s{suffix}\n")

    def note(self, text: str) -> None:
        self._write(f"{text}\n")

    def callback(self, verb: str = "import") -> Callable[[str, int, int], None]:
        """A ``progress(name, bytes_done, bytes_total)`` for :func:`~.archive.import_image`:
        a live line on a terminal, and one line per layer (or archive) once it is read."""
        current, start, last = "", 0.0, 0.0

        def update(name: str, done: int, total: int) -> None:
            nonlocal current, start, last
            now = time.monotonic()
            if name != current:
                current, start, last = name, now, 0.0
            short = name[7:19] if name.startswith("sha256:") else os.path.basename(name)
            label = " ".join(w for w in (verb, self.what, short) if w)
            if done >= total:
                prefix, suffix = ("\r", "\x1b[K") if self.tty else ("", "")
                self._write(f"{prefix}{label} {human_size(total)} in {now - start:.1f}s{suffix}\n")
                current = ""
            elif self.tty and now - last > 0.1:
                last = now
                self._write(
                    f"\r{label} {human_size(done)}/{human_size(total)} {100 * done // total:3d}%\x1b[K"
                )

        return update


def human_size(n: int, sep: str = " ") -> str:
    """``1234567`` -> ``1.2 MB`` (decimal units, as Docker prints sizes)."""
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f}{sep}{unit}" if unit == "B" else f"{size:.1f}{sep}{unit}"
        size /= 1000
    return f"{n}{sep}B"  # pragma: no cover


# --------------------------------------------------------------------------------------------
# pull and push between a registry and the store


@dataclass(frozen=True)
class PullResult:
    """What :func:`pull` did: the image id in the store, the tag it got, the manifest it came from."""

    image_id: str
    ref: str | None
    manifest_digest: str
    downloaded: tuple[str, ...]
    present: tuple[str, ...]


@dataclass(frozen=True)
class PushResult:
    """What :func:`push` did: the manifest's digest, and which layer blobs were uploaded."""

    manifest_digest: str
    uploaded: tuple[str, ...]
    present: tuple[str, ...]


def registry_repository(ref: Reference) -> tuple[str, str]:
    """(registry, repository) as the API wants them: Docker Hub's official images are ``library/``."""
    registry = _canonical_registry(ref.registry or DOCKER_HUB)
    repository = ref.repository
    if registry == DOCKER_HUB and "/" not in repository:
        repository = "library/" + repository
    return registry, repository


def _layer_history(config: dict[str, Any], count: int) -> list[str]:
    history = config.get("history")
    if not isinstance(history, list):
        return [""] * count
    entries = [h for h in history if isinstance(h, dict) and not h.get("empty_layer")]
    if len(entries) != count:
        return [""] * count
    return [str(h.get("created_by") or "") for h in entries]


def _diff_ids(config: dict[str, Any], count: int, what: str) -> list[str]:
    rootfs = config.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or len(diff_ids) != count:
        raise RegistryError(
            f"{what}: the config's rootfs.diff_ids does not list one digest per layer ({count} layers)"
        )
    return [check_digest(d, f"{what} rootfs.diff_ids", RegistryError) for d in diff_ids]


def _check_platform(config: dict[str, Any], what: str) -> None:
    os_name, arch = host_platform()
    got = (config.get("os"), config.get("architecture"))
    if got != (os_name, arch):
        raise RegistryNotFoundError(
            f"{what} is an image for {got[0]}/{got[1]}; this host is {os_name}/{arch}",
            hint="pull a tag (or an index) that has an image for this platform",
        )


def _progress(quiet: bool, stream: TextIO | None, what: str) -> Progress | None:
    return None if quiet else Progress(stream, what=what)


def pull(
    ref: str | Reference,
    store: Store | None = None,
    *,
    client: RegistryClient | None = None,
    quiet: bool = False,
    progress: TextIO | None = None,
) -> PullResult:
    """Pull ``[registry/]name[:tag][@digest]`` into ``store`` (default: the data root's) and tag it.

    Layers the store has already are not downloaded.  Each blob is streamed to a temporary file,
    checked against its digest and size, then extracted by the store (which checks the layer's
    diff_id): a corrupt blob raises RegistryDigestError and stores nothing.  Progress goes to
    ``progress`` (default stderr): one line per layer, or a live line on a terminal.
    """
    parsed = ref if isinstance(ref, Reference) else parse_reference(ref)
    store = store if store is not None else Store.default()
    registry, repository = registry_repository(parsed)
    client = client if client is not None else RegistryClient(registry)
    what = str(parsed)
    manifest = client.resolve(repository, parsed.ident)
    layers = manifest.layers
    for desc in layers:
        if desc.media_type not in LAYER_TYPES:
            hint = "zstd-compressed layers are not supported yet" if "zstd" in desc.media_type else ""
            raise RegistryError(
                f"{what}: layer {desc.digest} has unsupported type {desc.media_type!r}", hint=hint
            )
    try:
        config = json.loads(client.read_blob(repository, manifest.config))
    except ValueError:
        raise RegistryError(f"{what}: the image config is not JSON") from None
    if not isinstance(config, dict):
        raise RegistryError(f"{what}: the image config is not a JSON object")
    _check_platform(config, what)
    diff_ids = _diff_ids(config, len(layers), what)
    created_by = _layer_history(config, len(layers))
    show = _progress(quiet, progress, what)
    downloaded: list[str] = []
    present: list[str] = []
    parent: str | None = None
    for i, (desc, diff_id) in enumerate(zip(layers, diff_ids, strict=True), 1):
        if store.has_layer(diff_id):
            present.append(diff_id)
            if show is not None:
                show.note(f"pull {what} layer {i}/{len(layers)} {diff_id[7:19]} already present")
        else:
            with store.tempdir() as tmp, open(os.path.join(tmp, "blob"), "w+b") as blob:
                if show is not None:
                    with show.layer(i, len(layers), desc.digest, desc.size) as update:
                        client.fetch_blob(repository, desc, blob, update)
                else:
                    client.fetch_blob(repository, desc, blob)
                blob.seek(0)
                store.add_layer_tar(
                    blob, expected_diff_id=diff_id, created_by=created_by[i - 1], parent=parent
                )
            downloaded.append(diff_id)
        parent = diff_id

    image_id = store.put_image(record_from_config(config))
    tag = None
    if parsed.tag is not None or parsed.digest is None:
        tag = store.tag(Reference(parsed.registry, parsed.repository, parsed.effective_tag), image_id)
    if show is not None:
        show.note(f"pulled {what}: image {image_id[:19]}, manifest {manifest.digest[:19]}")
    return PullResult(image_id, tag, manifest.digest, tuple(downloaded), tuple(present))


def push(
    ref: str | Reference,
    store: Store | None = None,
    *,
    client: RegistryClient | None = None,
    quiet: bool = False,
    progress: TextIO | None = None,
) -> PushResult:
    """Push the stored image ``[registry/]name[:tag]`` to its registry (an OCI manifest, gzip layers).

    Blobs the registry has already are not uploaded again.  Images on the host base cannot be
    pushed (their lowest layer is this host).
    """
    parsed = ref if isinstance(ref, Reference) else parse_reference(ref)
    if parsed.digest:
        raise InvalidSpecError(f"push {ref}: push a name[:tag], not a digest")
    store = store if store is not None else Store.default()
    record = store.resolve(parsed)
    config = config_from_record(record, [store.tar_digest(d) for d in record.layers])
    registry, repository = registry_repository(parsed)
    client = client if client is not None else RegistryClient(registry)
    what = str(parsed)
    show = _progress(quiet, progress, what)
    descs: list[Descriptor] = []
    uploaded: list[str] = []
    present: list[str] = []
    for i, diff_id in enumerate(record.layers, 1):
        with store.tempdir() as tmp, open(os.path.join(tmp, "blob"), "w+b") as blob:
            with store.open_layer_tar(diff_id) as tar:
                gz = gzip_blob(tar, blob)
            digest, size = gz.diff_id, gz.size
            if show is not None:
                with show.layer(i, len(record.layers), digest, size, verb="push"):
                    sent = client.push_blob(repository, digest, blob, size)
            else:
                sent = client.push_blob(repository, digest, blob, size)
        (uploaded if sent else present).append(digest)
        descs.append(Descriptor(MEDIA_LAYER_GZIP, digest, size))
    raw_config = canonical_json(config)
    config_desc = Descriptor(MEDIA_CONFIG, sha256_digest(raw_config), len(raw_config))
    client.push_blob(repository, config_desc.digest, io.BytesIO(raw_config), len(raw_config))
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": config_desc.to_json(),
        "layers": [d.to_json() for d in descs],
    }
    raw = canonical_json(manifest)
    digest = client.put_manifest(repository, parsed.effective_tag or "latest", raw, MEDIA_MANIFEST)
    if show is not None:
        show.note(f"pushed {what}: manifest {digest}")
    return PushResult(digest, tuple(uploaded), tuple(present))


def pull_image(ref: str) -> Image:
    """``Image.pull(ref)``: pull into the default store, then the image as the store has it."""
    from ..image import Image

    result = pull(ref)
    return Image.load(result.ref or result.image_id)
