"""Threads and xdist are safe: parallel sessions pass and leave nothing behind.

``test_xdist_session_*`` runs ``pytest -n 2`` in a child process over a generated module of 20
tests that start containers with limits (through the fixture, the marker, threads, exec and
stop).  Every generated test records its worker's pid, owner tag, launcher pid and the host pids of
its containers; after the run the host is checked for each of them.  Plain subprocess rather than
``pytester``: the run needs a private state directory (env) so that what is found afterwards can
only be this run's.  The thread tests run in-process.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pytest_sandbox import Container, Result, Sandbox
from tests.e2e_support import (
    CHILD_REPORT,
    Proc,
    child_env,
    owner_cgroup_dirs,
    pytest_argv,
    state_dirs,
    wait_gone,
    write_child_project,
)

N_TESTS = 20

XDIST_MODULE = (
    CHILD_REPORT
    + '''
import threading
import pytest
from pytest_sandbox.core.naming import process_start_time
from pytest_sandbox.runtime import get_runtime

REPORTS = os.environ["PSBX_REPORTS"]


def record(request, *containers):
    """This test's worker, launcher and container processes, as (pid, start time) pairs."""
    rt = get_runtime()
    pids = [os.getpid(), rt.client.pid] + [p for c in containers for p in (c.pid, c.init_pid)]
    name = request.node.name.replace("/", "_")
    report(os.path.join(REPORTS, name + ".json"), worker=os.getpid(), owner=rt.owner,
           procs=[[p, process_start_time(p)] for p in pids])


@pytest.mark.parametrize("i", range(NRUN))
def test_run_with_limits(sandbox, request, i):
    r = sandbox.run(["sh", "-c", "echo $((6 * 7)); hostname"],
                    memory="64m", cpus=0.5, pids=32, hostname=f"box{i}")
    assert r.exit_code == 0 and r.stdout.split()[0] == b"42" and r.stdout.split()[-1] == f"box{i}".encode()
    record(request)


@pytest.mark.parametrize("i", range(NSTART))
@pytest.mark.sandbox(memory="32m", pids=16)
def test_start_exec_stop(sandbox, request, i):
    c = sandbox.start(["sh", "-c", "sleep 1000 & echo up; exec sleep 1000"])
    c.wait_for_log(b"up")
    limits = c.cgroup_limits()
    assert limits.get("pids.max") == "16"
    assert c.exec(["sh", "-c", "echo $$"]).exit_code == 0
    record(request, c)
    assert c.stop(timeout=1).signal is not None


def test_oom_under_xdist(sandbox, request):
    r = sandbox.run(["python3", "-c", "x = b'x' * (100 << 20)"], memory="32m")
    assert r.oom_killed and r.exit_code == 137
    record(request)


def test_threads(sandbox, request):
    results, containers = [], []
    lock = threading.Lock()

    def work(n):
        c = sandbox.start(["sleep", "1000"], pids=8)
        r = sandbox.run(["echo", str(n)], memory="32m")
        with lock:
            results.append(r.stdout)
            containers.append(c)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [b"0\\n", b"1\\n", b"2\\n", b"3\\n"]
    assert all(c.running for c in containers)  # their starting threads are gone; they are not
    record(request, *containers)
'''
)


def _procs(entries: list[dict[str, Any]]) -> set[Proc]:
    """Every (pid, start time) the child's tests recorded: workers, launchers, containers."""
    out: set[Proc] = set()
    for e in entries:
        out |= {(int(pid), int(start)) for pid, start in e["procs"] if start is not None}
    return out


def test_xdist_session_with_limits_passes_and_leaves_nothing(tmp_path: Path) -> None:
    """pytest -n 2 over 20 container tests with limits: all pass, both workers ran containers, and
    afterwards no worker, launcher or container process, cgroup group or state dir remains."""
    n_run, n_start = 10, 8
    project, state, reports = tmp_path / "child", tmp_path / "state", tmp_path / "reports"
    state.mkdir()
    reports.mkdir()
    module = XDIST_MODULE.replace("NRUN", str(n_run)).replace("NSTART", str(n_start))
    write_child_project(project, {"test_parallel.py": module})
    t0 = time.monotonic()
    proc = subprocess.run(
        pytest_argv("-q", "-n", "2", "test_parallel.py"),
        cwd=project,
        env=child_env(state, {"PSBX_REPORTS": str(reports)}),
        capture_output=True,
        timeout=180,
        check=False,
    )
    took = time.monotonic() - t0
    output = proc.stdout.decode() + proc.stderr.decode()
    expected = n_run + n_start + 2
    assert expected == N_TESTS
    assert proc.returncode == 0, output
    assert f"{expected} passed" in output, output
    entries = [json.loads(p.read_text()) for p in sorted(reports.glob("*.json"))]
    assert len(entries) == expected
    owners = {str(e["owner"]) for e in entries}
    workers = {int(e["worker"]) for e in entries}
    print(f"xdist child run: {expected} tests on {len(workers)} workers in {took:.2f} s")
    assert len(workers) == 2, "both xdist workers should have run containers"
    assert len(owners) == 2
    procs = _procs(entries)
    # 2 workers + 2 launchers + a command and an init per started container (some may have been
    # caught between two states under load: only a floor is asserted; what matters is below).
    assert len(procs) >= 4 + n_start, f"the child's processes were not recorded: {sorted(procs)}"
    # The run is over: every process it had is gone, its cgroups and state directories too.
    left, _ = wait_gone(procs, 5.0)
    assert not left, f"processes of the xdist run survived it: {sorted(left)}"
    for owner in owners:
        assert not owner_cgroup_dirs(owner), f"cgroup groups left by {owner}: {owner_cgroup_dirs(owner)}"
    assert not state_dirs(state), f"state directories left: {state_dirs(state)}"


def test_threads_start_and_run_containers_concurrently(sandbox: Sandbox) -> None:
    """8 threads x 3 containers each through one handle: all succeed with their own output."""

    def work(n: int) -> list[Result]:
        return [sandbox.run(["echo", f"{n}-{k}"], memory="32m", pids=8) for k in range(3)]

    with ThreadPoolExecutor(8) as pool:
        results = [r for rs in pool.map(work, range(8)) for r in rs]
    expected = sorted(f"{n}-{k}\n".encode() for n in range(8) for k in range(3))
    assert sorted(r.stdout for r in results) == expected
    assert all(r.exit_code == 0 and r.memory_peak for r in results)


def test_container_outlives_the_thread_that_started_it(sandbox: Sandbox) -> None:
    """PDEATHSIG pitfall: a container started from a short-lived thread keeps running after it."""
    started: list[Container] = []
    t = threading.Thread(target=lambda: started.append(sandbox.start(["sleep", "1000"], pids=8)))
    t.start()
    t.join()
    (c,) = started
    time.sleep(0.3)
    assert c.running
    assert c.exec(["true"]).exit_code == 0
