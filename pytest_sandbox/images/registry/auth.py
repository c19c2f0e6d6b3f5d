"""Registry credentials: Docker's config.json, and answering a registry's 401 challenge.

``GET /v2/`` (or any request) answered 401 with ``WWW-Authenticate: Bearer realm=..,service=..``
sends the client to the token server (``realm?service=..&scope=repository:NAME:pull[,push]``),
with Basic credentials from ``~/.docker/config.json`` (or ``$DOCKER_CONFIG``) when it has some
for the registry; a ``Basic`` challenge is answered with those credentials directly.  Tokens are
cached per scope until they expire.  Credentials are never sent to a plain-http realm unless the
registry itself is reached over plain http (listed as insecure), nor over TLS whose certificate
is unchecked to a host nobody listed as insecure (an insecure registry's token server is checked
unless it is listed too).  Token answers are capped at 1 MiB.
"""

from __future__ import annotations

import base64
import http.client
import json
import re
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request

from ...core.errors import RegistryAuthError, RegistryConnectionError, RegistryError
from .http import MAX_ERROR_BYTES, Endpoint, error_detail, redact, safe_read
from .settings import DOCKER_HUB, DOCKER_HUB_ALIASES, INSECURE_HINT, canonical_registry, docker_config_path

__all__ = ["Auth", "docker_config_path", "docker_credentials", "parse_challenge"]

MAX_TOKEN_BYTES = 1 << 20
_CHALLENGE_PARAM = re.compile(r'(\w+)=(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))')


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
    if canonical_registry(registry) == DOCKER_HUB:
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


class Auth:
    """One endpoint's credentials, and what its challenges earned: a token per scope, or Basic."""

    def __init__(self, host: str, credentials: tuple[str, str] | None) -> None:
        self.host = host
        self.credentials = credentials
        self._tokens: dict[str, tuple[str, float]] = {}
        self._basic = False

    def header(self, scope: str) -> str | None:
        """The Authorization header for a request in ``scope``, if a challenge earned one."""
        if self._basic and self.credentials:
            return "Basic " + self._basic_credentials()
        token = self._tokens.get(scope)
        if token and token[1] > time.monotonic():
            return "Bearer " + token[0]
        return None

    def _basic_credentials(self) -> str:
        assert self.credentials is not None
        return base64.b64encode(":".join(self.credentials).encode()).decode()

    def answer(self, challenge: str, scope: str, endpoint: Endpoint) -> None:
        """Answer a 401's ``WWW-Authenticate``: Basic with our credentials, or fetch a Bearer token."""
        scheme, params = parse_challenge(challenge)
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
            raise RegistryAuthError(f"{self.host}: unsupported authentication challenge {challenge!r}")
        self._tokens[scope] = self._fetch_token(params, scope, endpoint)

    def _token_request(self, params: dict[str, str], scope: str, ep: Endpoint) -> urllib.request.Request:
        realm = params["realm"]
        parts = urllib.parse.urlsplit(realm)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise RegistryAuthError(f"{self.host}: token realm {realm!r} is not an http(s) URL")
        if parts.scheme == "http" and ep.scheme != "http":
            raise RegistryAuthError(
                f"{self.host}: refusing a plain-http token realm {realm} for an https registry",
                hint="the registry's auth configuration should give an https realm",
            )
        query = [("service", params["service"])] if params.get("service") else []
        query += [("scope", s) for s in (params.get("scope") or scope).split(" ") if s]
        url = realm + ("&" if parts.query else "?") + urllib.parse.urlencode(query)
        req = urllib.request.Request(url, method="GET")
        if self.credentials:
            req.add_unredirected_header("Authorization", "Basic " + self._basic_credentials())
        return req

    def _fetch_token(self, params: dict[str, str], scope: str, endpoint: Endpoint) -> tuple[str, float]:
        realm = params["realm"]
        netloc = urllib.parse.urlsplit(realm).netloc
        req = self._token_request(params, scope, endpoint)
        try:
            with endpoint.open_raw(req) as resp:
                body = endpoint.read(resp, MAX_TOKEN_BYTES + 1, realm)
        except urllib.error.HTTPError as e:
            detail = error_detail(safe_read(e, MAX_ERROR_BYTES))
            e.close()
            raise RegistryAuthError(
                f"{self.host}: token server {netloc} refused {scope}: HTTP {e.code} {detail}".rstrip(),
                status=e.code,
                hint=f"check the credentials for {self.host} in {docker_config_path()}"
                if self.credentials
                else f"this registry needs credentials: add them to {docker_config_path()} (docker login)",
            ) from None
        except RegistryError:
            raise
        except urllib.error.URLError as e:
            raise self._unreachable(realm, e) from None
        except (OSError, http.client.HTTPException) as e:
            raise endpoint.connection_error(f"{self.host}: token server", realm, e) from None
        return self._token(body, netloc)

    def _unreachable(self, realm: str, e: urllib.error.URLError) -> RegistryConnectionError:
        netloc = urllib.parse.urlsplit(realm).netloc
        hint = ""
        if isinstance(e.reason, ssl.SSLError) and "CERTIFICATE_VERIFY_FAILED" in str(e.reason):
            hint = (
                f"the certificate of the token server {netloc} is not trusted: add its CA to the "
                f"system's trust store, or {INSECURE_HINT.format(host=netloc)}"
            )
        return RegistryConnectionError(
            f"{self.host}: token server {redact(realm)} unreachable: {e.reason}", hint=hint
        )

    def _token(self, body: bytes, netloc: str) -> tuple[str, float]:
        """The token of a token server's answer, and when to stop using it."""
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
            raise RegistryAuthError(f"{self.host}: the token server {netloc} answered without a token")
        return token, time.monotonic() + max(expires - 5, 1)
