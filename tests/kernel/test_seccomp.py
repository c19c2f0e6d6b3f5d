"""The default seccomp filter (issue 9, item 10): Docker's default profile, compiled by libseccomp in
pytest and installed by the launcher as the last step before the command starts.

Each refused call is made with ``syscall(2)`` from python3 in a container on the host base image,
with arguments chosen so that, unconfined, the *kernel* answers something other than EPERM (a
bad address, a bad descriptor, a full namespace count, or success): the EPERM then comes from the
filter.  Module loading and kexec are refused by the kernel too without CAP_SYS_MODULE/SYS_BOOT,
so for those the EPERM is checked, not who gave it (this machine's kernel has neither: ENOSYS).
"""

from __future__ import annotations

import ctypes
import errno
import json
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_sandbox import InvalidSpecError, Sandbox, SeccompUnavailableError
from pytest_sandbox import sandbox as sandbox_module
from pytest_sandbox.host import seccomp as host_seccomp
from tests import probes

KEY_SPEC_SESSION_KEYRING = -3
KEY_SPEC_USER_KEYRING = -4
CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
SIGCHLD = 17
AF_VSOCK = 40
UFFD_USER_MODE_ONLY = 1

# name -> (arguments, whether the kernel answers something else than EPERM when unconfined: False
# where it refuses the call by itself).  A string argument is passed as bytes.
CALLS: dict[str, tuple[tuple[object, ...], bool]] = {
    "keyctl": ((0, KEY_SPEC_SESSION_KEYRING, 0), True),  # KEYCTL_GET_KEYRING_ID
    "add_key": (("psbx-no-such-type", "d", "x", 1, KEY_SPEC_SESSION_KEYRING), True),
    "request_key": (("user", "psbx-absent", 0, 0), True),
    "userfaultfd": ((UFFD_USER_MODE_ONLY,), True),
    "io_uring_setup": ((1, 0), True),
    "io_uring_enter": ((-1, 0, 0, 0, 0, 0), True),
    "io_uring_register": ((-1, 0, 0, 0), True),
    "bpf": ((9999, 0, 0), True),
    "perf_event_open": ((0, 0, -1, -1, 0), True),
    "mount": ((0, 0, 0, 0, 0), True),
    "umount2": ((0, 0), True),
    "unshare": ((CLONE_NEWUSER | CLONE_NEWNS,), True),  # max_user_namespaces is 0 inside
    "clone3": ((0, 0), True),  # ENOSYS, not EPERM: see below
    "clone": ((CLONE_NEWUSER | CLONE_NEWNS | SIGCHLD, 0, 0, 0, 0), True),
    "setns": ((-1, 0), True),
    "open_tree": ((-1, 0, 0), True),
    "move_mount": ((-1, 0, -1, 0, 0), False),
    "fsopen": ((0, 0), False),
    "fspick": ((-1, 0, 0), False),
    "mount_setattr": ((-1, 0, 0, 0, 0), True),
    "socket": ((AF_VSOCK, 1, 0), True),
    "kcmp": ((0, 0, 0, 0, 0), True),  # needs CAP_SYS_PTRACE under the profile; unconfined: ESRCH
    "personality": ((0xFFFF,), True),
    "init_module": ((0, 0, ""), False),
    "finit_module": ((-1, "", 0), False),
    "delete_module": (("psbx", 0), False),
    "kexec_load": ((0, 0, 0, 0), False),
    "kexec_file_load": ((-1, -1, 0, "", 0), False),
    "swapon": (("/nonexistent", 0), False),
    "reboot": ((0, 0, 0, 0), False),
    "open_by_handle_at": ((-1, 0, 0), True),
}

PROBE = """
import ctypes, json, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
out = {}
for name, (nr, args) in json.loads(sys.argv[1]).items():
    args = [a.encode() if isinstance(a, str) else ctypes.c_long(a) for a in args]
    ctypes.set_errno(0)
    r = libc.syscall(nr, *args)
    out[name] = "ok" if r >= 0 else __import__("errno").errorcode[ctypes.get_errno()]
print(json.dumps(out))
"""


def _numbers() -> dict[str, tuple[int, tuple[object, ...]]]:
    """Each call with this machine's syscall number (libseccomp's table)."""
    return {name: (_nr(name), args) for name, (args, _) in CALLS.items()}


def _probe(sandbox: Sandbox, **opts: object) -> dict[str, str]:
    result = sandbox.run(["python3", "-c", PROBE, json.dumps(_numbers())], **opts).check()  # type: ignore[arg-type]
    answers: dict[str, str] = json.loads(result.stdout)
    return answers


@pytest.fixture(scope="module")
def confined(sandbox_module: Sandbox) -> dict[str, str]:
    return _probe(sandbox_module)


@pytest.fixture(scope="module")
def unconfined(sandbox_module: Sandbox) -> dict[str, str]:
    return _probe(sandbox_module, seccomp="unconfined")


@pytest.mark.parametrize("name", sorted(set(CALLS) - {"clone3"}))
def test_the_default_filter_refuses_with_eperm(confined: dict[str, str], name: str) -> None:
    """Item 10: keyrings, userfaultfd, io_uring, bpf, perf, the mount family, namespaces, modules,
    kexec... fail with EPERM under the default profile, as under Docker's."""
    assert confined[name] == "EPERM"


def test_clone3_fails_with_enosys_so_libc_falls_back_to_clone(confined: dict[str, str]) -> None:
    """Item 10: Docker answers clone3 with ENOSYS (its flags are behind a pointer the filter cannot
    read), so that glibc falls back to clone, whose flags the filter does check."""
    assert confined["clone3"] == "ENOSYS"


def _nr(name: str) -> int:
    lib = ctypes.CDLL(host_seccomp.LIBRARY)
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    return int(lib.seccomp_syscall_resolve_name(name.encode()))


@pytest.mark.parametrize("name", sorted(n for n, (_, kernel_answers) in CALLS.items() if kernel_answers))
def test_unconfined_lets_the_call_reach_the_kernel(unconfined: dict[str, str], name: str) -> None:
    """Item 10: seccomp="unconfined" installs no filter: the kernel's own answer (an error of the
    arguments, or success) comes back, not EPERM."""
    assert unconfined[name] not in ("EPERM", "ENOSYS")


def test_exec_runs_under_the_containers_filter(sandbox: Sandbox) -> None:
    """Item 10: as `docker exec`, an exec gets the container's profile (default, and unconfined)."""
    code = (
        "import ctypes, errno; libc = ctypes.CDLL(None, use_errno=True); "
        f"r = libc.syscall({_nr('keyctl')}, 0, {KEY_SPEC_SESSION_KEYRING}, 0); "
        "print('ok' if r >= 0 else errno.errorcode[ctypes.get_errno()])"
    )
    confined = sandbox.start(["sleep", "60"])
    free = sandbox.start(["sleep", "60"], seccomp="unconfined")
    assert confined.exec(["python3", "-c", code]).stdout.strip() == b"EPERM"
    assert confined.exec(["python3", "-c", code], user="1000").stdout.strip() == b"EPERM"
    assert free.exec(["python3", "-c", code]).stdout.strip() == b"ok"


def test_a_non_root_command_is_filtered_too(sandbox: Sandbox) -> None:
    """Item 10: user= takes the fork path (ids switch in the child): the filter goes there too."""
    code = (
        "import ctypes, errno; libc = ctypes.CDLL(None, use_errno=True); "
        f"libc.syscall({_nr('unshare')}, {CLONE_NEWUSER}); print(errno.errorcode[ctypes.get_errno()])"
    )
    assert sandbox.run(["python3", "-c", code], user="1000").stdout.strip() == b"EPERM"


def test_a_custom_profile_refuses_mkdir(sandbox: Sandbox, tmp_path: Path) -> None:
    """Item 10: a profile in Docker's JSON format, as a dict or a file, blocks what it lists."""
    profile = {
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EACCES}],
    }
    path = tmp_path / "no-mkdir.json"
    path.write_text(json.dumps(profile))
    for given in (profile, str(path)):
        r = sandbox.run(["sh", "-c", "mkdir /tmp/d; echo $?; touch /tmp/f && echo touched"], seccomp=given)
        assert r.stdout.split() == [b"1", b"touched"], r
        assert b"Permission denied" in r.stderr
    assert sandbox.run(["mkdir", "/tmp/d"], seccomp="default").exit_code == 0


@pytest.mark.sandbox(seccomp="unconfined")
def test_the_marker_sets_seccomp(sandbox: Sandbox) -> None:
    """Item 10: @pytest.mark.sandbox(seccomp=...) is the default of the test's handle."""
    code = (
        "import ctypes; libc = ctypes.CDLL(None, use_errno=True); "
        f"print(libc.syscall({_nr('keyctl')}, 0, {KEY_SPEC_SESSION_KEYRING}, 0) >= 0)"
    )
    assert sandbox.run(["python3", "-c", code]).stdout.strip() == b"True"
    assert sandbox.run(["python3", "-c", code], seccomp="default").stdout.strip() == b"False"


def test_a_bad_profile_is_refused_before_anything_is_created(sandbox: Sandbox) -> None:
    """Item 10: a typed error naming the field, and no state directory left behind."""
    state = Path(probes.runtime().state_dir)
    before = set(state.iterdir()) if state.exists() else set()
    bad = {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_NOPE"}]}
    with pytest.raises(InvalidSpecError, match=r"syscalls\[0\]: action"):
        sandbox.run(["true"], seccomp=bad)
    assert (set(state.iterdir()) if state.exists() else set()) == before


@pytest.fixture
def no_libseccomp(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """libseccomp as on a host without libseccomp2 (the cached library and programs forgotten)."""
    caches = (host_seccomp._library, host_seccomp.compile_profile, sandbox_module._default_program)
    monkeypatch.setattr(host_seccomp, "LIBRARY", "libseccomp-psbx-missing.so.2")
    for cache in caches:
        cache.cache_clear()
    try:
        yield
    finally:
        monkeypatch.undo()
        for cache in caches:
            cache.cache_clear()


def test_without_libseccomp_the_error_names_the_package(sandbox: Sandbox, no_libseccomp: None) -> None:
    """Item 10: never an unfiltered run instead; seccomp="unconfined" still works."""
    with pytest.raises(SeccompUnavailableError, match="libseccomp2") as info:
        sandbox.run(["true"])
    assert "unconfined" in info.value.hint
    assert sandbox.run(["true"], seccomp="unconfined").exit_code == 0


# -- i386 socketcall: its arguments are in memory, where the filter cannot look -----------------

# i386 system calls through int $0x80 from a 64-bit process (IA32 emulation), no compiler needed:
# the stub loads eax, ebx, ecx, edx from REGS, all in one MAP_32BIT page (an i386 pointer is 32
# bits).  A register given as "mem" is the address of the call's memory words (socketcall's args),
# "sv" that of two spare ints (socketpair's sv).  Prints each answer: a number >= 0 or an errno name.
I386_PROBE = """
import ctypes, errno, json, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
c = ctypes
libc.mmap.argtypes = [c.c_void_p, c.c_size_t, c.c_int, c.c_int, c.c_int, c.c_long]
MAP_32BIT, RWX, PRIVATE_ANON = 0x40, 7, 0x22
page = libc.mmap(None, 4096, RWX, PRIVATE_ANON | MAP_32BIT, -1, 0)
assert page is not None and page < 1 << 31, page
REGS, MEM, SV = page + 2048, page + 2112, page + 2176
load = lambda opcode, addr: b"\\x8b" + bytes([opcode, 0x25]) + struct.pack("<I", addr)  # mov r32, [addr]
code = (
    b"\\x53"  # push rbx (callee-saved)
    + load(0x04, REGS) + load(0x1C, REGS + 4) + load(0x0C, REGS + 8) + load(0x14, REGS + 12)
    + b"\\xcd\\x80"  # int $0x80
    + b"\\x5b\\xc3"  # pop rbx; ret
)
ctypes.memmove(page, code, len(code))
call = ctypes.CFUNCTYPE(ctypes.c_int)(page)
out = {}
for name, regs, mem in json.loads(sys.argv[1]):
    regs = [{"mem": MEM, "sv": SV}.get(r, r) for r in regs]
    ctypes.memmove(REGS, struct.pack("<4I", *regs), 16)
    ctypes.memmove(MEM, struct.pack("<%dI" % len(mem), *[SV if m == "sv" else m for m in mem]), 4 * len(mem))
    r = call()
    out[name] = r if r >= 0 else errno.errorcode[-r]
print(json.dumps(out))
"""
I386_SOCKETCALL, I386_SOCKET = 102, 359
SYS_SOCKET, SYS_SOCKETPAIR, SYS_GETSOCKOPT = 1, 8, 15
AF_UNIX, AF_INET, SOCK_STREAM, SOL_SOCKET, SO_TYPE = 1, 2, 1, 1, 3
I386_CALLS = [
    ("socketcall vsock", [I386_SOCKETCALL, SYS_SOCKET, "mem", 0], [AF_VSOCK, SOCK_STREAM, 0]),
    ("socketcall inet", [I386_SOCKETCALL, SYS_SOCKET, "mem", 0], [AF_INET, SOCK_STREAM, 0]),
    ("socketcall socketpair", [I386_SOCKETCALL, SYS_SOCKETPAIR, "mem", 0], [AF_UNIX, SOCK_STREAM, 0, "sv"]),
    # fd 0 is not a socket (a pipe or /dev/null): ENOTSOCK says the op reached the kernel.
    ("socketcall getsockopt", [I386_SOCKETCALL, SYS_GETSOCKOPT, "mem", 0], [0, SOL_SOCKET, SO_TYPE, 0, 0]),
    ("socket vsock", [I386_SOCKET, AF_VSOCK, SOCK_STREAM, 0], []),
    ("socket inet", [I386_SOCKET, AF_INET, SOCK_STREAM, 0], []),
]


def _i386_calls(sandbox: Sandbox, **opts: object) -> dict[str, object]:
    """I386_CALLS through int $0x80, from python3 in a container on the host base image."""
    r = sandbox.run(["python3", "-c", I386_PROBE, json.dumps(I386_CALLS)], **opts)  # type: ignore[arg-type]
    if r.signal == signal.SIGSEGV:
        pytest.skip(
            "this kernel has no IA32 emulation (CONFIG_IA32_EMULATION=n or ia32_emulation=0 on its "
            "command line): int $0x80 faults, so there is no i386 socketcall to get past the filter"
        )
    answers: dict[str, object] = json.loads(r.check().stdout)
    return answers


def test_i386_socketcall_cannot_create_a_refused_socket_family(sandbox: Sandbox) -> None:
    """Item 10: the default profile checks socket()'s family (AF_ALG, AF_VSOCK refused), but i386's
    socketcall(SYS_SOCKET, args) carries the family in memory, where seccomp cannot read it: the
    filter answers that op with ENOSYS (libc then has to use the direct socket call, which is
    checked), and lets every other op through.  Unconfined, the same calls reach the kernel."""
    confined = _i386_calls(sandbox)
    assert confined["socketcall vsock"] == "ENOSYS", confined
    assert confined["socketcall inet"] == "ENOSYS", confined
    # not refused: the profile lets socketpair(2) through for every family anyway
    assert confined["socketcall socketpair"] == 0, confined
    assert confined["socketcall getsockopt"] == "ENOTSOCK", confined
    assert confined["socket vsock"] == "EPERM", confined
    assert isinstance(confined["socket inet"], int), confined
    unconfined = _i386_calls(sandbox, seccomp="unconfined")
    # An fd where vsock is built in or loadable, EAFNOSUPPORT where it is not: the kernel answered.
    for name in ("socketcall vsock", "socket vsock"):
        assert unconfined[name] == "EAFNOSUPPORT" or isinstance(unconfined[name], int), unconfined
    assert isinstance(unconfined["socketcall inet"], int), unconfined


# -- real programs under the default profile ----------------------------------------------------


def test_python_and_sh_run_unchanged(sandbox: Sandbox) -> None:
    """Item 10: threads (clone3 -> clone), subprocesses (posix_spawn/vfork), pipes, signals."""
    code = (
        "import threading, subprocess, signal, os\n"
        "t = threading.Thread(target=lambda: None); t.start(); t.join()\n"
        "print(subprocess.run(['sh', '-c', 'echo a | tr a b; (kill -TERM $$ &); wait; true'],"
        " capture_output=True).stdout.decode().strip())\n"
        "pid = os.fork()\n"
        "os._exit(3) if pid == 0 else print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))\n"
    )
    assert sandbox.run(["python3", "-c", code]).check().stdout.split() == [b"b", b"3"]


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed (.ci/setup)")
def test_redis_server_runs_under_the_default_filter(sandbox: Sandbox) -> None:
    """Item 10: redis-server (jemalloc, background threads) answers PING."""
    redis = sandbox.start(
        [
            "redis-server",
            "--port",
            "6379",
            "--bind",
            "127.0.0.1",
            "--dir",
            "/tmp",
            "--save",
            "",
            "--appendonly",
            "no",
        ]
    )
    redis.wait_for_log(b"Ready to accept connections", timeout=30)
    assert redis.exec(["redis-cli", "-p", "6379", "PING"]).check().stdout.strip() == b"PONG"
    assert redis.exec(["redis-cli", "SET", "k", "v"]).check().stdout.strip() == b"OK"


POSTGRES_BIN = Path("/usr/lib/postgresql/15/bin")


@pytest.mark.skipif(
    not (POSTGRES_BIN / "postgres").exists(), reason="postgresql-15 is not installed (.ci/setup)"
)
def test_postgres_runs_under_the_default_filter(sandbox: Sandbox) -> None:
    """Item 10: initdb and postgres (shared memory, semaphores, forked backends) as user postgres."""
    env = {"PATH": f"{POSTGRES_BIN}:/usr/bin:/bin"}
    script = (
        "initdb -D /tmp/pg -U postgres --auth=trust && "
        "exec postgres -D /tmp/pg -k /tmp -c listen_addresses=''"
    )
    pg = sandbox.start(["sh", "-c", script], user="postgres", env=env)
    pg.wait_for_log(b"ready to accept connections", timeout=60)
    assert pg.exec(["pg_isready", "-h", "/tmp"]).exit_code == 0
    out = pg.exec(["psql", "-h", "/tmp", "-U", "postgres", "-Atc", "select 6 * 7"], user="postgres").check()
    assert out.stdout.strip() == b"42"


# -- item 7: the key quota ------------------------------------------------------------------------


def _qnkeys(uid: int) -> int:
    """Keys charged to host ``uid`` (/proc/key-users: "uid: usage nkeys/nikeys qnkeys/maxkeys ...")."""
    for line in Path("/proc/key-users").read_text().splitlines():
        fields = line.split()
        if fields and fields[0] == f"{uid}:":
            return int(fields[3].split("/")[0])
    return 0


def test_one_container_cannot_spend_every_containers_key_quota(sandbox: Sandbox) -> None:
    """Item 7: container A's 200 add_key calls are refused (EPERM), the key quota of the host uid
    that every container's root is (/proc/key-users, 200 keys) does not grow by them, and container
    B (unconfined) can still add a key."""
    uid = probes.uid_base()
    before = _qnkeys(uid)
    add = (
        "import ctypes, errno\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "libc.syscall.restype = ctypes.c_long\n"
        "codes = set()\n"
        "for i in range({n}):\n"
        f"    r = libc.syscall({_nr('add_key')}, b'user', b'psbx-%d' % i, b'x', 1, ctypes.c_long({{ring}}))\n"
        "    codes.add('ok' if r >= 0 else errno.errorcode[ctypes.get_errno()])\n"
        "print(sorted(codes))\n"
    )
    # A stays up while the host's accounting is read: before the fix, its keys lived as long as
    # its user keyring, and every other container's add_key then failed with EDQUOT.
    a = sandbox.start(
        ["python3", "-c", add.format(n=200, ring=KEY_SPEC_USER_KEYRING) + "__import__('time').sleep(60)"]
    )
    a.wait_for_log(b"['EPERM']", timeout=30)
    # Other containers (their session keyrings, other test processes') may hold a few keys.
    assert _qnkeys(uid) - before < 20
    b = sandbox.run(["python3", "-c", add.format(n=1, ring=KEY_SPEC_SESSION_KEYRING)], seccomp="unconfined")
    assert b.check().stdout.strip() == b"['ok']"
