# Long module: every isolation property of a container in one place (namespaces, root
# filesystem, privileges, fds), so that a missing one shows.
"""Isolation, proved against the real kernel: namespaces, pivot_root, /proc, /dev, /sys, masks,
privileges and fd hygiene.

Every test looks at the container from the inside *and* compares with what the host sees, so that
it fails if the property is broken, not only if a command errors.  The busybox image is used where
host tools are not needed (it starts fastest); the host base where a probe needs ``python3`` to
report an exact errno.  Nothing here changes the host outside the test's ``tmp_path`` (the mount
propagation test mounts there and unmounts in ``finally``), and everything is safe under xdist.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import secrets
import socket
import stat
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pytest_sandbox import Container, Image, InvalidSpecError, Result, Sandbox
from pytest_sandbox.core.naming import PROJECT_CGROUP
from pytest_sandbox.host.rootfs import (
    DEV_LINKS,
    DEVICES,
    MASKED_PATHS,
    READONLY_PATHS,
    ContainerDirs,
    mask_plan,
)
from pytest_sandbox.launcher.process import DEFAULT_CAPS
from tests import probes

NAMESPACES = ("cgroup", "ipc", "mnt", "net", "pid", "user", "uts")
DEFAULT_CAP_MASK = sum(1 << c for c in DEFAULT_CAPS)
SLEEP = ["sleep", "60"]


# -- helpers ------------------------------------------------------------------------------------


def sh(sandbox: Sandbox, script: str, *, image: Image | None = None, **opts: Any) -> Result:
    """Run a shell script in a fresh container; its Result (not checked)."""
    return sandbox.run(["sh", "-c", script], image=image, **opts)


def probe(sandbox: Sandbox, code: str, args: object = None, **opts: Any) -> Any:
    """Run ``code`` with the host base's python3 (``ARGS`` = ``args``); what it printed as JSON."""
    prelude = "import json, os, sys\nARGS = json.loads(sys.argv[1])\n"
    r = sandbox.run(["python3", "-c", prelude + code, json.dumps(args)], **opts).check()
    return json.loads(r.stdout)


def exec_probe(container: Container, code: str, args: object = None) -> Any:
    prelude = "import json, os, sys\nARGS = json.loads(sys.argv[1])\n"
    r = container.exec(["python3", "-c", prelude + code, json.dumps(args)]).check()
    return json.loads(r.stdout)


def status_fields(text: str | bytes) -> dict[str, str]:
    """``/proc/<pid>/status`` as a dict of field -> value (whitespace-trimmed)."""
    if isinstance(text, bytes):
        text = text.decode()
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


@dataclass(frozen=True)
class Mount:
    mount_id: int
    root: str
    mount_point: str
    options: str
    optional: tuple[str, ...]
    fstype: str
    source: str
    super_options: str


def parse_mountinfo(text: str | bytes) -> list[Mount]:
    """proc(5) mountinfo lines."""
    if isinstance(text, bytes):
        text = text.decode()
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        sep = fields.index("-")
        mounts.append(
            Mount(
                int(fields[0]),
                fields[3],
                fields[4],
                fields[5],
                tuple(fields[6:sep]),
                fields[sep + 1],
                fields[sep + 2],
                fields[sep + 3],
            )
        )
    return mounts


def host_mount_points() -> set[str]:
    with open("/proc/self/mountinfo") as f:
        return {m.mount_point for m in parse_mountinfo(f.read())}


def token() -> str:
    return secrets.token_hex(4)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.shmget.argtypes = [ctypes.c_int, ctypes.c_size_t, ctypes.c_int]
_libc.shmctl.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
IPC_CREAT, IPC_EXCL, IPC_RMID = 0o1000, 0o2000, 0


def sysv_shm_keys(text: str | bytes) -> set[int]:
    """The keys listed in a /proc/sysvipc/shm table (header line skipped)."""
    if isinstance(text, bytes):
        text = text.decode()
    return {int(line.split()[0]) for line in text.splitlines()[1:] if line.strip()}


@pytest.fixture
def host_shm() -> Iterator[int]:
    """A SysV shared memory segment in the host's IPC namespace; its key.  Removed afterwards."""
    while True:
        key = secrets.randbelow(0x7FFF_0000) + 0x1000
        shmid = _libc.shmget(key, 4096, IPC_CREAT | IPC_EXCL | 0o600)
        if shmid >= 0:
            break
        if ctypes.get_errno() != errno.EEXIST:
            raise OSError(ctypes.get_errno(), "shmget")
    try:
        yield key
    finally:
        _libc.shmctl(shmid, IPC_RMID, None)


# -- namespaces, one at a time ------------------------------------------------------------------


def test_uts_namespace_own_hostname(sandbox: Sandbox, busybox_image: Image) -> None:
    """UTS: the container's hostname is its own and setting it never touches the host's.

    The container's first process calls sethostname("box") as root of the new user namespace; if
    the UTS namespace were shared, the host (and every other test) would now be called "box".
    The container's root also cannot rename its own UTS namespace later (no CAP_SYS_ADMIN).
    """
    before = socket.gethostname()
    script = "hostname; uname -n; cat /proc/sys/kernel/hostname; hostname renamed"
    r = sh(sandbox, script, image=busybox_image, hostname="box")
    assert r.stdout.split() == [b"box", b"box", b"box"]
    assert (r.exit_code, r.stderr) == (1, b"hostname: sethostname: Operation not permitted\n")
    assert socket.gethostname() == before != "box"
    with open("/proc/sys/kernel/hostname") as f:
        assert f.read().strip() == before


def test_user_namespace_root_is_an_unprivileged_host_uid(sandbox: Sandbox, busybox_image: Image) -> None:
    """USER: uid 0 inside is host uid ``uid_base`` (not 0), for the command, its files and its maps.

    This is what makes every other namespace owned by an unprivileged identity: if container root
    were host root, a single escape (a bind mount, a leaked fd) would be a host-root compromise.
    """
    base = probes.launcher_info().uid_base
    assert base >= 65536
    c = sandbox.start(SLEEP, image=busybox_image)
    script = "cat /proc/self/uid_map /proc/self/gid_map; id -u; id -g; touch /owned; stat -c %u:%g /owned"
    inside = c.exec(["sh", "-c", script]).check()
    lines = [line.split() for line in inside.stdout.decode().splitlines()]
    assert lines == [["0", str(base), "65536"], ["0", str(base), "65536"], ["0"], ["0"], ["0:0"]]
    # The host sees the same process and file with the mapped ids.
    host = status_fields(Path(f"/proc/{c.pid}/status").read_text())
    assert host["Uid"].split() == [str(base)] * 4
    assert host["Gid"].split() == [str(base)] * 4
    owned = os.stat(os.path.join(ContainerDirs(c.dir).upper(0), "owned"))
    assert (owned.st_uid, owned.st_gid) == (base, base)
    assert os.readlink(f"/proc/{c.pid}/ns/user") != os.readlink("/proc/self/ns/user")


def test_mount_namespace_is_private_both_ways(sandbox: Sandbox, busybox_image: Image, tmp_path: Path) -> None:
    """MOUNT: mounts made for the container stay inside, host mounts made later stay outside.

    The bind source is made a *shared* mount on the host first, so this fails if the container's
    clone of it (or its root) kept a peer group: mount events would then propagate into the
    container (or out of it), as in runc/crun's propagation tests.  No ``shared:`` tag inside.
    """
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "underneath").write_text("the directory, not a mount\n")
    scratch = f"/scratch-{token()}"
    subprocess.run(["mount", "--bind", str(src), str(src)], check=True)
    try:
        subprocess.run(["mount", "--make-shared", str(src)], check=True)
        c = sandbox.start(SLEEP, image=busybox_image, mounts={str(src): "/data"}, tmpfs=[scratch])
        inside = parse_mountinfo(c.exec(["cat", "/proc/self/mountinfo"]).check().stdout)
        assert scratch in {m.mount_point for m in inside}
        assert "/data" in {m.mount_point for m in inside}
        assert [m for m in inside if any(o.startswith(("shared:", "master:")) for o in m.optional)] == []
        # Nothing the container mounted is visible on the host.
        host_points = host_mount_points()
        assert scratch not in host_points
        assert not any(p.startswith(c.dir) for p in host_points)
        # A host mount under the shared source, made after start, does not reach the container.
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(src / "sub")], check=True)
        try:
            (src / "sub" / "on-host-tmpfs").write_text("host\n")
            r = c.exec(["sh", "-c", "ls /data/sub; grep -c ' /data/sub ' /proc/self/mountinfo"])
            assert r.stdout.split() == [b"underneath", b"0"]
        finally:
            subprocess.run(["umount", str(src / "sub")], check=True)
    finally:
        subprocess.run(["umount", str(src)], check=True)


def test_ipc_namespace_hides_sysv_objects(sandbox: Sandbox, host_shm: int) -> None:
    """IPC: a host SysV shm segment is invisible inside, and one made inside is invisible outside.

    Shared IPC would let a test attach to (and corrupt) the shared memory of host services, or
    leak segments that outlive the container.
    """
    with open("/proc/sysvipc/shm") as f:
        assert host_shm in sysv_shm_keys(f.read())  # the control: the host lists it
    c = sandbox.start(SLEEP)
    inner_key = host_shm ^ 0x5A5A
    seen = exec_probe(
        c,
        """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
libc.shmget.argtypes = [ctypes.c_int, ctypes.c_size_t, ctypes.c_int]
before = open("/proc/sysvipc/shm").read()
shmid = libc.shmget(ARGS, 4096, 0o1000 | 0o600)
print(json.dumps({"before": before, "shmid": shmid, "after": open("/proc/sysvipc/shm").read()}))
""",
        inner_key,
    )
    assert sysv_shm_keys(seen["before"]) == set()  # a fresh IPC namespace has no segment at all
    assert seen["shmid"] >= 0
    assert sysv_shm_keys(seen["after"]) == {inner_key}
    with open("/proc/sysvipc/shm") as f:
        assert inner_key not in sysv_shm_keys(f.read())
    assert sysv_shm_keys(c.exec(["cat", "/proc/sysvipc/shm"]).check().stdout) == {inner_key}


def test_pid_namespace(sandbox: Sandbox) -> None:
    """PID: the command is pid 2 under the container's init (pid 1) and sees no host process.

    Without it a test could signal, ptrace or read the environment of the pytest process and every
    other host process.  kill() of the pytest worker and of the launcher must fail with ESRCH.
    """
    status = status_fields(sandbox.run(["cat", "/proc/self/status"]).check().stdout)
    assert (status["Pid"], status["PPid"], status["NSpid"]) == ("2", "1", "2")
    launcher = probes.launcher_pid_if_started()
    assert launcher is not None
    seen = probe(
        sandbox,
        """
def kill(pid):
    try:
        os.kill(pid, 0)
        return 0
    except OSError as e:
        return e.errno
pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
print(json.dumps({"pids": pids, "pid": os.getpid(), "ppid": os.getppid(),
                  "kill": [kill(p) for p in ARGS]}))
""",
        [os.getpid(), launcher],
    )
    assert seen == {"pids": [1, 2], "pid": 2, "ppid": 1, "kill": [errno.ESRCH, errno.ESRCH]}
    # From the host, the same process has a host pid and pid 2 in the container's namespace.
    c = sandbox.start(SLEEP)
    host = status_fields(Path(f"/proc/{c.pid}/status").read_text())
    assert host["NSpid"].split() == [str(c.pid), "2"]
    init = status_fields(Path(f"/proc/{c.init_pid}/status").read_text())
    assert init["NSpid"].split() == [str(c.init_pid), "1"]


def test_network_namespace_loopback_only(sandbox: Sandbox) -> None:
    """NET: with network=None the container has only a loopback of its own, and it is up.

    The host's interfaces are absent, and a server on the host's 127.0.0.1 is unreachable from
    the container's 127.0.0.1 (ECONNREFUSED: nobody listens on *its* loopback) -- CVE-2020-8558;
    a server inside is reachable on it (a down lo gives ENETUNREACH: fixed in create.py).
    """
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        seen = probe(
            sandbox,
            """
import socket
s = socket.socket()
try:
    s.connect(("127.0.0.1", ARGS))
    err = 0
except OSError as e:
    err = e.errno
own = socket.create_server(("127.0.0.1", 0))
with socket.create_connection(own.getsockname(), timeout=5) as client, own.accept()[0] as conn:
    client.sendall(b"ping")
    echoed = conn.recv(4).decode()
devs = [line.split(":")[0].strip() for line in open("/proc/net/dev").read().splitlines()[2:]]
print(json.dumps({"connect": err, "own": echoed, "sys": sorted(os.listdir("/sys/class/net")), "proc": devs,
                  "lo_flags": int(open("/sys/class/net/lo/flags").read(), 16)}))
""",
            port,
            network=None,
        )
    assert seen["connect"] == errno.ECONNREFUSED
    assert seen["own"] == "ping"  # the container's own loopback works
    assert seen["sys"] == ["lo"]
    assert seen["proc"] == ["lo"]
    assert seen["lo_flags"] & 0x1, "loopback is not up"  # IFF_UP


def test_cgroup_namespace_root(sandbox: Sandbox, busybox_image: Image) -> None:
    """CGROUP: inside, every hierarchy's path is ``/``; the host sees the container's real leaf.

    Without a cgroup namespace the container would learn (and, with a writable cgroupfs, could
    climb to) its ancestors ``pytest-sandbox/<owner>``: CVE-2023-25809 territory.
    """
    c = sandbox.start(SLEEP, image=busybox_image)
    for path in ("/proc/self/cgroup", "/proc/1/cgroup"):
        lines = c.exec(["cat", path]).check().stdout.decode().splitlines()
        assert lines
        assert [line.rsplit(":", 1)[1] for line in lines] == ["/"] * len(lines), lines
    host = Path(f"/proc/{c.pid}/cgroup").read_text().splitlines()
    ours = f"/{PROJECT_CGROUP}/{probes.owner()}/"
    assert any(line.split(":", 2)[2].startswith(ours) for line in host), host
    assert sorted(os.listdir("/sys/fs/cgroup")) != [], "host control"
    assert c.exec(["ls", "-A", "/sys/fs/cgroup"]).check().stdout == b""  # no cgroupfs mounted inside (v1)


def test_namespace_inodes_differ_pairwise(sandbox: Sandbox, busybox_image: Image) -> None:
    """Two concurrent containers and the host are in 7 pairwise different namespaces each,
    and ``exec`` joins exactly the namespaces of the container's command.

    A shared namespace between two tests would let one test's processes, mounts, IPC or network
    interfere with another's under xdist; an exec landing in a different namespace than the
    container's command would run with the wrong isolation.
    """
    script = "for n in " + " ".join(NAMESPACES) + "; do readlink /proc/self/ns/$n; done"
    host = [os.readlink(f"/proc/self/ns/{n}") for n in NAMESPACES]
    containers = [sandbox.start(SLEEP, image=busybox_image) for _ in range(2)]
    views = [host]
    for c in containers:
        inside = c.exec(["sh", "-c", script]).check().stdout.decode().split()
        assert inside == [os.readlink(f"/proc/{c.pid}/ns/{n}") for n in NAMESPACES]
        views.append(inside)
    for i, name in enumerate(NAMESPACES):
        links = [v[i] for v in views]
        assert all(link.startswith(f"{name}:[") for link in links)
        assert len(set(links)) == 3, f"{name} namespace shared: {links}"


# -- the root filesystem: pivot_root, /proc, /dev, /sys, /tmp, masks -----------------------------


def test_pivot_root_detaches_the_host_root(sandbox: Sandbox, tmp_path: Path) -> None:
    """pivot_root + detach, not chroot: no path, ``..``, /proc link or chroot trick reaches the host.

    The container's root has CAP_SYS_CHROOT, so it tries the classic chroot escape (chroot into a
    subdirectory, chdir("..") past it, chroot(".")): with chroot-based isolation that lands on
    the host's root.  A host canary file (unique path, outside any sandbox path) must stay
    unreachable every way.
    """
    canary = tmp_path / f"canary-{token()}"
    canary.write_text("host secret\n")
    seen = probe(
        sandbox,
        """
def exists(path):
    try:
        os.stat(path)
        return True
    except OSError:
        return False
canary = ARGS
root_ino = os.stat("/").st_ino
out = {
    "direct": exists(canary),
    "dotdot": exists("/../../../.." + canary),
    "proc_self_root": exists("/proc/self/root" + canary),
    "proc_1_root": exists("/proc/1/root" + canary),
    "root_link": os.readlink("/proc/self/root"),
    "dotdot_is_root": os.stat("/..").st_ino == root_ino,
    "listing": sorted(os.listdir("/")),
}
os.makedirs("/tmp/jail/inner")
keep = os.open("/", os.O_RDONLY)
os.chroot("/tmp/jail")
os.fchdir(keep)
for _ in range(64):
    os.chdir("..")
os.chroot(".")
out["escaped_listing"] = sorted(os.listdir("/"))
out["escaped_canary"] = exists(canary)
out["escaped_root_is_root"] = os.stat("/").st_ino == root_ino
print(json.dumps(out))
""",
        str(canary),
    )
    assert seen["direct"] is False
    assert seen["dotdot"] is False
    assert seen["proc_self_root"] is False
    assert seen["proc_1_root"] is False
    assert seen["root_link"] == "/"
    assert seen["dotdot_is_root"] is True
    assert seen["escaped_canary"] is False
    assert seen["escaped_root_is_root"] is True
    assert seen["escaped_listing"] == seen["listing"]
    assert canary.read_text() == "host secret\n"


def expected_system_mounts() -> set[str]:
    """Mount points every container has: root, /proc, /dev, /sys, /tmp and the masks."""
    points = {"/", "/proc", "/dev", "/dev/pts", "/dev/shm", "/dev/mqueue", "/sys", "/tmp"}
    points |= {"/" + rel for rel, _ in mask_plan()}
    points |= {"/" + rel for rel in READONLY_PATHS if os.path.exists("/" + rel)}
    return points


def test_mountinfo_shows_no_host_mount(sandbox: Sandbox, busybox_image: Image) -> None:
    """After pivot_root the old root is gone: the container's mount table is exactly its own.

    Every mount point is one the container was given; none is a host mount (/mnt/..., cgroupfs,
    the state directory), and no mount root names a host path.  A lazily detached old root that
    stayed attached somewhere would show up here.
    """
    r = sandbox.run(["cat", "/proc/self/mountinfo"], image=busybox_image).check()
    mounts = parse_mountinfo(r.stdout)
    points = [m.mount_point for m in mounts]
    assert len(points) == len(set(points)), points
    assert set(points) == expected_system_mounts()
    by_point = {m.mount_point: m for m in mounts}
    assert by_point["/"].fstype == "overlay"
    assert (by_point["/proc"].fstype, by_point["/proc"].root) == ("proc", "/")
    assert [by_point[p].fstype for p in ("/sys", "/dev", "/tmp")] == ["sysfs", "tmpfs", "tmpfs"]
    state_parent = os.path.dirname(probes.state_dir())
    for m in mounts:
        assert not m.root.startswith((state_parent + "/", "/tmp/", "/home", "/root")), m
        assert not m.source.startswith("/dev/"), m  # no block device (the host's disk)
        assert not m.fstype.startswith(("ext", "xfs", "btrfs", "cgroup")), m


def test_proc_is_a_fresh_procfs(sandbox: Sandbox, busybox_image: Image) -> None:
    """/proc is a new procfs of the container's PID and net namespaces, not the host's.

    A bind of the host's /proc would list host pids and interfaces, and /proc/1 would be the host's
    init (whose root is the host's /).
    """
    r = sh(
        sandbox,
        "echo /proc/[0-9]*; echo --; cat /proc/net/dev; echo --; cat /proc/1/status",
        image=busybox_image,
    ).check()
    pids, netdev, init = r.stdout.decode().split("--\n")
    assert pids.split() == ["/proc/1", "/proc/2"]  # init and this shell (the glob is expanded by sh)
    assert [line.split(":")[0].strip() for line in netdev.splitlines()[2:]] == ["lo"]
    init_status = status_fields(init)
    assert (init_status["Pid"], init_status["PPid"], init_status["Name"]) == ("1", "0", "psbx-init")


def test_dev_is_minimal(sandbox: Sandbox, busybox_image: Image) -> None:
    """/dev holds exactly the standard nodes, links and pts/shm/mqueue, and the nodes work.

    The host's /dev would expose disks (sda/vda), /dev/kmsg, /dev/mem; a nodev /dev would make
    /dev/null unusable.  Each node must be the right character device.
    """
    script = (
        "ls -A /dev; echo --; for d in "
        + " ".join(n for n, _, _ in DEVICES)
        + "; do stat -c '%n %F %t:%T' /dev/$d; done; echo --; head -c 4 /dev/zero | od -An -tx1;"
        " echo x > /dev/full; echo full=$?; echo --; grep -E ' /dev/(pts|shm|mqueue) ' /proc/self/mountinfo"
    )
    r = sh(sandbox, script, image=busybox_image)
    listing, nodes, io, submounts = r.stdout.decode().split("--\n")
    expected = {n for n, _, _ in DEVICES} | {n for n, _ in DEV_LINKS} | {"pts", "shm", "mqueue"}
    assert set(listing.split()) == expected
    for line in nodes.splitlines():
        path, _, rest = line.partition(" ")
        name = path.removeprefix("/dev/")
        major, minor = next((ma, mi) for n, ma, mi in DEVICES if n == name)
        assert rest == f"character special file {major:x}:{minor:x}", line
    assert io.split() == ["00", "00", "00", "00", "full=1"]
    assert b"No space left on device" in r.stderr  # /dev/full is the real full device
    fstypes = {m.mount_point: m.fstype for m in parse_mountinfo(submounts)}
    assert fstypes == {"/dev/pts": "devpts", "/dev/shm": "tmpfs", "/dev/mqueue": "mqueue"}


def test_sys_is_read_only(sandbox: Sandbox) -> None:
    """/sys is a read-only sysfs: creating or writing anything there fails with EROFS.

    A writable sysfs lets container root change host kernel and device settings (it is the
    host's kernel).  /sys/fs/cgroup is empty on cgroup v1: no host cgroupfs is reachable.
    """
    seen = probe(
        sandbox,
        """
def write(path):
    try:
        with open(path, "w") as f:
            f.write("1")
        return 0
    except OSError as e:
        return e.errno
print(json.dumps({"new": write("/sys/psbx-new"), "kernel": write("/sys/kernel/mm/ksm/run"),
                  "lo_mtu": write("/sys/class/net/lo/mtu"), "cgroup": os.listdir("/sys/fs/cgroup")}))
""",
    )
    assert seen == {"new": errno.EROFS, "kernel": errno.EROFS, "lo_mtu": errno.EROFS, "cgroup": []}


def test_tmp_is_a_private_tmpfs(sandbox: Sandbox, busybox_image: Image) -> None:
    """/tmp is a tmpfs of the container (mode 1777): writes there land neither in the host's /tmp
    nor in the container's upper layer.
    """
    c = sandbox.start(SLEEP, image=busybox_image)
    name = f"tmpfile-{token()}"
    r = c.exec(["sh", "-c", f"echo data > /tmp/{name}; stat -c %a /tmp; grep ' /tmp ' /proc/self/mountinfo"])
    mode, mountline = r.check().stdout.decode().split("\n", 1)
    assert mode == "1777"
    assert parse_mountinfo(mountline)[0].fstype == "tmpfs"
    assert not os.path.exists(f"/tmp/{name}")
    upper = Path(ContainerDirs(c.dir).upper(0))
    assert list(upper.rglob(name)) == []


def test_masked_paths(sandbox: Sandbox) -> None:
    """The masked paths (rootfs.MASKED_PATHS) read as nothing and cannot be unmasked.

    Files are bind mounts of /dev/null (char 1:3, empty), directories empty read-only tmpfs; the
    container's root cannot unmount them (no CAP_SYS_ADMIN).  They leak host kernel state
    (/proc/keys, /proc/kcore, /proc/timer_list, /sys/firmware ...).
    """
    plan = mask_plan()
    assert sorted({is_dir for _, is_dir in plan}) == [False, True], plan  # files and directories to test
    assert {rel for rel, _ in plan} <= set(MASKED_PATHS)
    seen = probe(
        sandbox,
        """
import ctypes, stat
libc = ctypes.CDLL(None, use_errno=True)
out = {}
for rel, is_dir in ARGS:
    path = "/" + rel
    st = os.lstat(path)
    entry = {"dir": stat.S_ISDIR(st.st_mode), "chr": stat.S_ISCHR(st.st_mode),
             "dev": [os.major(st.st_rdev), os.minor(st.st_rdev)]}
    if is_dir:
        entry["listing"] = os.listdir(path)
        try:
            open(path + "/x", "w")
            entry["create"] = 0
        except OSError as e:
            entry["create"] = e.errno
    else:
        entry["content"] = open(path, "rb").read().decode()
    entry["umount"] = ctypes.get_errno() if libc.umount2(path.encode(), 0) != 0 else 0
    out[rel] = entry
print(json.dumps(out))
""",
        plan,
    )
    for rel, is_dir in plan:
        entry = seen[rel]
        assert entry["umount"] == errno.EPERM, rel
        if is_dir:
            assert (entry["dir"], entry["listing"], entry["create"]) == (True, [], errno.EROFS), rel
        else:
            assert (entry["chr"], entry["dev"], entry["content"]) == (True, [1, 3], ""), rel
    # The control: on the host those files have content (else masking them proves nothing).
    for rel, is_dir in plan:
        if not is_dir and rel in ("proc/interrupts", "proc/timer_list"):
            assert Path("/" + rel).read_bytes() != b""


def test_read_only_kernel_interfaces(sandbox: Sandbox) -> None:
    """/proc/sys, /proc/sysrq-trigger and the other READONLY_PATHS reject writes with EROFS.

    ``core_pattern`` is the classic escape: a writable one runs a container-chosen program as
    host root on the next crash (CVE-2019-19921 / CVE-2023-27561 targets).
    """
    targets = [
        "/proc/sys/kernel/core_pattern",
        "/proc/sys/vm/drop_caches",
        "/proc/sys/kernel/hostname",
        "/proc/sys/user/max_user_namespaces",
    ]
    # /proc/sysrq-trigger, if this kernel has it
    targets += ["/" + rel for rel in READONLY_PATHS if os.path.isfile("/" + rel)]
    seen = probe(
        sandbox,
        """
out = {}
for path in ARGS:
    try:
        with open(path, "w") as f:
            f.write("|/x")
        out[path] = 0
    except OSError as e:
        out[path] = e.errno
print(json.dumps(out))
""",
        targets,
    )
    assert seen == dict.fromkeys(targets, errno.EROFS)
    assert not Path("/proc/sys/kernel/core_pattern").read_text().startswith("|/x")


# -- privileges --------------------------------------------------------------------------------


def test_root_has_exactly_the_default_capabilities(sandbox: Sandbox, busybox_image: Image) -> None:
    """Container root holds DEFAULT_CAPS (effective = permitted = bounding), nothing inheritable
    or ambient, and no_new_privs: the same set in the command and in an exec.

    A wider set (SYS_ADMIN, NET_RAW, DAC_READ_SEARCH, MKNOD) reopens mount, raw-socket,
    Shocker and device-node attacks; no_new_privs stops setuid binaries regaining dropped caps.
    """
    assert DEFAULT_CAP_MASK == 0x800405FB  # podman's 11: CHOWN .. SETFCAP, as documented
    c = sandbox.start(SLEEP, image=busybox_image)
    for out in (
        sandbox.run(["cat", "/proc/self/status"], image=busybox_image).check().stdout,
        c.exec(["cat", "/proc/self/status"]).check().stdout,
        Path(f"/proc/{c.pid}/status").read_bytes(),
    ):
        f = status_fields(out)
        caps = {k: int(f[k], 16) for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")}
        assert caps == {
            "CapInh": 0,
            "CapPrm": DEFAULT_CAP_MASK,
            "CapEff": DEFAULT_CAP_MASK,
            "CapBnd": DEFAULT_CAP_MASK,
            "CapAmb": 0,
        }
        assert f["NoNewPrivs"] == "1"


def test_non_root_user_has_no_capabilities(sandbox: Sandbox, busybox_image: Image) -> None:
    """user="1000" runs with empty permitted/effective sets (the bounding set stays the default)."""
    r = sandbox.run(["cat", "/proc/self/status"], image=busybox_image, user="1000").check()
    f = status_fields(r.stdout)
    assert f["Uid"].split() == ["1000"] * 4
    assert {k: int(f[k], 16) for k in ("CapInh", "CapPrm", "CapEff", "CapAmb")} == dict.fromkeys(
        ("CapInh", "CapPrm", "CapEff", "CapAmb"), 0
    )
    assert int(f["CapBnd"], 16) == DEFAULT_CAP_MASK
    assert f["NoNewPrivs"] == "1"


def test_nested_namespaces_and_mknod_are_refused(sandbox: Sandbox, busybox_image: Image) -> None:
    """Inside, no new user namespace (max_user_namespaces=0 -> ENOSPC), no other namespace or mount
    (no CAP_SYS_ADMIN -> EPERM), and no device node (no CAP_MKNOD -> EPERM).

    Nested user namespaces give container root the kernel attack surface written for real root
    (CVE-2022-0185, CVE-2022-0492 needs one); mknod would let it create /dev/sda and read the disk.
    These are the kernel's own answers, so without the seccomp filter, which refuses the first
    three with EPERM before the kernel sees them (tests/kernel/test_seccomp.py).
    """
    script = (
        "cat /proc/sys/user/max_user_namespaces;"
        "unshare -U true; echo userns=$?;"
        "unshare -m true; echo mntns=$?;"
        "mount -t tmpfs tmpfs /tmp; echo mount=$?;"
        "mknod /tmp/null c 1 3; echo mknod=$?;"
        "mknod /dev/vda b 254 0; echo mknod_blk=$?;"
        "ls /tmp /dev | grep -c -E '^(null|vda)$'"
    )
    r = sh(sandbox, script, image=busybox_image, seccomp="unconfined")
    limit, *codes, nodes = r.stdout.decode().split()
    assert limit == "0"
    assert [c.split("=")[0] for c in codes] == ["userns", "mntns", "mount", "mknod", "mknod_blk"]
    assert all(c.split("=")[1] != "0" for c in codes), codes
    assert nodes == "1"  # only the container's own /dev/null: neither node was made
    assert r.stderr.decode().splitlines() == [
        "unshare: unshare(0x10000000): No space left on device",  # CLONE_NEWUSER, max_user_namespaces=0
        "unshare: unshare(0x20000): Operation not permitted",  # CLONE_NEWNS, no CAP_SYS_ADMIN
        "mount: permission denied (are you root?)",  # busybox words EPERM so
        "mknod: /tmp/null: Operation not permitted",
        "mknod: /dev/vda: Operation not permitted",
    ]


# -- fd hygiene (CVE-2024-21626) ---------------------------------------------------------------


def test_only_stdio_fds_reach_the_command(sandbox: Sandbox, busybox_image: Image, tmp_path: Path) -> None:
    """The command, an exec, and a run from another thread see fds 0, 1, 2 only (plus ls's own
    directory fd), even while the pytest process holds inheritable directory and socket fds.

    runc leaked an fd of the host's /sys/fs/cgroup into the container (CVE-2024-21626); any
    directory fd of the host lets ``openat(fd, "../../..")`` walk the host filesystem.
    """
    dir_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    sock_a, sock_b = socket.socketpair()
    os.set_inheritable(dir_fd, True)
    sock_a.set_inheritable(True)
    try:
        ls = ["ls", "/proc/self/fd"]
        results: list[Result] = [sandbox.run(ls, image=busybox_image)]
        c = sandbox.start(SLEEP, image=busybox_image)
        results.append(c.exec(ls))
        thread = threading.Thread(target=lambda: results.append(sandbox.run(ls, image=busybox_image)))
        thread.start()
        thread.join()
        assert len(results) == 3
        for r in results:
            # 3 is ls's own handle on /proc/self/fd, open while it lists it.
            assert r.check().stdout.split() == [b"0", b"1", b"2", b"3"]
        # The sleeping command, from the host: exactly 0, 1, 2 -- /dev/null and its two output
        # pipes (never a log file: the launcher copies the pipes into those; issue 9, item 2).
        fds = {fd: os.readlink(f"/proc/{c.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{c.pid}/fd")}
        assert sorted(fds) == ["0", "1", "2"]
        assert fds["0"] == "/dev/null"
        assert fds["1"].startswith("pipe:"), fds
        assert fds["2"].startswith("pipe:"), fds
        assert fds["1"] != fds["2"], fds
        # Its init may hold pipes to the launcher, but never a directory or a socket.
        for fd in os.listdir(f"/proc/{c.init_pid}/fd"):
            mode = os.stat(f"/proc/{c.init_pid}/fd/{fd}").st_mode
            assert stat.S_ISFIFO(mode) or stat.S_ISREG(mode) or stat.S_ISCHR(mode), (fd, oct(mode))
    finally:
        os.close(dir_fd)
        sock_a.close()
        sock_b.close()


@pytest.mark.parametrize(
    "workdir",
    [
        "/proc/self/fd/3",
        "/proc/self/fd/5",
        "/proc/self/fd/7",
        "/proc/self/fd/64",
        "/proc/self/cwd",
        "/proc/1/root",
        "/proc/../proc/self/fd/5",
        "//proc/self/fd/5",
    ],
)
def test_workdir_under_proc_rejected_before_start(
    sandbox: Sandbox, busybox_image: Image, workdir: str
) -> None:
    """workdir="/proc/self/fd/N" (CVE-2024-21626's cwd escape) is refused before anything exists."""
    state = probes.state_dir()
    before = set(os.listdir(state)) if os.path.isdir(state) else set()
    with pytest.raises(InvalidSpecError, match="CVE-2024-21626"):
        sandbox.run(["pwd"], image=busybox_image, workdir=workdir)
    after = set(os.listdir(state)) if os.path.isdir(state) else set()
    assert after == before


def test_exec_workdir_under_proc_rejected(sandbox: Sandbox, busybox_image: Image) -> None:
    """The same check guards ``exec(workdir=...)``; the container keeps running."""
    c = sandbox.start(SLEEP, image=busybox_image)
    for n in (3, 5, 9):
        with pytest.raises(InvalidSpecError, match="CVE-2024-21626"):
            c.exec(["pwd"], workdir=f"/proc/self/fd/{n}")
    assert c.running
    assert c.exec(["pwd"], workdir="/etc").check().stdout == b"/etc\n"
