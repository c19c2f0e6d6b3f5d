"""What a hostile (or merely careless) container and image can do to the host: nothing that lasts.

- a container fills its writable layer with what trips up cleanup code --
  ``chmod 000`` trees, files of many owners, 10,000 files, 200-deep nesting, hard links, fifos,
  sockets, setuid/sticky/mode-0 files, whiteouts and opaque directories over lower layers -- and
  the state directory is still removed completely, with nothing in the launcher's log.
- 300 create/destroy cycles leave the pytest process's fds and threads and the launcher's
  fds exactly where they were, and the launcher's RSS within a small tolerance.
- (CVE-2019-19921, CVE-2023-27561): an image whose /proc, /dev, /sys or /usr is a symlink
  (absolute into a host canary, relative climbing out, dangling) is refused with a SetupError
  saying it must be an ordinary directory, and the canary does not change by a byte.
- (CVE-2019-5736): inside, /proc/<pid>/exe and /proc/<pid>/mem of PID 1 (a fork of the
  host's Python) cannot be opened for writing, nor PID 1 ptraced, and the host's Python binaries
  keep their sha256.
"""

from __future__ import annotations

import ast
import contextlib
import errno
import hashlib
import json
import os
import stat
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pytest_sandbox import Container, Image, InvalidSpecError, Sandbox, SetupError
from tests import probes
from tests.e2e_support import launcher_settled
from tests.probes import launcher_pid


def _launcher_log() -> bytes:
    try:
        with open(probes.launcher_log_path(), "rb") as f:
            return f.read()
    except FileNotFoundError:
        return b""


# -- hostile upper-layer contents ------------------------------------------------------------------

HOSTILE = r"""
import fcntl, glob, os, shutil, socket, stat, struct, sys, time

N_FILES, DEPTH = 10000, 200
# 10,000 files, a few of them hard-linked many times.
os.mkdir("/many")
for i in range(N_FILES):
    with open(f"/many/f{i}", "w") as f:
        f.write("x")
for i in range(50):
    os.link("/many/f0", f"/many/hard{i}")
os.link("/many/f1", "/hard-elsewhere")
# 200-deep nesting, locked at the bottom.
os.mkdir("/deep")
os.chdir("/deep")
for _ in range(DEPTH):
    os.mkdir("d")
    os.chdir("d")
with open("bottom", "w") as f:
    f.write("x")
os.chmod("bottom", 0)
os.chmod(".", 0)
os.chdir("/")
# chmod 000 directories, nested, each holding files; the outer ones locked last.
os.makedirs("/locked/a/b/c")
for d in ("/locked", "/locked/a", "/locked/a/b", "/locked/a/b/c"):
    with open(d + "/f", "w") as f:
        f.write("x")
for d in ("/locked/a/b/c", "/locked/a/b", "/locked/a", "/locked"):
    os.chmod(d, 0)
# Files and directories owned by many mapped uids and gids, some private to their owner.
os.mkdir("/owners")
uids = [1, 2, 7, 100, 999, 1000, 4242, 30000, 65533, 65534]
for uid in uids:
    path = f"/owners/u{uid}"
    os.mkdir(path, 0o700)
    with open(path + "/secret", "w") as f:
        f.write("x")
    os.chown(path + "/secret", uid, (uid * 7) % 65536)
    os.chmod(path + "/secret", 0o400)
    os.chown(path, uid, uid)
# A sticky world-writable directory with other users' files, like /tmp.
os.mkdir("/sticky")
os.chmod("/sticky", 0o1777)
for uid in uids[:4]:
    with open(f"/sticky/of{uid}", "w") as f:
        f.write("x")
    os.chown(f"/sticky/of{uid}", uid, uid)
os.chown("/sticky", 4242, 4242)
# Special files: fifos, a bound unix socket, weird modes.
os.mkdir("/special")
for i in range(5):
    os.mkfifo(f"/special/fifo{i}", 0)
s = socket.socket(socket.AF_UNIX)
s.bind("/special/sock")
s.close()
for name, mode in (("setuid", 0o4755), ("setgid", 0o2755), ("all", 0o7777), ("none", 0), ("wo", 0o222)):
    with open(f"/special/{name}", "w") as f:
        f.write("#!/bin/sh\n")
    os.chmod(f"/special/{name}", mode)
os.chmod("/special", 0o555)  # a read-only directory full of things
# The immutable and append-only flags need CAP_LINUX_IMMUTABLE in the host's namespace.
FS_IOC_SETFLAGS, FS_IMMUTABLE_FL, FS_APPEND_FL = 0x40086602, 0x10, 0x20
immutable = {}
for flag, name in ((FS_IMMUTABLE_FL, "immutable"), (FS_APPEND_FL, "append")):
    with open(f"/{name}", "w") as f:
        try:
            fcntl.ioctl(f.fileno(), FS_IOC_SETFLAGS, struct.pack("i", flag))
            immutable[name] = "set"
        except OSError as e:
            immutable[name] = e.errno
# Deletions over lower layers: whiteouts (root overlay: the skeleton's /etc; /usr overlay: the
# host's /usr), and a directory deleted and made again (an opaque directory).
os.unlink("/etc/passwd")
os.unlink("/etc/group")
stdlib = sorted(glob.glob("/usr/lib/python3*/email"))[0]
shutil.rmtree(stdlib + "/mime")
shutil.rmtree(stdlib + "/../wsgiref")
os.mkdir(stdlib + "/../wsgiref")
with open(stdlib + "/../wsgiref/new", "w") as f:
    f.write("x")
print(repr(immutable), flush=True)
print("ready", flush=True)
time.sleep(1000)
"""


def _walk_stats(root: str) -> dict[str, Any]:
    """What the host finds in a container's upper layers (walked as root: modes do not stop it)."""
    files = depth = whiteouts = opaque = fifos = sockets = locked = 0
    owners: set[int] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        if os.path.basename(dirpath).startswith("work."):
            dirnames.clear()
            continue
        st = os.lstat(dirpath)
        owners.add(st.st_uid)
        locked += stat.S_IMODE(st.st_mode) == 0
        depth = max(depth, dirpath.count("/") - root.count("/"))
        with contextlib.suppress(OSError):
            opaque += os.getxattr(dirpath, "trusted.overlay.opaque", follow_symlinks=False) == b"y"
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            owners.add(st.st_uid)
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                whiteouts += 1
            elif stat.S_ISFIFO(st.st_mode):
                fifos += 1
            elif stat.S_ISSOCK(st.st_mode):
                sockets += 1
            else:
                files += 1
    return {
        "files": files,
        "depth": depth,
        "whiteouts": whiteouts,
        "opaque": opaque,
        "fifos": fifos,
        "sockets": sockets,
        "locked": locked,
        "owners": len(owners),
    }


def test_hostile_upper_layer_is_removed_completely(sandbox: Sandbox) -> None:
    """A container that fills its writable layers with chmod-000 trees, many owners, 10,000 files,
    200-deep nesting, hard links, fifos, sockets, odd modes, whiteouts and an opaque directory:
    after removal its state directory is gone, and the launcher logged no error."""
    log_before = len(_launcher_log())
    c = sandbox.start(["python3", "-c", HOSTILE])
    c.wait_for_log(b"ready", timeout=60)
    flags = ast.literal_eval(c.logs("stdout").splitlines()[0].decode())
    # The container cannot make an immutable or append-only file (the cleaner could not delete it).
    assert flags == {"immutable": errno.EPERM, "append": errno.EPERM}, flags
    # The host sees all of it in the upper layers, so the test really hands the cleaner all of it.
    found = _walk_stats(os.path.dirname(probes.upper_dir(c)))  # the writable tmpfs
    assert found["files"] >= 10000, found
    assert found["depth"] >= 200, found
    assert found["whiteouts"] >= 3, found
    assert found["opaque"] >= 1, found
    assert (found["fifos"], found["sockets"]) == (5, 1), found
    assert found["locked"] >= 5, found  # the 000 directories
    assert found["owners"] >= 10, found
    passwd = os.lstat(os.path.join(probes.upper_dir(c), "etc", "passwd"))
    assert (stat.S_IFMT(passwd.st_mode), passwd.st_rdev) == (stat.S_IFCHR, 0), "no whiteout over /etc/passwd"
    links = os.stat(os.path.join(probes.upper_dir(c), "many", "f0")).st_nlink
    assert links == 51, links  # itself and its 50 hard links
    directory = c.dir
    c.remove()  # answered once the cleaner has deleted the directory
    assert not os.path.lexists(directory), f"left behind: {os.listdir(directory)}"
    log = _launcher_log()[log_before:]
    assert b"cannot remove" not in log, log.decode(errors="replace")
    assert b"Traceback" not in log, log.decode(errors="replace")


# -- resource stability ----------------------------------------------------------------------------


def _count(path: str) -> int:
    return len(os.listdir(path))


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def _cycle(sb: Sandbox, i: int, image: Image) -> None:
    if i % 3:
        r = sb.run(["sh", "-c", f"echo {i}"], image=image)
        assert r.stdout == f"{i}\n".encode(), r
    else:
        c = sb.start(["sleep", "1000"], image=image)
        assert c.exec(["echo", str(i)]).stdout == f"{i}\n".encode()
        r = c.stop(timeout=5)
        assert r.signal is not None, r
        c.remove()
        sb.forget(c)


def test_300_cycles_leak_no_fds_threads_or_memory(busybox_image: Image) -> None:
    """300 create/destroy cycles (two run() for each start+exec+stop): the pytest process's fd
    and thread counts and the launcher's fd count end exactly where they started; the launcher's
    RSS grows by less than 512 KiB."""
    launcher = launcher_pid()
    with Sandbox() as sb:
        for i in range(30):  # warm up: lazy imports, allocator pools, the gc threshold
            _cycle(sb, i, busybox_image)
    launcher_settled(launcher)
    fds, threads = _count("/proc/self/fd"), _count("/proc/self/task")
    py_threads = threading.active_count()
    launcher_fds, rss = _count(f"/proc/{launcher}/fd"), _rss_kib(launcher)
    with Sandbox() as sb:
        for i in range(300):
            _cycle(sb, i, busybox_image)
    launcher_settled(launcher)
    assert probes.launcher_pid_if_started() == launcher
    after = {
        "fds": _count("/proc/self/fd"),
        "threads": _count("/proc/self/task"),
        "py_threads": threading.active_count(),
        "launcher_fds": _count(f"/proc/{launcher}/fd"),
    }
    assert after == {"fds": fds, "threads": threads, "py_threads": py_threads, "launcher_fds": launcher_fds}
    grown = _rss_kib(launcher) - rss
    # Measured: ~90 KiB, all in the first few hundred containers after the warm-up, then flat; an
    # Entity (a few KiB with its buffers) kept per container would add ~1 MiB.
    assert grown < 512, f"the launcher's RSS grew by {grown} KiB over 300 containers"


# -- the rootfs's mount points must be ordinary directories ----------------------------------------


def _snapshot(root: Path) -> list[tuple[Any, ...]]:
    """Every entry under ``root`` (itself included): type, mode, owner, size, times, inode, links,
    and the content's sha256 or the symlink's target -- a byte-for-byte fingerprint."""
    out: list[tuple[Any, ...]] = []
    for path in sorted([root, *root.rglob("*")]):
        st = os.lstat(path)
        body: object = ""
        if stat.S_ISREG(st.st_mode):
            body = hashlib.sha256(path.read_bytes()).hexdigest()
        elif stat.S_ISLNK(st.st_mode):
            body = os.readlink(path)
        elif stat.S_ISDIR(st.st_mode):
            body = sorted(os.listdir(path))
        times = (st.st_mtime_ns, st.st_ctime_ns)
        out.append(
            (str(path), st.st_mode, st.st_uid, st.st_gid, st.st_size, *times, st.st_ino, st.st_nlink, body)
        )
    return out


@pytest.fixture
def canary(tmp_path: Path) -> Iterator[Path]:
    """A host directory outside every sandbox path, which no container may touch."""
    root = tmp_path / "canary"
    (root / "sub").mkdir(parents=True)
    (root / "file").write_text("canary\n")
    (root / "sub" / "deeper").write_bytes(os.urandom(64))
    (root / "link").symlink_to("file")
    os.utime(root / "file", ns=(1_000_000_000, 1_000_000_000))
    before = _snapshot(root)
    yield root
    assert _snapshot(root) == before, "the host canary directory changed"
    with open("/proc/self/mountinfo") as f:
        assert str(root) not in f.read(), "something was mounted on the canary"


def _link_target(kind: str, canary: Path) -> str:
    if kind == "absolute":
        return str(canary)
    if kind == "relative":
        return "../" * 40 + str(canary).lstrip("/")  # climbs out of any rootfs to the host's /
    return str(canary / "does-not-exist")


LINK_KINDS = ("absolute", "relative", "dangling")


@pytest.mark.parametrize(
    ("mount_point", "kind"), [(m, k) for m in ("proc", "dev", "sys") for k in LINK_KINDS]
)
def test_symlinked_system_mount_point_is_refused(
    mount_point: str, kind: str, sandbox: Sandbox, busybox_layer: Path, canary: Path
) -> None:
    """An image whose /proc, /dev or /sys is a symlink (absolute to a host directory, relative
    climbing out, dangling) is refused with a SetupError saying it must be an ordinary directory;
    the host directory it points to is unchanged (checked by the canary fixture)."""
    layer = canary.parent / "layer"
    layer.mkdir()
    (layer / mount_point).symlink_to(_link_target(kind, canary))
    image = Image.from_layers(busybox_layer, layer, base=None)
    with pytest.raises(SetupError) as excinfo:
        sandbox.run(["true"], image=image)
    err = excinfo.value
    assert f"/{mount_point} in the image is a symlink" in str(err), err
    assert "must be mounted on an ordinary directory" in str(err), err
    assert (err.call, err.filename, err.errno) == ("mount", f"/{mount_point}", errno.ENOTDIR), err


@pytest.mark.parametrize("kind", LINK_KINDS)
def test_symlinked_usr_on_the_host_base_is_refused(
    kind: str, sandbox: Sandbox, tmp_path: Path, canary: Path
) -> None:
    """On the host base, /usr is an overlay of its own: a layer whose /usr is a symlink is refused
    before anything is created (InvalidSpecError), and the symlink's target is neither mounted nor
    changed -- also when a higher layer's real usr/ hides the symlink in the merged view (the
    lower layer's usr would otherwise be cloned, following the link, as a layer of /usr)."""
    layer = tmp_path / "layer"
    layer.mkdir()
    (layer / "usr").symlink_to(_link_target(kind, canary))
    above = tmp_path / "above"
    (above / "usr").mkdir(parents=True)
    for image in (Image.from_layers(layer), Image.from_layers(layer, above)):
        with pytest.raises(InvalidSpecError, match=r"/usr is a symlink; on the host base /usr is the host's"):
            sandbox.run(["true"], image=image)


def test_symlinked_etc_gets_the_generated_files_inside(
    sandbox: Sandbox, busybox_layer: Path, tmp_path: Path, canary: Path
) -> None:
    """A layer whose /etc is a symlink to a host directory: /etc/hostname and /etc/hosts are
    still written into the container's own layer (the canary gets nothing), and the kernel's
    core_pattern stays read-only inside (the CVE-2019-19921 impact)."""
    layer = tmp_path / "layer"
    layer.mkdir()
    (layer / "etc").symlink_to(canary)
    r = sandbox.run(
        ["sh", "-c", "cat /etc/hostname; echo '|/x' > /proc/sys/kernel/core_pattern; echo $?"],
        image=Image.from_layers(busybox_layer, layer, base=None),
        hostname="inside",
    )
    assert r.stdout == b"inside\n1\n", r
    assert b"Read-only file system" in r.stderr, r


# -- the host's Python cannot be written or ptraced from inside ------------------------------------

PROBE = r"""
import ctypes, errno, json, os, sys, time

def attempt(path, mode):
    try:
        with open(path, mode):
            return "opened"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))

libc = ctypes.CDLL(None, use_errno=True)
PTRACE_ATTACH, PTRACE_DETACH = 16, 17
me = os.getpid()
report = {"pids": [], "exe": {}, "mem": {}, "ptrace": {}}
deadline = time.monotonic() + float(sys.argv[1])
os.makedirs("/tmp/probe", exist_ok=True)
os.chmod("/tmp/probe", 0o777)  # where a non-root exec says "done"
while True:  # keep trying while the host execs into us (CVE-2016-9962: a helper caught mid-setup)
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        pid = int(name)
        if pid not in report["pids"]:
            report["pids"].append(pid)
        for kind in ("exe", "mem"):
            result = attempt(f"/proc/{pid}/{kind}", "r+b")
            if result == "opened" or name not in report[kind]:
                report[kind][name] = result
    if libc.ptrace(PTRACE_ATTACH, 1, None, None) == 0:
        report["ptrace"]["1"] = "attached"
        os.waitpid(1, 0x40000000)  # __WALL: its attach stop, then let it go
        libc.ptrace(PTRACE_DETACH, 1, None, None)
    else:
        report["ptrace"]["1"] = errno.errorcode[ctypes.get_errno()]
    if time.monotonic() > deadline or os.path.exists("/tmp/probe/done"):
        break
print(json.dumps(report))
"""


def _host_binaries() -> dict[str, str]:
    """The host's Python interpreters a container could reach: the launcher's (PID 1 of every
    container is a fork of it) and the one the host base exposes as /usr/bin/python3."""
    launcher_exe = os.path.realpath(f"/proc/{launcher_pid()}/exe")
    paths = {os.path.realpath(sys.executable), launcher_exe, os.path.realpath("/usr/bin/python3")}
    return {p: hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths}


def _check_probe(report: dict[str, Any]) -> None:
    assert 1 in report["pids"], report
    assert not [p for k in ("exe", "mem") for p, r in report[k].items() if r == "opened"], report
    assert report["exe"]["1"] in ("EACCES", "EPERM"), report
    assert report["mem"]["1"] in ("EACCES", "EPERM"), report
    assert report["ptrace"] == {"1": "EPERM"}, report


def test_host_python_cannot_be_written_or_ptraced(sandbox: Sandbox) -> None:
    """From a container (as its root), /proc/1/exe and /proc/1/mem -- PID 1 is a fork of the
    launcher, the host's Python -- and every other visible process's exe and mem refuse to open
    for writing, ptrace(PTRACE_ATTACH, 1) fails with EPERM, and the host's Python binaries keep
    their sha256."""
    before = _host_binaries()
    r = sandbox.run(["python3", "-c", PROBE, "0"], timeout=60)
    assert r.exit_code == 0, r
    _check_probe(json.loads(r.stdout))
    assert _host_binaries() == before


def test_exec_helpers_cannot_be_written_or_ptraced(sandbox: Sandbox) -> None:
    """The same probe, looping as the container's root while the host runs 30 exec()s into it as
    another user (each exec's process starts as a fork of the host's Python): no process's exe or
    mem ever opens for writing, PID 1 cannot be ptraced, the binaries keep their sha256.  The
    probe stops when told (not after a fixed time, which a loaded host's execs could outlast)."""
    before = _host_binaries()
    c: Container = sandbox.start(["python3", "-c", PROBE, "120"])
    for i in range(30):
        r = c.exec(["sh", "-c", f"echo {i}"], user="1000", timeout=30)
        assert r.stdout == f"{i}\n".encode(), r
    # As uid 1000 too: a process of container root's own may rightly be opened by container root.
    c.exec(
        ["sh", "-c", "until [ -d /tmp/probe ]; do sleep 0.05; done; touch /tmp/probe/done"], user="1000"
    ).check()
    result = c.wait(timeout=30)
    assert result.exit_code == 0, result
    report = json.loads(result.stdout)
    _check_probe(report)
    assert len(report["pids"]) > 1, "the probe never saw an exec'd process"
    assert _host_binaries() == before
