"""Layer tars: the deterministic writer, digest_dir, and the extractor on real tars of real tools.

The hostile-input side (refusals, host canaries, the whiteout matrix under a real overlay
mount) is tests/kernel/test_image_input_safety.py.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from pytest_sandbox.images.layertar import (
    LayerDigest,
    digest_dir,
    extract_layer_tar,
    write_layer_tar,
)
from tests.layertar_support import build, dirm, reg, snapshot, sym, tree

NON_UTF8 = b"caf\xe9"


def _make_tree(root: Path, *, reverse: bool = False) -> Path:
    """A tree exercising every kind of entry; ``reverse`` creates it in the opposite order (other
    inode numbers, other readdir order: the tar must not change)."""
    dirs = ["d", "d/sub", "emptydir", "d/" + "x" * 200]
    files = {
        "d/sub/f": b"x" * 3_000_000,  # more than one read chunk
        "empty": b"",
        "long" * 40: b"long name",
        "d/" + "x" * 200 + "/" + "y" * 200: b"long path",
        "café": b"utf-8 name",
    }
    root.mkdir()
    for d in reversed(dirs) if reverse else dirs:
        (root / d).mkdir(parents=True, exist_ok=True)
    for name in sorted(files, reverse=reverse):
        (root / name).write_bytes(files[name])
    with open(os.fsencode(root) + b"/" + NON_UTF8, "wb"):
        pass
    os.symlink("../../etc/passwd", root / "d" / "link")
    os.mkfifo(root / "fifo")
    os.link(root / "d" / "sub" / "f", root / "hard")
    os.mknod(root / "d" / "gone", stat.S_IFCHR | 0o600, 0)  # a whiteout
    os.setxattr(root / "d" / "sub", "trusted.overlay.opaque", b"y")
    os.setxattr(root / "empty", "user.note", b"\xffbinary\0value")
    os.chown(root / "empty", 1000, 1000)
    os.chown(root / ("long" * 40), 3_000_000, 65534)  # needs PAX for the uid
    os.chmod(root / "empty", 0o4755)
    os.chmod(root / "emptydir", 0o700)
    os.chmod(root / "fifo", 0o600)
    for dirpath, dirnames, filenames in os.walk(os.fsencode(root), topdown=False):
        for entry in [*filenames, *dirnames]:
            os.utime(os.path.join(dirpath, entry), ns=(1_500_000_000 * 10**9,) * 2, follow_symlinks=False)
    os.utime(root / "fifo", ns=(10**9, 10**9))
    os.utime(root / "empty", ns=(10**18, 10**18))
    return root


def _comparable(root: Path) -> dict[str, tuple[object, ...]]:
    """snapshot() without inode numbers, and without the root's own entry."""
    snap = snapshot(root)
    snap.pop(".", None)
    return {k: v[:7] + v[8:] for k, v in snap.items()}


def _tar(data: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        return t.getmembers()


def test_same_tree_gives_the_same_bytes_and_digest_dir_agrees(tmp_path: Path) -> None:
    a = _make_tree(tmp_path / "a")
    b = _make_tree(tmp_path / "b", reverse=True)
    out_a, out_b = io.BytesIO(), io.BytesIO()
    da = write_layer_tar(str(a), out_a)
    db = write_layer_tar(str(b), out_b)
    assert out_a.getvalue() == out_b.getvalue()
    assert da == db == digest_dir(str(a))
    assert da == LayerDigest("sha256:" + hashlib.sha256(out_a.getvalue()).hexdigest(), len(out_a.getvalue()))
    (b / "empty").write_text("changed")
    assert digest_dir(str(b)) != da


def test_written_tar_maps_overlay_format_to_oci(tmp_path: Path) -> None:
    out = io.BytesIO()
    write_layer_tar(str(_make_tree(tmp_path / "t")), out)
    members = {m.name: m for m in _tar(out.getvalue())}
    names = list(members)
    for i, name in enumerate(names):  # parents come first
        parent = name.rsplit("/", 1)[0] if "/" in name else None
        assert parent is None or names.index(parent) < i
    assert names.index("d") < names.index("d/sub") < names.index("d/sub/f")
    assert "d/.wh.gone" in members
    assert members["d/.wh.gone"].isfile()
    assert "d/sub/.wh..wh..opq" in members
    assert "d/gone" not in members
    assert members["hard"].islnk()
    assert members["hard"].linkname == "d/sub/f"
    assert members["long" * 40].uid == 3_000_000
    assert members["empty"].mode == 0o4755
    assert members["empty"].pax_headers["SCHILY.xattr.user.note"].encode("utf-8", "surrogateescape") == (
        b"\xffbinary\0value"
    )
    assert not any("trusted.overlay" in k for m in members.values() for k in m.pax_headers)
    assert all(m.uname == "" and m.gname == "" for m in members.values())
    # GNU tar reads it too
    (tmp_path / "l.tar").write_bytes(out.getvalue())
    listing = subprocess.run(["tar", "tvf", str(tmp_path / "l.tar")], capture_output=True, check=True)
    assert b"d/.wh.gone" in listing.stdout


def test_round_trip_keeps_every_attribute(tmp_path: Path) -> None:
    src = _make_tree(tmp_path / "src")
    out = io.BytesIO()
    written = write_layer_tar(str(src), out)
    dest = tmp_path / "dest"
    dest.mkdir()
    assert extract_layer_tar(io.BytesIO(out.getvalue()), str(dest)) == written
    assert _comparable(dest) == _comparable(src)
    assert os.lstat(dest / "hard").st_ino == os.lstat(dest / "d" / "sub" / "f").st_ino
    assert digest_dir(str(dest)) == written
    gz = tmp_path / "gz"
    gz.mkdir()
    assert extract_layer_tar(io.BytesIO(gzip.compress(out.getvalue())), str(gz)) == written


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tarfile_formats_extract(tmp_path: Path, fmt: int) -> None:
    deep = "/".join(["p" * 50] * 3)  # ustar needs its prefix field for this one
    members = [
        dirm("./"),
        dirm("./etc"),
        reg("./etc/hosts", b"127.0.0.1 localhost\n"),
        reg(deep + "/f", b"deep"),
    ]
    if fmt != tarfile.USTAR_FORMAT:
        members.append(reg("n" * 150, b"long"))
    data = build(*members, fmt=fmt)
    dest = tmp_path / "dest"
    dest.mkdir()
    got = extract_layer_tar(io.BytesIO(data), str(dest))
    assert got.diff_id == "sha256:" + hashlib.sha256(data).hexdigest()  # padding to 10240 included
    assert got.size == len(data)
    assert (dest / "etc" / "hosts").read_text() == "127.0.0.1 localhost\n"
    assert (dest / deep / "f").read_text() == "deep"


def test_gnu_tar_archives_extract(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "a" / ("b" * 120)).mkdir(parents=True)
    (src / "a" / ("b" * 120) / "f").write_text("gnu")
    os.symlink("f", src / "a" / ("b" * 120) / "l")
    (src / "a" / "h1").write_text("linked")
    os.link(src / "a" / "h1", src / "a" / "h2")
    for fmt in ("gnu", "posix", "ustar"):
        archive = tmp_path / f"{fmt}.tar.gz"
        args = ["tar", f"--format={fmt}", "-czf", str(archive), "-C", str(src), "."]
        if fmt == "ustar":
            args = ["tar", "--format=ustar", "-czf", str(archive), "-C", str(src), "a/h1", "a/h2"]
        subprocess.run(args, check=True, capture_output=True)
        dest = tmp_path / fmt
        dest.mkdir()
        with open(archive, "rb") as f:
            extract_layer_tar(f, str(dest))
        if fmt != "ustar":
            assert tree(dest) == tree(src)
        assert os.stat(dest / "a" / "h1").st_ino == os.stat(dest / "a" / "h2").st_ino


def test_unterminated_tar_as_umoci_writes_it(tmp_path: Path) -> None:
    """umoci 0.4 ends a layer right after the last file's data: no padding, no end blocks."""
    data = build(reg("etc/a", b"abc"))
    header_and_data = data[: 3 * 512 + 3] if data[156:157] == b"x" else data[: 512 + 3]
    dest = tmp_path / "dest"
    dest.mkdir()
    got = extract_layer_tar(io.BytesIO(header_and_data), str(dest))
    assert (dest / "etc" / "a").read_bytes() == b"abc"
    assert got.size == len(header_and_data)


def test_same_layer_whiteouts_follow_the_image_spec(tmp_path: Path) -> None:
    """A whiteout hides lower layers only: this layer's own entry of that name stays (a directory
    then becomes opaque), and a whiteout of nothing is a whiteout."""
    data = build(
        reg(".wh.a"),
        dirm("a"),
        reg("a/mine", b"1"),  # whiteout, then the dir again: opaque
        dirm("b"),
        reg("b/mine", b"2"),
        reg(".wh.b"),  # the dir, then its whiteout: opaque
        reg("c", b"3"),
        reg(".wh.c"),  # a file, then its whiteout: the file
        reg(".wh.d"),
        reg("d", b"4"),  # whiteout, then a file: the file
        reg(".wh.e"),  # just a whiteout
        reg(".wh.f/"),  # a whiteout entry with a trailing slash names f
    )
    dest = tmp_path / "dest"
    dest.mkdir()
    extract_layer_tar(io.BytesIO(data), str(dest))
    for name in ("a", "b"):
        assert os.getxattr(dest / name, "trusted.overlay.opaque") == b"y"
    assert (dest / "a" / "mine").read_text() == "1"
    assert (dest / "b" / "mine").read_text() == "2"
    assert (dest / "c").read_text() == "3"
    assert (dest / "d").read_text() == "4"
    for name in ("e", "f"):
        st = os.lstat(dest / name)
        assert stat.S_ISCHR(st.st_mode)
        assert st.st_rdev == 0


def test_overlay_whiteout_device_in_a_tar_is_a_whiteout(tmp_path: Path) -> None:
    info, _ = reg("gone")
    info.type = tarfile.CHRTYPE
    dest = tmp_path / "dest"
    dest.mkdir()
    extract_layer_tar(io.BytesIO(build((info, None))), str(dest))
    assert stat.S_ISCHR(os.lstat(dest / "gone").st_mode)


def test_later_entries_replace_earlier_ones(tmp_path: Path) -> None:
    data = build(
        dirm("x"),
        reg("x/inner", b"gone"),
        reg("x", b"now a file"),
        reg("y", b"file"),
        dirm("y"),
        reg("y/in", b"now a dir"),
        reg("z", b"first"),
        sym("z", "target"),
    )
    dest = tmp_path / "dest"
    dest.mkdir()
    extract_layer_tar(io.BytesIO(data), str(dest))
    assert tree(dest) == {"x": "file:now a file", "y": "dir", "y/in": "file:now a dir", "z": "link:target"}


def test_directory_mtimes_survive_their_children(tmp_path: Path) -> None:
    info, _ = dirm("d")
    info.mtime = 1_234_567_890
    dest = tmp_path / "dest"
    dest.mkdir()
    extract_layer_tar(io.BytesIO(build((info, None), reg("d/a", b"x"), reg("d/b", b"y"))), str(dest))
    assert os.stat(dest / "d").st_mtime == 1_234_567_890


def test_pax_mtime_with_fraction_and_negative(tmp_path: Path) -> None:
    a, _ = reg("a")
    a.pax_headers = {"mtime": "1500000000.25"}
    b, _ = reg("b")
    b.pax_headers = {"mtime": "-10"}
    dest = tmp_path / "dest"
    dest.mkdir()
    extract_layer_tar(io.BytesIO(build((a, b""), (b, b""))), str(dest))
    assert os.stat(dest / "a").st_mtime_ns == 1_500_000_000_250_000_000
    assert os.stat(dest / "b").st_mtime_ns == -10 * 10**9


def test_pre_posix_directory_entry_is_a_directory(tmp_path: Path) -> None:
    """Typeflag NUL with a trailing slash is a directory (as tarfile and Go's archive/tar read
    it); it was made a regular file ``a``, so ``a/b`` was refused as written through a file."""
    data = bytearray(build(reg("a/"), reg("a/b", b"x"), fmt=tarfile.USTAR_FORMAT))
    data[156:157] = b"\0"
    data[148:156] = b" " * 8
    data[148:156] = b"%06o\0 " % sum(data[:512])
    dest = tmp_path / "dest"
    dest.mkdir()
    extract_layer_tar(io.BytesIO(bytes(data)), str(dest))
    assert tree(dest) == {"a": "dir", "a/b": "file:x"}


def test_overlay_and_trusted_xattrs_are_carried_neither_way(tmp_path: Path) -> None:
    """The writer leaves out what the extractor would drop (trusted.*, user.overlay.*), so a
    written layer extracts to the same tree it came from and digest_dir ignores them."""
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    before = digest_dir(str(src))
    os.setxattr(src / "d", "trusted.other", b"x")
    os.setxattr(src / "d", "user.overlay.redirect", b"/etc")
    assert digest_dir(str(src)) == before
    os.setxattr(src / "d", "user.kept", b"y")
    out = io.BytesIO()
    write_layer_tar(str(src), out)
    (member,) = _tar(out.getvalue())
    assert set(member.pax_headers) == {"SCHILY.xattr.user.kept"}
