"""The registry client against real registries (Debian's docker-registry) on loopback.

Protocol tests build their blobs and manifests here; the pull/push tests go through the store.
Every registry, token server and proxy is started by a fixture of this module and stopped (by
pid, or by shutting its thread down) at the end.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_sandbox import Image, Sandbox
from pytest_sandbox.errors import (
    InvalidSpecError,
    RegistryAuthError,
    RegistryConnectionError,
    RegistryDigestError,
    RegistryError,
    RegistryNotFoundError,
    SandboxError,
)
from pytest_sandbox.registry import (
    MEDIA_DOCKER_LIST,
    MEDIA_DOCKER_MANIFEST,
    MEDIA_OCI_CONFIG,
    MEDIA_OCI_INDEX,
    MEDIA_OCI_LAYER_GZIP,
    MEDIA_OCI_MANIFEST,
    Descriptor,
    RegistryClient,
    RegistrySettings,
    docker_credentials,
    host_platform,
    parse_challenge,
    pull,
    push,
    sha256_digest,
)
from pytest_sandbox.store import ImageRecord, Store
from tests.registry_support import ForwardProxy, RegistryServer, TokenServer, make_image


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


@pytest.fixture(autouse=True)
def _no_ambient_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No proxy, mirror, insecure list or Docker credentials from the environment of the test run."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("PYTEST_SANDBOX_INSECURE_REGISTRIES", raising=False)
    monkeypatch.delenv("PYTEST_SANDBOX_REGISTRY_MIRRORS", raising=False)
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker-config"))


def insecure(*hosts: str) -> RegistrySettings:
    return RegistrySettings.parse(",".join(hosts))


def client_for(server: RegistryServer) -> RegistryClient:
    """A client of ``server``, listed as insecure (it speaks plain http), without mirrors."""
    return RegistryClient(server.host, settings=insecure(server.host))


def gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def push_blob(
    client: RegistryClient, repo: str, data: bytes, media_type: str = MEDIA_OCI_LAYER_GZIP
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
    media_type: str = MEDIA_OCI_MANIFEST,
) -> tuple[str, int]:
    config = json.dumps(
        {"architecture": arch, "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}
    ).encode()
    cdesc = push_blob(client, repo, config, MEDIA_OCI_CONFIG)
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


def test_insecure_list_matches_host_port_bare_host_and_cidr() -> None:
    s = RegistrySettings.parse("reg.example:5000, 127.0.0.1 ,10.0.0.0/8")
    assert s.is_insecure("reg.example:5000")
    assert not s.is_insecure("reg.example:5001")
    assert not s.is_insecure("reg.example")
    assert s.is_insecure("127.0.0.1:41234")  # no port in the entry: every port
    assert s.is_insecure("10.1.2.3:443")
    assert not s.is_insecure("11.0.0.1")
    assert not RegistrySettings().is_insecure("127.0.0.1:5000")  # loopback is not insecure by default


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTEST_SANDBOX_INSECURE_REGISTRIES", "127.0.0.1:5000")
    monkeypatch.setenv(
        "PYTEST_SANDBOX_REGISTRY_MIRRORS", "https://mirror.example, 127.0.0.1:5000=http://127.0.0.1:5000"
    )
    s = RegistrySettings.from_env()
    assert s.is_insecure("127.0.0.1:5000")
    assert s.mirrors_for("docker.io") == ["mirror.example"]
    assert s.mirrors_for("index.docker.io") == ["mirror.example"]
    assert s.mirrors_for("127.0.0.1:5000") == ["127.0.0.1:5000"]


@pytest.mark.parametrize(
    ("insecure_list", "mirrors", "match"),
    [
        ("not a host", "", "not a registry host"),
        ("300.1.2.3/99", "", "neither host"),
        ("", "ftp://mirror.example", "http"),
        ("", "https://mirror.example/path", "no path"),
        ("", "http://mirror.example", "not an insecure registry"),
    ],
)
def test_bad_settings_are_refused(insecure_list: str, mirrors: str, match: str) -> None:
    with pytest.raises(InvalidSpecError, match=match):
        RegistrySettings.parse(insecure_list, mirrors)


def test_challenge_parsing() -> None:
    scheme, params = parse_challenge(
        'Bearer realm="https://auth.example/token",service="reg",scope="repository:a/b:pull,push"'
    )
    assert scheme == "bearer"
    assert params == {
        "realm": "https://auth.example/token",
        "service": "reg",
        "scope": "repository:a/b:pull,push",
    }
    assert parse_challenge('Basic realm="x"') == ("basic", {"realm": "x"})


def test_docker_config_credentials(tmp_path: Path) -> None:
    import base64

    path = tmp_path / "config.json"
    path.write_text(
        json.dumps(
            {
                "auths": {
                    "https://index.docker.io/v1/": {"auth": base64.b64encode(b"hub:pw").decode()},
                    "127.0.0.1:5000": {"auth": base64.b64encode(b"alice:s3:cret").decode()},
                }
            }
        )
    )
    assert docker_credentials("127.0.0.1:5000", str(path)) == ("alice", "s3:cret")
    assert docker_credentials("docker.io", str(path)) == ("hub", "pw")
    assert docker_credentials("other.example", str(path)) is None
    assert docker_credentials("x", str(tmp_path / "missing.json")) is None
    path.write_text("{not json")
    with pytest.raises(RegistryAuthError, match="cannot read Docker credentials"):
        docker_credentials("x", str(path))


def test_bad_repository_and_reference_refused_before_any_request() -> None:
    client = RegistryClient("127.0.0.1:9", settings=insecure("127.0.0.1:9"))  # nothing listens on port 9
    with pytest.raises(InvalidSpecError):
        client.get_manifest("../etc", "latest")
    with pytest.raises(InvalidSpecError):
        client.get_manifest("ok", "bad tag!")
    with pytest.raises(RegistryError, match="not a sha256 digest"):
        client.get_manifest("ok", "sha256:../../x")


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
    for media_type in (MEDIA_OCI_MANIFEST, MEDIA_DOCKER_MANIFEST):
        digest, _ = push_manifest(client, "proto/manifest", "v1", [gz(b"layer one")], media_type=media_type)
        by_tag = client.get_manifest("proto/manifest", "v1")
        assert by_tag.digest == digest
        assert by_tag.media_type == media_type
        by_digest = client.get_manifest("proto/manifest", digest)
        assert by_digest.raw == by_tag.raw
        assert [d.digest for d in by_tag.layers] == [sha256_digest(gz(b"layer one"))]
        assert client.read_blob("proto/manifest", by_tag.config).startswith(b"{")


@pytest.mark.parametrize("index_type", [MEDIA_OCI_INDEX, MEDIA_DOCKER_LIST])
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
                "mediaType": MEDIA_OCI_MANIFEST,
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
        client.fetch_blob("proto/nothing-here", Descriptor(MEDIA_OCI_LAYER_GZIP, sha256_digest(b"x"), 1), f)


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
    assert ["repository:team/app:pull,push"] in [scopes for _, scopes in asked]
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
    pushed = push(ref, src, client=client_for(registry), progress=out)
    assert len(pushed.uploaded) == 2
    assert out.getvalue().count("push ") == 2
    assert f"pushed {ref}: manifest {pushed.manifest_digest}" in out.getvalue()
    again = push(ref, src, client=client_for(registry), quiet=True)  # the registry has every blob
    assert again.uploaded == ()
    assert len(again.present) == 2
    assert again.manifest_digest == pushed.manifest_digest  # deterministic gzip and config

    dst = Store(str(tmp_path / "dst"))
    out = io.StringIO()
    pulled = pull(ref, dst, client=client_for(registry), progress=out)
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
    """A child pytest run whose ini lists the registry as insecure and a mirror for it."""
    client = client_for(mirror)
    digest, _ = push_manifest(client, "ini/app", "1", [gz(b"served by the mirror")])
    (tmp_path / "pytest.ini").write_text(
        "[pytest]\n"
        f"sandbox_insecure_registries = {registry.host}, {mirror.host}\n"
        f"sandbox_registry_mirrors = {registry.host}={mirror.host}\n"
    )
    (tmp_path / "test_child.py").write_text(
        "from pytest_sandbox.registry import RegistryClient\n\n"
        "def test_it():\n"
        f"    c = RegistryClient({registry.host!r})\n"
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
