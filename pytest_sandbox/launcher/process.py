"""The last steps before a container command runs: identity, privileges, cwd, PATH lookup, exec.

Runs inside every container namespace, after pivot_root, in the container's init or in an exec
helper (see :func:`launch`).  Failures are typed with Docker's codes: 127 not found, 126 not
executable, 125 anything else.  User and group names are resolved by reading the
image's /etc/passwd and /etc/group as text, never through NSS: glibc would load the image's
libnss_*.so into a process that started on the host (CVE-2019-14271).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
from dataclasses import dataclass
from typing import NoReturn

from ..core.errors import (
    CommandNotExecutableError,
    CommandNotFoundError,
    SandboxError,
    SetupError,
    UserNotFoundError,
    from_wire,
    to_wire,
)
from ..core.spec import DEFAULT_PATH, MAX_MAPPED_ID, ProcessSpec
from ..host import libc, seccomp

# capabilities(7) numbers of podman's default set: CHOWN DAC_OVERRIDE FOWNER FSETID KILL SETGID
# SETUID SETPCAP NET_BIND_SERVICE SYS_CHROOT SETFCAP.  No SYS_ADMIN, NET_RAW, MKNOD, DAC_READ_SEARCH.
DEFAULT_CAPS = frozenset({0, 1, 3, 4, 5, 6, 7, 8, 10, 18, 31})
_MAX_DB_BYTES = 4 << 20


def _read_db(path: str) -> bytes:
    """An /etc/passwd-style file, read with a bound (it may be hostile); b"" if absent or odd."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return b""
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return b""
        return os.read(fd, _MAX_DB_BYTES)
    finally:
        os.close(fd)


def parse_db(data: bytes) -> list[tuple[int, list[str]]]:
    """(line number from 1, fields split on ':') of each entry of an /etc/passwd-style file."""
    return [
        (number, line.split(":"))
        for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1)
        if line and line[0] != "#"
    ]


def mapped_id(text: str, what: str, where: str) -> int:
    """``text`` as a uid/gid of the container's user namespace, or UserNotFoundError naming ``where``.

    Only ASCII digits up to MAX_MAPPED_ID: an id outside the map fails setresuid with EINVAL, and
    -1 / 4294967295 -- which int() and Python's uid converter accept -- *is* (uid_t)-1, "leave
    unchanged" to setresuid(2)/setresgid(2)/setgroups: the command would keep our uid 0 and root's
    capabilities (issue 9, item 5).
    """
    if text.isascii() and text.isdigit() and int(text) <= MAX_MAPPED_ID:
        return int(text)
    raise UserNotFoundError(
        f"{where}: {what} {text!r} is not an id of the container's user namespace (0-{MAX_MAPPED_ID})",
        path=where.partition(" line ")[0] if " line " in where else "",
        errno=errno.EINVAL,
        hint=f"give the entry a {what} from 0 to {MAX_MAPPED_ID} in the image",
    )


def resolve_user(user: str | None) -> tuple[int, int, list[int], str]:
    """(uid, gid, supplementary gids, home) for ``user`` as Docker resolves it."""
    return resolve_user_in(user, _read_db("/etc/passwd"), _read_db("/etc/group"))


def resolve_user_in(
    user: str | None, passwd_data: bytes, group_data: bytes
) -> tuple[int, int, list[int], str]:
    """:func:`resolve_user` on the given file contents (pure); every id checked by :func:`mapped_id`."""
    if user is None:
        user = "0"
    name, _, group = user.partition(":")
    numeric = name.isascii() and name.isdigit()
    entry = next(
        (
            (n, e)
            for n, e in parse_db(passwd_data)
            if len(e) >= 7 and (e[0] == name or (numeric and e[2] == name))
        ),
        None,
    )
    if entry is not None:
        where = f"/etc/passwd line {entry[0]}"
        e = entry[1]
        uid, gid = mapped_id(e[2], "uid", where), mapped_id(e[3], "gid", where)
        home, login = e[5] or "/", e[0]
    elif numeric:
        # Docker: a numeric uid unknown to the image runs with gid 0 and HOME=/.
        uid, gid, home, login = mapped_id(name, "uid", f"user={user!r}"), 0, "/", ""
    else:
        raise UserNotFoundError(
            f"user {name!r} not found in the image's /etc/passwd",
            path="/etc/passwd",
            errno=errno.ENOENT,
            hint="use a numeric uid, or add the user to the image",
        )
    groups_db = parse_db(group_data)
    if group:
        if group.isascii() and group.isdigit():
            gid = mapped_id(group, "gid", f"user={user!r}")
        else:
            g = next(((n, e) for n, e in groups_db if len(e) >= 3 and e[0] == group), None)
            if g is None:
                raise UserNotFoundError(
                    f"group {group!r} not found in the image's /etc/group",
                    path="/etc/group",
                    errno=errno.ENOENT,
                )
            gid = mapped_id(g[1][2], "gid", f"/etc/group line {g[0]}")
    supplementary = {gid}
    if login:
        for n, e in groups_db:
            if len(e) >= 4 and login in e[3].split(","):
                supplementary.add(mapped_id(e[2], "gid", f"/etc/group line {n}"))
    if uid == 0 and entry is None:
        home = "/root"
    return uid, gid, sorted(supplementary), home


def _is_exec_file(path: str) -> tuple[bool, str]:
    """(True, "") if ``path`` can be executed by us, else (False, why)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False, "no such file or directory"
    except OSError as e:
        return False, os.strerror(e.errno or 0).lower()
    if stat.S_ISDIR(st.st_mode):
        return False, "is a directory"
    if not stat.S_ISREG(st.st_mode):
        return False, "is not a regular file"
    if not os.access(path, os.X_OK):
        return False, f"permission denied (mode {stat.filemode(st.st_mode)})"
    return True, ""


def find_program(argv0: str, env_path: str | None, workdir: str) -> str:
    """The path execve gets, as Docker/crun resolve it, or a typed 126/127 error naming it."""
    if "/" in argv0:
        path = argv0 if argv0.startswith("/") else os.path.normpath(os.path.join(workdir, argv0))
        ok, why = _is_exec_file(path)
        if ok:
            return path
        if why == "no such file or directory":
            raise CommandNotFoundError(
                f"exec {argv0}: no such file or directory", call="execve", path=path, errno=errno.ENOENT
            )
        raise CommandNotExecutableError(f"exec {argv0}: {why}", call="execve", path=path, errno=errno.EACCES)
    denied = ""
    for d in (env_path if env_path is not None else DEFAULT_PATH).split(":"):
        candidate = os.path.join(d or ".", argv0)
        ok, why = _is_exec_file(candidate)
        if ok:
            return candidate
        if why != "no such file or directory" and not denied:
            denied = f"{candidate}: {why}"
    if denied:
        raise CommandNotExecutableError(
            f"exec {argv0}: {denied}", call="execve", path=argv0, errno=errno.EACCES
        )
    raise CommandNotFoundError(
        f'exec: "{argv0}": executable file not found in $PATH ({env_path})',
        call="execve",
        path=argv0,
        errno=errno.ENOENT,
    )


def _explain_exec_failure(path: str, err: OSError, call: str = "execve") -> SandboxError:
    """A typed error for a failed start: ``call`` is posix_spawn or execve (the fork path)."""
    code = err.errno or 0
    if code == errno.ENOENT:
        # The file exists (find_program checked), so what is missing is its interpreter.
        interp = _interpreter(path)
        return CommandNotFoundError(
            f"exec {path}: its interpreter {interp} is missing in the image"
            if interp
            else f"exec {path}: no such file or directory",
            call="execve",
            path=interp or path,
            errno=code,
        )
    if code == errno.ENOEXEC:
        return CommandNotExecutableError(
            f"exec {path}: exec format error (not a program for this architecture, or a script without #!)",
            call="execve",
            path=path,
            errno=code,
        )
    if code in (errno.EACCES, errno.EPERM, errno.EISDIR):
        return CommandNotExecutableError(
            f"exec {path}: {os.strerror(code)}", call="execve", path=path, errno=code
        )
    # Anything else is not about the program: posix_spawn's clone failed (EAGAIN at the pids
    # limit, ENOMEM), or the kernel could not load it.
    return SetupError(f"{call} {path}: {os.strerror(code)}", call=call, path=path, errno=code)


def _interpreter(path: str) -> str:
    """The ``#!`` interpreter or the ELF program interpreter (dynamic loader) of ``path``."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return ""
    if head.startswith(b"#!"):
        line = head[2:].split(b"\n", 1)[0].strip()
        return line.split()[0].decode(errors="replace") if line else ""
    if head.startswith(b"\x7fELF"):
        marker = head.find(b"/lib")
        if marker >= 0:
            return head[marker:].split(b"\0", 1)[0].decode(errors="replace")
    return ""


def _drop_bounding_caps(keep: frozenset[int]) -> None:
    for cap in range(libc.cap_last_cap() + 1):
        if cap not in keep:
            libc.prctl(libc.PR_CAPBSET_DROP, cap)


@dataclass(frozen=True)
class Prepared:
    """A command resolved inside the container: who runs it, where, with what."""

    argv: tuple[str, ...]
    env: dict[str, str]
    uid: int
    gid: int
    groups: list[int]
    workdir: str
    seccomp: bytes | None = None
    seccomp_in_init: bool = False


def prepare(proc: ProcessSpec, hostname: str) -> Prepared:
    """Resolve the user, fill HOME/HOSTNAME, create a missing workdir (as Docker does)."""
    env = dict(proc.env)
    uid, gid, groups, home = resolve_user(proc.user)
    env.setdefault("HOME", home)
    env.setdefault("HOSTNAME", hostname)
    if not os.path.isdir(proc.workdir):
        try:
            os.makedirs(proc.workdir, 0o755, exist_ok=True)
        except OSError as e:
            raise CommandNotExecutableError(
                f'workdir "{proc.workdir}" does not exist and cannot be created: {os.strerror(e.errno or 0)}',
                call="mkdir",
                path=proc.workdir,
                errno=e.errno or 0,
            ) from None
    return Prepared(proc.argv, env, uid, gid, groups, proc.workdir, proc.seccomp, proc.seccomp_in_init)


def become(p: Prepared) -> str:
    """Take the command's identity and privileges; chdir; return the program's path.

    Bounding set first (needs CAP_SETPCAP), then groups and ids; a non-root uid loses every
    capability by itself, root keeps only the default set.  no_new_privs last: setuid binaries in
    the image cannot regain what was dropped.
    """
    _drop_bounding_caps(DEFAULT_CAPS)
    with libc.named("setgroups"):
        os.setgroups(p.groups)
    with libc.named("setresgid"):
        os.setresgid(p.gid, p.gid, p.gid)
    with libc.named("setresuid"):
        os.setresuid(p.uid, p.uid, p.uid)
    # A gid or uid change reset these (commit_creds); in the posix_spawn path this process stays
    # the container's init or the exec helper, which must remain non-dumpable and die with us.
    libc.prctl(libc.PR_SET_DUMPABLE, 0)
    libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)
    if p.uid == 0:
        mask = sum(1 << c for c in DEFAULT_CAPS)
        libc.capset(mask, mask, 0)
    libc.prctl(libc.PR_CAP_AMBIENT, libc.PR_CAP_AMBIENT_CLEAR_ALL)
    try:
        os.chdir(p.workdir)
    except OSError as e:
        raise CommandNotExecutableError(
            f'workdir "{p.workdir}": {os.strerror(e.errno or 0)}',
            call="chdir",
            path=p.workdir,
            errno=e.errno or 0,
        ) from None
    path = find_program(p.argv[0], p.env.get("PATH"), p.workdir)
    libc.prctl(libc.PR_SET_NO_NEW_PRIVS, 1)
    return path


def _install_filter(p: Prepared) -> None:
    if p.seccomp is not None:
        seccomp.install(p.seccomp)


# The launcher ignores these (SIGINT so a Ctrl-C aimed at pytest does not hit it); execve would keep
# that, and a shell cannot even trap a signal ignored at its start.
_DEFAULT_SIGNALS = (signal.SIGINT, signal.SIGPIPE, signal.SIGXFSZ)


def launch(p: Prepared) -> int:
    """Start the command as a child and return its pid, or raise a typed 125/126/127 error.

    Root commands -- the common case -- are started with posix_spawn (a vfork: no copy of this
    Python process's page tables, and exec errors come back synchronously).  The calling process
    takes the command's identity first, which is fine: it is the container's init or an exec
    helper, whose privileged work is done.  Other users need a fork to switch ids in the child.
    """
    if p.uid == 0 and (p.seccomp is None or p.seccomp_in_init):
        path = become(p)
        # The filter last (after no_new_privs): from here on this process -- the container's
        # init or the exec helper -- is under it too, as Docker's tini is under `run --init`;
        # only the built-in profile comes this way: it allows all they still do (wait4, select,
        # read, write, kill).  posix_spawn's clone3 then fails with ENOSYS and glibc uses clone.
        _install_filter(p)
        try:
            return os.posix_spawn(
                path, list(p.argv), p.env, setsid=True, setsigdef=_DEFAULT_SIGNALS, setsigmask=()
            )
        except OSError as e:
            raise _explain_exec_failure(path, e, "posix_spawn") from None
    err_r, err_w = os.pipe()  # close-on-exec: EOF means the child's execve succeeded
    pid = os.fork()
    if pid == 0:
        os.close(err_r)
        _exec_in_child(p, err_w)
    os.close(err_w)
    failure = b"".join(iter(lambda: os.read(err_r, 65536), b""))
    os.close(err_r)
    if failure:
        os.waitpid(pid, 0)
        raise from_wire(json.loads(failure))
    return pid


def _exec_in_child(p: Prepared, err_fd: int) -> NoReturn:
    try:
        os.setsid()  # no controlling terminal: TIOCSTI injection is impossible (CVE-2017-5226)
        for sig in _DEFAULT_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        path = become(p)
        libc.close_fds_except({err_fd})
        _install_filter(p)  # the very last step before execve
        try:
            os.execve(path, list(p.argv), p.env)
        except OSError as e:
            raise _explain_exec_failure(path, e) from None
    except BaseException as e:  # report every failure, including bugs, as a structured error
        code = getattr(e, "exit_code", 125) if isinstance(e, SandboxError) else 125
        try:
            os.write(err_fd, json.dumps(to_wire(e)).encode())
        finally:
            os._exit(code)
    raise AssertionError("unreachable")
