"""The process lifecycle on the real kernel: PID 1, exit codes, signals, stop, exec, timeouts, logs.

Every test starts real containers through the ``sandbox`` fixture (host base image unless noted);
nothing is mocked.  Covers reaping and exit status, signal delivery and stop escalation, command
and workdir errors and API misuse, plus the exec, run(timeout=), input= and readiness-wait
contracts.
"""

from __future__ import annotations

import os
import random
import re
import signal
import time
from pathlib import Path

import pytest

from pytest_sandbox import (
    CommandNotExecutableError,
    CommandNotFoundError,
    Container,
    ContainerNotRunningError,
    Image,
    InvalidSignalError,
    InvalidSpecError,
    ReadinessError,
    Result,
    Sandbox,
    SandboxTimeoutError,
    SetupError,
    UserNotFoundError,
)
from pytest_sandbox.core.naming import PROJECT_CGROUP
from tests import probes

NAMESPACES = ("user", "mnt", "pid", "uts", "ipc", "net", "cgroup")


def _ns_pid(host_pid: int) -> int:
    """The pid a host process has inside its own (innermost) PID namespace."""
    with open(f"/proc/{host_pid}/status") as f:
        for line in f:
            if line.startswith("NSpid:"):
                return int(line.split()[-1])
    raise AssertionError(f"no NSpid line for {host_pid}")


def _poll(condition: object, timeout: float, interval: float = 0.05) -> None:
    """Call ``condition`` until it returns truthy or ``timeout`` passes (then one last time)."""
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(interval)


# -------------------------------------------------------------------------------- PID 1 and exits


def test_init_reaps_orphaned_zombies(sandbox: Sandbox) -> None:
    """200 double-forked children are re-parented to our PID 1 and reaped: no Z process remains."""
    # Each orphan is a subshell of a subshell; it waits (builtins only, no exec) until its parent
    # has exited and it has been re-parented, records its new parent pid, then exits.
    orphan = (
        'n=0; while read p c s pp rest < /proc/self/stat && [ "$pp" != 1 ] && [ $n -lt 100000 ]; '
        'do n=$((n+1)); done; echo "$pp" >> /tmp/ppids'
    )
    script = (
        f"i=0; while [ $i -lt 200 ]; do ( ( {orphan} ) & ); i=$((i+1)); done; echo SPAWNED; exec sleep 100"
    )
    c = sandbox.start(["sh", "-c", script])
    c.wait_for_log(b"SPAWNED", timeout=30)

    ppids: list[str] = []

    def all_reported() -> bool:
        ppids[:] = c.exec(["cat", "/tmp/ppids"]).stdout.decode().split()
        return len(ppids) >= 200

    _poll(all_reported, timeout=15)
    assert len(ppids) == 200, f"only {len(ppids)} orphans reported"
    assert set(ppids) == {"1"}, "orphans must be re-parented to the container's PID 1"

    table: list[str] = []

    def no_zombies() -> bool:
        out = c.exec(["ps", "-eo", "stat=,pid=,ppid=,comm="]).stdout.decode()
        table[:] = out.splitlines()
        return not any(line.split()[0].startswith("Z") for line in table)

    _poll(no_zombies, timeout=5)
    zombies = [line for line in table if line.split()[0].startswith("Z")]
    assert zombies == [], f"PID 1 left zombies: {zombies}"
    # What remains is init, the main command and the ps itself: the orphans are gone.
    assert len(table) <= 3, table
    assert c.running


@pytest.mark.parametrize(
    ("script", "exit_code", "sig"),
    [
        ("exit 0", 0, None),
        ("exit 1", 1, None),
        ("exit 42", 42, None),
        ("exit 255", 255, None),
        ("exit 127", 127, None),
        ("kill -9 $$", 137, signal.SIGKILL),
        ("kill -TERM $$", 143, signal.SIGTERM),
    ],
)
def test_exit_status_reported_exactly(sandbox: Sandbox, script: str, exit_code: int, sig: int | None) -> None:
    """The main command's exit code or killing signal comes back exactly (Docker's 128+N for signals)."""
    r = sandbox.run(["sh", "-c", script])
    assert (r.exit_code, r.signal) == (exit_code, sig)
    assert r.ok is (exit_code == 0)


def test_command_exiting_127_is_not_command_not_found(sandbox: Sandbox) -> None:
    """A command that itself exits 127 is a Result; a missing command is an error naming the path."""
    r = sandbox.run(["sh", "-c", "echo ran; exit 127"])
    assert isinstance(r, Result)
    assert (r.exit_code, r.signal, r.stdout) == (127, None, b"ran\n")

    with pytest.raises(CommandNotFoundError) as e:
        sandbox.run(["/no/such/cmd"])
    assert isinstance(e.value, FileNotFoundError)
    assert e.value.exit_code == 127
    assert "/no/such/cmd" in str(e.value)
    assert e.value.filename == "/no/such/cmd"


def test_command_not_found_in_path(sandbox: Sandbox) -> None:
    """A bare name is looked up in the image's PATH; the error names the command and the PATH."""
    with pytest.raises(CommandNotFoundError) as e:
        sandbox.run(["psbx-no-such-command"], env={"PATH": "/usr/bin:/bin"})
    assert e.value.exit_code == 127
    assert '"psbx-no-such-command"' in str(e.value)
    assert "/usr/bin:/bin" in str(e.value)


def test_directory_is_not_executable(sandbox: Sandbox) -> None:
    """A directory as the command raises CommandNotExecutableError (126) naming the path."""
    with pytest.raises(CommandNotExecutableError) as e:
        sandbox.run(["/etc"])
    assert isinstance(e.value, PermissionError)
    assert e.value.exit_code == 126
    assert "/etc" in str(e.value)
    assert "is a directory" in str(e.value)


def app_layer(tmp_path: Path, name: str, content: bytes, mode: int) -> Path:
    """A layer holding one file, /app/``name``, with ``content`` and ``mode``."""
    layer = tmp_path / "layer"
    (layer / "app").mkdir(parents=True)
    (layer / "app" / name).write_bytes(content)
    (layer / "app" / name).chmod(mode)
    return layer


def test_non_executable_file_is_not_executable(sandbox: Sandbox, tmp_path: Path) -> None:
    """A regular file without the x bit raises CommandNotExecutableError (126) naming path and mode."""
    layer = app_layer(tmp_path, "tool", b"#!/bin/sh\necho hi\n", 0o644)
    with pytest.raises(CommandNotExecutableError) as e:
        sandbox.run(["/app/tool"], image=Image.from_layers(layer))
    assert e.value.exit_code == 126
    assert "/app/tool" in str(e.value)
    assert "-rw-r--r--" in str(e.value)


def test_missing_shebang_interpreter_is_named(sandbox: Sandbox, tmp_path: Path) -> None:
    """A script whose #! interpreter is missing: the error names the interpreter, not only the script."""
    layer = app_layer(tmp_path, "run.sh", b"#!/opt/psbx/no-such-interpreter -e\necho hi\n", 0o755)
    with pytest.raises(CommandNotFoundError) as e:
        sandbox.run(["/app/run.sh"], image=Image.from_layers(layer))
    assert e.value.exit_code == 127
    assert "/opt/psbx/no-such-interpreter" in str(e.value)
    assert "/app/run.sh" in str(e.value)


def test_wrong_format_executable(sandbox: Sandbox, tmp_path: Path) -> None:
    """An executable that is no program for this machine (ENOEXEC) is a 126 'exec format error'."""
    layer = app_layer(tmp_path, "blob", b"\x7fELF" + b"\x00" * 60, 0o755)
    with pytest.raises(CommandNotExecutableError) as e:
        sandbox.run(["/app/blob"], image=Image.from_layers(layer))
    assert e.value.exit_code == 126
    assert "exec format error" in str(e.value)


def test_unknown_user_raises(sandbox: Sandbox, busybox_image: Image) -> None:
    """user= naming nobody in the image's /etc/passwd raises UserNotFoundError (not an exit code)."""
    with pytest.raises(UserNotFoundError) as e:
        sandbox.run(["true"], user="nosuchuser", image=busybox_image)
    assert isinstance(e.value, LookupError)
    assert "nosuchuser" in str(e.value)
    with pytest.raises(UserNotFoundError, match="nosuchgroup"):
        sandbox.run(["true"], user="app:nosuchgroup", image=busybox_image)
    # ...while a known name resolves to its ids.
    r = sandbox.run(["id"], user="app", image=busybox_image)
    assert r.stdout.startswith(b"uid=1000(app) gid=1000(app)")


def _image_with_etc(busybox_layer: Path, tmp_path: Path, passwd: str, group: str) -> Image:
    """The busybox image with its /etc/passwd and /etc/group replaced by an upper layer."""
    etc = tmp_path / "etc-layer" / "etc"
    etc.mkdir(parents=True)
    (etc / "passwd").write_text(passwd)
    (etc / "group").write_text(group)
    return Image.from_layers(busybox_layer, etc.parent, base=None)


@pytest.mark.parametrize(
    "case",
    [
        ("app:x:-1:1000::/:/bin/sh", "app:x:1000:", r"/etc/passwd line 2: uid '-1'"),
        ("app:x:4294967295:1000::/:/bin/sh", "app:x:1000:", r"/etc/passwd line 2: uid '4294967295'"),
        ("app:x:1000:4294967295::/:/bin/sh", "app:x:1000:", r"/etc/passwd line 2: gid '4294967295'"),
        ("app:x:1000:1000::/:/bin/sh", "wheel:x:70000:app", r"/etc/group line 2: gid '70000'"),
    ],
)
def test_user_with_unmapped_id_in_image_is_refused(
    sandbox: Sandbox, busybox_layer: Path, tmp_path: Path, case: tuple[str, str, str]
) -> None:
    """Issue 9 item 5: an image's passwd/group entry with an id outside the map never means root.

    uid -1 (= 4294967295 = (uid_t)-1) made setresuid leave uid 0 in place: the command ran as root
    with root's capabilities.  Now run() and exec() raise UserNotFoundError naming the line, and
    the command does not run (no marker file appears).
    """
    passwd_line, group_line, named = case
    image = _image_with_etc(
        busybox_layer, tmp_path, f"root:x:0:0::/root:/bin/sh\n{passwd_line}\n", f"root:x:0:\n{group_line}\n"
    )
    with pytest.raises(UserNotFoundError, match=named):
        sandbox.run(["sh", "-c", "id; touch /ran"], user="app", image=image)
    c = sandbox.start(["sleep", "100"], image=image)
    with pytest.raises(UserNotFoundError, match=named):
        c.exec(["touch", "/ran"], user="app")
    assert c.exec(["sh", "-c", "test -e /ran || echo absent"]).stdout == b"absent\n"
    assert c.exec(["id", "-u"], user="root").stdout == b"0\n"  # the container itself is fine


def test_numeric_user_outside_the_map_is_refused(sandbox: Sandbox) -> None:
    """user="4294967295" or "0:65536" to run() or exec(): InvalidSpecError before anything is created."""
    for user in ("4294967295", "65536", "0:65536", "1000:4294967295"):
        with pytest.raises(InvalidSpecError, match="outside the container's user namespace"):
            sandbox.run(["true"], user=user)
    c = sandbox.start(["sleep", "100"])
    with pytest.raises(InvalidSpecError, match="outside the container's user namespace"):
        c.exec(["true"], user="4294967295")
    assert sandbox.containers == [c]


def test_missing_workdir_is_created(sandbox: Sandbox) -> None:
    """A workdir missing in the image is created (Docker's behaviour, documented in process.py)."""
    r = sandbox.run(["pwd"], workdir="/srv/psbx/deep")
    assert r.stdout == b"/srv/psbx/deep\n"


def test_uncreatable_workdir_is_an_error(sandbox: Sandbox) -> None:
    """A workdir that cannot exist (below a file) is a 126-class error naming it."""
    with pytest.raises(CommandNotExecutableError) as e:
        sandbox.run(["pwd"], workdir="/etc/passwd/sub")
    assert "/etc/passwd/sub" in str(e.value)


def test_setup_failure_is_never_an_exit_code(sandbox: Sandbox) -> None:
    """Setup failures are exceptions (SetupError family), never a Result with 125/126/127."""
    for cmd in (["/no/such/cmd"], ["/etc"]):
        with pytest.raises(SetupError):
            sandbox.run(cmd)
    assert list(sandbox.results) == []  # nothing was recorded as a run result


# --------------------------------------------------------------------------------------- signals

TRAPPED = [1, 2, 3, 4, 5, 6, 8, 10, 12, 13, 14, 15, 16, 20, 21, 22, 23, 24, 25, 26, 64]


def test_signals_forwarded_exactly_once(sandbox: Sandbox) -> None:
    """Each of 21 trapped signals sent with kill() in random order reaches the command exactly once.

    (podman 130-kill.bats.)  Half are sent by number, half by name.
    """
    traps = "; ".join(f"trap 'echo got: {n}' {n}" for n in TRAPPED)
    loop = "while ! test -e /stop; do sleep 0.05; done"
    c = sandbox.start(["sh", "-c", f"{traps}; echo READY; {loop}; echo DONE"])
    c.wait_for_log(b"READY", timeout=10)
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    order = TRAPPED[:]
    rng.shuffle(order)
    for n in order:
        c.kill(n if rng.random() < 0.5 else signal.Signals(n).name)
        time.sleep(0.01)

    def got() -> list[int]:
        return [int(x) for x in re.findall(rb"got: (\d+)", c.logs("stdout"))]

    _poll(lambda: len(got()) >= len(TRAPPED), timeout=5)
    time.sleep(0.2)  # a duplicate would show up now
    received = got()
    assert sorted(received) == sorted(TRAPPED), f"seed {seed}: sent {order}, received {received}"
    assert c.running
    c.exec(["touch", "/stop"])
    r = c.wait(10)
    assert (r.exit_code, r.signal) == (0, None)
    assert r.stdout.endswith(b"DONE\n")


def test_stop_escalates_to_sigkill(sandbox: Sandbox) -> None:
    """stop(timeout=1) on a command ignoring SIGTERM kills it after ~1 s: exit 137, signal 9."""
    c = sandbox.start(["sh", "-c", "trap '' TERM; echo READY; while :; do sleep 0.05; done"])
    c.wait_for_log(b"READY", timeout=10)
    t0 = time.monotonic()
    r = c.stop(timeout=1)
    elapsed = time.monotonic() - t0
    assert (r.exit_code, r.signal) == (137, signal.SIGKILL)
    assert 1.0 <= elapsed <= 3.0, elapsed
    assert not c.running
    assert c.result is r
    assert c.stop(timeout=1) is r  # stopping again returns the recorded result at once


def test_stop_cooperative_process_is_quick(sandbox: Sandbox) -> None:
    """stop() on a command that dies on SIGTERM returns 143 well before the timeout."""
    c = sandbox.start(["sleep", "100"])
    t0 = time.monotonic()
    r = c.stop(timeout=10)
    assert (r.exit_code, r.signal) == (143, signal.SIGTERM)
    assert time.monotonic() - t0 < 2.0


@pytest.mark.parametrize("bad", [0, 65, -1, "SIGBAD", "", "0", "SIGRTMIN+40", True, 1.5])
def test_invalid_signal_refused_and_nothing_sent(sandbox: Sandbox, bad: object) -> None:
    """kill() with an invalid signal raises InvalidSignalError (podman wording); nothing is sent."""
    c = sandbox.start(["sleep", "100"])
    with pytest.raises(InvalidSignalError) as e:
        c.kill(bad)  # type: ignore[arg-type]
    assert isinstance(e.value, ValueError)
    assert str(e.value).startswith("invalid signal")
    assert repr(bad) in str(e.value)
    if isinstance(bad, int) and not isinstance(bad, bool):
        assert "valid signals are 1 through 64" in str(e.value)
    assert c.running
    assert c.exec(["true"]).exit_code == 0


def test_kill_and_exec_after_exit(sandbox: Sandbox) -> None:
    """kill/exec on an exited container raise ContainerNotRunningError, waited for or not."""
    c = sandbox.start(["true"])
    _poll(lambda: not c.running, timeout=10)
    # Exited, but its result not collected yet: the launcher is the one that refuses.
    with pytest.raises(ContainerNotRunningError):
        c.exec(["true"])
    with pytest.raises(ContainerNotRunningError):
        c.kill()
    assert c.wait(5).exit_code == 0
    with pytest.raises(ContainerNotRunningError):
        c.exec(["true"])
    with pytest.raises(ContainerNotRunningError):
        c.kill("TERM")


def test_kill_exec_wait_after_remove_and_double_remove(sandbox: Sandbox) -> None:
    """After remove(): kill/exec/wait raise ContainerNotRunningError; a second remove() is silent."""
    c = sandbox.start(["sleep", "100"])
    c.remove()
    assert not c.running
    with pytest.raises(ContainerNotRunningError):
        c.kill()
    with pytest.raises(ContainerNotRunningError):
        c.exec(["true"])
    with pytest.raises(ContainerNotRunningError):
        c.wait(1)
    c.remove()  # silent
    assert "removed" in repr(c)
    # Its state directory is gone from the host.
    assert not os.path.exists(c.dir)


def test_remove_of_an_exited_container_deletes_its_state_first(sandbox: Sandbox) -> None:
    """remove() returns only once the container's directory (upper layer, logs) is gone, exited or not."""
    for i in range(25):  # the race this guards against showed up in about 1 of 15 rounds
        c = sandbox.start(["sh", "-c", "echo data > /written; exit 3"])
        assert c.wait(10).exit_code == 3
        assert os.path.isdir(c.dir)
        c.remove()
        assert not os.path.exists(c.dir), f"round {i}: {c.dir} still exists after remove()"
        assert c.logs() == b""  # the logs were read before removal (the command printed nothing)


def test_sigkill_ends_the_whole_container(sandbox: Sandbox) -> None:
    """kill() (SIGKILL) ends the container, background processes included; exit 137."""
    c = sandbox.start(["sh", "-c", "sleep 100 & sleep 100 & echo READY; wait"])
    c.wait_for_log(b"READY", timeout=10)
    with open(f"/proc/{c.pid}/task/{c.pid}/children") as f:
        background = [int(p) for p in f.read().split()]
    assert len(background) == 2
    c.kill()
    r = c.wait(5)
    assert (r.exit_code, r.signal) == (137, signal.SIGKILL)
    for pid in [c.init_pid, c.pid, *background]:
        _poll(lambda pid=pid: _gone(pid), timeout=2)
        assert _gone(pid), f"pid {pid} survived the container's SIGKILL"


def _gone(pid: int) -> bool:
    """The pid no longer exists (or is a zombie about to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


# ------------------------------------------------------------------------------------------ exec


@pytest.fixture
def sleeper(sandbox: Sandbox) -> Container:
    """A running container whose main command prints its namespaces and cgroups, then sleeps."""
    script = (
        "for n in " + " ".join(NAMESPACES) + "; do readlink /proc/self/ns/$n; done; "
        "echo ---; cat /proc/self/cgroup; echo READY; exec sleep 100"
    )
    c = sandbox.start(["sh", "-c", script], env={"MAIN": "m", "OVER": "main"}, hostname="exec-box")
    c.wait_for_log(b"READY", timeout=10)
    return c


def test_exec_joins_the_container_namespaces(sleeper: Container) -> None:
    """exec'd commands run in the main process's namespaces: same ns inodes, hostname, PID view."""
    script = "for n in " + " ".join(NAMESPACES) + "; do readlink /proc/self/ns/$n; done"
    r = sleeper.exec(["sh", "-c", script])
    main_ns = sleeper.logs("stdout").split(b"---")[0].split()
    assert r.stdout.split() == main_ns
    # ...which are the main command's as the host sees them, and none is the host's.
    for name, link in zip(NAMESPACES, r.stdout.decode().split(), strict=True):
        assert os.readlink(f"/proc/{sleeper.pid}/ns/{name}") == link
        assert os.readlink(f"/proc/self/ns/{name}") != link, f"{name} namespace is the host's"
    assert sleeper.exec(["hostname"]).stdout == b"exec-box\n"
    # The main command is visible under its in-namespace pid, with its argv.
    ns_pid = _ns_pid(sleeper.pid)
    assert sleeper.exec(["cat", f"/proc/{ns_pid}/cmdline"]).stdout == b"sleep\x00100\x00"


def test_exec_joins_the_container_cgroup(sleeper: Container) -> None:
    """exec'd commands are in the container's cgroup: the same (namespaced) /proc/self/cgroup as main."""
    main_view = sleeper.logs("stdout").split(b"---")[1].split(b"READY")[0].strip()
    assert sleeper.exec(["cat", "/proc/self/cgroup"]).stdout.strip() == main_view
    # ...and the main command's cgroup (host view) is a container leaf of ours, not the launcher's.
    owner_group = f"/{PROJECT_CGROUP}/{probes.owner()}/psbx-c-"
    with open(f"/proc/{sleeper.pid}/cgroup") as f:
        assert any(line.split(":", 2)[2].startswith(owner_group) for line in f)


def test_exec_env_workdir_user_overrides(sleeper: Container) -> None:
    """exec inherits the container's env and defaults, and env=/workdir=/user= override them."""
    script = 'echo "$MAIN $OVER ${NEW:-unset} $(pwd) $(id -u) $(id -g)"'
    assert sleeper.exec(["sh", "-c", script]).stdout == b"m main unset / 0 0\n"
    r = sleeper.exec(["sh", "-c", script], env={"OVER": "exec", "NEW": "n"}, workdir="/tmp", user="1000:1001")
    assert r.stdout == b"m exec n /tmp 1000 1001\n"


def test_exec_exit_codes_and_input(sleeper: Container) -> None:
    """exec reports exit codes and signals exactly, feeds input= to stdin and separates stderr."""
    assert sleeper.exec(["sh", "-c", "exit 3"]).exit_code == 3
    r = sleeper.exec(["sh", "-c", "kill -9 $$"])
    assert (r.exit_code, r.signal) == (137, signal.SIGKILL)
    assert not r.oom_killed
    r = sleeper.exec(["sh", "-c", "tr a-z A-Z; echo err >&2"], input=b"hello exec\n")
    assert (r.stdout, r.stderr) == (b"HELLO EXEC\n", b"err\n")
    with pytest.raises(CommandNotFoundError, match="/no/such/cmd"):
        sleeper.exec(["/no/such/cmd"])
    assert sleeper.running


def test_exec_timeout_kills_only_the_exec(sleeper: Container) -> None:
    """exec(timeout=) kills only the exec'd process and raises with the partial result."""
    t0 = time.monotonic()
    with pytest.raises(SandboxTimeoutError) as e:
        sleeper.exec(["sh", "-c", "echo partial; sleep 100"], timeout=0.5)
    assert time.monotonic() - t0 < 3.0
    assert isinstance(e.value, TimeoutError)
    res = e.value.result
    assert isinstance(res, Result)
    assert (res.stdout, res.signal, res.exit_code) == (b"partial\n", signal.SIGKILL, 137)
    assert sleeper.running
    assert os.path.exists(f"/proc/{sleeper.pid}")
    assert sleeper.exec(["echo", "still here"]).stdout == b"still here\n"


# ------------------------------------------------------------------------------- run, logs, waits


def test_run_timeout_raises_with_partial_output(sandbox: Sandbox) -> None:
    """run(timeout=) on a long command raises SandboxTimeoutError in about the timeout, with output."""
    t0 = time.monotonic()
    with pytest.raises(SandboxTimeoutError) as e:
        sandbox.run(["sh", "-c", "echo partial; echo err >&2; sleep 100"], timeout=1)
    elapsed = time.monotonic() - t0
    assert 1.0 <= elapsed < 3.0, elapsed
    res = e.value.result
    assert isinstance(res, Result)
    assert (res.stdout, res.stderr, res.signal) == (b"partial\n", b"err\n", signal.SIGKILL)
    assert "did not finish in 1" in str(e.value)


def test_run_input_feeds_stdin(sandbox: Sandbox) -> None:
    """input= bytes (binary safe) are the command's stdin; without it stdin is empty (/dev/null)."""
    payload = bytes(range(256)) * 4
    r = sandbox.run(["sh", "-c", "cat; echo -n END"], input=payload)
    assert r.stdout == payload + b"END"
    assert sandbox.run(["wc", "-c"]).stdout.strip() == b"0"


def test_large_output_intact(sandbox: Sandbox) -> None:
    """Several MB on stdout and stderr come back byte for byte."""
    r = sandbox.run(["sh", "-c", "seq 1 1000000; seq 1 200000 >&2"])
    assert r.exit_code == 0
    expected = "".join(f"{i}\n" for i in range(1, 1_000_001)).encode()
    assert len(r.stdout) > 6_000_000
    assert r.stdout == expected
    assert r.stderr == "".join(f"{i}\n" for i in range(1, 200_001)).encode()


def test_wait_for_log_timeout_shows_last_lines(sandbox: Sandbox) -> None:
    """wait_for_log times out with ReadinessError quoting the last log lines (not the whole log)."""
    c = sandbox.start(["sh", "-c", "for i in $(seq 1 30); do echo line$i; done; exec sleep 100"])
    c.wait_for_log(b"line30", timeout=10)
    t0 = time.monotonic()
    with pytest.raises(ReadinessError) as e:
        c.wait_for_log(b"never printed", timeout=1)
    assert 1.0 <= time.monotonic() - t0 < 3.0
    message = str(e.value)
    assert "timed out" in message
    assert "line30" in message
    assert "line11" in message
    assert "line10\n" not in message  # only the tail
    assert isinstance(e.value, TimeoutError)
    assert c.running


def test_wait_for_log_fails_fast_when_container_exits(sandbox: Sandbox) -> None:
    """If the container exits first, wait_for_log fails at once with its exit code and output."""
    c = sandbox.start(["sh", "-c", "echo booting; echo 'config error' >&2; exit 3"])
    t0 = time.monotonic()
    with pytest.raises(ReadinessError) as e:
        c.wait_for_log(b"ready", timeout=30)
    assert time.monotonic() - t0 < 5.0
    message = str(e.value)
    assert "exited (code 3)" in message
    assert "booting" in message
    assert "config error" in message
    assert isinstance(e.value.result, Result)
    assert e.value.result.exit_code == 3


def test_wait_timeout_then_result(sandbox: Sandbox) -> None:
    """wait(timeout) raises SandboxTimeoutError while running; the container is unaffected."""
    c = sandbox.start(["sh", "-c", "sleep 0.5; exit 7"])
    with pytest.raises(SandboxTimeoutError):
        c.wait(0.05)
    assert c.running
    assert c.wait(10).exit_code == 7


def test_command_starts_with_default_signal_dispositions(sleeper: Container, sandbox: Sandbox) -> None:
    """Neither the command nor an exec inherits the launcher's ignored SIGINT, SIGPIPE or SIGXFSZ."""
    mask = (1 << (signal.SIGINT - 1)) | (1 << (signal.SIGPIPE - 1)) | (1 << (signal.SIGXFSZ - 1))

    def ignored(status: bytes) -> int:
        line = next(x for x in status.splitlines() if x.startswith(b"SigIgn:"))
        return int(line.split()[1], 16) & mask

    assert ignored(sandbox.run(["cat", "/proc/self/status"]).stdout) == 0
    assert ignored(sleeper.exec(["cat", "/proc/self/status"]).stdout) == 0
    with open(f"/proc/{sleeper.pid}/status", "rb") as f:
        assert ignored(f.read()) == 0
