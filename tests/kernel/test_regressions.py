"""Regression tests for problems a code review found; each failed before its fix."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pytest_sandbox import Image, Sandbox, SandboxTimeoutError, SetupError
from pytest_sandbox.launcher.client import make_private_dir
from tests import probes
from tests.e2e_support import ident, wait_gone


def _launcher_fds() -> int:
    pid = probes.launcher_pid_if_started()
    assert pid is not None
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_read_only_bind_is_read_only_below_its_submounts(sandbox: Sandbox, tmp_path: Path) -> None:
    """A ro bind of a directory that has a mount below it: the submount is read-only too."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "psbx-test", str(src / "sub")], check=True)
    try:
        r = sandbox.run(
            ["sh", "-c", "touch /data/top; echo $?; touch /data/sub/below; echo $?"],
            mounts={str(src): ("/data", "ro")},
        )
        assert r.stdout.split() == [b"1", b"1"], r
        assert b"Read-only file system" in r.stderr
        assert not (src / "sub" / "below").exists()
    finally:
        subprocess.run(["umount", str(src / "sub")], check=True)


def test_a_very_deep_tree_is_removed_and_the_launcher_survives(sandbox: Sandbox) -> None:
    """1,500 nested directories in the upper layer (shutil.rmtree's recursion limit was ~1,000):
    the state directory is deleted, the launcher lives on and its log records no error."""
    launcher = probes.launcher_pid_if_started()
    deep = "i=0; while [ $i -lt 1500 ]; do mkdir d && cd d || exit 1; i=$((i+1)); done; touch leaf"
    r = sandbox.run(["sh", "-c", deep])
    assert r.exit_code == 0, r
    sandbox.close()  # waits for the removal
    assert probes.launcher_pid_if_started() == launcher
    assert os.listdir(probes.state_dir()) == ["launcher.log"]
    with open(probes.launcher_log_path()) as f:
        assert "cannot remove" not in f.read()


def test_failed_starts_leak_no_launcher_fds(tmp_path: Path) -> None:
    """Starts that fail inside the container's setup (an image whose /proc is a symlink) close
    every fd the launcher opened for them: its fd count ends where it started (before the fix,
    one more per failure)."""
    layer = tmp_path / "bad"
    layer.mkdir()
    (layer / "proc").symlink_to("/tmp")
    image = Image.from_layers(layer, base=None)

    def fail() -> None:
        with Sandbox() as sb, pytest.raises(SetupError):  # close() waits until the removal is done
            sb.run(["true"], image=image)

    fail()
    before = _launcher_fds()
    for _ in range(25):
        fail()
    assert _launcher_fds() == before


def test_timeout_during_setup_is_a_timeout(sandbox: Sandbox) -> None:
    """run(timeout=) that fires before the command even started raises SandboxTimeoutError (the
    caller's time limit), not a SetupError about a setup process that died."""
    for _ in range(5):
        with pytest.raises(SandboxTimeoutError):
            sandbox.run(["sleep", "5"], timeout=0.0005)


def test_a_state_dir_made_by_another_user_is_refused(tmp_path: Path) -> None:
    """The state directory's name is predictable in a world-writable directory: one that exists
    and is not ours and private is refused, not used."""
    mine = tmp_path / "psbx-1-1"
    make_private_dir(str(mine))
    make_private_dir(str(mine))  # ours, private: accepted again (a restarted launcher)
    theirs = tmp_path / "psbx-2-2"
    theirs.mkdir(mode=0o777)
    os.chown(theirs, 65534, 65534)
    with pytest.raises(SetupError, match="is not a private directory"):
        make_private_dir(str(theirs))


FORK_CHILD = textwrap.dedent(
    """
    import os, sys, time
    from pytest_sandbox import Sandbox
    from pytest_sandbox.runtime import get_runtime
    c = Sandbox().start(["sleep", "100"])
    print(get_runtime().client.pid, c.init_pid, flush=True)
    if os.fork() == 0:
        time.sleep(30)  # a forked child (multiprocessing, a test) that outlives us
        os._exit(0)
    time.sleep(100)
    """
)


def test_a_forked_child_does_not_keep_the_launcher_alive(tmp_path: Path) -> None:
    """pytest SIGKILLed while a child it forked still runs: the launcher sees EOF anyway (the
    child closed its copy of the socket at fork) and takes the container down."""
    proc = subprocess.Popen(
        [sys.executable, "-c", FORK_CHILD],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTEST_SANDBOX_STATE_DIR": str(tmp_path)},
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        launcher, init = (int(x) for x in proc.stdout.readline().split())
        procs = {p for p in (ident(launcher), ident(init)) if p is not None}
        assert len(procs) == 2
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        left, _ = wait_gone(procs, 5.0)
        assert not left, f"still alive after pytest's SIGKILL: {left}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the forked grandchild, in the same session
