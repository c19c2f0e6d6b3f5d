"""Threads: the API is used from many threads at once, and the pytest process never forks.

pytest processes are multi-threaded (xdist's execnet, user threads), so the runtime forks only in
its single-threaded launcher.  These tests pin that design (docs/architecture.md, "How a container is
born") and its reliability: concurrent containers from 8 threads, containers outliving
the thread that started them (the PR_SET_PDEATHSIG pitfall: it fires when the *thread* that
forked exits), 8 threads racing stop/kill/exec on one container, no fork() in the pytest process
(so no Python 3.12 "fork() in a multi-threaded process" DeprecationWarning under -W error).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NoReturn

import pytest

from pytest_sandbox import Container, ContainerNotRunningError, Result, Sandbox, SetupError
from tests import probes

# -- fork watch: os.register_at_fork hooks cannot be removed, so one hook, armed by a fixture ----

_fork_watch: list[str] | None = None


def _before_fork() -> None:
    if _fork_watch is not None:
        _fork_watch.append(threading.current_thread().name)


os.register_at_fork(before=_before_fork)


@pytest.fixture
def forks() -> Iterator[list[str]]:
    """Names of the threads that call fork() in this (the pytest) process during the test.

    The at-fork hook runs for os.fork()/os.forkpty() -- exactly the calls Python 3.12 warns about
    in a multi-threaded process -- and not for subprocess's vfork/exec, which is safe.
    """
    global _fork_watch
    _fork_watch = []
    try:
        yield _fork_watch
    finally:
        _fork_watch = None


def _in_threads(n: int, target: Callable[[int], Any]) -> list[Any]:
    """Run ``target(i)`` for i in range(n) in n threads released together; their results in order."""
    barrier = threading.Barrier(n)

    def run(i: int) -> Any:
        barrier.wait(timeout=30)
        return target(i)

    with ThreadPoolExecutor(max_workers=n, thread_name_prefix="psbx-test") as pool:
        return list(pool.map(run, range(n)))


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


# ----------------------------------------------------------------------------------------- tests


def test_eight_threads_run_containers_concurrently(sandbox: Sandbox, forks: list[str]) -> None:
    """8 threads x 4 runs (plus a start/exec/stop each): every result belongs to its own caller."""

    def work(i: int) -> list[tuple[int, bytes, bytes]]:
        out = []
        for j in range(4):
            token = f"t{i}-r{j}"
            script = 'echo "$1"; echo "err-$1" >&2; exit "$2"'
            r = sandbox.run(["sh", "-c", script, "sh", token, str(i * 4 + j)])
            out.append((r.exit_code, r.stdout, r.stderr))
        c = sandbox.start(["sleep", "100"], env={"TOKEN": f"t{i}"})
        out.append((0, c.exec(["sh", "-c", "echo $TOKEN"]).stdout, b""))
        out.append((c.stop(timeout=5).exit_code, b"", b""))
        return out

    results = _in_threads(8, work)
    for i, got in enumerate(results):
        expected = [(i * 4 + j, f"t{i}-r{j}\n".encode(), f"err-t{i}-r{j}\n".encode()) for j in range(4)]
        assert got == [*expected, (0, f"t{i}\n".encode(), b""), (143, b"", b"")]
    assert forks == []


def test_container_outlives_the_thread_that_started_it(sandbox: Sandbox) -> None:
    """A container started from a short-lived thread keeps running after that thread exits."""
    box: list[Container] = []
    t = threading.Thread(target=lambda: box.append(sandbox.start(["sleep", "100"])), name="short-lived")
    t.start()
    t.join()
    (c,) = box
    time.sleep(0.3)  # a parent-death signal tied to the thread would have fired by now
    assert c.running
    assert _alive(c.pid)
    assert _alive(c.init_pid)
    assert c.exec(["echo", "alive"]).stdout == b"alive\n"
    assert c.stop(timeout=5).exit_code == 143  # it ends normally, by our hand


_SHORT_LIVED_LAUNCHER = textwrap.dedent(
    """
    import json, os, sys, threading, time

    def no_fork():
        raise AssertionError("the pytest-side process called os.fork()")

    os.fork = no_fork
    from pytest_sandbox import Sandbox
    from pytest_sandbox.runtime import get_runtime

    sb = Sandbox()
    box = []
    # The launcher is started lazily by the first start(): here from a thread that then exits.
    t = threading.Thread(target=lambda: box.append(sb.start(["sleep", "100"])))
    t.start()
    t.join()
    time.sleep(0.5)
    c = box[0]
    rt = get_runtime()
    launcher = rt.client.pid
    report = {
        "launcher": launcher,
        "launcher_alive": os.path.exists(f"/proc/{launcher}/status"),
        "running": c.running,
        "exec": c.exec(["echo", "alive"]).stdout.decode(),
        "state_dir": rt.state_dir,
    }
    report["exit"] = c.stop(timeout=5).exit_code
    sb.close()
    print(json.dumps(report))
    """
)


def test_launcher_started_from_a_short_lived_thread(tmp_path: Path) -> None:
    """In a fresh process, a launcher and a container started from a thread that exits stay up.

    The launcher must not tie its life to the *thread* that spawned it (PR_SET_PDEATHSIG would);
    it still goes away, with everything, when that process exits.
    """
    script = tmp_path / "child.py"
    script.write_text(_SHORT_LIVED_LAUNCHER)
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, timeout=120, env=env, check=False
    )
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    report = json.loads(proc.stdout.decode().splitlines()[-1])
    assert report["launcher_alive"] is True
    assert report["running"] is True
    assert report["exec"] == "alive\n"
    assert report["exit"] == 143
    # The child process exited: its launcher and state directory are gone.
    deadline = time.monotonic() + 10
    while _alive(report["launcher"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(report["launcher"])
    assert not os.path.exists(report["state_dir"])


def test_concurrent_stop_kill_exec_on_one_container(sandbox: Sandbox) -> None:
    """8 threads racing stop/kill/exec on one container: one consistent end, the exit recorded.

    The command ignores SIGTERM, so only the SIGKILLs (kill() and stop()'s escalation) end it.
    """
    c = sandbox.start(["sh", "-c", "trap '' TERM; echo READY; while :; do sleep 0.05; done"])
    c.wait_for_log(b"READY", timeout=10)

    def op(i: int) -> object:
        try:
            kind = i % 4
            if kind == 0:
                return c.stop(timeout=0.5)
            if kind == 1:
                c.kill()
                return "killed"
            if kind == 2:
                c.kill("TERM")
                return "termed"
            return c.exec(["sleep", "0.2"])
        except ContainerNotRunningError:
            return "not running"
        except SetupError as e:
            # An exec racing the container's death: see test_exec_racing_container_death_is_not_running.
            return "exec setup failed" if i % 4 == 3 else e

    outcomes = _in_threads(8, op)
    final = c.result
    assert isinstance(final, Result)
    assert (final.exit_code, final.signal) == (137, signal.SIGKILL)
    assert not c.running
    assert c.wait() is final
    for i, out in enumerate(outcomes):
        if i % 4 == 0:
            assert out is final, "every stop() returns the one recorded result"
        elif i % 4 in (1, 2):
            assert out in ("killed", "termed", "not running")
        elif isinstance(out, Result):
            assert out.exit_code in (0, 137)
        else:
            assert out in ("not running", "exec setup failed")
    with pytest.raises(ContainerNotRunningError):
        c.exec(["true"])
    with pytest.raises(ContainerNotRunningError):
        c.kill()
    assert not _alive(c.pid)
    assert not _alive(c.init_pid)


def test_exec_racing_container_death_is_not_running(sandbox: Sandbox) -> None:
    """exec right after kill(): either it ran (a Result) or ContainerNotRunningError -- never a SetupError.

    A setup error names a problem of the user's command or host; here the only problem is that
    the container was going away, and "Cannot allocate memory" (fork in a PID namespace whose init
    is gone) sends users looking for a memory problem that does not exist.
    """
    failures = []
    for _ in range(10):
        c = sandbox.start(["sleep", "100"])
        c.kill()
        try:
            c.exec(["true"])
        except ContainerNotRunningError:
            pass
        except SetupError as e:
            failures.append(str(e))
        c.remove()
    assert failures == []


def test_pytest_process_never_forks(
    sandbox: Sandbox, forks: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With os.fork() made to fail in this process, containers still start, exec and stop from threads.

    Only the launcher (a separate, single-threaded process) forks.
    """

    def no_fork() -> NoReturn:
        raise AssertionError("pytest_sandbox called os.fork() in the pytest process")

    monkeypatch.setattr(os, "fork", no_fork)

    def work(i: int) -> tuple[bytes, bytes, int]:
        r = sandbox.run(["echo", f"run{i}"])
        c = sandbox.start(["sleep", "100"])
        out = c.exec(["echo", f"exec{i}"]).stdout
        return r.stdout, out, c.stop(timeout=5).exit_code

    assert _in_threads(4, work) == [(f"run{i}\n".encode(), f"exec{i}\n".encode(), 143) for i in range(4)]
    assert forks == []


def test_no_fork_warning_under_error_filter(sandbox: Sandbox, forks: list[str]) -> None:
    """Starting containers from threads raises no warning even with warnings turned into errors.

    Python >= 3.12 warns "This process is multi-threaded, use of fork() may lead to deadlocks" on
    os.fork() in a threaded process; under ``-W error::DeprecationWarning`` that would be an error.
    On every version, the at-fork hook proves no fork() happened at all.
    """
    assert threading.active_count() > 1  # at least the launcher reader thread: we are multi-threaded
    with warnings.catch_warnings():
        warnings.simplefilter("error")

        def work(i: int) -> int:
            c = sandbox.start(["sh", "-c", f"exit {i}"])
            return c.wait(10).exit_code

        assert _in_threads(4, work) == [0, 1, 2, 3]
        assert sandbox.run(["true"]).exit_code == 0
    assert forks == []


def test_launcher_is_single_threaded() -> None:
    """The process that forks containers has exactly one thread (forking from it is safe)."""
    pid = probes.launcher_pid()
    assert os.listdir(f"/proc/{pid}/task") == [str(pid)]
