"""Real registries on loopback for the registry and CLI tests.

:class:`RegistryServer` runs Debian's ``docker-registry`` (the CNCF distribution registry) on
127.0.0.1 with a free port and its storage in a temporary directory; it is killed by pid at the
end.  :class:`TokenServer` is a tiny token service (http.server in a thread) that signs JWTs
with an RSA key made by ``openssl``; a registry started with ``token=`` trusts it, answers 401
with ``WWW-Authenticate: Bearer realm=...`` and checks the tokens' grants itself.
:class:`ForwardProxy` is a minimal forward proxy (absolute-URI requests and ``CONNECT`` tunnels)
that records what passed through.  :class:`ScriptedServer` answers with a function the test gives
it, over http or https (a throwaway certificate for 127.0.0.1), for what a real registry will not
do on purpose: redirect to another host or to plain http, hang, cut a body short.
"""

from __future__ import annotations

import base64
import http.client
import http.server
import json
import os
import select
import shutil
import socket
import ssl
import stat
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pytest_sandbox.config import RegistrySettings
from pytest_sandbox.image import History, ImageConfig
from pytest_sandbox.images.store import ImageRecord, Store

REGISTRY_BIN = shutil.which("docker-registry") or "/usr/bin/docker-registry"
SERVICE = "psbx-test-registry"
ISSUER = "psbx-test-issuer"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def reply(
    h: http.server.BaseHTTPRequestHandler,
    status: int,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> None:
    """Answer one request with ``status``, ``headers`` and ``body``, then close the connection."""
    h.send_response(status)
    for k, v in (headers or {}).items():
        h.send_header(k, v)
    h.send_header("Content-Length", str(len(body)))
    h.send_header("Connection", "close")
    h.end_headers()
    if h.command != "HEAD":
        h.wfile.write(body)


class _InThread:
    """An http.server serving from a thread; ``close()`` stops it and joins its threads."""

    httpd: http.server.HTTPServer

    def _serve(self, httpd: http.server.HTTPServer, name: str) -> None:
        self.httpd = httpd
        self.thread = threading.Thread(target=httpd.serve_forever, name=name, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


class TokenServer(_InThread):
    """Issues registry tokens: ``users`` (name -> password) get what they ask; anonymous, ``anonymous``."""

    def __init__(self, tmp: Path, users: dict[str, str], anonymous: tuple[str, ...] = ("pull",)) -> None:
        self.dir = tmp
        self.users = users
        self.anonymous = anonymous
        self.key = tmp / "token.key"
        self.cert = tmp / "token.pem"
        req = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=psbx"]
        subprocess.run(
            [*req, "-keyout", str(self.key), "-out", str(self.cert)], check=True, capture_output=True
        )
        der = subprocess.run(
            ["openssl", "x509", "-in", str(self.cert), "-outform", "DER"], check=True, capture_output=True
        ).stdout
        self._x5c = base64.b64encode(der).decode()
        #: (user or "", scope strings) of every token request, in order.
        self.requests: list[tuple[str, list[str]]] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                server._handle(self)

        self._serve(http.server.HTTPServer(("127.0.0.1", 0), Handler), "psbx-test-token")
        self.port = self.httpd.server_address[1]
        self.realm = f"http://127.0.0.1:{self.port}/token"

    def _handle(self, h: http.server.BaseHTTPRequestHandler) -> None:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(h.path).query)
        user = ""
        auth = h.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            name, _, password = base64.b64decode(auth[6:]).decode().partition(":")
            if self.users.get(name) != password:
                reply(h, 401, json.dumps({"details": "bad credentials"}).encode())
                return
            user = name
        scopes = query.get("scope", [])
        self.requests.append((user, scopes))
        access = []
        for scope in scopes:
            kind, name, actions = scope.split(":", 2) if scope.count(":") >= 2 else ("", "", "")
            allowed = actions.split(",") if user else [a for a in actions.split(",") if a in self.anonymous]
            access.append({"type": kind, "name": name, "actions": allowed})
        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "sub": user,
            "aud": query.get("service", [""])[0],
            "exp": now + 300,
            "nbf": now - 10,
            "iat": now,
            "jti": os.urandom(8).hex(),
            "access": access,
        }
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self._x5c]}
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        signature = subprocess.run(
            ["openssl", "dgst", "-sha256", "-sign", str(self.key)],
            input=signing_input.encode(),
            check=True,
            capture_output=True,
        ).stdout
        token = {"token": f"{signing_input}.{_b64url(signature)}", "expires_in": 300}
        reply(h, 200, json.dumps(token).encode(), {"Content-Type": "application/json"})


class RegistryServer:
    """``docker-registry serve`` on 127.0.0.1:<free port>, storage under ``tmp``; plain http."""

    def __init__(self, tmp: Path, *, token: TokenServer | None = None) -> None:
        self.dir = tmp
        self.storage = tmp / "storage"
        self.log = tmp / "registry.log"
        self.proc: subprocess.Popen[bytes] | None = None
        for _ in range(5):  # the port may be taken between free_port() and the registry's bind
            self.port = free_port()
            self.host = f"127.0.0.1:{self.port}"
            self._write_config(token)
            with open(self.log, "wb") as log:
                self.proc = subprocess.Popen(
                    [REGISTRY_BIN, "serve", str(tmp / "config.yml")],
                    stdout=log,
                    stderr=log,
                    stdin=subprocess.DEVNULL,
                )
            if self._wait_ready():
                return
            self.close()
        raise RuntimeError(f"docker-registry did not start: {self.log.read_text()[-2000:]}")

    def _write_config(self, token: TokenServer | None) -> None:
        auth = ""
        if token is not None:
            auth = (
                "auth:\n  token:\n"
                f"    realm: {token.realm}\n    service: {SERVICE}\n    issuer: {ISSUER}\n"
                f"    rootcertbundle: {token.cert}\n"
            )
        (self.dir / "config.yml").write_text(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.storage}\n  delete:\n    enabled: true\n"
            f"http:\n  addr: 127.0.0.1:{self.port}\n" + auth
        )

    def _wait_ready(self) -> bool:
        assert self.proc is not None
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"http://{self.host}/v2/", timeout=1):
                    return True
            except urllib.error.HTTPError as e:  # 401: up, and asking for a token
                e.close()
                return True
            except (urllib.error.URLError, OSError, http.client.HTTPException):
                time.sleep(0.02)
        return False

    def blob_data(self, digest: str) -> Path:
        """Where the registry keeps a blob's bytes (to corrupt it)."""
        hexa = digest.split(":", 1)[1]
        return self.storage / "docker/registry/v2/blobs/sha256" / hexa[:2] / hexa / "data"

    def close(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait()
        self.proc = None


class ForwardProxy(_InThread):
    """A plain-http forward proxy (absolute-URI requests) that records the URLs it forwarded."""

    def __init__(self) -> None:
        self.urls: list[str] = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _forward(self) -> None:
                proxy.urls.append(self.path)
                parts = urllib.parse.urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("proxy-connection",)}
                conn = http.client.HTTPConnection(parts.netloc, timeout=30)
                try:
                    path = parts.path + (f"?{parts.query}" if parts.query else "")
                    conn.request(self.command, path, body=body, headers=headers)
                    resp = conn.getresponse()
                    skip = ("transfer-encoding", "connection", "content-length")
                    headers = {k: v for k, v in resp.getheaders() if k.lower() not in skip}
                    reply(self, resp.status, resp.read(), headers)
                finally:
                    conn.close()

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

            def do_CONNECT(self) -> None:  # an https tunnel: bytes both ways, unread
                proxy.urls.append(f"CONNECT {self.path}")
                host, _, port = self.path.rpartition(":")
                with socket.create_connection((host, int(port)), timeout=30) as upstream:
                    self.send_response(200, "Connection established")
                    self.end_headers()
                    self.wfile.flush()
                    sockets = [self.connection, upstream]
                    while True:
                        ready, _, _ = select.select(sockets, [], [], 30)
                        if not ready:
                            return
                        for sock in ready:
                            data = sock.recv(65536)
                            if not data:
                                return
                            (upstream if sock is self.connection else self.connection).sendall(data)

        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        httpd.daemon_threads = False  # close() joins the tunnels
        self._serve(httpd, "psbx-test-proxy")
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"


@dataclass(frozen=True)
class Seen:
    """One request a :class:`ScriptedServer` received."""

    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    tls: bool


Script = Callable[[http.server.BaseHTTPRequestHandler, Seen], None]


def make_certificate(tmp: Path, name: str = "server") -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (its own CA: trust it with ``SSL_CERT_FILE``)."""
    key, cert = tmp / f"{name}.key", tmp / f"{name}.pem"
    args = "-x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=127.0.0.1"
    extension = ["-addext", "subjectAltName=IP:127.0.0.1"]
    subprocess.run(
        ["openssl", "req", *args.split(), *extension, "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    return key, cert


class _ScriptedHttpd(http.server.ThreadingHTTPServer):
    daemon_threads = False  # server_close() joins every handler thread
    tls: ssl.SSLContext | None = None

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that gave up (timed out, refused a redirect) is what these tests provoke

    def finish_request(self, request: Any, client_address: Any) -> None:
        """With TLS, a connection is wrapped if it starts with a handshake, else served in clear
        (so a test sees what a client would send over plain http to this port)."""
        if self.tls is None:
            super().finish_request(request, client_address)
            return
        request.settimeout(10)
        try:
            first = request.recv(1, socket.MSG_PEEK)
        except OSError:
            return
        if first != b"\x16":
            super().finish_request(request, client_address)
            return
        try:
            wrapped = self.tls.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):  # the client refused the certificate
            return
        try:
            super().finish_request(wrapped, client_address)
        finally:
            wrapped.close()


class ScriptedServer(_InThread):
    """An http(s) server on 127.0.0.1 that answers with ``script(handler, seen)``, recording ``seen``.

    ``tls`` is the (key, certificate) to serve https with; plain http is still answered on the same
    port.  ``release`` is set at close: a script that hangs waits on it.
    """

    def __init__(self, script: Script, *, tls: tuple[Path, Path] | None = None) -> None:
        self.script = script
        self.requests: list[Seen] = []
        self.release = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _serve(self) -> None:
                seen = Seen(
                    self.command,
                    self.path,
                    {k.lower(): v for k, v in self.headers.items()},
                    isinstance(self.connection, ssl.SSLSocket),
                )
                server.requests.append(seen)
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                self.close_connection = True
                server.script(self, seen)

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

        httpd = _ScriptedHttpd(("127.0.0.1", 0), Handler)
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(str(tls[1]), str(tls[0]))
            httpd.tls = context
        self._serve(httpd, "psbx-test-scripted")
        self.host = f"127.0.0.1:{httpd.server_address[1]}"
        self.url = f"{'https' if tls else 'http'}://{self.host}"

    reply = staticmethod(reply)

    def close(self) -> None:
        self.release.set()
        super().close()


def make_image(store: Store, busybox_layer: Path, tmp_path: Path, ref: str) -> ImageRecord:
    """busybox + a layer with a file and a whiteout of busybox's /etc/group, tagged ``ref``."""
    top = tmp_path / "top"
    (top / "etc").mkdir(parents=True)
    (top / "hello.txt").write_text("hello from the registry\n")
    os.mknod(top / "etc" / "group", 0o600 | stat.S_IFCHR, os.makedev(0, 0))  # an overlay whiteout
    base = store.add_layer_dir(busybox_layer, created_by="busybox")
    layer = store.add_layer_dir(top, created_by="hello", parent=base.digest)
    record = ImageRecord(
        layers=(base.digest, layer.digest),
        config=ImageConfig(env=(("GREETING", "hi"),), workdir="/etc", cmd=("sh", "-c", "cat /hello.txt")),
        created="2024-01-02T03:04:05Z",
        history=(History("2024-01-02T03:04:05Z", "busybox"), History("2024-01-02T03:04:06Z", "hello")),
    )
    store.tag(ref, store.put_image(record))
    return record


@pytest.fixture(autouse=True)
def no_ambient_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No proxy, mirror, insecure list or Docker credentials from the environment of the test run
    (autouse in the modules that import it)."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("PYTEST_SANDBOX_INSECURE_REGISTRIES", raising=False)
    monkeypatch.delenv("PYTEST_SANDBOX_REGISTRY_MIRRORS", raising=False)
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker-config"))


def insecure(*hosts: str) -> RegistrySettings:
    """Settings that list ``hosts`` as insecure (plain http), and nothing else."""
    return RegistrySettings.parse(",".join(hosts))
