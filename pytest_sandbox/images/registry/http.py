"""HTTP to one registry host: scheme detection, TLS rules, redirects, timeouts, typed errors.

Stdlib only (``urllib``), so ``HTTPS_PROXY``/``HTTP_PROXY``/``NO_PROXY`` work as urllib reads them.
Certificates are checked for every host but those listed as insecure; a redirect from https to
http is refused; ``Authorization`` goes to the registry's own host and scheme only, as an
unredirected header (never on to a storage backend a blob download is redirected to).  Every
request has a timeout (per connect and per read): a registry that accepts and then goes silent,
or closes a body early, is a RegistryConnectionError.  Messages never carry a URL's query (a
storage backend's signed URL is a credential) nor a token.  What a 401 asks for is answered by
the endpoint's :class:`Authenticator` (:mod:`.auth`).
"""

from __future__ import annotations

import http.client
import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from typing import IO, Any, Protocol

from ...core.errors import (
    RegistryAuthError,
    RegistryConnectionError,
    RegistryError,
    RegistryNotFoundError,
)
from .settings import INSECURE_HINT, docker_config_path

DEFAULT_TIMEOUT = 60.0
MAX_ERROR_BYTES = 4096


class Authenticator(Protocol):
    """An endpoint's credentials: the Authorization header for a scope, and answering a 401."""

    def header(self, scope: str) -> str | None: ...

    def answer(self, challenge: str, scope: str, endpoint: Endpoint) -> None: ...


def error_detail(body: bytes) -> str:
    try:
        errors = json.loads(body).get("errors") or []
        return "; ".join(f"{e.get('code', '?')}: {e.get('message', '')}" for e in errors)
    except (ValueError, AttributeError, TypeError):
        return body[:200].decode("utf-8", "replace").strip()


def redact(url: str) -> str:
    """A URL for a message: no query or fragment (a storage backend's signed URL is a credential)."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def safe_read(resp: IO[bytes], n: int) -> bytes:
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
                f"{req.get_method()} {redact(req.full_url)}: redirected to {redact(newurl)}; "
                f"refusing to leave https for {new}",
                hint="the registry (or its storage backend) must redirect to https URLs",
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class Body:
    """A response body, read through its endpoint: a body cut short is a RegistryConnectionError."""

    def __init__(self, ep: Endpoint, resp: IO[bytes], url: str) -> None:
        self.ep = ep
        self.resp = resp
        self.url = url

    def read(self, n: int = -1, /) -> bytes:
        return self.ep.read(self.resp, n, self.url)


class Endpoint:
    """One registry host: its scheme (https, or http when insecure), its auth, its openers.

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
        auth: Authenticator,
        insecure_host: Callable[[str], bool] | None = None,
    ):
        self.host = host
        self.insecure = insecure
        self.timeout = timeout
        self.auth = auth
        self._insecure_host = insecure_host
        self.scheme: str | None = None if insecure else "https"
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
            self.open_raw(urllib.request.Request(f"https://{self.host}/v2/", method="GET")).close()
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

    def open_raw(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        opener = self._unverified if self._skips_verification(req.full_url) else self._verified
        resp: http.client.HTTPResponse = opener.open(req, timeout=self.timeout)
        return resp

    def read(self, resp: IO[bytes], n: int, url: str) -> bytes:
        """``resp.read(n)``; a body cut short or a registry gone silent is a RegistryConnectionError."""
        try:
            data = resp.read(n)
        except (OSError, http.client.HTTPException) as e:
            raise self.connection_error("reading", url, e) from None
        missing = getattr(resp, "length", None)  # http.client returns short reads at an early EOF
        if len(data) < n and missing:
            raise RegistryConnectionError(
                f"reading {redact(url)}: the connection closed with {missing} bytes of the body to come"
            )
        return data

    def connection_error(self, what: str, url: str, e: BaseException) -> RegistryConnectionError:
        if isinstance(e, TimeoutError):
            return RegistryConnectionError(
                f"{what} {redact(url)}: no answer within {self.timeout:g}s",
                hint=f"{self.host} (or a proxy on the way) accepted the connection, then went silent",
            )
        if isinstance(e, http.client.IncompleteRead):
            detail = f"the connection closed with {e.expected} bytes of the body to come"
        else:
            detail = str(e) or type(e).__name__
        return RegistryConnectionError(f"{what} {redact(url)}: {detail}")

    # -- auth

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
        url = self._url(method, path)
        # Credentials go to this host over its own scheme only (never to a storage backend).
        parts = urllib.parse.urlsplit(url)
        same_host = parts.scheme == self.scheme and parts.netloc == self.host
        for attempt in range(2):
            req = urllib.request.Request(url, method=method, headers=dict(headers or {}))
            if isinstance(body, bytes):
                req.data = body
            elif body is not None:
                body.seek(0)
                req.data = body
            auth = self.auth.header(scope) if same_host else None
            if auth:
                req.add_unredirected_header("Authorization", auth)
            try:
                resp = self.open_raw(req)
            except urllib.error.HTTPError as e:
                challenge = self._refusal(e, method, url, answerable=attempt == 0 and same_host)
                self.auth.answer(challenge, scope, self)
                continue
            except RegistryError:
                raise
            except (OSError, http.client.HTTPException) as e:
                raise self._transport_error(method, url, e) from None
            if resp.status not in ok:
                resp.close()
                raise self._http_error(method, url, resp.status, "")
            return resp
        raise AssertionError("unreachable")  # pragma: no cover

    def _url(self, method: str, path: str) -> str:
        """The absolute URL of ``path``, refused if it is not http(s) or leaves https for http."""
        base = self.base  # an insecure registry's scheme is found out first
        url = path if "://" in path else base + path
        scheme = urllib.parse.urlsplit(url).scheme
        if scheme not in ("http", "https"):
            raise RegistryError(f"{method} {redact(url)}: {self.host} gave a URL that is not http(s)")
        if self.scheme == "https" and scheme != "https":
            raise RegistryConnectionError(
                f"{method} {redact(url)}: {self.host} is reached over https; refusing to go on over http",
                hint="the registry's Location header is not https: fix its configuration (its http.host)",
            )
        return url

    def _refusal(self, e: urllib.error.HTTPError, method: str, url: str, *, answerable: bool) -> str:
        """The challenge of a 401 we may answer; any other refusal raised as its RegistryError."""
        status, resp_headers = e.code, e.headers
        detail = error_detail(safe_read(e, MAX_ERROR_BYTES)) if method != "HEAD" else ""
        e.close()
        challenge = resp_headers.get("WWW-Authenticate", "") if status == 401 and answerable else ""
        if not challenge:
            raise self._http_error(method, url, status, detail) from None
        return str(challenge)

    def _transport_error(self, method: str, url: str, e: BaseException) -> RegistryConnectionError:
        """What went wrong below HTTP: TLS, an unreachable host, a connection cut or gone silent."""
        if isinstance(e, ssl.SSLError):
            return self._tls_error(url, e)
        if isinstance(e, urllib.error.URLError):
            if isinstance(e.reason, ssl.SSLError):
                return self._tls_error(url, e.reason)
            return RegistryConnectionError(
                f"cannot reach {redact(url)}: {e.reason}",
                hint="is the registry running at that address? (HTTPS_PROXY/NO_PROXY are honoured)",
            )
        return self.connection_error(method, url, e)

    def _tls_error(self, url: str, e: ssl.SSLError | OSError) -> RegistryConnectionError:
        reason = getattr(e, "reason", None) or str(e)
        if "CERTIFICATE_VERIFY_FAILED" in str(e):
            hint = (
                f"the certificate of {self.host} is not trusted: add its CA to the system's trust store, "
                f"or {INSECURE_HINT.format(host=self.host)}"
            )
        else:
            hint = f"if {self.host} serves plain http, {INSECURE_HINT.format(host=self.host)}"
        return RegistryConnectionError(f"{redact(url)}: TLS handshake failed ({reason})", hint=hint)

    def _http_error(self, method: str, url: str, status: int, detail: str) -> RegistryError:
        message = f"{method} {redact(url)}: HTTP {status}" + (f" ({detail})" if detail else "")
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
