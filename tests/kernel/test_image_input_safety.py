# Long module: one attack surface: each refused input beside the CVE it stands for,
# all built with the hostile-tar writers defined here.
"""Hostile layer tars are refused or confined.

- CVE-2014-9356 / CVE-2014-6407: ``../``, ``a/../../x``, a symlink then a
  write through it (also 41-deep chains, relative targets, whiteouts and opaque markers through
  it), hardlinks to ``/etc/shadow``, to ``../../outside``, through a symlink or to entries not
  yet seen, NUL or newline in names -- each refused with a LayerTarError naming the entry.
  Absolute names (and hardlink targets) are confined: ``/x`` is the layer's own ``/x``.
- CVE-2021-29136: ``.`` (or ``./``, ``/``) as a symlink in a layer is refused; a symlinked
  directory in layer 1 followed by a file under it in layer 2 lands in layer 2's own directory.
- Whiteout edge cases (image-spec PR #1314): bare ``.wh.``, ``.wh..``, ``.wh...``, a ``.wh.``
  directory, AUFS metadata, a non-file whiteout and a root opaque marker raise; a 3-layer matrix
  mounted for real with overlayfs shows exactly the expected merged view, and extracting a layer
  never modifies the lower layers' directories on disk.
- Huge PAX and GNU headers, device nodes, sparse files, bad checksums and truncated archives are
  refused; overlayfs xattrs smuggled in a tar are dropped.
- OCI layouts and docker archives (CVE-2024-3727, digest mismatch): a replaced, recompressed,
  truncated or grown layer blob, an edited config or manifest, a ``sha256:../../x`` digest, a
  blob that is a fifo or a symlink to /etc/shadow, archive members named ``../`` or absolute,
  a layer not matching its diff_id -- each refused, and nothing is left in the store.

After every case the host canaries (a directory tree next to the destination, /etc/shadow and
/etc/passwd) are unchanged -- content, mode, mtime, inode, link count, xattrs -- and nothing
new exists outside the destination.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pytest_sandbox.core.errors import LayerTarError
from pytest_sandbox.host import libc
from pytest_sandbox.images.archive import export_oci_layout, import_docker_archive, import_oci_layout
from pytest_sandbox.images.layertar import extract_layer_tar
from pytest_sandbox.images.store import ImageRecord, Store
from tests.layertar_support import build, dev, dirm, hard, reg, snapshot, sym, tree

HOST_FILES = ("/etc/shadow", "/etc/passwd")


def _host_state() -> dict[str, tuple[int, int, int, str]]:
    out = {}
    for path in HOST_FILES:
        st = os.stat(path)
        out[path] = (
            st.st_ino,
            st.st_nlink,
            st.st_mtime_ns,
            hashlib.sha256(Path(path).read_bytes()).hexdigest(),
        )
    return out


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Path]:
    """A canary tree beside the extraction destination; checked unchanged after the test."""
    canary = tmp_path / "host"
    (canary / "sub").mkdir(parents=True)
    (canary / "canary").write_text("precious")
    (canary / "sub" / "deep").write_text("precious too")
    (tmp_path / "store" / "layer").mkdir(parents=True)
    before = {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("store")}
    host_before = _host_state()
    yield canary
    after = {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("store")}
    assert after == before, "something outside the destination changed"
    # the store holds only the layer directories the tests made (a `../x` would add store/x)
    assert set(os.listdir(tmp_path / "store")) <= {"layer", "l1", "l2", "l3", "r1", "r2", "r3"}
    assert _host_state() == host_before, "a host file changed or gained a link"


def _dest(host: Path) -> Path:
    return host.parent / "store" / "layer"


def _extract(data: bytes, dest: Path) -> None:
    extract_layer_tar(io.BytesIO(data), str(dest))


def _pax_name(name: str, data: bytes = b"x") -> bytes:
    info, payload = reg("placeholder", data)
    info.pax_headers = {"path": name}
    return build((info, payload))


def _pax_symlink(target: str) -> bytes:
    info, _ = sym("s", "placeholder")
    info.pax_headers = {"linkpath": target}
    return build((info, None))


def _huge_pax() -> bytes:
    info, payload = reg("file", b"x")
    info.pax_headers = {"comment": "x" * (2 << 20)}
    return build((info, payload))


def _sparse() -> bytes:
    info, payload = reg("sparse", b"x")
    info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "sparse"}
    return build((info, payload))


def _bad_checksum() -> bytes:
    data = bytearray(build(reg("file", b"x")))
    data[0] ^= 0x01
    return bytes(data)


def _truncated() -> bytes:
    return build(reg("file", b"y" * 5000))[:2048]


def _pax_entry(headers: dict[str, str], kind: str = "file") -> bytes:
    info, payload = dirm("d") if kind == "dir" else sym("s", "t") if kind == "symlink" else reg("f", b"x")
    info.pax_headers = headers
    return build((info, payload))


def _base256_mtime() -> bytes:
    """A ustar header whose mtime is a base-256 number no time_t holds (GNU tar writes these)."""
    data = bytearray(build(reg("f", b"x"), fmt=tarfile.USTAR_FORMAT))
    data[136:148] = b"\x80" + b"\xff" * 11
    data[148:156] = b" " * 8
    data[148:156] = b"%06o\0 " % sum(data[:512])
    return bytes(data)


def _symlink_chain(host: Path) -> bytes:
    links = [sym(f"l{i}", f"l{i + 1}") for i in range(41)]
    return build(*links, sym("l41", str(host)), reg("l0/new", b"evil"))


# name -> (tar builder, the refusal's message)
REFUSED: dict[str, tuple[Callable[[Path], bytes], str]] = {
    "dotdot": (lambda h: build(reg("../x", b"evil")), r"'\.\.' in a name"),
    "dotdot-to-canary": (lambda h: build(reg("../../host/canary", b"evil")), r"'\.\.' in a name"),
    "inner-dotdot": (lambda h: build(reg("a/../../x", b"evil")), r"'\.\.' in a name"),
    "symlink-then-write": (lambda h: build(sym("link", str(h)), reg("link/canary", b"evil")), "symlink"),
    "symlink-then-new-file": (lambda h: build(sym("link", str(h)), reg("link/new", b"evil")), "symlink"),
    "relative-symlink-then-write": (
        lambda h: build(sym("link", "../../host"), reg("link/canary", b"evil")),
        "symlink",
    ),
    "symlink-then-mkdir": (lambda h: build(sym("link", str(h)), dirm("link/sub/newdir")), "symlink"),
    "symlink-then-fifo": (
        lambda h: build(sym("link", str(h)), dev("link/fifo", tarfile.FIFOTYPE, 0, 0)),
        "symlink",
    ),
    "symlink-chain-41": (_symlink_chain, "symlink"),
    "symlink-then-whiteout": (lambda h: build(sym("link", str(h)), reg("link/.wh.canary")), "symlink"),
    "symlink-then-opaque": (lambda h: build(sym("link", str(h)), reg("link/.wh..wh..opq")), "symlink"),
    "hardlink-etc-shadow": (lambda h: build(hard("shadow", "/etc/shadow")), "not an earlier"),
    "hardlink-etc-shadow-after-etc": (
        lambda h: build(dirm("etc"), reg("etc/passwd", b"x"), hard("shadow", "/etc/shadow")),
        "not an earlier",
    ),
    "hardlink-outside": (lambda h: build(hard("out", "../../host/canary")), r"'\.\.' in a hardlink target"),
    "hardlink-not-yet-seen": (lambda h: build(hard("early", "later"), reg("later", b"x")), "not an earlier"),
    "hardlink-through-symlink": (
        lambda h: build(sym("link", str(h)), hard("h", "link/canary")),
        "not an earlier",
    ),
    "hardlink-into-symlinked-dir": (
        lambda h: build(reg("f", b"x"), sym("link", str(h)), hard("link/new", "f")),
        "symlink",
    ),
    "nul-in-name": (lambda h: _pax_name("a\0b"), "NUL or newline"),
    "newline-in-name": (lambda h: build(reg("evil\nname", b"x")), "NUL or newline"),
    "nul-in-symlink-target": (lambda h: _pax_symlink("/etc\0x"), "malformed symlink target"),
    "char-device": (lambda h: build(dev("null", tarfile.CHRTYPE, 1, 3)), "character device 1:3"),
    "block-device": (lambda h: build(dev("sda", tarfile.BLKTYPE, 8, 0)), "block device 8:0"),
    "bare-whiteout": (lambda h: build(reg(".wh.")), "malformed whiteout"),
    "bare-whiteout-in-etc": (
        lambda h: build(dirm("etc"), reg("etc/passwd", b"x"), reg("etc/.wh.")),
        "malformed",
    ),
    "whiteout-of-dot": (lambda h: build(dirm("etc"), reg("etc/.wh..")), "malformed whiteout"),
    "whiteout-of-dotdot": (lambda h: build(dirm("etc"), reg("etc/.wh...")), "malformed whiteout"),
    "whiteout-as-directory": (lambda h: build(reg("etc/.wh.x/y", b"x")), "whiteout name"),
    "aufs-metadata-file": (lambda h: build(reg(".wh..wh.aufs")), "AUFS"),
    "aufs-metadata-dir": (lambda h: build(reg(".wh..wh.plnk/123", b"x")), "whiteout name"),
    "whiteout-as-symlink": (lambda h: build(sym(".wh.etc", str(h))), "empty regular file"),
    "opaque-root": (lambda h: build(reg(".wh..wh..opq")), "opaque whiteout of the layer root"),
    "huge-pax-header": (lambda h: _huge_pax(), "PAX header"),
    "huge-gnu-longname": (lambda h: build(reg("n" * (2 << 20), b"x"), fmt=tarfile.GNU_FORMAT), "GNU header"),
    "sparse": (lambda h: _sparse(), "sparse"),
    "dot-as-symlink": (lambda h: build(sym(".", str(h)), reg("etc/passwd", b"evil")), "layer root"),
    "dotslash-as-symlink": (lambda h: build(sym("./", str(h)), reg("canary", b"evil")), "layer root"),
    "slash-as-symlink": (lambda h: build(sym("/", str(h)), reg("canary", b"evil")), "layer root"),
    "bad-checksum": (lambda h: _bad_checksum(), "checksum"),
    "truncated": (lambda h: _truncated(), "truncated"),
    "zstd": (lambda h: b"\x28\xb5\x2f\xfd" + b"\0" * 100, "zstd"),
    # each of these raised OverflowError or a bare ValueError, not a LayerTarError naming the entry
    "mtime-base256-overflow": (lambda h: _base256_mtime(), "'f': mtime out of range"),
    "mtime-pax-overflow": (lambda h: _pax_entry({"mtime": "9" * 30}), "'f': mtime out of range"),
    "mtime-pax-overflow-dir": (lambda h: _pax_entry({"mtime": "-" + "9" * 30}, "dir"), "mtime out of range"),
    "mtime-pax-overflow-symlink": (
        lambda h: _pax_entry({"mtime": "9" * 30}, "symlink"),
        "mtime out of range",
    ),
    "nul-in-xattr-name": (lambda h: _pax_entry({"SCHILY.xattr.user.a\0b": "v"}), "malformed xattr name"),
    "empty-xattr-name": (lambda h: _pax_entry({"SCHILY.xattr.": "v"}), "malformed xattr name"),
    # the directory a file was in is replaced by a symlink: that file is no longer a link target
    "hardlink-into-dir-replaced-by-symlink": (
        lambda h: build(dirm("a"), reg("a/canary", b"x"), sym("a", str(h)), hard("h", "a/canary")),
        "not an earlier",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_hostile_entry_is_refused(case: str, host: Path) -> None:
    make, message = REFUSED[case]
    with pytest.raises(LayerTarError, match=message):
        _extract(make(host), _dest(host))


def test_absolute_names_are_confined_to_the_layer(host: Path) -> None:
    """``/x`` means the layer's /x (as docker reads it; umoci writes its root as ``/``)."""
    dest = _dest(host)
    canary = str(host / "canary")
    _extract(build(dirm("/"), reg(canary, b"evil"), dirm(str(host / "newdir")), hard("/copy", canary)), dest)
    inside = dest / canary.lstrip("/")
    assert inside.read_bytes() == b"evil"
    assert os.stat(dest / "copy").st_ino == os.stat(inside).st_ino
    assert (dest / str(host / "newdir").lstrip("/")).is_dir()


def test_refusal_names_the_entry_and_a_fix(host: Path) -> None:
    with pytest.raises(LayerTarError) as info:
        _extract(build(reg("ok", b"x"), sym("link", str(host)), reg("link/canary", b"evil")), _dest(host))
    assert "'link/canary'" in str(info.value)
    assert info.value.hint
    assert isinstance(info.value, ValueError)


def test_hardlink_to_a_symlink_links_the_symlink_not_its_target(host: Path) -> None:
    dest = _dest(host)
    _extract(build(sym("link", str(host / "canary")), hard("h", "link")), dest)
    assert os.readlink(dest / "h") == str(host / "canary")
    assert os.lstat(dest / "h").st_ino == os.lstat(dest / "link").st_ino


def test_entry_replacing_a_symlink_replaces_the_link_not_its_target(host: Path) -> None:
    """A file, a directory or a fifo named like an earlier symlink takes its place in the layer."""
    dest = _dest(host)
    data = build(
        sym("f", str(host / "canary")),
        reg("f", b"layer's own"),
        sym("d", str(host)),
        dirm("d"),
        reg("d/canary", b"layer's own too"),
        sym("p", str(host / "canary")),
        dev("p", tarfile.FIFOTYPE, 0, 0),
    )
    _extract(data, dest)
    assert (dest / "f").read_text() == "layer's own"
    assert not (dest / "d").is_symlink()
    assert (dest / "d" / "canary").read_text() == "layer's own too"
    assert not (dest / "p").is_symlink()


def test_overlay_xattrs_in_a_tar_are_dropped(host: Path) -> None:
    """trusted.overlay.* (opaque, redirect, metacopy) are overlayfs' own: never taken from a tar."""
    dest = _dest(host)
    info, _ = dirm("d")
    info.pax_headers = {
        "SCHILY.xattr.trusted.overlay.opaque": "y",
        "SCHILY.xattr.trusted.overlay.redirect": "/etc",
        # what overlayfs reads instead when mounted with userxattr (rootless)
        "SCHILY.xattr.user.overlay.opaque": "y",
        "SCHILY.xattr.user.overlay.redirect": "/etc",
        "SCHILY.xattr.user.kept": "yes",
    }
    _extract(build((info, None)), dest)
    assert os.listxattr(dest / "d") == ["user.kept"]


def test_deep_nesting_needs_neither_many_fds_nor_recursion(host: Path) -> None:
    """2,000 nested directories (all PATH_MAX allows) under a 256-fd limit: extracted, written
    back and replaced by a file -- no EMFILE (one fd per level was held) and no RecursionError
    (the replaced tree was removed recursively)."""
    import resource

    from pytest_sandbox.host.cleanup import remove_tree
    from pytest_sandbox.images.layertar import digest_dir

    deep = "/".join(["a"] * 2000)
    dest, again = _dest(host), host.parent / "store" / "l1"
    again.mkdir()
    soft, hard_limit = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard_limit), hard_limit))
    try:
        _extract(build(dirm(deep), reg(deep + "/f", b"deep")), dest)
        fd, depth = os.open(dest, os.O_RDONLY | os.O_DIRECTORY), 0
        while "a" in os.listdir(fd):
            sub = os.open("a", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd, depth = sub, depth + 1
        assert os.listdir(fd) == ["f"]
        os.close(fd)
        assert depth == 2000
        assert digest_dir(str(dest)).size > 2000 * 512
        _extract(build(dirm(deep), reg(deep + "/f", b"deep"), reg("a", b"now a file")), again)
        assert (again / "a").read_bytes() == b"now a file"
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard_limit))
        for top in (dest / "a", again / "a"):  # before the canary check (or pytest) walks them
            remove_tree(str(top))


def test_cve_2021_29136_symlinked_dir_in_layer1_then_file_in_layer2(host: Path, tmp_path: Path) -> None:
    """Layer 1 makes etc a symlink to the canary dir; layer 2 writes etc/canary: it lands in
    layer 2's own directory, and the merged view (a real overlay mount) shows layer 2's file."""
    l1, l2 = tmp_path / "store" / "l1", tmp_path / "store" / "l2"
    l1.mkdir()
    l2.mkdir()
    _extract(build(sym("etc", str(host)), sym("root", "/")), l1)
    _extract(build(reg("etc/canary", b"evil"), reg("root/etc/shadow", b"evil")), l2)
    assert (l2 / "etc" / "canary").read_text() == "evil"
    assert os.readlink(l1 / "etc") == str(host)
    with _overlay(tmp_path / "store" / "merged", [l2, l1]) as merged:
        assert (merged / "etc" / "canary").read_text() == "evil"
        assert (merged / "root" / "etc" / "shadow").read_text() == "evil"


class _overlay:
    """A read-only overlay mount of ``lowers`` (topmost first) at ``target``, for the test's span."""

    def __init__(self, target: Path, lowers: list[Path]) -> None:
        self.target = target
        self.lowers = lowers

    def __enter__(self) -> Path:
        self.target.mkdir(exist_ok=True)
        opts = "lowerdir=" + ":".join(str(p) for p in self.lowers)
        libc.mount("overlay", str(self.target), "overlay", libc.MS_RDONLY, opts)
        return self.target

    def __exit__(self, *exc: object) -> None:
        libc.umount2(str(self.target))
        self.target.rmdir()


# -- the 3-layer whiteout matrix --------------------------------------------------------------

LAYER1 = (
    dirm("a"),
    reg("a/x", b"a/x from 1"),
    reg("a/y", b"a/y from 1"),
    dirm("b"),
    reg("b/1", b"b/1 from 1"),
    reg("c", b"c from 1"),
    dirm("d"),
    reg("d/k", b"d/k from 1"),
    reg("e", b"e from 1"),
    dirm("g"),
    reg("g/old", b"g/old from 1"),
    dirm("keep"),
    reg("keep/file", b"keep from 1"),
    dirm("opq"),
    reg("opq/lower", b"opq/lower from 1"),
)
LAYER2 = (
    reg(".wh.c"),  # delete a file
    reg("a/.wh.x"),  # delete a file in a dir; a/y stays
    dirm("b"),
    reg("b/.wh..wh..opq"),  # opaque: hides b/1 ...
    reg("b/2", b"b/2 from 2"),  # ... but keeps this layer's own entries
    reg(".wh.d"),  # delete a dir ...
    dirm("d"),  # ... and add it back in the same layer: only this layer's content
    reg("d/new", b"d/new from 2"),
    reg("f", b"f from 2"),
    dirm("g"),  # this layer's own dir, then a whiteout of it: lower contents hidden
    reg("g/mine", b"g/mine from 2"),
    reg(".wh.g"),
    reg("h", b"h from 2"),  # a file, then its whiteout in the same layer: the file stays
    reg(".wh.h"),
    dirm("opq"),
    reg("opq/.wh..wh..opq"),  # opaque marker before the dir's own entries
    reg("opq/own", b"opq/own from 2"),
    reg(".wh.missing"),  # a whiteout of nothing at all is harmless
)
LAYER3 = (
    reg("c", b"c from 3"),  # re-add a file deleted below
    reg("a/.wh.y"),
    dirm("b"),
    reg("b/3", b"b/3 from 3"),
    reg(".wh.f"),
    reg(".wh.e"),
    dirm("e"),  # a file below becomes a dir
    reg("e/inner", b"e/inner from 3"),
)
EXPECTED = {
    "a": "dir",
    "b": "dir",
    "b/2": "file:b/2 from 2",
    "b/3": "file:b/3 from 3",
    "c": "file:c from 3",
    "d": "dir",
    "d/new": "file:d/new from 2",
    "e": "dir",
    "e/inner": "file:e/inner from 3",
    "g": "dir",
    "g/mine": "file:g/mine from 2",
    "h": "file:h from 2",
    "keep": "dir",
    "keep/file": "file:keep from 1",
    "opq": "dir",
    "opq/own": "file:opq/own from 2",
}


def test_three_layer_whiteout_matrix_merges_as_expected(host: Path, tmp_path: Path) -> None:
    """Each layer in its own dir; mounted with overlayfs the merged tree is exactly EXPECTED, and
    every extraction left the lower layers' directories untouched on disk."""
    store = tmp_path / "store"
    layers: list[Path] = []
    snapshots: list[dict[str, tuple[object, ...]]] = []
    for i, members in enumerate((LAYER1, LAYER2, LAYER3), 1):
        layer = store / f"l{i}"
        layer.mkdir()
        _extract(build(*members), layer)
        for lower, snap in zip(layers, snapshots, strict=False):
            assert snapshot(lower) == snap, f"extracting layer {i} changed {lower.name}"
        layers.append(layer)
        snapshots.append(snapshot(layer))
    assert tree(layers[0])["a/x"] == "file:a/x from 1"
    with _overlay(store / "merged", layers[::-1]) as merged:
        assert tree(merged) == EXPECTED
    for lower, snap in zip(layers, snapshots, strict=False):
        assert snapshot(lower) == snap


def test_whiteout_matrix_survives_an_export_round_trip(host: Path, tmp_path: Path) -> None:
    """Each extracted layer, written back as a tar by us and extracted again, merges the same."""
    from pytest_sandbox.images.layertar import write_layer_tar

    store = tmp_path / "store"
    again: list[Path] = []
    for i, members in enumerate((LAYER1, LAYER2, LAYER3), 1):
        first, second = store / f"l{i}", store / f"r{i}"
        first.mkdir()
        second.mkdir()
        _extract(build(*members), first)
        out = io.BytesIO()
        written = write_layer_tar(str(first), out)
        assert extract_layer_tar(io.BytesIO(out.getvalue()), str(second)) == written
        again.append(second)
    with _overlay(store / "merged", again[::-1]) as merged:
        assert tree(merged) == EXPECTED


# -- hostile image layouts and archives (digests, CVE-2024-3727) ------------------------------


def _store_is_empty(store: Store) -> None:
    """Nothing of a refused import stayed: no layer, no image, no tag, no temp file."""
    layers = Path(store.root) / "layers" / "sha256"
    assert not layers.exists() or not os.listdir(layers)
    assert store.images() == []
    assert store.refs() == {}
    leftovers = [os.path.join(d, f) for d, _, fs in os.walk(Path(store.root) / "tmp") for f in fs]
    assert leftovers == []


@pytest.fixture
def layout(tmp_path: Path) -> Path:
    """A valid one-layer OCI layout made by us (tag v1), for the tests to spoil."""
    src = Store(tmp_path / "src")
    layer = tmp_path / "layer"
    (layer / "etc").mkdir(parents=True)
    (layer / "etc" / "motd").write_text("hello\n")
    src.tag("src:1", src.put_image(ImageRecord(layers=(src.add_layer_dir(str(layer)).digest,))))
    export_oci_layout(src, "src:1", str(tmp_path / "layout"), "v1")
    return tmp_path / "layout"


def _blob(layout: Path, kind: str) -> Path:
    index = json.loads((layout / "index.json").read_text())
    manifest_path = layout / "blobs" / "sha256" / str(index["manifests"][0]["digest"])[7:]
    if kind == "manifest":
        return manifest_path
    manifest = json.loads(manifest_path.read_text())
    desc = manifest["config"] if kind == "config" else manifest["layers"][0]
    return layout / "blobs" / "sha256" / str(desc["digest"])[7:]


def _evil_layer(layout: Path) -> bytes:
    return gzip.compress(build(reg("etc/motd", b"evil\n")), mtime=0)


def _same_content_other_bytes(layout: Path) -> bytes:
    return gzip.decompress(_blob(layout, "layer").read_bytes())  # right diff_id, wrong blob digest


def _spoil_index_digest(layout: Path) -> None:
    index = json.loads((layout / "index.json").read_text())
    index["manifests"][0]["digest"] = "sha256:../../../../etc/passwd"
    (layout / "index.json").write_text(json.dumps(index))


def _fifo_blob(layout: Path) -> None:
    blob = _blob(layout, "layer")
    blob.unlink()
    os.mkfifo(blob)


def _symlink_blob(layout: Path) -> None:
    blob = _blob(layout, "layer")
    blob.unlink()
    blob.symlink_to("/etc/shadow")


def _replace(kind: str, make: Callable[[Path], bytes]) -> Callable[[Path], None]:
    def spoil(layout: Path) -> None:
        _blob(layout, kind).write_bytes(make(layout))

    return spoil


def _nested_index(layout: Path) -> None:
    (layout / "index.json").write_text("[" * 100_000)


def _move_and_link(path: Path) -> None:
    """Move ``path`` out of the layout and leave a symlink to it in its place."""
    elsewhere = path.parent.parent / (path.name + "-elsewhere")
    while elsewhere.exists():
        elsewhere = elsewhere.parent / (elsewhere.name + "-")
    path.rename(elsewhere)
    path.symlink_to(elsewhere)


def _point_index_at(layout: Path, manifest: bytes) -> None:
    digest = hashlib.sha256(manifest).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(manifest)
    index = json.loads((layout / "index.json").read_text())
    index["manifests"][0].update(digest="sha256:" + digest, size=len(manifest))
    (layout / "index.json").write_text(json.dumps(index))


SPOILED: dict[str, tuple[Callable[[Path], None], str]] = {
    "layer-replaced": (_replace("layer", _evil_layer), "declares|digest mismatch"),
    "layer-recompressed": (
        _replace("layer", _same_content_other_bytes),
        "descriptor declares|digest mismatch",
    ),
    "layer-truncated": (
        _replace("layer", lambda lay: _blob(lay, "layer").read_bytes()[:-20]),
        "corrupt|declares",
    ),
    "layer-grown": (_replace("layer", lambda lay: _blob(lay, "layer").read_bytes() + b"\0" * 64), "declares"),
    "config-edited": (
        _replace("config", lambda lay: _blob(lay, "config").read_bytes().replace(b"amd64", b"arm64")),
        "digest mismatch",
    ),
    "manifest-edited": (
        _replace("manifest", lambda lay: _blob(lay, "manifest").read_bytes() + b" "),
        "declares",
    ),
    "digest-path-traversal": (_spoil_index_digest, "64 lowercase hex"),
    "layer-blob-is-a-fifo": (_fifo_blob, "not a regular file"),
    "layer-blob-is-a-symlink": (_symlink_blob, "symlink"),
    # the blobs were read through these (with the right digest, from anywhere on the host)
    "blobs-dir-is-a-symlink": (lambda lay: _move_and_link(lay / "blobs"), "symlink"),
    "blobs-sha256-is-a-symlink": (lambda lay: _move_and_link(lay / "blobs" / "sha256"), "symlink"),
    # these raised RecursionError
    "index-nested-too-deeply": (_nested_index, "nested too deeply"),
    "manifest-nested-too-deeply": (lambda lay: _point_index_at(lay, b"[" * 100_000), "nested too deeply"),
}


@pytest.mark.parametrize("case", sorted(SPOILED))
def test_spoiled_oci_layout_is_refused_and_nothing_is_stored(case: str, layout: Path, tmp_path: Path) -> None:
    spoil, message = SPOILED[case]
    spoil(layout)
    store = Store(tmp_path / "store")
    before = _host_state()
    with pytest.raises(LayerTarError, match=message):
        import_oci_layout(store, str(layout), "v1", "spoiled:1")
    _store_is_empty(store)
    assert _host_state() == before


def _archive(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _config(layer_tar: bytes) -> bytes:
    diff_id = "sha256:" + hashlib.sha256(layer_tar).hexdigest()
    return json.dumps({"os": "linux", "rootfs": {"type": "layers", "diff_ids": [diff_id]}}).encode()


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("layer-path-traversal", "not in the archive"),
        ("config-path-absolute", "not in the archive"),
        ("layer-not-matching-diff-id", "digest mismatch"),
        ("config-not-matching-its-name", "does not match its digest"),
        ("hostile-layer", "symlink"),
        ("member-named-dotdot", r"docker-archive:.*a\.tar: layer tar entry '\.\./x': '\.\.'"),
    ],
)
def test_hostile_docker_archive_is_refused(case: str, message: str, tmp_path: Path) -> None:
    good = build(reg("etc/motd", b"hello\n"))
    evil = build(sym("etc", "/etc"), reg("etc/motd", b"evil\n"))
    config = _config(good)
    name = hashlib.sha256(config).hexdigest() + ".json"
    layers, members = ["layer.tar"], {"layer.tar": good, name: config}
    if case == "layer-path-traversal":
        layers = ["../../../etc/shadow"]
    elif case == "config-path-absolute":
        name = "/etc/passwd"
    elif case == "layer-not-matching-diff-id":
        members["layer.tar"] = build(reg("etc/motd", b"other\n"))
    elif case == "config-not-matching-its-name":
        members[name] = config.replace(b"linux", b"linux", 1) + b" "
    elif case == "member-named-dotdot":
        members["../x"] = b"evil"
    elif case == "hostile-layer":
        members["layer.tar"] = evil
        members[name] = _config(evil)
        name = hashlib.sha256(members[name]).hexdigest() + ".json"
        members[name] = _config(evil)
    manifest = [{"Config": name, "RepoTags": ["x:1"], "Layers": layers}]
    _archive(tmp_path / "a.tar", {**members, "manifest.json": json.dumps(manifest).encode()})
    store = Store(tmp_path / "store")
    with pytest.raises(LayerTarError, match=message):
        import_docker_archive(store, str(tmp_path / "a.tar"))
    _store_is_empty(store)
