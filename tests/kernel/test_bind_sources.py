"""Host paths given to containers and images: exactly what the test named is used, and no device.

- (issue 9, item 1) a bind source is resolved once, at ``run()``, and mounted from the descriptor
  pytest opened then -- never looked up by path again.  A host process swapping a symlink to a
  decoy directory in and out of the source's name (``renameat2(RENAME_EXCHANGE)``, as a container
  holding a read-write bind of the parent can) never gets the decoy mounted: each start either
  mounts the real directory or is refused with ``InvalidSpecError``.  A symlink planted by one
  container in a shared bind is refused when the next container mounts the path (as the last
  component or as a directory above it).  No descriptor is left in pytest, in the launcher, or in
  the container.  The same for a from_layers directory reached through a symlink planted after
  the image was made (refused: LayerError), and for Image.copy sources (a planted symlink is
  refused; under a swapping race no stored layer ever holds the decoy).
- (issue 9, item 6) a device node in a ``from_layers`` directory or in a bind source does not open
  inside (layers, binds and the overlays are ``nodev``): a block node of the host's disk gives
  ``EACCES``, while the container's own /dev/null still works.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pytest_sandbox import Image, InvalidSpecError, LayerError, LayerNotFoundError, Sandbox
from pytest_sandbox.images.store import Store
from tests import probes
from tests.e2e_support import launcher_settled
from tests.probes import launcher_pid, state_dir

# A decoy stands in for the host's "/": the real attack links to "/", a test must never.
DECOY = b"DECOY\n"
REAL = b"real\n"

SWAPPER = textwrap.dedent(
    """
    import ctypes, os, sys
    libc = ctypes.CDLL(None, use_errno=True)
    RENAME_EXCHANGE = 2
    a, b = (os.fsencode(p) for p in sys.argv[1:3])
    print("swapping", flush=True)
    while True:
        if libc.renameat2(-100, a, -100, b, RENAME_EXCHANGE) != 0:
            sys.exit(ctypes.get_errno())
    """
)


def _decoy(tmp_path: Path) -> Path:
    decoy = tmp_path / "decoy"
    decoy.mkdir()
    (decoy / "marker").write_bytes(DECOY)
    (decoy / "sub").mkdir()
    (decoy / "sub" / "marker").write_bytes(DECOY)
    return decoy


def _fd_count(pid: int | str) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _race(sb: Sandbox, image: Image, source: Path, attempts: int) -> tuple[dict[str, int], list[str]]:
    outcomes = {"mounted": 0, "refused": 0}
    refusals: list[str] = []
    for i in range(attempts * 10):  # on a busy host one outcome may take a while to come
        if i >= attempts and min(outcomes.values()) > 0:
            break
        try:
            r = sb.run(
                ["sh", "-c", f"cat /data/marker; echo {i} > /data/written.{i}"],
                image=image,
                mounts={str(source): "/data"},
            )
        except InvalidSpecError as e:
            refusals.append(str(e))
            outcomes["refused"] += 1
            continue
        assert r.stdout == REAL, (i, r)
        outcomes["mounted"] += 1
    return outcomes, refusals


def test_swapped_in_symlink_never_mounts_the_decoy(busybox_image: Image, tmp_path: Path) -> None:
    """Issue 9 item 1: while a process exchanges the source directory with a symlink to a decoy
    (renameat2 RENAME_EXCHANGE, in a loop), 150 or more containers mount it and write into it:
    none sees or writes the decoy; every start mounts the real directory or is refused with
    InvalidSpecError, and both happen (the race is live).  pytest's and the launcher's fd counts
    end where they started."""
    decoy = _decoy(tmp_path)
    shared = tmp_path / "shared"
    (shared / "cache").mkdir(parents=True)
    (shared / "cache" / "marker").write_bytes(REAL)
    (shared / "link").symlink_to(decoy)
    launcher = launcher_pid()
    with Sandbox() as sb:  # warm-up: the first start with a bind mount
        sb.run(["true"], image=busybox_image, mounts={str(shared / "cache"): "/data"})
    launcher_settled(launcher)
    pytest_fds, launcher_fds = _fd_count("self"), _fd_count(launcher)
    swapper = subprocess.Popen(
        [sys.executable, "-c", SWAPPER, str(shared / "cache"), str(shared / "link")], stdout=subprocess.PIPE
    )
    try:
        assert swapper.stdout is not None
        assert swapper.stdout.readline() == b"swapping\n"
        with Sandbox() as sb:
            outcomes, refusals = _race(sb, busybox_image, shared / "cache", 150)
    finally:
        swapper.kill()
        swapper.wait()
        if swapper.stdout is not None:
            swapper.stdout.close()
    assert sorted(str(p.relative_to(decoy)) for p in decoy.rglob("*")) == ["marker", "sub", "sub/marker"]
    assert (decoy / "marker").read_bytes() == DECOY
    print(outcomes)
    assert outcomes["mounted"] > 0, outcomes
    assert outcomes["refused"] > 0, outcomes
    assert [m for m in refusals if not any(w in m for w in ("symlink", "replaced", "changed"))] == []
    real = next(p for p in (shared / "cache", shared / "link") if not p.is_symlink())
    assert len(list(real.glob("written.*"))) == outcomes["mounted"], outcomes
    launcher_settled(launcher)
    # pytest's may shrink (xdist and lazy helpers close theirs), never grow; the launcher's is exact.
    assert _fd_count("self") <= pytest_fds
    assert _fd_count(launcher) == launcher_fds


def test_symlink_planted_in_a_shared_bind_is_refused(
    sandbox: Sandbox, busybox_image: Image, tmp_path: Path
) -> None:
    """Issue 9 item 1: a container with a read-write bind of shared/ replaces shared/cache with a
    symlink to a decoy host directory; the next container mounting shared/cache -- or
    shared/cache/sub, through the symlink -- is refused with InvalidSpecError before anything is
    created, and the decoy is never mounted."""
    decoy = _decoy(tmp_path)
    shared = tmp_path / "shared"
    (shared / "cache" / "sub").mkdir(parents=True)
    planter = sandbox.run(
        ["sh", "-c", f"rm -r /shared/cache && ln -s {decoy} /shared/cache && echo planted"],
        image=busybox_image,
        mounts={str(shared): "/shared"},
    )
    assert planter.stdout == b"planted\n", planter
    assert os.readlink(shared / "cache") == str(decoy)
    state = set(os.listdir(state_dir()))
    for source in (shared / "cache", shared / "cache" / "sub"):
        with pytest.raises(InvalidSpecError, match="goes through a symlink"):
            sandbox.run(["cat", "/data/marker"], image=busybox_image, mounts={str(source): "/data"})
    assert set(os.listdir(state_dir())) == state  # refused before anything was made
    assert (decoy / "marker").read_bytes() == DECOY


def test_no_bind_source_fd_reaches_the_container(
    sandbox: Sandbox, busybox_image: Image, tmp_path: Path
) -> None:
    """Issue 9 item 1: the O_PATH descriptors of bind sources (one of them a file) are closed in
    the container's init and its command: inside, only fds 0-2 are open (an fd of a host
    directory would let the container walk the host with openat(fd, ".."))."""
    src = tmp_path / "src"
    src.mkdir()
    conf = tmp_path / "app.conf"
    conf.write_text("x=1\n")
    c = sandbox.start(
        ["sh", "-c", "ls /proc/self/fd; echo ready; exec sleep 60"],
        image=busybox_image,
        mounts={str(src): "/data", str(conf): ("/etc/app.conf", "ro")},
    )
    try:
        c.wait_for_log("ready", timeout=10)
        assert c.logs("stdout").split() == [b"0", b"1", b"2", b"3", b"ready"]  # 3: ls's own dir fd
        assert c.init_pid is not None
        init_fds = [os.readlink(f"/proc/{c.init_pid}/fd/{n}") for n in os.listdir(f"/proc/{c.init_pid}/fd")]
        assert not [t for t in init_fds if str(tmp_path) in t], init_fds
    finally:
        c.stop(0.1)


def test_more_mounts_than_a_message_can_carry_is_refused(sandbox: Sandbox, tmp_path: Path) -> None:
    """Issue 9 item 1: the sources' fds travel in one message (SCM_MAX_FD is 253): more mounts than
    the limit are refused with InvalidSpecError at run(), before anything is created."""
    mounts = {}
    for i in range(201):
        (tmp_path / str(i)).mkdir()
        mounts[str(tmp_path / str(i))] = f"/m/{i}"
    with pytest.raises(InvalidSpecError, match="at most 200 bind mounts"):
        sandbox.run(["true"], mounts=mounts)


# -- item 6: device nodes ----------------------------------------------------------------------------


def _candidates() -> list[tuple[int, int, str]]:
    """(type, device number, name): the root filesystem's disk, every block device, /dev/kvm."""
    root = os.stat("/").st_dev
    found = [(stat.S_IFBLK, root, "the root filesystem's disk")] if os.major(root) else []
    for name in sorted(os.listdir("/sys/dev/block")):
        major, minor = (int(x) for x in name.split(":"))
        found.append((stat.S_IFBLK, os.makedev(major, minor), f"block device {name}"))
    return [*found, (stat.S_IFCHR, os.makedev(10, 232), "/dev/kvm")]


def _host_device(scratch: Path) -> tuple[int, int, str]:
    """A device that host root may open (a device cgroup or LSM may forbid some: the root disk
    here): the node must open without nodev, or the test would prove nothing."""
    scratch.mkdir()
    for kind, dev, name in _candidates():
        node = scratch / "probe"
        os.mknod(node, kind | 0o444, dev)
        try:
            os.close(os.open(node, os.O_RDONLY | os.O_CLOEXEC))
        except OSError:
            continue
        finally:
            node.unlink()
        return kind, dev, name
    pytest.fail("no device of this host opens for host root; cannot test nodev")


def _make_node(directory: Path, kind: int, dev: int) -> None:
    directory.mkdir()
    os.mknod(directory / "disk", kind | 0o444, dev)
    os.chmod(directory / "disk", 0o444)  # mknod's mode went through the umask


def test_device_nodes_in_layers_and_binds_do_not_open(
    sandbox: Sandbox, busybox_layer: Path, tmp_path: Path
) -> None:
    """Issue 9 item 6: a node of a host device (a disk or loop block device, else /dev/kvm), mode
    0444 and opening on the host, in a from_layers directory (seen through the overlay) and in a
    bind source cannot be opened inside: EACCES ("Permission denied": the nodev mounts), while
    the container's own /dev/null still opens."""
    kind, dev, name = _host_device(tmp_path / "scratch")
    layer, bind = tmp_path / "layer", tmp_path / "bind"
    _make_node(layer, kind, dev)
    _make_node(bind, kind, dev)
    script = (
        "for f in /disk /data/disk /dev/null; do "
        "if head -c 1 $f > /dev/null; then echo $f=opened; else echo $f=refused; fi; done"
    )
    r = sandbox.run(
        ["sh", "-c", script],
        image=Image.from_layers(busybox_layer, layer, base=None),
        mounts={str(bind): "/data"},
    )
    assert r.stdout.split() == [b"/disk=refused", b"/data/disk=refused", b"/dev/null=opened"], (name, r)
    assert r.stderr.count(b"Permission denied") == 2, (name, r)


def test_device_node_in_a_read_only_bind_on_the_host_base_does_not_open(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    """Issue 9 item 6: the same through a read-only bind, on the host base image: EACCES."""
    kind, dev, name = _host_device(tmp_path / "scratch")
    _make_node(tmp_path / "bind", kind, dev)
    r = sandbox.run(
        ["python3", "-c", "open('/data/disk', 'rb')"], mounts={str(tmp_path / "bind"): ("/data", "ro")}
    )
    assert r.exit_code == 1, (name, r)
    assert b"PermissionError: [Errno 13]" in r.stderr, (name, r)


def test_layer_reached_through_a_planted_symlink_is_refused(
    sandbox: Sandbox, busybox_image: Image, busybox_layer: Path, tmp_path: Path
) -> None:
    """Issue 9 item 1, for layers: Image.from_layers(shared/sub/layer) is made while sub/ is a real
    directory; a container with a read-write bind of shared/ then swaps sub/ for a symlink to a
    decoy holding its own layer/.  The next container of that image is refused (a LayerError
    naming the symlink), and never shows the decoy's files."""
    decoy = _decoy(tmp_path)
    (decoy / "layer").mkdir()
    (decoy / "layer" / "marker").write_bytes(DECOY)
    shared = tmp_path / "shared"
    (shared / "sub" / "layer").mkdir(parents=True)
    (shared / "sub" / "layer" / "marker").write_bytes(REAL)
    image = Image.from_layers(busybox_layer, shared / "sub" / "layer", base=None)
    assert sandbox.run(["cat", "/marker"], image=image).stdout == REAL
    planter = sandbox.run(
        ["sh", "-c", f"mv /shared/sub /shared/old && ln -s {decoy} /shared/sub && echo planted"],
        image=busybox_image,
        mounts={str(shared): "/shared"},
    )
    assert planter.stdout == b"planted\n", planter
    with pytest.raises(LayerError, match="symlink") as err:
        sandbox.run(["cat", "/marker"], image=image)
    assert b"DECOY" not in str(err.value).encode()


# -- the same for COPY build steps -------------------------------------------------------------------


def test_copy_step_through_a_planted_symlink_is_refused(
    sandbox: Sandbox, busybox_image: Image, busybox_layer: Path, tmp_path: Path
) -> None:
    """Issue 9 item 1, for Image.copy: a container with a read-write bind of shared/ replaces
    shared/app with a symlink to a decoy; copying shared/app (or a file below it) into an image
    is refused with InvalidSpecError, and nothing of the decoy is stored."""
    decoy = _decoy(tmp_path)
    shared = tmp_path / "shared"
    (shared / "app").mkdir(parents=True)
    planter = sandbox.run(
        ["sh", "-c", f"rm -r /shared/app && ln -s {decoy} /shared/app && echo planted"],
        image=busybox_image,
        mounts={str(shared): "/shared"},
    )
    assert planter.stdout == b"planted\n", planter
    store = Store(tmp_path / "store")
    base = Image.from_layers(busybox_layer, base=None, store=store)
    for source in (shared / "app", shared / "app" / "marker"):
        with pytest.raises(InvalidSpecError, match="goes through a symlink"):
            base.copy(source, "/app")
    assert not list((tmp_path / "store").rglob("marker"))


def test_copy_step_racing_a_symlink_swap_never_copies_the_decoy(busybox_layer: Path, tmp_path: Path) -> None:
    """Issue 9 item 1, for Image.copy: while a process exchanges the source directory with a
    symlink to a decoy (renameat2 RENAME_EXCHANGE), 100 copies of it are each refused or store
    the real directory; no stored layer ever holds the decoy's marker."""
    decoy = _decoy(tmp_path)
    shared = tmp_path / "shared"
    (shared / "app").mkdir(parents=True)
    (shared / "link").symlink_to(decoy)
    store = Store(tmp_path / "store")
    base = Image.from_layers(busybox_layer, base=None, store=store)
    outcomes = {"copied": 0, "refused": 0}
    real_dir = os.open(shared / "app", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # under either name
    swapper = subprocess.Popen(
        [sys.executable, "-c", SWAPPER, str(shared / "app"), str(shared / "link")], stdout=subprocess.PIPE
    )
    try:
        assert swapper.stdout is not None
        assert swapper.stdout.readline() == b"swapping\n"
        for i in range(100):
            # A new content each time (the marker of the real directory, then i): no cache hit.
            fd = os.open(
                "marker", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644, dir_fd=real_dir
            )
            os.write(fd, REAL + str(i).encode())
            os.close(fd)
            try:
                image = base.copy(shared / "app", "/app")
            except (InvalidSpecError, LayerNotFoundError):
                outcomes["refused"] += 1
                continue
            copied = Path(image.layers[-1]) / "app" / "marker"
            assert copied.read_bytes().startswith(REAL), (i, copied.read_bytes())
            outcomes["copied"] += 1
    finally:
        swapper.kill()
        swapper.wait()
        if swapper.stdout is not None:
            swapper.stdout.close()
        os.close(real_dir)
    stored = [p.read_bytes() for p in (tmp_path / "store").rglob("marker")]
    assert DECOY not in stored, outcomes
    assert outcomes["refused"] > 0, outcomes


def test_networked_container_starts_with_a_state_dir_behind_a_symlink(
    busybox_image: Image, tmp_path: Path
) -> None:
    """Issue 9 item 1: state_dir given through a symlink (as /var/run is one to /run): the
    /etc/hosts bind source of a networked container, in the state directory, is canonical, so
    it is not refused as a symlinked source; the container reads its own /etc/hosts."""
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    rt = probes.new_runtime(state_dir=str(tmp_path / "link" / "state"))
    try:
        with Sandbox(runtime=rt) as sb:
            net = sb.network()
            r = sb.run(["cat", "/etc/hosts"], image=busybox_image, network=net, name="web")
            assert r.exit_code == 0, r
            assert b"\tweb" in r.stdout or b" web" in r.stdout, r
    finally:
        rt.close()
