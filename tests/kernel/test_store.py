"""The local image store on real trees, as root: layers from directories (copy, digest,
stat-snapshot cache), images on the host base, two processes building one image, privacy, error
paths.  Each test has its own store (tmp_path).  What needs no root -- records, tags, prune, crash
safety -- is in tests/unit/test_store_records.py; reference and digest parsing in
tests/unit/test_references.py."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import BinaryIO

import pytest

from pytest_sandbox import Image, InvalidSpecError, Sandbox
from pytest_sandbox.images import layertar
from pytest_sandbox.images import store as store_mod
from pytest_sandbox.images.store import Store, stat_snapshot
from tests import probes
from tests.layertar_support import text_layer

# -- layers from directories ---------------------------------------------------------------------


def _rich_tree(root: Path) -> Path:
    """Files, a setuid binary, symlinks, a hardlink pair, a fifo, a whiteout, an opaque dir, owners."""
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "conf").write_text("a=1\n")
    (root / "bin").mkdir()
    tool = root / "bin" / "tool"
    tool.write_bytes(b"\x7fELF" + os.urandom(5000))
    os.chmod(tool, 0o4755)
    (root / "bin" / "alias").symlink_to("tool")
    os.link(tool, root / "bin" / "hard")
    (root / "link-out").symlink_to("/etc/shadow")  # kept as a symlink, never followed
    os.mkfifo(root / "fifo")
    os.mknod(root / "gone", stat.S_IFCHR | 0o600, 0)  # a whiteout
    (root / "opaque").mkdir()
    os.setxattr(root / "opaque", "trusted.overlay.opaque", b"y")
    os.setxattr(root / "etc" / "conf", "user.note", b"kept")
    (root / "home" / "app").mkdir(parents=True)
    (root / "home" / "app" / "data").write_text("mine")
    os.chown(root / "home" / "app", 1000, 1000)
    os.lchown(root / "home" / "app" / "data", 1000, 2000)
    os.utime(root / "etc" / "conf", ns=(1_000_000_000, 1_500_000_000_000_000_000))
    return root


def test_add_layer_dir_copies_everything_and_digests_like_layertar(tmp_path: Path) -> None:
    src = _rich_tree(tmp_path / "src")
    st = Store(tmp_path / "store")
    info = st.add_layer_dir(src, created_by="test")
    diff = Path(st.layer_path(info.digest))
    assert info.digest == layertar.digest_dir(str(src)).diff_id == layertar.digest_dir(str(diff)).diff_id
    assert info.path == str(diff)
    assert info.created_by == "test"
    assert info.size > 0
    assert (diff / "etc" / "conf").read_text() == "a=1\n"
    assert stat.S_IMODE(os.stat(diff / "bin" / "tool").st_mode) == 0o4755
    assert os.readlink(diff / "bin" / "alias") == "tool"
    assert os.readlink(diff / "link-out") == "/etc/shadow"
    assert os.stat(diff / "bin" / "hard").st_ino == os.stat(diff / "bin" / "tool").st_ino
    assert stat.S_ISFIFO(os.lstat(diff / "fifo").st_mode)
    wh = os.lstat(diff / "gone")
    assert stat.S_ISCHR(wh.st_mode)
    assert wh.st_rdev == 0
    assert os.getxattr(diff / "opaque", "trusted.overlay.opaque") == b"y"
    assert os.getxattr(diff / "etc" / "conf", "user.note") == b"kept"
    data = os.lstat(diff / "home" / "app" / "data")
    assert (data.st_uid, data.st_gid) == (1000, 2000)
    assert os.stat(diff / "etc" / "conf").st_mtime_ns == 1_500_000_000_000_000_000
    meta = json.loads((diff.parent / "meta.json").read_text())
    assert meta["digest"] == info.digest
    assert meta["created_by"] == "test"
    assert set(meta) == {"digest", "parent", "created", "created_by", "size"}
    assert st.layer_info(info.digest) == info
    assert st.layer_digest_of(str(diff)) == info.digest
    assert st.layer_digest_of(str(src)) is None
    # nothing left in tmp/
    assert [p for p in (tmp_path / "store" / "tmp").rglob("*") if not p.is_dir()] == []


def test_unchanged_dir_is_a_hit_that_reads_no_contents(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = _rich_tree(tmp_path / "src")
    (src / "big").write_bytes(os.urandom(4 << 20))
    st = Store(tmp_path / "store")
    first = st.add_layer_dir(src)
    before = probes.bytes_read()
    assert st.add_layer_dir(src) == first
    assert probes.bytes_read() - before < 64 << 10  # the cache entry and meta.json, not the 4 MiB file

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("layer content was read")

    with monkeypatch.context() as m:
        m.setattr(layertar, "digest_dir", forbidden)
        m.setattr(store_mod, "copy_tree", forbidden)
        m.setattr(store_mod, "copy_file_at", forbidden)
        assert st.add_layer_dir(src) == first
        assert Store(tmp_path / "store").add_layer_dir(src) == first  # another process's view
        # a layer directory of the store itself is recognised by its path
        assert st.add_layer_dir(st.layer_path(first.digest)).digest == first.digest


@pytest.mark.parametrize(
    "change",
    [
        "rewrite-same-size",
        "chmod",
        "chown",
        "xattr",
        "new-file",
        "rename",
        "delete",
        "symlink-target",
        "touch-mtime",
    ],
)
def test_changed_dir_is_stored_again(tmp_path: Path, change: str) -> None:
    src = _rich_tree(tmp_path / "src")
    st = Store(tmp_path / "store")
    first = st.add_layer_dir(src)
    conf = src / "etc" / "conf"
    if change == "rewrite-same-size":
        with open(conf, "r+b") as f:  # in place: same inode, same size
            f.write(b"b")
    elif change == "chmod":
        os.chmod(conf, 0o600)
    elif change == "chown":
        os.chown(conf, 5, 5)
    elif change == "xattr":
        os.setxattr(conf, "user.note", b"changed")
    elif change == "new-file":
        (src / "etc" / "new").write_text("")
    elif change == "rename":
        conf.rename(src / "etc" / "conf2")
    elif change == "delete":
        conf.unlink()
    elif change == "symlink-target":
        (src / "bin" / "alias").unlink()
        (src / "bin" / "alias").symlink_to("hard")
    elif change == "touch-mtime":
        os.utime(conf, ns=(0, 7_000_000_000))
    second = st.add_layer_dir(src)
    assert second.digest != first.digest
    assert second.digest == layertar.digest_dir(str(src)).diff_id
    assert st.has_layer(first.digest)


def test_stat_snapshot_changes_with_ctime_only(tmp_path: Path) -> None:
    src = _rich_tree(tmp_path / "src")
    before = stat_snapshot(str(src))
    assert stat_snapshot(str(src)) == before
    os.utime(src / "etc" / "conf", ns=(5, os.stat(src / "etc" / "conf").st_mtime_ns))  # atime only
    # utime changes the ctime: a write we cannot see otherwise (mtime put back) is still seen
    assert stat_snapshot(str(src)) != before


def test_device_nodes_other_than_whiteouts_are_refused(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    os.mknod(src / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    st = Store(tmp_path / "store")
    with pytest.raises(InvalidSpecError, match="device node"):
        st.add_layer_dir(src)
    assert os.listdir(tmp_path / "store" / "layers" / "sha256") == []


def test_dead_owners_tmp_is_swept(tmp_path: Path) -> None:
    dead = tmp_path / "store" / "tmp" / "psbx-999999999-1" / "half"
    dead.mkdir(parents=True)
    (dead / "f").write_text("x")
    alive = tmp_path / "store" / "tmp" / "not-an-owner"
    alive.mkdir()
    st = Store(tmp_path / "store")
    st.add_layer_dir(_rich_tree(tmp_path / "src"))
    assert not dead.parent.exists()
    assert alive.exists()


# -- images ------------------------------------------------------------------------------------------


def test_images_on_the_host_base_are_stored_without_the_host(tmp_path: Path) -> None:
    st = Store(tmp_path / "store")
    layer = text_layer(tmp_path, "a", "from the layer")
    Image.from_layers(layer, store=st).tag("onhost:1")
    record = st.resolve("onhost:1")
    assert record.host_base is True
    assert len(record.layers) == 1
    bare = Image.host_base().tag("hostonly", store=st)
    assert st.resolve("hostonly").layers == ()
    assert bare.host is True
    loaded = Image.load("onhost:1", store=st)
    assert loaded.host is True
    with Sandbox() as sb:
        r = sb.run(["sh", "-c", "cat /a.txt; test -x /usr/bin/env && echo host"], image=loaded)
    assert r.stdout == b"from the layerhost\n"


def test_open_layer_tar_is_the_digested_tar(tmp_path: Path) -> None:
    st = Store(tmp_path / "store")
    info = st.add_layer_dir(_rich_tree(tmp_path / "src"))
    with st.open_layer_tar(info.digest) as f:
        data = f.read()
    import hashlib

    assert "sha256:" + hashlib.sha256(data).hexdigest() == info.digest
    other = Store(tmp_path / "other")
    with st.open_layer_tar(info.digest) as f:
        again = other.add_layer_tar(f, expected_diff_id=info.digest)
    assert again.digest == info.digest
    with st.open_layer_tar(info.digest) as f, pytest.raises(InvalidSpecError, match="mismatch"):
        Store(tmp_path / "third").add_layer_tar(f, expected_diff_id="sha256:" + "0" * 64)
    assert os.listdir(tmp_path / "third" / "layers" / "sha256") == []


# -- two processes, one build ------------------------------------------------------------------

_WORKER = textwrap.dedent(
    """
    import os, sys, time
    from pytest_sandbox import Image
    from pytest_sandbox.images.store import Store
    store, layer, gate = sys.argv[1:4]
    while not os.path.exists(gate):
        time.sleep(0.001)
    image = (
        Image.from_layers(layer, base=None, store=Store(store))
        .run(["sh", "-c", "sleep 0.3; cat /proc/sys/kernel/random/uuid > /built-by"])
        .tag("raced:1")
    )
    print(image.image_id)
    """
)


def test_two_processes_build_the_same_image_once(tmp_path: Path, busybox_layer: Path) -> None:
    """As two xdist workers would: both start at once; the step runs once, both get one image."""
    gate = tmp_path / "gate"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(tmp_path / "store"), str(busybox_layer), str(gate)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        for _ in range(2)
    ]
    gate.write_text("")
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
        outs.append(out.decode().strip())
    assert outs[0] == outs[1]
    st = Store(tmp_path / "store")
    assert len(st.images()) == 2  # the base and the built image: built once
    assert len(os.listdir(tmp_path / "store" / "layers" / "sha256")) == 2
    assert Path(Image.load("raced:1", store=st).layers[-1], "built-by").read_text().count("-") == 4


# -- crash safety, privacy, error paths -----------------------------------------------------------


def test_the_store_is_private_to_its_owner(tmp_path: Path) -> None:
    """Layers hold setuid-root programs: another host user must not reach them, even with the data
    root in a world-readable place (and a store root made 0755 earlier is tightened)."""
    public = Path(tempfile.mkdtemp(prefix="psbx-test-public-", dir="/tmp"))
    try:
        os.chmod(public, 0o755)
        (public / "store").mkdir(mode=0o755)
        st = Store(public / "store")
        info = st.add_layer_dir(_rich_tree(tmp_path / "src"))
        tool = Path(st.layer_path(info.digest), "bin", "tool")
        assert os.stat(tool).st_mode & 0o4000
        assert stat.S_IMODE(os.stat(public / "store").st_mode) == 0o700
        other = subprocess.run(["test", "-x", str(tool)], check=False, user=65534, group=65534)
        assert other.returncode != 0  # nobody cannot even see it
    finally:
        shutil.rmtree(public)


def test_copy_tree_errors_leak_no_fd(tmp_path: Path) -> None:
    src = _rich_tree(tmp_path / "src")
    (tmp_path / "exists").mkdir()
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(FileExistsError):
        store_mod.copy_tree(str(src), str(tmp_path / "exists"))
    os.mknod(src / "etc" / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    with pytest.raises(InvalidSpecError, match="device node"):
        store_mod.copy_tree(str(src), str(tmp_path / "dest"))  # refused deep in the walk
    assert len(os.listdir("/proc/self/fd")) == fds


@pytest.mark.parametrize("xattr", ["trusted.overlay.metacopy", "trusted.overlay.redirect"])
def test_overlay_entries_that_need_their_lower_layers_are_refused(tmp_path: Path, xattr: str) -> None:
    """A metacopy file has no data of its own, a redirected directory no contents: copied without
    the mark, they would be stored silently wrong."""
    src = text_layer(tmp_path, "a", "")
    os.setxattr(src / "a.txt", xattr, b"" if xattr.endswith("metacopy") else b"/elsewhere")
    st = Store(tmp_path / "store")
    with pytest.raises(InvalidSpecError, match=re.escape(xattr)) as err:
        st.add_layer_dir(src)
    assert "metacopy=off" in err.value.hint
    assert os.listdir(tmp_path / "store" / "layers" / "sha256") == []


def test_two_pulls_of_one_layer_extract_it_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = Store(tmp_path / "src")
    info = src.add_layer_dir(_rich_tree(tmp_path / "tree"))
    with src.open_layer_tar(info.digest) as f:
        data = f.read()
    calls = []
    real = layertar.extract_layer_tar

    def slow_extract(stream: BinaryIO, dest: str) -> layertar.LayerDigest:
        calls.append(dest)
        time.sleep(0.3)  # both workers are inside add_layer_tar at once
        return real(stream, dest)

    monkeypatch.setattr(layertar, "extract_layer_tar", slow_extract)
    dst = tmp_path / "dst"
    got: list[str] = []

    def pull() -> None:
        got.append(Store(dst).add_layer_tar(io.BytesIO(data), expected_diff_id=info.digest).digest)

    workers = [threading.Thread(target=pull) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(30)
    assert got == [info.digest, info.digest]
    assert len(calls) == 1
