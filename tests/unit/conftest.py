"""The unit tier: pure tests -- no root, no kernel namespaces, no launcher.

CI runs this tier as an unprivileged user (.ci/run); it needs nothing but pytest and the package
under test (the kernel tiers' leak check and busybox fixtures are not imported here).  A test may
use files in its own ``tmp_path`` and short-lived child processes of its own.

``no_launcher`` (autouse) fails a unit test that leaves a child process running -- above all a
launcher, which pytest_sandbox starts on first use and keeps for the whole session (so it would
also escape the leak check, which the kernel tier has and this tier has not).  Such a test
belongs in tests/kernel.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest


def _children() -> dict[int, str]:
    """This process's live children (any thread's), pid -> name, read from /proc."""
    pids: set[int] = set()
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError), open(f"/proc/self/task/{tid}/children") as f:
            pids.update(int(p) for p in f.read().split())
    names: dict[int, str] = {}
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/comm") as f:
            names[pid] = f.read().strip()
    return names


@pytest.fixture(autouse=True)
def no_launcher() -> Iterator[None]:
    before = _children()
    yield
    started = {pid: name for pid, name in _children().items() if pid not in before}
    if started:
        shown = ", ".join(f"{pid} ({name})" for pid, name in sorted(started.items()))
        pytest.fail(
            f"a unit test left processes running: {shown}.  Unit tests start no launcher and leave "
            "no process behind; a test that needs containers belongs in tests/kernel.",
            pytrace=False,
        )
