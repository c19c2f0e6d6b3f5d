"""Bad input is refused before anything exists.

Every value in :data:`CASES` must make ``sandbox.run`` *and* ``sandbox.start`` raise the typed
error -- which is also the builtin a caller would catch (ValueError, FileNotFoundError,
NotADirectoryError) -- with a message quoting the bad value, and must leave no trace: no new entry
in the runtime's state directory, no request to the launcher (so no cgroup, no process, no mount).
The autouse leak check (tests/kernel_fixtures.py) independently checks processes, cgroups, state and mounts.
Errors only the kernel side can detect (a missing command, an unknown user) must leave nothing
behind either, once the handle is closed.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pytest_sandbox import (
    CommandNotExecutableError,
    CommandNotFoundError,
    Image,
    InvalidSpecError,
    LayerNotADirectoryError,
    LayerNotFoundError,
    Sandbox,
    SandboxError,
    UserNotFoundError,
)
from pytest_sandbox.core.errors import SetupError
from pytest_sandbox.core.naming import PROJECT_CGROUP
from tests import probes

Call = Callable[[Sandbox, str, Path], object]


def _opts(**kwargs: Any) -> Call:
    """A call of run()/start() with valid ['true'] and the given (bad) options."""
    return lambda sb, method, _tmp: getattr(sb, method)(["true"], **kwargs)


def _cmd(cmd: object) -> Call:
    return lambda sb, method, _tmp: getattr(sb, method)(cmd)


def _image(make: Callable[[Path], Image | object]) -> Call:
    return lambda sb, method, tmp: getattr(sb, method)(["true"], image=make(tmp))


def _layer(tmp: Path, name: str = "layer") -> Path:
    path = tmp / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def _vanished_layer(tmp: Path) -> Image:
    """An image whose layer existed when the Image was made, and is gone at start."""
    layer = _layer(tmp, "vanishing")
    image = Image.from_layers(layer)
    layer.rmdir()
    return image


def _file_layer(tmp: Path) -> Image:
    (tmp / "a-file").write_text("not a directory")
    return Image.from_layers(tmp / "a-file")


def _nested(tmp: Path) -> Image:
    outer = _layer(tmp, "outer")
    return Image.from_layers(outer, _layer(outer, "inner"))


@dataclass(frozen=True)
class Case:
    id: str
    call: Call
    error: type[SandboxError]
    builtin: type[Exception]
    quoted: str  # must appear in the message; "{tmp}" is replaced by the test's tmp_path


CASES = [
    # sizes and limits
    Case("memory-unit", _opts(memory="64q"), InvalidSpecError, ValueError, "memory='64q'"),
    Case("memory-word", _opts(memory="abc"), InvalidSpecError, ValueError, "memory='abc'"),
    Case("memory-empty", _opts(memory=""), InvalidSpecError, ValueError, "memory=''"),
    Case("memory-negative", _opts(memory=-1), InvalidSpecError, ValueError, "memory=-1"),
    Case("memory-negative-str", _opts(memory="-1"), InvalidSpecError, ValueError, "memory='-1'"),
    Case("memory-zero", _opts(memory=0), InvalidSpecError, ValueError, "memory=0"),
    Case("memory-below-min", _opts(memory="1m"), InvalidSpecError, ValueError, "memory='1m'"),
    Case("memory-overflow", _opts(memory=10**30), InvalidSpecError, ValueError, f"memory={10**30}"),
    Case("memory-exponent", _opts(memory="1e9"), InvalidSpecError, ValueError, "memory='1e9'"),
    Case("memory-float", _opts(memory=1.5e9), InvalidSpecError, ValueError, "memory=1500000000.0"),
    Case(
        "swap-below-memory",
        _opts(memory="64m", memory_swap="32m"),
        InvalidSpecError,
        ValueError,
        "memory_swap='32m'",
    ),
    Case("swap-without-memory", _opts(memory_swap="1g"), InvalidSpecError, ValueError, "memory_swap='1g'"),
    Case("cpus-zero", _opts(cpus=0), InvalidSpecError, ValueError, "cpus=0"),
    Case("cpus-negative", _opts(cpus=-1), InvalidSpecError, ValueError, "cpus=-1"),
    Case("cpus-word", _opts(cpus="x"), InvalidSpecError, ValueError, "cpus='x'"),
    Case("cpus-too-many", _opts(cpus=1000), InvalidSpecError, ValueError, "cpus=1000"),
    Case("cpu-shares-one", _opts(cpu_shares=1), InvalidSpecError, ValueError, "cpu_shares=1"),
    Case("pids-zero", _opts(pids=0), InvalidSpecError, ValueError, "pids=0"),
    Case("pids-one", _opts(pids=1), InvalidSpecError, ValueError, "pids=1"),
    Case("pids-negative", _opts(pids=-2), InvalidSpecError, ValueError, "pids=-2"),  # -1: no limit
    Case("cpuset-offline", _opts(cpuset="99"), InvalidSpecError, ValueError, "cpuset='99'"),
    Case("cpuset-reversed", _opts(cpuset="1-0"), InvalidSpecError, ValueError, "cpuset='1-0'"),
    Case(
        "cgroup-off-with-limits",
        _opts(cgroup=False, memory="64m"),
        InvalidSpecError,
        ValueError,
        "cgroup=False",
    ),
    # images and layers
    Case(
        "layer-missing",
        _image(lambda t: Image.from_layers(t / "missing")),
        LayerNotFoundError,
        FileNotFoundError,
        "{tmp}/missing",
    ),
    Case("layer-vanished", _image(_vanished_layer), LayerNotFoundError, FileNotFoundError, "{tmp}/vanishing"),
    Case("layer-is-file", _image(_file_layer), LayerNotADirectoryError, NotADirectoryError, "{tmp}/a-file"),
    Case("layers-nested", _image(_nested), InvalidSpecError, ValueError, "{tmp}/outer/inner"),
    Case(
        "layers-duplicate",
        _image(lambda t: Image.from_layers(_layer(t), _layer(t))),
        InvalidSpecError,
        ValueError,
        "{tmp}/layer",
    ),
    Case("image-not-an-image", _image(lambda t: "debian:12"), InvalidSpecError, ValueError, "'debian:12'"),
    # mounts
    Case(
        "mount-source-missing",
        _opts(mounts={"/nonexistent/psbx": "/data"}),
        InvalidSpecError,
        ValueError,
        "'/nonexistent/psbx'",
    ),
    Case(
        "mount-source-relative",
        _opts(mounts={"relative/dir": "/data"}),
        InvalidSpecError,
        ValueError,
        "'relative/dir'",
    ),
    Case("mount-over-root", _opts(mounts={"/usr": "/"}), InvalidSpecError, ValueError, "'/usr'"),
    Case("mount-mode", _opts(mounts=["/usr:/data:rx"]), InvalidSpecError, ValueError, "'rx'"),
    Case("tmpfs-size", _opts(tmpfs={"/run": "lots"}), InvalidSpecError, ValueError, "'lots'"),
    Case("tmpfs-root", _opts(tmpfs=["/"]), InvalidSpecError, ValueError, "tmpfs"),
    # process
    Case("workdir-relative", _opts(workdir="app"), InvalidSpecError, ValueError, "workdir='app'"),
    Case(
        "workdir-proc",
        _opts(workdir="/proc/self/fd/3"),
        InvalidSpecError,
        ValueError,
        "workdir='/proc/self/fd/3'",
    ),
    Case("workdir-empty", _opts(workdir=""), InvalidSpecError, ValueError, "workdir=''"),
    Case("cmd-string", _cmd("ls -l"), InvalidSpecError, ValueError, "cmd='ls -l'"),
    Case("cmd-empty", _cmd([]), InvalidSpecError, ValueError, "cmd=[]"),
    Case("cmd-none", _cmd(None), InvalidSpecError, ValueError, "cmd=None"),
    Case("cmd-not-str", _cmd(["sleep", 1]), InvalidSpecError, ValueError, "argument 1"),
    Case("cmd-empty-program", _cmd(["", "x"]), InvalidSpecError, ValueError, "cmd=['', 'x']"),
    Case("cmd-nul", _cmd(["echo", "a\0b"]), InvalidSpecError, ValueError, "'a\\x00b'"),
    Case("env-key-equals", _opts(env={"A=B": "1"}), InvalidSpecError, ValueError, "'A=B'"),
    Case("env-key-empty", _opts(env={"": "1"}), InvalidSpecError, ValueError, "''"),
    Case("env-value-none", _opts(env={"A": None}), InvalidSpecError, ValueError, "env['A']=None"),
    Case("env-not-mapping", _opts(env=["A=1"]), InvalidSpecError, ValueError, "env=['A=1']"),
    Case("user-three-parts", _opts(user="a:b:c"), InvalidSpecError, ValueError, "user='a:b:c'"),
    Case("user-empty", _opts(user=""), InvalidSpecError, ValueError, "user=''"),
    Case("user-unmapped", _opts(user=70000), InvalidSpecError, ValueError, "user='70000'"),
    Case("user-bad-name", _opts(user="bad user"), InvalidSpecError, ValueError, "user='bad user'"),
    Case("hostname-chars", _opts(hostname="bad_host!"), InvalidSpecError, ValueError, "hostname='bad_host!'"),
    Case("hostname-long", _opts(hostname="a" * 65), InvalidSpecError, ValueError, "hostname='aaaa"),
    Case("name-chars", _opts(name="bad name"), InvalidSpecError, ValueError, "name='bad name'"),
    Case("timeout-zero", _opts(timeout=0), InvalidSpecError, ValueError, "timeout=0"),
    Case("timeout-negative", _opts(timeout=-1), InvalidSpecError, ValueError, "timeout=-1"),
    Case("timeout-str", _opts(timeout="5"), InvalidSpecError, ValueError, "timeout='5'"),
    Case("input-str", _opts(input="text"), InvalidSpecError, ValueError, "input='text'"),
    Case("network", _opts(network="bridge"), InvalidSpecError, ValueError, "network='bridge'"),
    Case("read-only-str", _opts(read_only="yes"), InvalidSpecError, ValueError, "read_only='yes'"),
]


def _state() -> list[str]:
    try:
        return sorted(os.listdir(probes.state_dir()))
    except FileNotFoundError:
        return []


def _leaves() -> list[str]:
    """Every cgroup directory under this process's owner group, in every hierarchy."""
    out: list[str] = []
    root = probes.cgroup_root()
    for h in ["", *sorted(os.listdir(root))]:
        group = os.path.join(root, h, PROJECT_CGROUP, probes.owner())
        for base, dirs, _files in os.walk(group):
            out.extend(os.path.join(base, d) for d in dirs)
    return out


def _is_empty(path: str) -> bool:
    try:
        with open(os.path.join(path, "cgroup.procs")) as f:
            return not f.read().split()
    except FileNotFoundError:
        return False  # removed meanwhile
    except OSError:
        return True


def _orphaned_cgroups(settle: float = 2.0) -> list[str]:
    """Cgroup leaves without any process: left behind.

    Live containers and the launcher's *spare* (a first process waiting, already attached, for the
    next container's spec) hold a process; a leaf being prepared is empty for a few milliseconds,
    a leaked one forever -- so empty leaves are polled for ``settle`` seconds before they count.
    """
    deadline = time.monotonic() + settle
    while True:
        empty = sorted(p for p in _leaves() if _is_empty(p))
        if not empty or time.monotonic() >= deadline:
            return empty
        time.sleep(0.05)


@pytest.fixture
def launcher_requests(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The operations sent to the (real, started) launcher during the test."""
    return probes.record_launcher_requests(monkeypatch)


@pytest.mark.parametrize("method", ["run", "start"])
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_refused_before_anything_exists(
    case: Case, method: str, tmp_path: Path, launcher_requests: list[str]
) -> None:
    """Each bad value raises its typed error (also the builtin), quoting the value; nothing is created."""
    state_before = _state()
    with Sandbox() as sb:
        with pytest.raises(case.error) as e:
            case.call(sb, method, tmp_path)
        assert sb.containers == []
    assert isinstance(e.value, case.builtin)
    assert case.quoted.format(tmp=tmp_path) in str(e.value)
    # No request reached the launcher: it created no cgroup, process, mount or directory for us.
    assert launcher_requests == [], "bad input reached the launcher"
    assert _state() == state_before
    assert _orphaned_cgroups(settle=0.5) == []


def test_misspelled_option_is_refused(sandbox: Sandbox, launcher_requests: list[str]) -> None:
    """An unknown keyword (a typo like memroy=) is an InvalidSpecError naming it and listing the
    options, never silently ignored; so is one given as a default (a marker's)."""
    with pytest.raises(
        InvalidSpecError,
        match=r"unknown option 'memroy' \(did you mean 'memory'\?\); the options are: .*image, .*memory",
    ):
        sandbox.run(["true"], memroy="64m")
    with pytest.raises(InvalidSpecError, match="unknown option 'cpu'"):
        Sandbox(defaults={"cpu": 1}).run(["true"])
    assert launcher_requests == []


def test_timeout_is_for_run_not_start(sandbox: Sandbox, launcher_requests: list[str]) -> None:
    """start() runs in the background: a timeout= there would be silently meaningless, so it is
    refused with where to put it instead."""
    with pytest.raises(
        InvalidSpecError, match=r"timeout=5: start\(\) runs in the background; give the timeout to wait"
    ):
        sandbox.start(["sleep", "10"], timeout=5)
    assert launcher_requests == []


def test_duplicate_name_refused(sandbox: Sandbox) -> None:
    """A second container with a live container's name is refused before it is created."""
    c = sandbox.start(["sleep", "100"], name="web")
    before = _state()
    with pytest.raises(InvalidSpecError, match="name='web': a container with this name already exists"):
        sandbox.start(["sleep", "100"], name="web")
    assert _state() == before
    assert sandbox.containers == [c]


# ------------------------------------------------------------- errors only the container can detect


@pytest.mark.parametrize(
    ("cmd", "user", "error", "quoted"),
    [
        (["/no/such/cmd"], None, CommandNotFoundError, "/no/such/cmd"),
        (["psbx-no-such-program"], None, CommandNotFoundError, "psbx-no-such-program"),
        (["/etc"], None, CommandNotExecutableError, "/etc"),
        (["true"], "nosuchuser", UserNotFoundError, "nosuchuser"),
    ],
)
def test_kernel_side_errors_leave_nothing(
    cmd: list[str], user: str | None, error: type[SetupError], quoted: str, launcher_requests: list[str]
) -> None:
    """A command or user only the container can look up: typed error, and nothing left once closed."""
    state_before = _state()
    for method in ("run", "start"):
        with Sandbox() as sb:
            with pytest.raises(error) as e:
                getattr(sb, method)(cmd, user=user)
            assert quoted in str(e.value)
            assert sb.containers == []
        assert _state() == state_before
    # The check really happened in the container: run() sends "run", start() "create".
    assert [op for op in launcher_requests if op in ("run", "create")] == ["run", "create"]
    assert _orphaned_cgroups() == []


BIG = "x" * (65 << 20)  # the 65 MiB env= value
E2BIG_CASES = [
    (
        ["true"],
        {"BIG": BIG},
        r"env\['BIG'\]: 68157444 bytes; one argument or NAME=value may have at most 131071",
    ),
    (["echo", "y" * (128 << 10)], {}, r"cmd\[1\]: 131072 bytes; one argument or NAME=value may have at most"),
    (
        ["true"],
        {f"V{i}": "z" * (100 << 10) for i in range(21)},
        r"cmd and env together: \d+ bytes; at most 2097152",
    ),
]


def test_a_cmd_or_env_execve_would_refuse_is_refused_before_anything_is_sent(
    sandbox: Sandbox, launcher_requests: list[str]
) -> None:
    """Issue 9, item 9: a 65 MiB env= value killed the launcher, and every container with it.  What
    execve(2) would refuse with E2BIG -- one string over MAX_ARG_STRLEN, or cmd and env together
    over 2 MiB -- is an InvalidSpecError naming it and the limit, in run(), start() and exec(),
    before anything is created or sent; the limit is the kernel's own (the host's execve agrees
    one byte over it, and a container takes the largest string under it)."""
    c = sandbox.start(["sleep", "60"])
    launcher_requests.clear()
    state_before = _state()
    for cmd, env, message in E2BIG_CASES:
        for call in (sandbox.run, sandbox.start, c.exec):
            with pytest.raises(InvalidSpecError, match=message):
                call(cmd, env=env)
    assert launcher_requests == [], "an oversized command reached the launcher"
    assert _state() == state_before
    assert c.running
    with pytest.raises(OSError, match="Argument list too long"):  # the kernel's limit: 131071 + NUL
        subprocess.run(["/bin/true"], env={"A": "x" * (131071 - 1)}, check=False)
    largest = {"A": "x" * (131071 - 2)}  # "A=" + value: 131071 bytes, then the NUL
    assert sandbox.run(["sh", "-c", 'echo "${#A}"'], env=largest).stdout == b"131069\n"
    assert c.exec(["sh", "-c", 'echo "${#A}"'], env=largest).stdout == b"131069\n"


def test_a_frame_the_launcher_cannot_take_is_refused_and_it_lives_on(sandbox: Sandbox) -> None:
    """Issue 9, item 9: no message can kill the launcher.  A frame over the size limits (a blob of
    16 MiB + 1, a header of 16 MiB + 1) or with a header that is not JSON is read without being
    kept, answered with an error when its request id could be read, and logged; the launcher --
    the same process -- and its running container carry on."""
    import struct

    from pytest_sandbox.core.errors import SandboxError
    from pytest_sandbox.launcher.protocol import MAX_BLOB, MAX_HEADER

    c = sandbox.start(["sleep", "60"])
    launcher = probes.launcher_pid()
    log_start = os.path.getsize(probes.launcher_log_path())

    def over_blob(rid: int) -> bytes:
        header = f'{{"rid": {rid}, "op": "create", "dir": "/nowhere", "fds": 0}}'.encode()
        return struct.pack(">II", len(header), MAX_BLOB + 1) + header + bytes(MAX_BLOB + 1)

    answered = probes.launcher_send_raw(over_blob)
    with pytest.raises(SandboxError, match=r"over the limits of 16777216 \+ 16777216"):
        answered.result(30)
    probes.launcher_send_raw(lambda rid: struct.pack(">II", MAX_HEADER + 1, 0) + bytes(MAX_HEADER + 1))
    probes.launcher_send_raw(lambda rid: struct.pack(">II", 3, 0) + b"{x}")
    assert c.exec(["echo", "alive"]).stdout == b"alive\n"
    assert sandbox.run(["true"]).exit_code == 0
    assert probes.launcher_pid() == launcher
    assert c.running
    with open(probes.launcher_log_path(), "rb") as f:
        f.seek(log_start)
        assert f.read().count(b"psbx-launcher: refused a frame") == 3
