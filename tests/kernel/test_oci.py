"""OCI image layouts and docker-archive tarballs, proven both ways against Debian's skopeo and umoci.

- Ours -> theirs: an image we export (``oci:DIR:TAG``, ``docker-archive:FILE``) is read by
  ``skopeo inspect``, copied by ``skopeo copy`` (which verifies every digest) and unpacked by
  ``umoci unpack``, whose rootfs shows our whiteouts and opaque directories applied.
- Theirs -> ours: an image made with ``umoci init/new/insert/config`` (whiteouts included), and
  the same image after ``skopeo copy`` to a docker-archive (plain layers) or hand-gzipped layers,
  is imported and runs in a container with its Env, WorkingDir and Cmd.
- Transports parse as skopeo's; the config <-> record mapping round-trips; images on the host
  base are refused for export.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pytest_sandbox import Image, InvalidSpecError, Sandbox
from pytest_sandbox.core.errors import LayerTarError
from pytest_sandbox.core.imagemodel import is_rfc3339
from pytest_sandbox.image import History, ImageConfig
from pytest_sandbox.images.archive import (
    export_docker_archive,
    export_image,
    export_oci_layout,
    import_docker_archive,
    import_image,
    import_oci_layout,
)
from pytest_sandbox.images.registry import RegistryClient, pull, push
from pytest_sandbox.images.store import ImageRecord, Store
from tests.layertar_support import tree
from tests.registry_support import RegistryServer, insecure


def _tool(*argv: str) -> str:
    assert shutil.which(argv[0]), f"{argv[0]} is not installed (.ci/setup installs it)"
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, f"{' '.join(argv)} failed: {r.stderr}"
    return r.stdout


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store")


def _layers_with_deletions(tmp_path: Path) -> tuple[Path, Path]:
    """Layer 1 adds files and a dir; layer 2 (overlay format) deletes one and makes the dir opaque."""
    one, two = tmp_path / "one", tmp_path / "two"
    (one / "opt").mkdir(parents=True)
    (one / "opt" / "old").write_text("old\n")
    (one / "gone").write_text("to be deleted\n")
    (one / "etc").mkdir()
    (one / "etc" / "motd").write_text("layer one\n")
    (two / "opt").mkdir(parents=True)
    (two / "opt" / "new").write_text("new\n")
    os.setxattr(two / "opt", "trusted.overlay.opaque", b"y")
    os.mknod(two / "gone", 0o020000, 0)  # a whiteout, as overlayfs writes it
    return one, two


@pytest.fixture
def our_image(store: Store, busybox_layer: Path, tmp_path: Path) -> str:
    """A 3-layer image of ours: busybox, then adds, then deletions; tagged ours:1."""
    one, two = _layers_with_deletions(tmp_path)
    digests = [store.add_layer_dir(str(d)).digest for d in (busybox_layer, one, two)]
    record = ImageRecord(
        layers=tuple(digests),
        config=ImageConfig(env=(("GREETING", "hi"),), workdir="/opt", cmd=("sh", "-c", "ls")),
        created="2024-05-01T00:00:00Z",
        history=(History("2024-05-01T00:00:00Z", f"layer {i}") for i in range(3)),  # type: ignore[arg-type]
    )
    store.tag("ours:1", store.put_image(record))
    return "ours:1"


# -- ours -> theirs ---------------------------------------------------------------------------


def test_exported_oci_layout_is_read_by_skopeo_and_unpacked_by_umoci(
    store: Store, our_image: str, tmp_path: Path
) -> None:
    layout = tmp_path / "layout"
    digest = export_oci_layout(store, our_image, str(layout), "v1")
    info = json.loads(_tool("skopeo", "inspect", f"oci:{layout}:v1"))
    assert info["Digest"] == digest
    assert len(info["Layers"]) == 3
    assert info["Env"] == ["GREETING=hi"]
    assert info["Os"] == "linux"
    config = json.loads(_tool("skopeo", "inspect", "--config", f"oci:{layout}:v1"))
    assert config["rootfs"]["diff_ids"] == list(store.resolve(our_image).layers)
    assert config["config"]["WorkingDir"] == "/opt"
    # skopeo copy reads and verifies every blob
    _tool("skopeo", "copy", f"oci:{layout}:v1", f"oci:{tmp_path / 'copy'}:v1")
    bundle = tmp_path / "bundle"
    _tool("umoci", "unpack", "--image", f"{layout}:v1", str(bundle))
    rootfs = bundle / "rootfs"
    assert (rootfs / "bin" / "busybox").is_file()
    assert not (rootfs / "gone").exists()  # our whiteout, applied by umoci
    assert sorted(os.listdir(rootfs / "opt")) == ["new"]  # our opaque dir, applied by umoci
    assert (rootfs / "etc" / "motd").read_text() == "layer one\n"


def test_exported_docker_archive_is_read_by_skopeo(store: Store, our_image: str, tmp_path: Path) -> None:
    archive = tmp_path / "image.tar"
    export_docker_archive(store, our_image, str(archive))
    info = json.loads(_tool("skopeo", "inspect", f"docker-archive:{archive}"))
    assert len(info["Layers"]) == 3
    _tool("skopeo", "copy", f"docker-archive:{archive}", f"oci:{tmp_path / 'fromarchive'}:x")
    _tool("umoci", "unpack", "--image", f"{tmp_path / 'fromarchive'}:x", str(tmp_path / "bundle"))
    assert not (tmp_path / "bundle" / "rootfs" / "gone").exists()
    with tarfile.open(archive) as t:
        manifest = json.load(t.extractfile("manifest.json"))  # type: ignore[arg-type]
    assert manifest[0]["RepoTags"] == ["ours:1"]


def test_export_then_import_is_the_same_image(store: Store, our_image: str, tmp_path: Path) -> None:
    original = store.resolve_id(our_image)
    export_image(our_image, f"oci:{tmp_path / 'layout'}:v1", store=store)
    export_image(our_image, f"docker-archive:{tmp_path / 'a.tar'}:saved:2", store=store)
    other = Store(tmp_path / "other")
    assert import_image(f"oci:{tmp_path / 'layout'}:v1", "back:1", store=other) == original
    assert import_image(f"docker-archive:{tmp_path / 'a.tar'}", None, store=other) == original
    assert other.refs() == {"back:1": original, "saved:2": original}
    assert tree(Path(other.layer_path(other.resolve("back:1").layers[2]))) == tree(
        Path(store.layer_path(store.resolve(our_image).layers[2]))
    )
    # importing again is a no-op
    assert import_image(f"oci:{tmp_path / 'layout'}:v1", None, store=other) == original


def test_exported_layout_is_deterministic(store: Store, our_image: str, tmp_path: Path) -> None:
    a = export_oci_layout(store, our_image, str(tmp_path / "a"), "v1")
    b = export_oci_layout(store, our_image, str(tmp_path / "b"), "v1")
    assert a == b
    # a second tag into the same layout adds an entry; re-export of a tag replaces its entry
    export_oci_layout(store, our_image, str(tmp_path / "a"), "v2")
    export_oci_layout(store, our_image, str(tmp_path / "a"), "v2")
    index = json.loads((tmp_path / "a" / "index.json").read_text())
    names = [m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"]]
    assert names == ["v1", "v2"]
    with pytest.raises(InvalidSpecError, match="say which one"):
        import_oci_layout(Store(tmp_path / "other"), str(tmp_path / "a"))


# -- theirs -> ours ---------------------------------------------------------------------------


@pytest.fixture
def umoci_layout(tmp_path: Path, busybox_layer: Path) -> Path:
    """An image built by umoci alone: busybox, files, a whiteout and an opaque insert, a config."""
    layout = tmp_path / "umoci"
    extra = tmp_path / "extra"
    (extra / "a").mkdir(parents=True)
    (extra / "a" / "keep").write_text("keep\n")
    (extra / "a" / "drop").write_text("drop\n")
    (extra / "b").mkdir()
    (extra / "b" / "old").write_text("old\n")
    replacement = tmp_path / "replacement"
    replacement.mkdir()
    (replacement / "fresh").write_text("fresh\n")
    image = f"{layout}:base"
    _tool("umoci", "init", "--layout", str(layout))
    _tool("umoci", "new", "--image", image)
    _tool("umoci", "insert", "--image", image, str(busybox_layer), "/")
    _tool("umoci", "insert", "--image", image, str(extra), "/srv")
    _tool("umoci", "insert", "--image", image, "--whiteout", "/srv/a/drop")
    _tool("umoci", "insert", "--image", image, "--opaque", str(replacement), "/srv/b")
    _tool(
        "umoci",
        "config",
        "--image",
        image,
        "--config.env",
        "FROM_UMOCI=yes",
        "--config.workingdir",
        "/srv",
        "--config.cmd",
        "sh",
    )
    return layout


EXPECTED_SRV = "FROM_UMOCI=yes\n/srv\nkeep\nfresh\n"
PROBE = ["sh", "-c", 'echo "FROM_UMOCI=$FROM_UMOCI"; pwd; ls a; ls b']


def test_umoci_image_is_imported_and_runs(
    umoci_layout: Path, store: Store, sandbox: Sandbox, tmp_path: Path
) -> None:
    image_id = import_oci_layout(store, str(umoci_layout), "base", "fromumoci:1")
    image = Image.load("fromumoci:1", store=store)
    assert image.image_id == image_id
    assert not image.host
    assert ("FROM_UMOCI", "yes") in image.config.env
    assert sandbox.run(PROBE, image=image).check().stdout.decode() == EXPECTED_SRV


def test_skopeo_docker_archive_plain_and_gzip_layers_are_imported_and_run(
    umoci_layout: Path, store: Store, sandbox: Sandbox, tmp_path: Path
) -> None:
    plain = tmp_path / "plain.tar"
    _tool("skopeo", "copy", f"oci:{umoci_layout}:base", f"docker-archive:{plain}:skopeo/made:1")
    image_id = import_docker_archive(store, str(plain))
    assert store.refs() == {"skopeo/made:1": image_id}
    out = sandbox.run(PROBE, image=Image.load("skopeo/made:1", store=store)).check().stdout.decode()
    assert out == EXPECTED_SRV
    # the same archive with every layer gzip-compressed imports as the same image
    zipped = tmp_path / "gzip.tar"
    _gzip_layers(plain, zipped)
    other = Store(tmp_path / "other")
    assert import_image(f"docker-archive:{zipped}", "zipped:1", store=other) == image_id
    out = sandbox.run(PROBE, image=Image.load("zipped:1", store=other)).check().stdout.decode()
    assert out == EXPECTED_SRV
    # and the whole archive gzipped (docker save | gzip)
    whole = tmp_path / "whole.tar.gz"
    whole.write_bytes(gzip.compress(plain.read_bytes()))
    assert import_image(f"docker-archive:{whole}:skopeo/made:1", "whole:1", store=other) == image_id


def _gzip_layers(src: Path, dst: Path) -> None:
    """Rewrite a docker-archive with gzip layers (as older ``docker save`` | tools produce)."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        members = {m.name: m for m in tin.getmembers() if m.isfile()}
        manifest = json.load(tin.extractfile("manifest.json"))  # type: ignore[arg-type]
        renames = {}
        for name in manifest[0]["Layers"]:
            data = gzip.compress(tin.extractfile(members[name]).read(), mtime=0)  # type: ignore[union-attr]
            renames[name] = name + ".gz"
            info = tarfile.TarInfo(renames[name])
            info.size = len(data)
            tout.addfile(info, io.BytesIO(data))
        manifest[0]["Layers"] = [renames[n] for n in manifest[0]["Layers"]]
        config = tin.extractfile(members[manifest[0]["Config"]]).read()  # type: ignore[union-attr]
        for name, data in ((manifest[0]["Config"], config), ("manifest.json", json.dumps(manifest).encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tout.addfile(info, io.BytesIO(data))


def test_skopeo_copied_layout_with_index_is_imported(
    umoci_layout: Path, store: Store, tmp_path: Path
) -> None:
    copy = tmp_path / "copy"
    _tool("skopeo", "copy", f"oci:{umoci_layout}:base", f"oci:{copy}:copied")
    a = import_image(f"oci:{copy}:copied", "copied:1", store=store)
    b = import_image(f"oci:{umoci_layout}:base", "direct:1", store=store)
    assert a == b


# -- the pieces -------------------------------------------------------------------------------


def test_host_base_images_are_not_exported(store: Store, tmp_path: Path) -> None:
    layer = tmp_path / "l"
    (layer / "etc").mkdir(parents=True)
    record = ImageRecord(layers=(store.add_layer_dir(str(layer)).digest,), host_base=True)
    store.tag("onhost:1", store.put_image(record))
    with pytest.raises(InvalidSpecError, match="host base"):
        export_oci_layout(store, "onhost:1", str(tmp_path / "out"))
    with pytest.raises(InvalidSpecError, match="host base"):
        export_docker_archive(store, "onhost:1", str(tmp_path / "out.tar"))
    assert not (tmp_path / "out.tar").exists()


# -- progress, and what images/registry/ reuses -------------------------------------------


def _small_image(store: Store, tmp_path: Path) -> tuple[str, list[str]]:
    """A 2-layer image (one layer over 1 MiB, so progress is heard in the middle); its diff_ids."""
    digests = []
    for i, size in enumerate((3 << 20, 10)):
        layer = tmp_path / f"layer{i}"
        layer.mkdir()
        (layer / f"f{i}").write_bytes(os.urandom(size))
        digests.append(store.add_layer_dir(str(layer)).digest)
    store.tag("small:1", store.put_image(ImageRecord(layers=tuple(digests))))
    return "small:1", digests


def _check_progress(calls: list[tuple[str, int, int]], names: list[str]) -> None:
    """Per layer: starts at 0, never goes back, ends once at its total, with totals constant."""
    assert list(dict.fromkeys(c[0] for c in calls)) == names
    for name in names:
        mine = [(done, total) for n, done, total in calls if n == name]
        assert mine[0][0] == 0
        assert mine[-1][0] == mine[-1][1] > 0
        assert [d for d, _ in mine] == sorted(d for d, _ in mine)
        assert len({t for _, t in mine}) == 1
        assert [d for d, t in mine].count(mine[-1][1]) == 1


def test_import_reports_progress_per_layer(store: Store, tmp_path: Path) -> None:
    ref, diff_ids = _small_image(store, tmp_path)
    export_image(ref, f"oci:{tmp_path / 'layout'}:v1", store=store)
    export_image(ref, f"docker-archive:{tmp_path / 'a.tar'}", store=store)
    manifest_digest = json.loads((tmp_path / "layout" / "index.json").read_text())["manifests"][0]["digest"]
    manifest = json.loads((tmp_path / "layout" / "blobs" / "sha256" / manifest_digest[7:]).read_text())
    blobs = [d["digest"] for d in manifest["layers"]]

    calls: list[tuple[str, int, int]] = []
    other = Store(tmp_path / "other")
    import_image(f"oci:{tmp_path / 'layout'}:v1", "p:1", store=other, progress=lambda *a: calls.append(a))
    _check_progress(calls, blobs)
    assert len([c for c in calls if c[0] == blobs[0]]) >= 3  # heard in the middle, not just the ends
    # a layer already stored is reported once, done
    calls.clear()
    import_image(f"oci:{tmp_path / 'layout'}:v1", "p:1", store=other, progress=lambda *a: calls.append(a))
    assert [c[1] == c[2] for c in calls] == [True, True]

    calls.clear()
    third = Store(tmp_path / "third")
    import_image(
        f"docker-archive:{tmp_path / 'a.tar'}", None, store=third, progress=lambda *a: calls.append(a)
    )
    _check_progress(calls, diff_ids)
    # a gzipped archive is decompressed first: that is reported under the archive's name
    (tmp_path / "a.tar.gz").write_bytes(gzip.compress((tmp_path / "a.tar").read_bytes()))
    calls.clear()
    import_image(
        f"docker-archive:{tmp_path / 'a.tar.gz'}",
        None,
        store=Store(tmp_path / "4"),
        progress=lambda *a: calls.append(a),
    )
    _check_progress(calls, [f"docker-archive:{tmp_path / 'a.tar.gz'}", *diff_ids])


def test_annotations_that_are_not_an_object_do_not_crash(store: Store, tmp_path: Path) -> None:
    """``"annotations": "x"`` in index.json raised AttributeError; now it is an image without a tag."""
    ref, _ = _small_image(store, tmp_path)
    export_image(ref, f"oci:{tmp_path / 'layout'}:v1", store=store)
    index = json.loads((tmp_path / "layout" / "index.json").read_text())
    index["manifests"][0]["annotations"] = "v1"
    (tmp_path / "layout" / "index.json").write_text(json.dumps(index))
    with pytest.raises(InvalidSpecError, match="no image tagged 'v1'"):
        import_image(f"oci:{tmp_path / 'layout'}:v1", None, store=Store(tmp_path / "other"))
    assert import_image(f"oci:{tmp_path / 'layout'}", None, store=Store(tmp_path / "other"))


def test_later_truncated_blob_stores_nothing(store: Store, tmp_path: Path) -> None:
    """Every blob is found with its declared size before any layer is extracted: a truncated
    second layer used to leave the first one stored."""
    ref, _ = _small_image(store, tmp_path)
    export_image(ref, f"oci:{tmp_path / 'layout'}:v1", store=store)
    manifest_digest = json.loads((tmp_path / "layout" / "index.json").read_text())["manifests"][0]["digest"]
    manifest = json.loads((tmp_path / "layout" / "blobs" / "sha256" / manifest_digest[7:]).read_text())
    last = tmp_path / "layout" / "blobs" / "sha256" / manifest["layers"][1]["digest"][7:]
    last.write_bytes(last.read_bytes()[:-5])
    other = Store(tmp_path / "other")
    with pytest.raises(LayerTarError, match=r"layer 1 .*declares"):
        import_image(f"oci:{tmp_path / 'layout'}:v1", "x:1", store=other)
    layers = Path(other.root) / "layers" / "sha256"
    assert not layers.exists() or os.listdir(layers) == []


def test_an_image_imported_from_umoci_exports_again_and_runs_after_a_round_trip(
    umoci_layout: Path, store: Store, sandbox: Sandbox, tmp_path: Path
) -> None:
    """umoci's layer tars are not byte for byte what our writer makes of the same tree: the
    store records both digests, so an imported image can be exported (and pushed) with a config
    whose diff_ids match the tars written -- checked by skopeo and by a re-import elsewhere."""
    import_oci_layout(store, str(umoci_layout), "base", "fromumoci:1")
    record = store.resolve("fromumoci:1")
    foreign = [d for d in record.layers if store.tar_digest(d) != d]
    assert foreign, "umoci's tars were expected to differ from ours (else this test proves nothing)"
    out = tmp_path / "again"
    export_oci_layout(store, "fromumoci:1", str(out), "v1")
    inspect = json.loads(_tool("skopeo", "inspect", "--config", f"oci:{out}:v1"))
    assert inspect["rootfs"]["diff_ids"] == [store.tar_digest(d) for d in record.layers]
    other = Store(tmp_path / "other")
    import_oci_layout(other, str(out), "v1", "again:1")
    assert other.resolve("again:1").layers == tuple(store.tar_digest(d) for d in record.layers)
    out2 = sandbox.run(PROBE, image=Image.load("again:1", store=other)).check().stdout.decode()
    assert out2 == EXPECTED_SRV
    archive = tmp_path / "again.tar"
    export_docker_archive(store, "fromumoci:1", str(archive))
    _tool("skopeo", "inspect", f"docker-archive:{archive}")  # a consistent archive


def test_an_image_that_repeats_a_layer_runs(
    store: Store, sandbox: Sandbox, tmp_path: Path, busybox_layer: Path
) -> None:
    """Real images repeat layers (the empty layer of metadata-only steps); overlayfs refuses the
    same lower directory twice (ELOOP), so the topmost copy alone is mounted -- the same view."""
    empty = tmp_path / "empty"
    empty.mkdir()
    marker = tmp_path / "marker"
    (marker / "etc").mkdir(parents=True)
    (marker / "etc" / "marker").write_text("top\n")
    base = store.add_layer_dir(busybox_layer).digest
    hole = store.add_layer_dir(empty).digest
    top = store.add_layer_dir(marker).digest
    record = ImageRecord(layers=(base, hole, top, hole))
    store.tag("repeats:1", store.put_image(record))
    image = Image.load("repeats:1", store=store)
    assert len(image.layers) == 4
    assert sandbox.run(["cat", "/etc/marker"], image=image).check().stdout == b"top\n"


# -- every kind of image, through skopeo and umoci -----------------------------------------------

# kind -> a file its rootfs has (beyond busybox's), or None
IMAGE_KINDS: dict[str, str | None] = {
    "from_layers": None,
    "copy": "app/app.txt",
    "run": "built",
    "env": None,
    "workdir": None,
    "user": None,
    "commit": "committed",
    "oci-import": "srv/b/fresh",
    "docker-archive-import": "srv/b/fresh",
    "pulled": None,
}


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[RegistryServer]:
    """Per test, asked for by the one kind that needs it (so inside the test's leak check)."""
    (tmp_path / "registry").mkdir()
    server = RegistryServer(tmp_path / "registry")
    yield server
    server.close()


def _made(
    kind: str, request: pytest.FixtureRequest, store: Store, busybox_layer: Path, tmp_path: Path
) -> str:
    """``kind:1`` in ``store``: an image of that kind, on busybox (exportable: no host base)."""
    base = Image.from_layers(busybox_layer, base=None, store=store)
    (tmp_path / "app.txt").write_text("app\n")
    steps: dict[str, Callable[[], Image]] = {
        "from_layers": lambda: base,
        "copy": lambda: base.copy(tmp_path / "app.txt", "/app/"),
        "run": lambda: base.run(["sh", "-c", "echo built > /built"]),
        "env": lambda: base.env(MODE="test"),
        "workdir": lambda: base.workdir("/srv"),
        "user": lambda: base.user("1000:1000"),
    }
    if kind in steps:
        steps[kind]().tag("kind:1")
    elif kind == "commit":
        sandbox: Sandbox = request.getfixturevalue("sandbox")
        c = sandbox.start(["sh", "-c", "echo c > /committed; echo ready; sleep 60"], image=base)
        c.wait_for_log("ready")
        c.commit("kind:1")
    elif kind == "oci-import":
        import_oci_layout(store, str(request.getfixturevalue("umoci_layout")), "base", "kind:1")
    elif kind == "docker-archive-import":
        archive = tmp_path / "skopeo.tar"
        _tool(
            "skopeo",
            "copy",
            f"oci:{request.getfixturevalue('umoci_layout')}:base",
            f"docker-archive:{archive}",
        )
        import_image(f"docker-archive:{archive}", "kind:1", store=store)
    else:  # pulled: pushed by us from another store (a config step: no time), pulled into this one
        server: RegistryServer = request.getfixturevalue("registry")
        ref = f"{server.host}/kinds/pulled:1"
        source = Store(tmp_path / "source")
        Image.from_layers(busybox_layer, base=None, store=source).env(MODE="pushed").tag(ref)
        client = RegistryClient(server.host, settings=insecure(server.host))
        push(ref, source, client=client, quiet=True)
        pull(ref, store, client=client, quiet=True)
        store.tag("kind:1", store.resolve_id(ref))
    return "kind:1"


@pytest.mark.parametrize("kind", IMAGE_KINDS)
def test_every_kind_of_image_is_read_by_skopeo_and_unpacked_by_umoci(
    kind: str, request: pytest.FixtureRequest, store: Store, busybox_layer: Path, tmp_path: Path
) -> None:
    """Issue 9, item 12: a config whose history says ``"created": ""`` (from_layers, config steps)
    stopped skopeo and umoci with `parsing time "\\"\\""`.  Every kind of image, exported as an OCI
    layout and as a docker-archive, is inspected and copied by skopeo (which checks every digest)
    and unpacked by umoci; each "created" written is RFC 3339."""
    ref = _made(kind, request, store, busybox_layer, tmp_path)
    layout, archive, bundles = tmp_path / "layout", tmp_path / "image.tar", tmp_path / "bundles"
    export_oci_layout(store, ref, str(layout), "v1")
    export_docker_archive(store, ref, str(archive))
    for source in (f"oci:{layout}:v1", f"docker-archive:{archive}"):
        config = json.loads(_tool("skopeo", "inspect", "--config", source))
        times = [config.get("created")] + [h.get("created") for h in config.get("history", [])]
        assert all(is_rfc3339(t) for t in times if t is not None), times
        assert json.loads(_tool("skopeo", "inspect", source))["Os"] == "linux"
        copy = tmp_path / f"copy-{len(os.listdir(tmp_path))}"
        _tool("skopeo", "copy", source, f"oci:{copy}:x")
        for unpack in (f"{layout}:v1", f"{copy}:x"):
            bundle = bundles / f"{len(os.listdir(bundles)) if bundles.exists() else 0}"
            _tool("umoci", "unpack", "--image", unpack, str(bundle))
            assert (bundle / "rootfs" / "bin" / "busybox").is_file()
            extra = IMAGE_KINDS[kind]
            assert extra is None or (bundle / "rootfs" / extra).is_file(), extra


def test_source_date_epoch_makes_a_build_reproducible(
    monkeypatch: pytest.MonkeyPatch, busybox_layer: Path, tmp_path: Path
) -> None:
    """Issue 9, item 12: with $SOURCE_DATE_EPOCH set, a build step's time is that one, so the same
    build in two stores exports the same manifest digest; without it, the time of the build."""
    (tmp_path / "app.txt").write_text("app\n")

    def build(name: str) -> str:
        st = Store(tmp_path / name)
        Image.from_layers(busybox_layer, base=None, store=st).copy(tmp_path / "app.txt", "/app/").tag("r:1")
        return export_oci_layout(st, "r:1", str(tmp_path / f"layout-{name}"), "v1")

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    assert build("a") == build("b")
    config = json.loads(_tool("skopeo", "inspect", "--config", f"oci:{tmp_path / 'layout-a'}:v1"))
    assert config["created"] == "2023-11-14T22:13:20Z"
    assert [h.get("created") for h in config["history"]] == [None, "2023-11-14T22:13:20Z"]
    monkeypatch.delenv("SOURCE_DATE_EPOCH")
    assert build("c") != build("d")  # each at its own time
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    with pytest.raises(InvalidSpecError, match=r"SOURCE_DATE_EPOCH='yesterday': expected a whole number"):
        build("e")
