"""Registry settings and parsing, no server: the insecure list, mirrors from the environment,
bad settings, WWW-Authenticate challenges, Docker's credential file, names refused before any
request.  The protocol against real registries is tests/kernel/test_registry.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pytest_sandbox.config import RegistrySettings
from pytest_sandbox.core.errors import (
    InvalidSpecError,
    RegistryAuthError,
    RegistryError,
)
from pytest_sandbox.images.registry import (
    RegistryClient,
    docker_credentials,
    parse_challenge,
)
from tests.registry_support import insecure, no_ambient_config  # noqa: F401 -- autouse: a clean environment


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
