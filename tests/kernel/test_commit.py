"""Container.commit: a container's writable layer becomes a new layer of a tagged image (real
containers, a store in tmp_path).  Owners are shifted from the host's ids back to the container's,
deletions stay whiteouts, the launcher's own files are left out."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from pytest_sandbox import ContainerNotRunningError, Image, InvalidSpecError, LayerNotFoundError, Sandbox
from pytest_sandbox.host.rootfs import ContainerDirs
from pytest_sandbox.images.store import Store
from tests import probes

SCRIPT = """
set -e
echo new > /new.txt
chown 1000:2000 /new.txt
mkdir -p /home/app && chown 1000 /home/app && echo mine > /home/app/f && chown 1000:1000 /home/app/f
cp /bin/busybox /suid && chmod 4755 /suid
ln -s /new.txt /link
ln /new.txt /hard
rm /bin/vi
rm -rf /etc && mkdir /etc && echo only > /etc/only
mkfifo /fifo
"""


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store")


def test_commit_makes_a_layer_with_container_ids(busybox_image: Image, store: Store) -> None:
    uid_base = probes.uid_base()
    with Sandbox() as sb:
        c = sb.start(["sh", "-c", SCRIPT], image=busybox_image)
        assert c.wait(30).exit_code == 0, c.logs()
        upper = Path(probes.upper_dir(c))
        assert os.lstat(upper / "new.txt").st_uid == uid_base + 1000  # the host's view
        image = c.commit("committed:1", store=store)
    assert image.image_id == store.resolve_id("committed:1")
    assert image.layers[:-1] == tuple(store.layer_path(d) for d in store.resolve("committed:1").layers[:-1])
    layer = Path(image.layers[-1])
    new = os.lstat(layer / "new.txt")
    assert (new.st_uid, new.st_gid) == (1000, 2000)
    assert os.lstat(layer / "home" / "app").st_uid == 1000
    assert os.lstat(layer / "home").st_uid == 0
    assert os.lstat(layer / "link").st_uid == 0
    assert stat.S_IMODE(os.lstat(layer / "suid").st_mode) == 0o4755  # chown did not clear it
    assert os.lstat(layer / "hard").st_ino == new.st_ino
    assert stat.S_ISFIFO(os.lstat(layer / "fifo").st_mode)
    vi = os.lstat(layer / "bin" / "vi")
    assert stat.S_ISCHR(vi.st_mode)
    assert vi.st_rdev == 0
    assert os.getxattr(layer / "etc", "trusted.overlay.opaque") == b"y"
    assert sorted(os.listdir(layer / "etc")) == ["only"]  # not the launcher's hostname and hosts
    for mount_point in ("dev", "proc", "sys", "tmp"):
        assert not os.path.lexists(layer / mount_point)
    ids = [(s.st_uid, s.st_gid) for s in (os.lstat(p) for p in layer.rglob("*"))]
    assert all(uid < 65536 and gid < 65536 for uid, gid in ids)
    record = store.resolve("committed:1")
    assert record.history[-1].created_by.startswith(f"commit {c.name}: sh -c")
    assert record.parent is not None
    with Sandbox() as sb:
        script = (
            "cat /new.txt /home/app/f /etc/only; ls -ln /new.txt | cut -c1-40; "
            "test -e /bin/vi || echo vi-gone; test -e /etc/passwd || echo passwd-gone; "
            "ls -l /suid | cut -c1-10"
        )
        r = sb.run(["sh", "-c", script], image=Image.load("committed:1", store=store))
    lines = r.stdout.decode().splitlines()
    assert lines[:3] == ["new", "mine", "only"]
    assert lines[3].split()[2:4] == ["1000", "2000"]
    assert lines[4:] == ["vi-gone", "passwd-gone", "-rwsr-xr-x"]


def test_commit_a_running_container_and_commit_again(busybox_image: Image, store: Store) -> None:
    with Sandbox() as sb:
        c = sb.start(["sh", "-c", "echo 1 > /gen; touch /ready; sleep 60"], image=busybox_image)
        c.wait_for(lambda: os.path.exists(os.path.join(probes.upper_dir(c), "ready")), timeout=10)
        first = c.commit("gen:1", store=store)
        c.exec(["sh", "-c", "echo 2 > /gen"])
        second = c.commit("gen:2", store=store)
        assert c.running
        r1 = sb.run(["cat", "/gen"], image=first)
        r2 = sb.run(["cat", "/gen"], image=second)
    assert (r1.stdout, r2.stdout) == (b"1\n", b"2\n")
    assert first.image_id != second.image_id
    assert store.resolve("gen:1").layers[:-1] == store.resolve("gen:2").layers[:-1]


def test_commit_on_the_host_base(store: Store) -> None:
    with Sandbox() as sb:
        c = sb.start(["sh", "-c", "mkdir /usr/psbx-commit && echo u > /usr/psbx-commit/f; echo r > /r"])
        c.wait(30)
        image = c.commit("onhost:1", store=store)
        assert store.resolve("onhost:1").host_base is True
        r = sb.run(["sh", "-c", "cat /usr/psbx-commit/f /r; test -x /usr/bin/env && echo host"], image=image)
    assert r.stdout == b"u\nr\nhost\n"
    assert not os.path.exists("/usr/psbx-commit")


def test_commit_of_a_stored_image_keeps_its_config(busybox_layer: Path, store: Store) -> None:
    base = Image.from_layers(busybox_layer, base=None, store=store).env(MODE="x").workdir("/w").tag("cfg:1")
    with Sandbox() as sb:
        c = sb.start(["sh", "-c", "echo $MODE > file"], image=base)
        c.wait(30)
        image = c.commit("cfg:2")  # the image's store
        r = sb.run(["sh", "-c", "pwd; cat file; echo $MODE"], image=Image.load("cfg:2", store=store))
    assert image.store == store
    assert r.stdout == b"/w\nx\nx\n"


def test_commit_refusals(busybox_image: Image, store: Store) -> None:
    with Sandbox() as sb:
        c = sb.start(["true"], image=busybox_image)
        c.wait(30)
        with pytest.raises(InvalidSpecError):
            c.commit("Not A Ref", store=store)
        with pytest.raises(InvalidSpecError):
            c.commit("x@sha256:" + "0" * 64, store=store)
        assert not os.path.exists(store.root)
        c.remove()
        with pytest.raises(ContainerNotRunningError, match="commit before removing"):
            c.commit("late:1", store=store)
    assert not os.path.exists(store.root)


def test_ids_outside_the_containers_range_become_nobody(busybox_image: Image, store: Store) -> None:
    """A file in the upper layer owned by a host id the container does not map (a host user's,
    another container's range) is stored as 65534 -- as the container sees it -- not as that
    host id; ids below 65536 (a lower layer's own, where idmapping was not possible) are kept."""
    uid_base = probes.uid_base()
    with Sandbox() as sb:
        c = sb.start(["sh", "-c", "touch /host-user /other-container /low /mine"], image=busybox_image)
        assert c.wait(30).exit_code == 0, c.logs()
        upper = Path(probes.upper_dir(c))
        os.chown(upper / "host-user", 70000, 300000)
        os.chown(upper / "other-container", uid_base + 65536, uid_base - 1)
        os.chown(upper / "low", 5, 6)
        image = c.commit("ids:1", store=store)
    layer = Path(image.layers[-1])
    owners = {n: (os.lstat(layer / n).st_uid, os.lstat(layer / n).st_gid) for n in os.listdir(layer)}
    assert owners == {
        "host-user": (65534, 65534),
        "other-container": (65534, 65534),
        "low": (5, 6),
        "mine": (0, 0),
    }


def test_an_upper_entry_that_needs_its_lower_layers_is_refused(busybox_image: Image, store: Store) -> None:
    """With redirect_dir or metacopy on, an upper entry is only a pointer into the lower layers:
    committed without them it would lose its contents.  Refused, and nothing tagged."""
    with Sandbox() as sb:
        c = sb.start(["sh", "-c", "mkdir /moved; echo x > /moved/f"], image=busybox_image)
        assert c.wait(30).exit_code == 0, c.logs()
        os.setxattr(Path(probes.upper_dir(c), "moved"), "trusted.overlay.redirect", b"/bin")
        with pytest.raises(InvalidSpecError, match=r"trusted\.overlay\.redirect"):
            c.commit("redirected:1", store=store)
    assert store.refs() == {}
    assert [p for p in Path(store.root, "tmp").rglob("*") if not p.is_dir()] == []


def test_a_writable_link_to_elsewhere_is_refused(busybox_image: Image, store: Store, tmp_path: Path) -> None:
    """Security review of issue 9, item 1: the state directory's ``writable.fd`` link is
    ``/proc/<launcher pid>/fd/<n>``; once that launcher is gone and its pid reused it leads to
    another process's fd n.  Pointed at a host directory here, commit refuses it (the tmpfs'
    recorded device/inode do not match) instead of storing the host directory's files."""
    host_dir = tmp_path / "host"
    (host_dir / "upper.0").mkdir(parents=True)
    (host_dir / "upper.0" / "secret").write_text("host file")
    with Sandbox() as sb:
        c = sb.start(["sh", "-c", "echo mine > /mine"], image=busybox_image)
        assert c.wait(30).exit_code == 0, c.logs()
        held = ContainerDirs(c.dir).held_writable
        real = os.readlink(held)
        os.replace(_symlink_beside(held, str(host_dir)), held)  # what a reused pid's fd n would be
        try:
            with pytest.raises(LayerNotFoundError, match=r"not the container's writable tmpfs"):
                c.commit("psbx-elsewhere:1", store=store)
        finally:
            os.replace(_symlink_beside(held, real), held)  # the launcher's cleaner follows it
        assert not os.path.exists(store.root)  # nothing stored, not even the parent image
        image = c.commit("psbx-elsewhere:2", store=store)  # through the launcher's own fd: allowed
        assert sb.run(["cat", "/mine"], image=image).stdout == b"mine\n"


def _symlink_beside(path: str, target: str) -> str:
    tmp = path + ".new"
    os.symlink(target, tmp)
    return tmp
