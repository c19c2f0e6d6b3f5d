# Long module: its registries, token server and proxy are module-scoped fixtures; split,
# each part would start its own.
"""The registry client against real registries (Debian's docker-registry) on loopback.

Protocol tests build their blobs and manifests here; the pull/push tests go through the store.
Every registry, token server and proxy is started by a fixture of this module and stopped (by
pid, or by shutting its thread down) at the end.
"""

from __future__ import annotations

import gzip
import http.server
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_sandbox import Image, Sandbox
from pytest_sandbox.cli import Progress
from pytest_sandbox.core.errors import (
    RegistryAuthError,
    RegistryConnectionError,
    RegistryDigestError,
    RegistryError,
    RegistryNotFoundError,
    SandboxError,
)
from pytest_sandbox.core.imagemodel import sha256_digest
from pytest_sandbox.images.manifest import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    MEDIA_CONFIG,
    MEDIA_INDEX,
    MEDIA_LAYER_GZIP,
    MEDIA_MANIFEST,
    Descriptor,
    host_platform,
)
from pytest_sandbox.images.registry import (
    RegistryClient,
    RegistrySettings,
    pull,
    push,
)
from pytest_sandbox.images.store import ImageRecord, Store
from tests.registry_support import (
    ForwardProxy,
    RegistryServer,
    Script,
    ScriptedServer,
    Seen,
    TokenServer,
    insecure,
    make_certificate,
    make_image,
    no_ambient_config,  # noqa: F401 -- autouse: a clean environment for every test here
    reply,
)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    server = RegistryServer(tmp_path_factory.mktemp("registry"))
    yield server
    server.close()


@pytest.fixture(scope="module")
def mirror(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    server = RegistryServer(tmp_path_factory.mktemp("mirror"))
    yield server
    server.close()


@pytest.fixture(scope="module")
def token_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenServer]:
    server = TokenServer(tmp_path_factory.mktemp("token"), users={"alice": "s3cret"})
    yield server
    server.close()


@pytest.fixture(scope="module")
def auth_registry(
    tmp_path_factory: pytest.TempPathFactory, token_server: TokenServer
) -> Iterator[RegistryServer]:
    server = RegistryServer(tmp_path_factory.mktemp("auth-registry"), token=token_server)
    yield server
    server.close()


def client_for(server: RegistryServer) -> RegistryClient:
    """A client of ``server``, listed as insecure (it speaks plain http), without mirrors."""
    return RegistryClient(server.host, settings=insecure(server.host))


def gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def push_blob(
    client: RegistryClient, repo: str, data: bytes, media_type: str = MEDIA_LAYER_GZIP
) -> Descriptor:
    digest = sha256_digest(data)
    client.push_blob(repo, digest, io.BytesIO(data), len(data))
    return Descriptor(media_type, digest, len(data))


def push_manifest(
    client: RegistryClient,
    repo: str,
    tag: str,
    layers: list[bytes],
    *,
    arch: str = "amd64",
    media_type: str = MEDIA_MANIFEST,
) -> tuple[str, int]:
    config = json.dumps(
        {"architecture": arch, "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}
    ).encode()
    cdesc = push_blob(client, repo, config, MEDIA_CONFIG)
    ldescs = [push_blob(client, repo, layer) for layer in layers]
    body = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": media_type,
            "config": cdesc.to_json(),
            "layers": [d.to_json() for d in ldescs],
        }
    ).encode()
    return client.put_manifest(repo, tag, body, media_type), len(body)


# -------------------------------------------------------------------------------------------
# settings and parsing (no server)


# -------------------------------------------------------------------------------------------
# protocol against the real registry


def test_blob_push_then_fetch_streams_and_verifies(registry: RegistryServer, tmp_path: Path) -> None:
    client = client_for(registry)
    client.ping()
    data = os.urandom(3 * 1024 * 1024 + 17)  # several read chunks
    desc = push_blob(client, "proto/blob", data)
    assert client.has_blob("proto/blob", desc.digest)
    assert not client.has_blob("proto/blob", sha256_digest(b"never pushed"))
    assert client.push_blob("proto/blob", desc.digest, io.BytesIO(data), len(data)) is False  # already there
    seen: list[int] = []
    with open(tmp_path / "blob", "w+b") as f:
        client.fetch_blob("proto/blob", desc, f, progress=seen.append)
        f.seek(0)
        assert f.read() == data
    assert seen[-1] == len(data)
    assert len(seen) > 1


def test_manifest_by_tag_and_by_digest(registry: RegistryServer) -> None:
    client = client_for(registry)
    for media_type in (MEDIA_MANIFEST, DOCKER_MANIFEST):
        digest, _ = push_manifest(client, "proto/manifest", "v1", [gz(b"layer one")], media_type=media_type)
        by_tag = client.get_manifest("proto/manifest", "v1")
        assert by_tag.digest == digest
        assert by_tag.media_type == media_type
        by_digest = client.get_manifest("proto/manifest", digest)
        assert by_digest.raw == by_tag.raw
        assert [d.digest for d in by_tag.layers] == [sha256_digest(gz(b"layer one"))]
        assert client.read_blob("proto/manifest", by_tag.config).startswith(b"{")


@pytest.mark.parametrize("index_type", [MEDIA_INDEX, DOCKER_MANIFEST_LIST])
def test_index_resolves_to_this_platform(registry: RegistryServer, index_type: str) -> None:
    client = client_for(registry)
    repo = "proto/multi"
    ours = host_platform()[1]
    other = "s390x" if ours != "s390x" else "amd64"
    entries = []
    for arch in (other, ours):
        digest, size = push_manifest(client, repo, f"only-{arch}", [gz(arch.encode())], arch=arch)
        entries.append(
            {
                "mediaType": MEDIA_MANIFEST,
                "digest": digest,
                "size": size,
                "platform": {"os": "linux", "architecture": arch},
            }
        )
    index = json.dumps({"schemaVersion": 2, "mediaType": index_type, "manifests": entries}).encode()
    client.put_manifest(repo, "multi", index, index_type)
    resolved = client.resolve(repo, "multi")
    assert resolved.digest == entries[1]["digest"]
    assert client.get_manifest(repo, "multi").is_index

    foreign = json.dumps({"schemaVersion": 2, "mediaType": index_type, "manifests": entries[:1]}).encode()
    client.put_manifest(repo, "foreign", foreign, index_type)
    with pytest.raises(RegistryNotFoundError, match=f"no image for linux/{ours}.*linux/{other}"):
        client.resolve(repo, "foreign")


def test_unknown_manifest_and_blob_are_not_found(registry: RegistryServer, tmp_path: Path) -> None:
    client = client_for(registry)
    with pytest.raises(RegistryNotFoundError, match="404") as info:
        client.get_manifest("proto/nothing-here", "latest")
    assert isinstance(info.value, FileNotFoundError)
    with open(tmp_path / "f", "w+b") as f, pytest.raises(RegistryNotFoundError):
        client.fetch_blob("proto/nothing-here", Descriptor(MEDIA_LAYER_GZIP, sha256_digest(b"x"), 1), f)


def test_corrupted_blob_is_rejected(registry: RegistryServer, tmp_path: Path) -> None:
    client = client_for(registry)
    data = os.urandom(200_000)
    desc = push_blob(client, "proto/corrupt", data)
    stored = registry.blob_data(desc.digest)
    raw = bytearray(stored.read_bytes())
    raw[1000] ^= 0xFF  # same size, one bit pattern changed
    stored.write_bytes(bytes(raw))
    with (
        tempfile.TemporaryFile(dir=tmp_path) as f,
        pytest.raises(RegistryDigestError, match="rejected") as info,
    ):
        client.fetch_blob("proto/corrupt", desc, f)
    assert "corrupt" in info.value.hint
    # A descriptor that lies about the size is caught too, before reading past it.
    short = Descriptor(desc.media_type, desc.digest, 100)
    with (
        tempfile.TemporaryFile(dir=tmp_path) as f,
        pytest.raises(RegistryDigestError, match="more than the 100"),
    ):
        client.fetch_blob("proto/corrupt", short, f)


def test_manifest_digest_mismatch_is_rejected(registry: RegistryServer) -> None:
    client = client_for(registry)
    digest, _ = push_manifest(client, "proto/mdigest", "v1", [gz(b"m")])
    stored = registry.blob_data(digest)
    original = stored.read_bytes()
    stored.write_bytes(original.replace(b'"schemaVersion": 2', b'"schemaVersion":  2'))
    assert stored.read_bytes() != original
    with pytest.raises(RegistryDigestError, match="manifest digest"):
        client.get_manifest("proto/mdigest", digest)


def test_plain_http_registry_needs_the_insecure_list(
    registry: RegistryServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = RegistryClient(registry.host, settings=RegistrySettings())
    with pytest.raises(RegistryConnectionError, match="TLS") as info:
        client.ping()
    assert "sandbox_insecure_registries" in info.value.hint
    assert "PYTEST_SANDBOX_INSECURE_REGISTRIES" in info.value.hint
    assert registry.host in info.value.hint
    assert isinstance(info.value, OSError)
    # Listed (here through the environment, as a user would): http is used.
    monkeypatch.setenv("PYTEST_SANDBOX_INSECURE_REGISTRIES", f"example.invalid,{registry.host}")
    listed = RegistryClient(registry.host)
    listed.ping()
    assert listed.origin.scheme == "http"


def test_unreachable_registry_is_a_connection_error() -> None:
    client = RegistryClient("127.0.0.1:9", settings=insecure("127.0.0.1:9"))
    with pytest.raises(RegistryConnectionError, match="cannot reach"):
        client.ping()


# -------------------------------------------------------------------------------------------
# token auth (the registry's own `auth: token`, a real 401 + WWW-Authenticate: Bearer)


def write_docker_config(path: Path, host: str, user: str, password: str) -> None:
    import base64

    path.mkdir(parents=True, exist_ok=True)
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    (path / "config.json").write_text(json.dumps({"auths": {host: {"auth": auth}}}))


def test_bearer_token_flow_with_docker_config_credentials(
    auth_registry: RegistryServer, token_server: TokenServer, tmp_path: Path
) -> None:
    write_docker_config(tmp_path / "docker-config", auth_registry.host, "alice", "s3cret")
    client = client_for(auth_registry)
    before = len(token_server.requests)
    digest, _ = push_manifest(client, "team/app", "1", [gz(b"authed layer")])
    assert client.get_manifest("team/app", "1").digest == digest
    asked = token_server.requests[before:]
    assert asked
    assert {user for user, _ in asked} == {"alice"}
    # The registry's challenge names the actions in no fixed order (pull,push or push,pull).
    granted = [
        {(s.rpartition(":")[0], frozenset(s.rpartition(":")[2].split(","))) for s in scopes}
        for _, scopes in asked
    ]
    assert {("repository:team/app", frozenset({"pull", "push"}))} in granted
    # One token per scope, cached: far fewer token requests than registry requests.
    assert len(asked) <= 3


def test_anonymous_may_pull_but_not_push(auth_registry: RegistryServer, token_server: TokenServer) -> None:
    write_docker_config(Path(os.environ["DOCKER_CONFIG"]), auth_registry.host, "alice", "s3cret")
    digest, _ = push_manifest(client_for(auth_registry), "team/public", "1", [gz(b"public")])
    os.remove(Path(os.environ["DOCKER_CONFIG"]) / "config.json")
    anonymous = client_for(auth_registry)
    assert anonymous.get_manifest("team/public", "1").digest == digest
    assert token_server.requests[-1][0] == ""
    with pytest.raises(RegistryAuthError, match="401") as info:
        push_blob(anonymous, "team/public", b"not allowed")
    assert isinstance(info.value, PermissionError)


def test_wrong_password_is_an_auth_error(auth_registry: RegistryServer, tmp_path: Path) -> None:
    write_docker_config(tmp_path / "docker-config", auth_registry.host, "alice", "wrong")
    with pytest.raises(RegistryAuthError, match=r"token server .* refused") as info:
        client_for(auth_registry).get_manifest("team/app", "1")
    assert "credentials" in info.value.hint


# -------------------------------------------------------------------------------------------
# mirrors and proxies


def test_mirror_is_tried_first_then_the_origin(registry: RegistryServer, mirror: RegistryServer) -> None:
    origin_client, mirror_client = client_for(registry), client_for(mirror)
    on_origin, _ = push_manifest(origin_client, "mirrored/app", "1", [gz(b"origin")])
    on_mirror, _ = push_manifest(mirror_client, "mirrored/app", "1", [gz(b"mirror")])
    only_origin, _ = push_manifest(origin_client, "mirrored/app", "2", [gz(b"origin only")])
    settings = RegistrySettings.parse(f"{registry.host},{mirror.host}", f"{registry.host}={mirror.host}")
    client = RegistryClient(registry.host, settings=settings)
    assert client.get_manifest("mirrored/app", "1").digest == on_mirror != on_origin
    assert client.served_by == [mirror.host]
    assert client.get_manifest("mirrored/app", "2").digest == only_origin  # the mirror lacks it
    assert client.served_by[-1] == registry.host
    # A dead mirror is skipped too.
    dead = RegistryClient(
        registry.host, settings=insecure(registry.host, "127.0.0.1:9"), mirrors=["127.0.0.1:9"]
    )
    assert dead.get_manifest("mirrored/app", "1").digest == on_origin
    # Nobody has it: the origin's error, naming what the mirror said.
    with pytest.raises(RegistryNotFoundError, match=r"also tried: 127\.0\.0\.1:9"):
        dead.get_manifest("mirrored/app", "3")


def test_docker_hub_mirror_serves_official_images(
    mirror: RegistryServer, busybox_layer: Path, tmp_path: Path
) -> None:
    """A bare mirror entry mirrors Docker Hub (as daemon.json): ``name`` is ``library/name`` there."""
    staging = Store(str(tmp_path / "staging"))
    record = make_image(staging, busybox_layer, tmp_path, f"{mirror.host}/library/hubapp:1")
    push(f"{mirror.host}/library/hubapp:1", staging, client=client_for(mirror), quiet=True)
    settings = RegistrySettings.parse(mirror.host, f"http://{mirror.host}")
    client = RegistryClient(None, settings=settings)
    assert client.registry == "docker.io"
    assert client.origin.host == "registry-1.docker.io"
    dst = Store(str(tmp_path / "dst"))
    result = pull("hubapp:1", dst, client=client, quiet=True)
    assert result.ref == "hubapp:1"
    assert dst.resolve("hubapp:1").layers == record.layers
    assert set(client.served_by) == {mirror.host}  # Docker Hub itself was never asked


def test_http_proxy_and_no_proxy_are_honoured(
    registry: RegistryServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = client_for(registry)
    digest, _ = push_manifest(client, "proxied/app", "1", [gz(b"through the proxy")])
    proxy = ForwardProxy()
    try:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        monkeypatch.setenv("NO_PROXY", "example.invalid")
        assert client_for(registry).get_manifest("proxied/app", "1").digest == digest
        assert f"http://{registry.host}/v2/proxied/app/manifests/1" in proxy.urls
        count = len(proxy.urls)
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        assert client_for(registry).get_manifest("proxied/app", "1").digest == digest
        assert len(proxy.urls) == count
    finally:
        proxy.close()


# -------------------------------------------------------------------------------------------
# pull and push through the store


def test_push_then_pull_into_an_empty_store_round_trips_and_runs(
    registry: RegistryServer, busybox_layer: Path, tmp_path: Path, sandbox: Sandbox
) -> None:
    ref = f"{registry.host}/roundtrip/app:1"
    src = Store(str(tmp_path / "src"))
    record = make_image(src, busybox_layer, tmp_path, ref)
    out = io.StringIO()
    pushed = push(ref, src, client=client_for(registry), progress=Progress(out, what=ref))
    assert len(pushed.uploaded) == 2
    assert out.getvalue().count("push ") == 2
    assert f"pushed {ref}: manifest {pushed.manifest_digest}" in out.getvalue()
    again = push(ref, src, client=client_for(registry), quiet=True)  # the registry has every blob
    assert again.uploaded == ()
    assert len(again.present) == 2
    assert again.manifest_digest == pushed.manifest_digest  # deterministic gzip and config

    dst = Store(str(tmp_path / "dst"))
    out = io.StringIO()
    pulled = pull(ref, dst, client=client_for(registry), progress=Progress(out, what=ref))
    assert pulled.manifest_digest == pushed.manifest_digest
    assert pulled.ref == ref
    assert pulled.downloaded == record.layers
    lines = out.getvalue().splitlines()
    assert [line.split()[3] for line in lines[:2]] == ["1/2", "2/2"]  # one line per layer
    got = dst.resolve(ref)
    assert got.layers == record.layers  # same diff_ids: the layers round-tripped exactly
    assert got.config == record.config
    assert [h.created_by for h in got.history] == ["busybox", "hello"]
    assert dst.layer_info(record.layers[1]).created_by == "hello"
    assert dst.layer_info(record.layers[1]).parent == record.layers[0]

    image = Image.load(ref, store=dst)
    r = sandbox.run(["sh", "-c", "cat /hello.txt; echo $GREETING; pwd; ls /etc"], image=image)
    assert r.exit_code == 0, r.stderr
    assert r.stdout.decode().split("\n")[:3] == ["hello from the registry", "hi", "/etc"]
    assert "group" not in r.stdout.decode().split("\n")[3:]  # the whiteout hides busybox's file
    assert "passwd" in r.stdout.decode()

    # Pulling again downloads nothing.
    second = pull(ref, dst, client=client_for(registry), quiet=True)
    assert second.downloaded == ()
    assert second.present == record.layers


def test_pull_by_digest_does_not_tag(registry: RegistryServer, busybox_layer: Path, tmp_path: Path) -> None:
    ref = f"{registry.host}/bydigest/app:1"
    src = Store(str(tmp_path / "src"))
    make_image(src, busybox_layer, tmp_path, ref)
    digest = push(ref, src, client=client_for(registry), quiet=True).manifest_digest
    dst = Store(str(tmp_path / "dst"))
    result = pull(f"{registry.host}/bydigest/app@{digest}", dst, client=client_for(registry), quiet=True)
    assert result.ref is None
    assert dst.refs() == {}
    assert dst.get_image(result.image_id).layers == src.resolve(ref).layers


@pytest.mark.parametrize(
    "diff_ids", [["md5:0"], ["sha256:../../x"], "sha256:" + "0" * 64], ids=["md5", "path", "not-a-list"]
)
def test_malformed_diff_ids_from_a_registry_are_a_registry_error(
    registry: RegistryServer, tmp_path: Path, diff_ids: object
) -> None:
    """The config is the registry's reply: a RegistryError, before any layer is downloaded (as
    before issue 8's re-layout, where the shared config parser raised LayerTarError instead)."""
    client = client_for(registry)
    os_name, arch = host_platform()
    rootfs = {"type": "layers", "diff_ids": diff_ids}
    config = json.dumps({"architecture": arch, "os": os_name, "rootfs": rootfs}).encode()
    cdesc = push_blob(client, "bad/diffids", config, MEDIA_CONFIG)
    ldesc = push_blob(client, "bad/diffids", gz(b"a layer"))
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": cdesc.to_json(),
        "layers": [ldesc.to_json()],
    }
    client.put_manifest("bad/diffids", "1", json.dumps(manifest).encode(), MEDIA_MANIFEST)
    dst = Store(str(tmp_path / "dst"))
    with pytest.raises(RegistryError, match=r"rootfs\.diff_ids"):
        pull(f"{registry.host}/bad/diffids:1", dst, client=client_for(registry), quiet=True)
    assert dst.images() == []


def test_corrupted_layer_blob_is_rejected_and_nothing_is_stored(
    registry: RegistryServer, busybox_layer: Path, tmp_path: Path
) -> None:
    ref = f"{registry.host}/corrupt/app:1"
    src = Store(str(tmp_path / "src"))
    make_image(src, busybox_layer, tmp_path, ref)
    client = client_for(registry)
    push(ref, src, client=client, quiet=True)
    layer = client.resolve("corrupt/app", "1").layers[1]  # the small top layer
    data = registry.blob_data(layer.digest)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))

    dst = Store(str(tmp_path / "dst"))
    with pytest.raises(RegistryDigestError, match=f"{layer.digest}.*rejected, nothing stored"):
        pull(ref, dst, client=client_for(registry), quiet=True)
    stored_layers = os.listdir(tmp_path / "dst" / "layers" / "sha256")
    assert len(stored_layers) == 1  # the good bottom layer, verified, may stay; the bad one never lands
    assert f"sha256:{stored_layers[0]}" == src.resolve(ref).layers[0]
    assert dst.images() == []
    assert dst.refs() == {}
    leftovers = [os.path.join(d, f) for d, _, files in os.walk(tmp_path / "dst" / "tmp") for f in files]
    assert leftovers == []


def test_host_base_image_cannot_be_pushed(registry: RegistryServer, tmp_path: Path) -> None:
    store = Store(str(tmp_path / "store"))
    (tmp_path / "layer").mkdir()
    (tmp_path / "layer" / "f").write_text("x")
    digest = store.add_layer_dir(tmp_path / "layer").digest
    store.tag(
        f"{registry.host}/hostbase/app:1", store.put_image(ImageRecord(layers=(digest,), host_base=True))
    )
    with pytest.raises(SandboxError, match="host"):
        push(f"{registry.host}/hostbase/app:1", store, client=client_for(registry), quiet=True)
    with pytest.raises(RegistryNotFoundError):
        client_for(registry).get_manifest("hostbase/app", "1")


def test_ini_keys_reach_the_client(registry: RegistryServer, mirror: RegistryServer, tmp_path: Path) -> None:
    """A child pytest run whose ini lists the registry as insecure and a mirror for it: the session's
    settings (those Image.pull gives its client) have them."""
    client = client_for(mirror)
    digest, _ = push_manifest(client, "ini/app", "1", [gz(b"served by the mirror")])
    (tmp_path / "pytest.ini").write_text(
        "[pytest]\n"
        f"sandbox_insecure_registries = {registry.host}, {mirror.host}\n"
        f"sandbox_registry_mirrors = {registry.host}={mirror.host}\n"
    )
    (tmp_path / "test_child.py").write_text(
        "from pytest_sandbox.images.registry import RegistryClient\n"
        "from pytest_sandbox.runtime import current_settings\n\n"
        "def test_it():\n"
        f"    c = RegistryClient({registry.host!r}, settings=current_settings().registries)\n"
        f"    assert c.get_manifest('ini/app', '1').digest == {digest!r}\n"
        f"    assert c.served_by == [{mirror.host!r}]\n"
        "    assert c.origin.insecure\n"
    )
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("PYTEST_SANDBOX_") and k != "PYTEST_ADDOPTS"
    }
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# -------------------------------------------------------------------------------------------
# what a real registry will not do on purpose: a scripted server (redirects, hangs, cut bodies)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """Two unrelated self-signed certificates for 127.0.0.1: a registry's and a token server's."""
    tmp = tmp_path_factory.mktemp("certs")
    return {name: make_certificate(tmp, name) for name in ("registry", "token")}


@pytest.fixture
def servers() -> Iterator[list[ScriptedServer]]:
    """Scripted servers a test starts (append them); all closed at the end."""
    started: list[ScriptedServer] = []
    yield started
    for server in started:
        server.close()


def scripted(servers: list[ScriptedServer], script: Script, **kwargs: tuple[Path, Path]) -> ScriptedServer:
    server = ScriptedServer(script, **kwargs)
    servers.append(server)
    return server


BLOB = os.urandom(50_000)
BLOB_DESC = Descriptor(MEDIA_LAYER_GZIP, sha256_digest(BLOB), len(BLOB))


def test_credentials_are_not_sent_on_a_redirect_to_storage(
    servers: list[ScriptedServer], tmp_path: Path
) -> None:
    """A blob download redirected to another host: the Bearer token stays with the registry."""
    storage = scripted(servers, lambda h, seen: reply(h, 200, BLOB))

    def registry_script(h: http.server.BaseHTTPRequestHandler, seen: Seen) -> None:
        if seen.path.startswith("/token"):
            reply(h, 200, json.dumps({"token": "T0K3N", "expires_in": 300}).encode())
        elif seen.headers.get("authorization") != "Bearer T0K3N":
            challenge = f'Bearer realm="{fake.url}/token",service="scripted"'
            reply(h, 401, b"{}", {"WWW-Authenticate": challenge})
        else:
            reply(h, 307, headers={"Location": f"{storage.url}/data/blob?X-Signature=s3cr3t"})

    fake = scripted(servers, registry_script)
    client = RegistryClient(fake.host, settings=insecure(fake.host), credentials=("alice", "pw"))
    with open(tmp_path / "blob", "w+b") as f:
        client.fetch_blob("scripted/app", BLOB_DESC, f)
        f.seek(0)
        assert f.read() == BLOB
    assert [s.path for s in storage.requests] == ["/data/blob?X-Signature=s3cr3t"]
    assert "authorization" not in storage.requests[0].headers
    token_request = next(s for s in fake.requests if s.path.startswith("/token"))
    assert token_request.headers["authorization"].startswith("Basic ")


def test_a_redirect_from_https_to_http_is_refused(
    servers: list[ScriptedServer], certs: dict[str, tuple[Path, Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(certs["registry"][1]))  # a trusted https registry
    storage = scripted(servers, lambda h, seen: reply(h, 200, BLOB))
    fake = scripted(
        servers,
        lambda h, seen: reply(h, 307, headers={"Location": f"{storage.url}/blob?sig=s3cr3t"}),
        tls=certs["registry"],
    )
    client = RegistryClient(fake.host, settings=RegistrySettings())
    with (
        tempfile.TemporaryFile() as f,
        pytest.raises(RegistryConnectionError, match="refusing to leave https for http") as info,
    ):
        client.fetch_blob("scripted/app", BLOB_DESC, f)
    assert "s3cr3t" not in info.value.message  # a signed URL is a credential: not printed
    assert storage.requests == []
    assert fake.requests[0].tls


def test_an_http_upload_location_from_an_https_registry_is_refused(
    servers: list[ScriptedServer], certs: dict[str, tuple[Path, Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The registry's own host, but plain http: the credentials must not go there in clear."""
    monkeypatch.setenv("SSL_CERT_FILE", str(certs["registry"][1]))

    def registry_script(h: http.server.BaseHTTPRequestHandler, seen: Seen) -> None:
        if "authorization" not in seen.headers:
            reply(h, 401, b"{}", {"WWW-Authenticate": 'Basic realm="scripted"'})
        elif seen.method == "HEAD":
            reply(h, 404)
        elif seen.method == "POST":
            reply(h, 202, headers={"Location": f"http://{fake.host}/upload/1?_state=abc"})
        else:
            reply(h, 201)

    fake = scripted(servers, registry_script, tls=certs["registry"])
    client = RegistryClient(fake.host, settings=RegistrySettings(), credentials=("alice", "s3cret"))
    with pytest.raises(RegistryConnectionError, match="refusing to go on over http"):
        client.push_blob("scripted/app", BLOB_DESC.digest, io.BytesIO(BLOB), len(BLOB))
    assert [s.method for s in fake.requests] == ["HEAD", "HEAD", "POST"]
    assert all(s.tls for s in fake.requests)


def test_an_untrusted_token_server_gets_no_credentials(
    servers: list[ScriptedServer], certs: dict[str, tuple[Path, Path]]
) -> None:
    """An insecure registry's certificate is not checked; its token server's (not listed) is."""
    token = scripted(servers, lambda h, seen: reply(h, 200, b'{"token": "T"}'), tls=certs["token"])
    challenge = f'Bearer realm="{token.url}/token",service="scripted"'
    fake = scripted(
        servers, lambda h, seen: reply(h, 401, b"{}", {"WWW-Authenticate": challenge}), tls=certs["registry"]
    )
    client = RegistryClient(fake.host, settings=insecure(fake.host), credentials=("alice", "s3cret"))
    with pytest.raises(RegistryConnectionError, match="token server") as info:
        client.get_manifest("scripted/app", "1")
    assert f"PYTEST_SANDBOX_INSECURE_REGISTRIES={token.host}" in info.value.hint
    assert token.requests == []  # the handshake failed before a byte of the request
    assert fake.requests
    assert all(s.tls for s in fake.requests)
    # Listed too: then it is trusted like the registry.
    listed = RegistryClient(fake.host, settings=insecure(fake.host, token.host))
    with pytest.raises(RegistryAuthError, match="401"):  # the token does not satisfy the script
        listed.get_manifest("scripted/app", "1")
    assert token.requests


def test_a_plain_http_token_realm_is_refused_for_an_https_registry(
    servers: list[ScriptedServer], certs: dict[str, tuple[Path, Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(certs["registry"][1]))
    token = scripted(servers, lambda h, seen: reply(h, 200, b'{"token": "T"}'))
    challenge = f'Bearer realm="{token.url}/token"'
    fake = scripted(
        servers, lambda h, seen: reply(h, 401, b"{}", {"WWW-Authenticate": challenge}), tls=certs["registry"]
    )
    client = RegistryClient(fake.host, settings=RegistrySettings(), credentials=("alice", "s3cret"))
    with pytest.raises(RegistryAuthError, match="refusing a plain-http token realm"):
        client.get_manifest("scripted/app", "1")
    assert token.requests == []


def test_a_body_cut_short_is_a_connection_error_and_the_origin_serves(
    servers: list[ScriptedServer], registry: RegistryServer, tmp_path: Path
) -> None:
    def cut_short(h: http.server.BaseHTTPRequestHandler, seen: Seen) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(len(BLOB)))
        h.end_headers()
        h.wfile.write(BLOB[: len(BLOB) // 2])

    mirror = scripted(servers, cut_short)
    with (
        tempfile.TemporaryFile(dir=tmp_path) as f,
        pytest.raises(RegistryConnectionError, match="closed with 25000 bytes"),
    ):
        RegistryClient(mirror.host, settings=insecure(mirror.host)).fetch_blob("cut/app", BLOB_DESC, f)
    push_blob(client_for(registry), "cut/app", BLOB)
    client = RegistryClient(
        registry.host, settings=insecure(registry.host, mirror.host), mirrors=[mirror.host]
    )
    with open(tmp_path / "blob", "w+b") as f:
        client.fetch_blob("cut/app", BLOB_DESC, f)  # the mirror failed mid-body: the origin served it
        f.seek(0)
        assert f.read() == BLOB
    assert client.served_by == [registry.host]
    assert len(mirror.requests) == 2


@pytest.mark.parametrize("when", ["before the headers", "in the body"])
def test_a_registry_that_goes_silent_times_out(servers: list[ScriptedServer], when: str) -> None:
    def silent(h: http.server.BaseHTTPRequestHandler, seen: Seen) -> None:
        if when == "in the body":
            h.send_response(200)
            h.send_header("Content-Type", MEDIA_MANIFEST)
            h.send_header("Content-Length", "1000")
            h.end_headers()
            h.wfile.write(b'{"schemaVersion"')
            h.wfile.flush()
        server.release.wait(30)

    server = scripted(servers, silent)
    client = RegistryClient(server.host, settings=insecure(server.host), timeout=0.5)
    start = time.monotonic()
    with pytest.raises(RegistryConnectionError, match=r"no answer within 0\.5s") as info:
        client.get_manifest("silent/app", "1")
    assert time.monotonic() - start < 10
    assert "went silent" in info.value.hint


def test_oversized_manifest_and_token_answers_are_refused(servers: list[ScriptedServer]) -> None:
    big = b'{"schemaVersion": 2, "pad": "' + b"x" * (5 << 20) + b'"}'
    manifest = scripted(servers, lambda h, seen: reply(h, 200, big, {"Content-Type": MEDIA_MANIFEST}))
    with pytest.raises(RegistryDigestError, match="larger than"):
        RegistryClient(manifest.host, settings=insecure(manifest.host)).get_manifest("big/app", "1")

    def registry_script(h: http.server.BaseHTTPRequestHandler, seen: Seen) -> None:
        if seen.path.startswith("/token"):
            reply(h, 200, b'{"token": "' + b"x" * (2 << 20) + b'"}')
        else:
            reply(h, 401, b"{}", {"WWW-Authenticate": f'Bearer realm="{fake.url}/token"'})

    fake = scripted(servers, registry_script)
    with pytest.raises(RegistryAuthError, match="larger than"):
        RegistryClient(fake.host, settings=insecure(fake.host)).get_manifest("big/app", "1")


def test_https_proxy_and_no_proxy_are_honoured(
    servers: list[ScriptedServer], certs: dict[str, tuple[Path, Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An https registry through HTTPS_PROXY (a CONNECT tunnel); NO_PROXY bypasses it."""
    monkeypatch.setenv("SSL_CERT_FILE", str(certs["registry"][1]))
    manifest = json.dumps(
        {"schemaVersion": 2, "mediaType": MEDIA_MANIFEST, "config": BLOB_DESC.to_json(), "layers": []}
    ).encode()
    fake = scripted(
        servers,
        lambda h, seen: reply(h, 200, manifest, {"Content-Type": MEDIA_MANIFEST}),
        tls=certs["registry"],
    )
    proxy = ForwardProxy()
    try:
        monkeypatch.setenv("HTTPS_PROXY", proxy.url)
        monkeypatch.setenv("NO_PROXY", "example.invalid")
        client = RegistryClient(fake.host, settings=RegistrySettings())
        assert client.get_manifest("proxied/app", "1").digest == sha256_digest(manifest)
        assert proxy.urls == [f"CONNECT {fake.host}"]
        assert [s.tls for s in fake.requests] == [True]
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        client = RegistryClient(fake.host, settings=RegistrySettings())
        assert client.get_manifest("proxied/app", "1").digest == sha256_digest(manifest)
        assert len(proxy.urls) == 1
        assert len(fake.requests) == 2
    finally:
        proxy.close()


def test_import_progress_callback_draws_a_live_line_per_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    """The printer the CLI gives oci.import_image: rewritten in place on a terminal, one line per layer."""

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    clock = iter(float(t) for t in range(100))
    monkeypatch.setattr("pytest_sandbox.cli.time.monotonic", lambda: next(clock))
    out = Terminal()
    update = Progress(out, what="app:1").callback("import")
    digest = sha256_digest(b"layer")
    for done in (0, 1 << 20, 2 << 20, 3 << 20):
        update(digest, done, 3 << 20)
    update("/tmp/archive.tar.gz", 10, 10)
    lines = out.getvalue().split("\n")
    assert lines[0].count("\r") == 3  # 33%, 66%, then the final line over them
    assert f"\rimport app:1 {digest[7:19]} 2.1 MB/3.1 MB  66%\x1b[K" in lines[0]
    assert lines[0].endswith(f"\rimport app:1 {digest[7:19]} 3.1 MB in 3.0s\x1b[K")
    assert lines[1] == "\rimport app:1 archive.tar.gz 10 B in 0.0s\x1b[K"
    plain = io.StringIO()
    update = Progress(plain, what="app:1").callback("import")
    for done in (0, 1, 2):
        update(digest, done, 2)
    assert plain.getvalue() == f"import app:1 {digest[7:19]} 2 B in 2.0s\n"
