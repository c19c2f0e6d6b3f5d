"""The container's root filesystem against the real kernel: layer stacking, layer immutability,
per-container upper layers, the host base, bind and tmpfs mounts, read-only roots, and the
process's env / workdir / user / hostname.

Layers are compared byte for byte (content, mode, owner, times, inode, xattrs) before and after
containers write to them, so a write that leaked through overlayfs into a lower layer -- or onto
the host's /usr -- fails the test.  Safe under xdist: every path a test writes is its own.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import stat
from pathlib import Path
from typing import Any

import pytest

from pytest_sandbox import Container, Image, Result, Sandbox
from pytest_sandbox.core.spec import DEFAULT_PATH
from pytest_sandbox.host.rootfs import ContainerDirs
from tests import probes

SLEEP = ["sleep", "60"]

# -- helpers ------------------------------------------------------------------------------------


def sh(sandbox: Sandbox, script: str, *, image: Image | None = None, **opts: Any) -> Result:
    return sandbox.run(["sh", "-c", script], image=image, **opts)


def exec_sh(container: Container, script: str, **opts: Any) -> Result:
    return container.exec(["sh", "-c", script], **opts)


def probe(sandbox: Sandbox, code: str, args: object = None, **opts: Any) -> Any:
    """Run ``code`` with the host base's python3 (``ARGS`` = ``args``); what it printed as JSON."""
    prelude = "import json, os, sys\nARGS = json.loads(sys.argv[1])\n"
    r = sandbox.run(["python3", "-c", prelude + code, json.dumps(args)], **opts).check()
    return json.loads(r.stdout)


def token() -> str:
    return secrets.token_hex(4)


Entry = tuple[object, ...]


def tree_state(root: Path) -> dict[str, Entry]:
    """Everything observable about a directory tree: per path, type, mode, owner, size, times,
    inode, link count, xattrs and the content's sha256 (or the symlink's target)."""
    out: dict[str, Entry] = {}

    def record(path: str) -> None:
        st = os.lstat(path)
        if stat.S_ISREG(st.st_mode):
            with open(path, "rb") as f:
                what = hashlib.sha256(f.read()).hexdigest()
        elif stat.S_ISLNK(st.st_mode):
            what = os.readlink(path)
        else:
            what = ""
        xattrs = tuple(sorted(os.listxattr(path, follow_symlinks=False)))
        out[os.path.relpath(path, root)] = (
            st.st_mode,
            st.st_uid,
            st.st_gid,
            st.st_size,
            st.st_mtime_ns,
            st.st_ctime_ns,
            st.st_ino,
            st.st_nlink,
            xattrs,
            what,
        )

    record(str(root))
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            record(os.path.join(dirpath, name))
    return out


def make_layer(root: Path, files: dict[str, str]) -> Path:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    return root


def upper_of(container: Container, target: str = "") -> Path:
    """The host directory holding the container's writes under overlay ``target`` ("" = root)."""
    index = [o.target for o in container.spec.overlays].index(target)
    return Path(ContainerDirs(container.dir).upper(index))


# -- layers -------------------------------------------------------------------------------------


def test_layers_stack_last_given_is_topmost(sandbox: Sandbox, busybox_layer: Path, tmp_path: Path) -> None:
    """Image.from_layers(a, b): b is on top.  A file in both shows b's copy; directories merge.

    Getting the order wrong silently runs the wrong version of an application over its base.
    The same holds on the host base, where an image layer also overrides the base's /etc.
    """
    low = make_layer(tmp_path / "low", {"f": "low\n", "d/low-only": "1\n", "etc/issue": "low issue\n"})
    high = make_layer(tmp_path / "high", {"f": "high\n", "d/high-only": "2\n"})
    script = "cat /f; ls /d; cat /etc/issue"
    up = sh(sandbox, script, image=Image.from_layers(busybox_layer, low, high, base=None)).check()
    assert up.stdout.decode().split("\n") == ["high", "high-only", "low-only", "low issue", ""]
    down = sh(sandbox, script, image=Image.from_layers(busybox_layer, high, low, base=None)).check()
    assert down.stdout.decode().split("\n")[0] == "low"
    image = Image.from_layers(low, high)  # on the host base
    assert image.host
    assert image.layers == (str(low), str(high))
    on_host = sh(sandbox, script + "; test -x /usr/bin/python3 && echo python", image=image).check()
    assert on_host.stdout.decode().split("\n") == ["high", "high-only", "low-only", "low issue", "python", ""]


def test_base_none_image_is_only_its_layers(
    sandbox: Sandbox, busybox_image: Image, busybox_layer: Path
) -> None:
    """base=None: the root is the busybox layer plus the container's own mounts -- no host /usr.

    A test that asked for a minimal image must not silently get the host's programs.
    """
    assert busybox_image.layers == (os.path.realpath(busybox_layer),)
    assert not busybox_image.host
    r = sh(sandbox, "ls -A /; test -e /usr; echo usr=$?; busybox true && echo ok", image=busybox_image)
    r.check()
    *listing, usr, ok = r.stdout.decode().split()
    assert sorted(listing) == ["bin", "dev", "etc", "proc", "sys", "tmp"]
    assert (usr, ok) == ("usr=1", "ok")


def test_layer_directories_never_change(sandbox: Sandbox, busybox_layer: Path, tmp_path: Path) -> None:
    """Containers that write, append, chmod, delete, rename and replace directories in their
    layers leave every layer directory identical (content, metadata, inodes, xattrs).

    Lower layers are shared by every container of the image (and by xdist workers); one leaked
    write, whiteout or opaque-dir xattr would corrupt all later tests.
    """
    layer = make_layer(
        tmp_path / "layer",
        {
            "app/config": "original\n",
            "app/remove-me": "x\n",
            "app/rename-me": "y\n",
            "app/chmod-me": "z\n",
            "app/tree/a/b": "deep\n",
            "app/tree/c": "c\n",
        },
    )
    (layer / "app" / "link").symlink_to("config")
    before = {"busybox": tree_state(busybox_layer), "layer": tree_state(layer)}
    image = Image.from_layers(busybox_layer, layer, base=None)
    script = (
        "set -e; cd /app;"
        "echo appended >> config; rm remove-me; mv rename-me renamed; chmod 600 chmod-me;"
        "rm -rf tree; mkdir tree; echo new > tree/c; ln -sf renamed link; touch newfile;"
        "rm /bin/ls; mv /etc/passwd /etc/passwd.moved; echo hacked > /bin/busybox.txt;"
        "chown 1000:1000 config; touch -d 2001-01-01 /etc;"
        "cat config; /bin/busybox ls -A . | tr '\\n' ' '; /bin/busybox stat -c %a chmod-me"
    )
    for _ in range(2):  # and again: the second container must see the original, not the first's changes
        r = sh(sandbox, script, image=image).check()
        assert r.stdout.decode().split("\n") == [
            "original",
            "appended",
            "chmod-me config link newfile renamed tree 600",
            "",
        ]
    after = {"busybox": tree_state(busybox_layer), "layer": tree_state(layer)}
    assert after == before


def test_writes_land_in_the_containers_own_upper_layer(sandbox: Sandbox, busybox_image: Image) -> None:
    """A container's writes go to its own upper layer: a concurrent container of the same image,
    and one started after, see the image as it was; the host finds the write in the writer's upper
    directory only.
    """
    a = sandbox.start(SLEEP, image=busybox_image)
    b = sandbox.start(SLEEP, image=busybox_image)
    name = f"written-{token()}"
    exec_sh(a, f"echo from-a > /etc/{name}; echo extra:x:3000:3000::/:/bin/sh >> /etc/passwd").check()
    assert exec_sh(a, f"cat /etc/{name}; grep -c extra /etc/passwd").check().stdout == b"from-a\n1\n"
    c = sandbox.start(SLEEP, image=busybox_image)
    for other in (b, c):
        r = exec_sh(other, f"test -e /etc/{name}; echo $?; grep -c extra /etc/passwd")
        assert r.stdout == b"1\n0\n"
    assert (upper_of(a) / "etc" / name).read_text() == "from-a\n"
    assert not (upper_of(b) / "etc" / name).exists()
    assert not (upper_of(c) / "etc" / name).exists()


# -- the host base ------------------------------------------------------------------------------


def test_host_base_shows_programs_but_no_secrets(sandbox: Sandbox) -> None:
    """The host base shows the host's /usr and a minimal /etc: passwd yes; shadow, gshadow, ssh
    host keys and ssl/private no; /root and /home empty; /etc/hostname is the container's.

    The default image must be useful (every installed program runs) without handing a test the
    host's credentials or users' files.
    """
    seen = probe(
        sandbox,
        """
import glob
out = {
    "usr_bin": sorted(os.listdir("/usr/bin")),
    "passwd": open("/etc/passwd").read(),
    "present": {p: os.path.lexists(p) for p in ARGS},
    "ssh_keys": glob.glob("/etc/ssh/ssh_host_*"),
    "root": os.listdir("/root"),
    "home": os.listdir("/home"),
    "hostname": open("/etc/hostname").read(),
    "env_hostname": os.environ["HOSTNAME"],
    "owner": [os.stat("/usr/bin/python3").st_uid, os.stat("/etc/passwd").st_uid],
}
print(json.dumps(out))
""",
        ["/etc/shadow", "/etc/gshadow", "/etc/shadow-", "/etc/gshadow-", "/etc/ssl/private", "/etc/sudoers"],
    )
    assert seen["usr_bin"] == sorted(os.listdir("/usr/bin"))
    assert seen["passwd"] == Path("/etc/passwd").read_text()
    assert seen["present"] == dict.fromkeys(seen["present"], False)
    assert os.path.exists("/etc/shadow")  # the control: the host has one
    assert seen["ssh_keys"] == []
    assert (seen["root"], seen["home"]) == ([], [])
    assert seen["hostname"] == seen["env_hostname"] + "\n"
    # Host files appear owned by root inside (idmapped layers); else they would be "nobody".
    idmap = probes.launcher_info().idmap
    assert seen["owner"] == ([0, 0] if idmap else [65534, 65534])


def _pick_host_files(directory: str, n: int) -> list[Path]:
    files = sorted(p for p in Path(directory).iterdir() if p.is_file() and not p.is_symlink())
    assert len(files) >= n, f"the host has fewer than {n} regular files in {directory}"
    return files[:n]


def test_host_base_writes_stay_in_the_container(sandbox: Sandbox) -> None:
    """Creating, appending to, deleting and renaming files in the host base's /usr succeeds inside
    and changes nothing on the host: the writes land in the container's upper layer of /usr.

    This is the promise that makes the host base safe to use at all: ``rm -rf /usr`` in a test
    must not touch the machine.
    """
    append, delete, rename = _pick_host_files("/usr/share/common-licenses", 3)
    new = f"/usr/bin/psbx-iso-{token()}"
    watched = [append, delete, rename, Path("/usr/share/common-licenses"), Path("/usr/bin")]

    def host_state() -> list[tuple[object, ...]]:
        out: list[tuple[object, ...]] = []
        for p in watched:
            st = p.lstat()
            content = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
            out.append((str(p), st.st_mode, st.st_uid, st.st_size, st.st_mtime_ns, st.st_ino, content))
        return out

    before = host_state()
    c = sandbox.start(SLEEP)
    script = (
        f"set -e; echo appended >> {append}; rm {delete}; mv {rename} {rename}.moved;"
        f"printf '#!/bin/sh\\necho hi\\n' > {new}; chmod 755 {new}; {new};"
        f"tail -n1 {append}; test ! -e {delete} && echo deleted; test -e {rename}.moved && echo moved;"
        f"stat -c %u:%g {new}"
    )
    r = exec_sh(c, script).check()
    assert r.stdout.decode().split("\n") == ["hi", "appended", "deleted", "moved", "0:0", ""]
    assert not os.path.exists(new)
    assert host_state() == before
    upper = upper_of(c, "usr")
    assert (upper / "bin" / os.path.basename(new)).is_file()
    assert (upper / append.relative_to("/usr")).read_bytes().endswith(b"appended\n")
    c.remove()
    assert host_state() == before


# -- mounts -------------------------------------------------------------------------------------


def test_bind_mounts_rw_and_ro(sandbox: Sandbox, busybox_image: Image, tmp_path: Path) -> None:
    """mounts={host: "/data"} is the host directory itself (writes and later host changes cross
    both ways); an "ro" mount -- directory or single file -- refuses every write with EROFS.

    Files written through the rw mount are owned on the host by the ids the container used,
    mapped back (idmapped mount: container root -> host root, uid 1000 -> 1000), as with Docker.
    """
    rw, ro = tmp_path / "rw", tmp_path / "ro"
    rw.mkdir(mode=0o777)
    rw.chmod(0o777)
    ro.mkdir()
    (rw / "from-host").write_text("host data\n")
    (ro / "keep").write_text("read only\n")
    conf = tmp_path / "app.conf"
    conf.write_text("setting=1\n")
    ro_before = tree_state(ro), conf.read_bytes()
    c = sandbox.start(
        SLEEP,
        image=busybox_image,
        mounts={str(rw): "/data", str(ro): ("/ro", "ro"), str(conf): ("/etc/app.conf", "ro")},
    )
    r = exec_sh(c, "cat /data/from-host /ro/keep /etc/app.conf; echo by-root > /data/by-root").check()
    assert r.stdout == b"host data\nread only\nsetting=1\n"
    exec_sh(c, "echo by-app > /data/by-app", user="1000").check()
    (rw / "later").write_text("after start\n")
    assert c.exec(["cat", "/data/later"]).check().stdout == b"after start\n"
    assert (rw / "by-root").read_text() == "by-root\n"
    idmap = probes.launcher_info().idmap
    base = 0 if idmap else probes.launcher_info().uid_base
    by_root, by_app = (rw / "by-root").stat(), (rw / "by-app").stat()
    assert (by_root.st_uid, by_root.st_gid) == (base, base)
    assert (by_app.st_uid, by_app.st_gid) == (base + 1000, base + 1000)
    r = exec_sh(
        c,
        "touch /ro/new; rm /ro/keep; echo x >> /ro/keep; echo x >> /etc/app.conf; "
        "grep -E ' /(ro|data|etc/app.conf) ' /proc/self/mountinfo | cut -d' ' -f5,6",
    )
    errors = r.stderr.decode().splitlines()
    assert len(errors) == 4, errors
    assert all("Read-only file system" in e for e in errors), errors
    options = dict(line.split() for line in r.stdout.decode().splitlines())
    assert options["/ro"].split(",")[0] == "ro"
    assert options["/etc/app.conf"].split(",")[0] == "ro"
    assert options["/data"].split(",")[0] == "rw"
    assert (tree_state(ro), conf.read_bytes()) == ro_before


def test_tmpfs_option_with_size(sandbox: Sandbox, busybox_image: Image) -> None:
    """tmpfs={"/scratch": "1m"} mounts a 1 MiB tmpfs: the size is enforced (ENOSPC past it) and
    nothing written there reaches the container's upper layer on the host disk.
    """
    c = sandbox.start(SLEEP, image=busybox_image, tmpfs={"/scratch": "1m", "/run/app": None})
    r = exec_sh(
        c,
        "grep -E ' /(scratch|run/app) ' /proc/self/mountinfo; stat -c %a /scratch;"
        "dd if=/dev/zero of=/scratch/big bs=1024 count=2048 2>&1; echo dd=$?;"
        "dd if=/dev/zero of=/run/app/big bs=1024 count=2048 2>/dev/null; echo dd2=$?",
    )
    lines = r.stdout.decode().splitlines()
    mounts = {line.split(" - ")[0].split()[4]: line.split(" - ")[1].split() for line in lines[:2]}
    assert mounts["/scratch"][0] == "tmpfs"
    assert "size=1024k" in mounts["/scratch"][2].split(",")
    assert mounts["/run/app"][0] == "tmpfs"
    # No size given: bounded as the writable layer is (issue 9, item 4), not half of RAM.
    assert {"size=1048576k", "nr_inodes=131072"} <= set(mounts["/run/app"][2].split(","))
    assert lines[2] == "1777"
    assert any("No space left on device" in line for line in lines[3:])
    assert "dd=1" in lines
    assert "dd2=0" in lines
    assert list(upper_of(c).rglob("big")) == []


def test_read_only_rootfs(sandbox: Sandbox, busybox_image: Image, tmp_path: Path) -> None:
    """read_only=True: the image's root refuses writes (EROFS); /tmp, /dev/shm, tmpfs options and
    rw bind mounts stay writable, as with ``docker run --read-only``.
    """
    (tmp_path / "rw").mkdir()
    c = sandbox.start(
        SLEEP, image=busybox_image, read_only=True, tmpfs=["/cache"], mounts={str(tmp_path / "rw"): "/data"}
    )
    r = exec_sh(
        c,
        "touch /new; echo x >> /etc/passwd; mkdir /bin/sub; rm /etc/hostname;"
        "for d in /tmp /dev/shm /cache /data; do echo x > $d/f && echo ok; done",
    )
    assert r.stdout == b"ok\nok\nok\nok\n"
    errors = r.stderr.decode().splitlines()
    assert len(errors) == 4, errors
    assert all("Read-only file system" in e for e in errors), errors
    assert (tmp_path / "rw" / "f").read_text() == "x\n"
    upper = upper_of(c)
    assert not (upper / "new").exists()
    assert not (upper / "bin").exists()
    assert sorted(p.name for p in (upper / "etc").iterdir()) == ["hostname", "hosts"]  # generated at setup


def test_read_only_rootfs_covers_the_host_base(sandbox: Sandbox) -> None:
    """read_only=True on the host base makes /usr read-only too, not just the root overlay.

    /usr is a separate overlay mount on the host base; a read-only root with a writable /usr
    let a test modify programs it was promised it could not (fixed in rootfs.finish_rootfs).
    """
    r = sh(
        sandbox,
        "touch /usr/bin/psbx-ro-probe; touch /etc/ro-probe; touch /tmp/ok && echo tmp-ok",
        read_only=True,
    )
    assert r.stdout == b"tmp-ok\n"
    errors = r.stderr.decode().splitlines()
    assert len(errors) == 2, errors
    assert all("Read-only file system" in e for e in errors), errors


# -- the process: env, workdir, user, hostname --------------------------------------------------


def test_env_is_exactly_what_was_asked(
    sandbox: Sandbox, busybox_image: Image, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The command's environment is the defaults plus ``env=``, nothing from the pytest process.

    Leaking the host environment would hand tests CI secrets and make results depend on who ran
    them.
    """
    monkeypatch.setenv("PSBX_HOST_ONLY", "must-not-leak")
    r = sandbox.run(
        ["env"],
        image=busybox_image,
        hostname="envbox",
        env={"FOO": "bar baz", "EMPTY": "", "PATH": "/bin:/usr/bin", "NUM": 42},
    ).check()
    env = dict(line.split("=", 1) for line in r.stdout.decode().splitlines())
    assert env == {
        "PATH": "/bin:/usr/bin",
        "PYTHONUNBUFFERED": "1",
        "FOO": "bar baz",
        "EMPTY": "",
        "NUM": "42",
        "HOME": "/root",
        "HOSTNAME": "envbox",
    }
    default = dict(
        line.split("=", 1)
        for line in sandbox.run(["env"], image=busybox_image).check().stdout.decode().splitlines()
    )
    assert default["PATH"] == DEFAULT_PATH
    assert "PSBX_HOST_ONLY" not in default


def test_workdir_is_created_if_missing(sandbox: Sandbox, busybox_image: Image) -> None:
    """workdir= is the command's cwd; a missing one is created (root-owned, 0755) as Docker does,
    and getcwd() inside returns it (never "(unreachable)", cf. CVE-2024-21626).
    """
    r = sh(
        sandbox, "pwd; stat -c '%u:%g %a' . ..; cd .. && pwd", image=busybox_image, workdir="/srv/app/deep"
    ).check()
    assert r.stdout.decode().split("\n") == ["/srv/app/deep", "0:0 755", "0:0 755", "/srv/app", ""]
    assert sandbox.run(["pwd"], image=busybox_image, workdir="/etc").check().stdout == b"/etc\n"
    as_app = sandbox.run(["pwd"], image=busybox_image, workdir="/var/lib/app", user="app").check()
    assert as_app.stdout == b"/var/lib/app\n"


@pytest.mark.parametrize(
    ("user", "expected_id", "home"),
    [
        ("1000", "uid=1000(app) gid=1000(app) groups=1000(app),2000(extra)", "/home/app"),
        (1000, "uid=1000(app) gid=1000(app) groups=1000(app),2000(extra)", "/home/app"),
        ("app", "uid=1000(app) gid=1000(app) groups=1000(app),2000(extra)", "/home/app"),
        ("app:extra", "uid=1000(app) gid=2000(extra) groups=2000(extra)", "/home/app"),
        ("4242", "uid=4242 gid=0(root) groups=0(root)", "/"),
        (None, "uid=0(root) gid=0(root) groups=0(root)", "/root"),
    ],
)
def test_user(
    sandbox: Sandbox, busybox_image: Image, user: str | int | None, expected_id: str, home: str
) -> None:
    """user= resolves against the image's own /etc/passwd and /etc/group (busybox: app = 1000,
    member of extra = 2000), sets HOME, and files it creates are owned by that uid inside.
    """
    r = sh(sandbox, "id; echo $HOME; touch /tmp/f; stat -c %u /tmp/f", image=busybox_image, user=user).check()
    uid = expected_id.removeprefix("uid=").partition("(")[0].partition(" ")[0]
    assert r.stdout.decode().split("\n") == [expected_id, home, uid, ""]


def test_hostname_defaults_to_the_container_id(sandbox: Sandbox, busybox_image: Image) -> None:
    """Without hostname=, the hostname is the container's id (Docker's behaviour), in the kernel,
    /etc/hostname, /etc/hosts and $HOSTNAME; two containers get two names.
    """
    a = sandbox.start(SLEEP, image=busybox_image)
    b = sandbox.start(SLEEP, image=busybox_image)
    assert a.id != b.id
    for c in (a, b):
        assert c.hostname == c.id
        r = exec_sh(c, "hostname; cat /etc/hostname; grep 127.0.1.1 /etc/hosts; echo $HOSTNAME").check()
        assert r.stdout.decode().split("\n") == [c.id, c.id, f"127.0.1.1\t{c.id}", c.id, ""]
