"""Image archives without a store: transport names, the OCI config <-> record mapping and its
refusals, the public media types, a docker archive's manifest checked before anything is read.
Import, export and interop with skopeo and umoci are in tests/kernel/test_oci.py."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from pytest_sandbox import InvalidSpecError
from pytest_sandbox.image import History, ImageConfig
from pytest_sandbox.images.archive import (
    Transport,
    import_image,
    parse_transport,
)
from pytest_sandbox.images.manifest import config_from_record, record_from_config
from pytest_sandbox.images.store import ImageRecord, Store


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("oci:/x/layout", Transport("oci", "/x/layout", None)),
        ("oci:rel/layout:v1.0", Transport("oci", "rel/layout", "v1.0")),
        ("oci:/l:name:tag", Transport("oci", "/l", "name:tag")),
        ("docker-archive:/x/a.tar", Transport("docker-archive", "/x/a.tar", None)),
        ("docker-archive:a.tar:user/app:2", Transport("docker-archive", "a.tar", "user/app:2")),
    ],
)
def test_parse_transport(text: str, expected: Transport) -> None:
    assert parse_transport(text) == expected
    assert str(expected) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "oci",
        "oci:",
        "docker:app",
        "dir:/x",
        "oci:/l:../x",
        "oci:/l:-bad",
        "docker-archive:a.tar:UP",
        "oci:\0",
    ],
)
def test_parse_transport_refuses(text: str) -> None:
    with pytest.raises(InvalidSpecError):
        parse_transport(text)


T = "2024-01-01T00:00:00.5Z"  # RFC 3339: any other "created" is left out of a config


def test_config_and_record_round_trip() -> None:
    record = ImageRecord(
        layers=("sha256:" + "a" * 64, "sha256:" + "b" * 64),
        config=ImageConfig(
            env=(("A", "1"), ("B", "x=y")), workdir="/w", user="1000:1000", cmd=("c",), entrypoint=("e", "-x")
        ),
        created="2024-01-01T00:00:00Z",
        history=(History(T, "one"), History(T, "env", True), History(T, "two")),
    )
    config = config_from_record(record)
    assert config["rootfs"] == {"type": "layers", "diff_ids": list(record.layers)}
    assert config["config"]["Env"] == ["A=1", "B=x=y"]
    assert config["history"][1] == {"created": T, "created_by": "env", "empty_layer": True}
    assert record_from_config(config) == record
    assert record_from_config(json.loads(json.dumps(config))).id == record.id


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"rootfs": {"type": "layers", "diff_ids": ["sha256:../../x"]}}, "diff_id"),
        ({"rootfs": {"type": "layers", "diff_ids": ["sha512:" + "a" * 128]}}, "diff_id"),
        ({"rootfs": {"type": "other", "diff_ids": []}}, "rootfs"),
        ({"os": "windows", "rootfs": {"type": "layers", "diff_ids": []}}, "only linux"),
        ({"rootfs": {"type": "layers", "diff_ids": []}, "config": {"Env": "A=1"}}, "Env"),
        ({"rootfs": {"type": "layers", "diff_ids": []}, "config": {"Cmd": [1]}}, "Cmd"),
    ],
)
def test_record_from_config_refuses_bad_configs(config: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidSpecError, match=message):
        record_from_config(config)


def test_media_types_and_hashing_writer_are_public() -> None:
    from pytest_sandbox.images import manifest as oci

    assert oci.MANIFEST_TYPES == (oci.MEDIA_MANIFEST, oci.DOCKER_MANIFEST)
    assert oci.INDEX_TYPES == (oci.MEDIA_INDEX, oci.DOCKER_MANIFEST_LIST)
    assert oci.CONFIG_TYPES == (oci.MEDIA_CONFIG, oci.DOCKER_CONFIG)
    assert {oci.MEDIA_LAYER_GZIP, oci.DOCKER_LAYER_GZIP, oci.DOCKER_LAYER} <= set(oci.LAYER_TYPES)
    out = io.BytesIO()
    sink = oci.HashingWriter(out)
    sink.write(b"abc")
    assert out.getvalue() == b"abc"
    assert sink.digest().diff_id == "sha256:" + hashlib.sha256(b"abc").hexdigest()
    assert sink.digest().size == 3


def test_docker_archive_repo_tags_must_be_a_list(tmp_path: Path) -> None:
    """``"RepoTags": "app:10"`` picked the image for ``:app:1`` (a substring test on a string)."""
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as t:
        info = tarfile.TarInfo("f")
        t.addfile(info, io.BytesIO(b""))
    diff_id = "sha256:" + hashlib.sha256(layer.getvalue()).hexdigest()
    config = json.dumps({"os": "linux", "rootfs": {"type": "layers", "diff_ids": [diff_id]}}).encode()
    manifest = json.dumps([{"Config": "c.json", "RepoTags": "app:10", "Layers": ["l.tar"]}]).encode()
    with tarfile.open(tmp_path / "a.tar", "w") as t:
        for name, data in (("l.tar", layer.getvalue()), ("c.json", config), ("manifest.json", manifest)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    with pytest.raises(InvalidSpecError, match="no image tagged 'app:1'"):
        import_image(f"docker-archive:{tmp_path / 'a.tar'}:app:1", None, store=Store(tmp_path / "s"))
