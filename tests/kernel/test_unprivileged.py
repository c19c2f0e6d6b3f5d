"""Without root, pytest_sandbox says so plainly -- before creating anything -- instead of failing
somewhere inside a syscall.  The run is made as a throwaway user (nobody) in a subprocess."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import pytest_sandbox

PROGRAM = """
import sys
from pytest_sandbox import Sandbox, SetupError
for what, call in (
    ("a container", lambda: Sandbox().run(["true"])),
    ("a network", lambda: Sandbox().network()),
):
    try:
        call()
    except SetupError as e:
        print("refused:", e)
    else:
        sys.exit(f"made {what} without root")
"""
NOBODY = 65534


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory nobody can use: pytest's tmp_path is private to root."""
    path = Path(tempfile.mkdtemp(prefix="pytest-sandbox-unpriv-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def test_non_root_gets_a_clear_error(public_dir: Path) -> None:
    """A non-root caller gets a SetupError naming the requirement and what to do; nothing is made.

    The package is copied where nobody can read it and run by the system's python3 (this
    interpreter may live in root's home).
    """
    shutil.copytree(Path(pytest_sandbox.__file__).parent, public_dir / "pkg" / "pytest_sandbox")
    state = public_dir / "state"
    state.mkdir()
    os.chown(state, NOBODY, NOBODY)
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(public_dir / "pkg"),
        "PYTEST_SANDBOX_STATE_DIR": str(state),
        "PYTEST_SANDBOX_DATA_ROOT": str(state / "data"),
        "HOME": str(state),
    }
    proc = subprocess.run(
        ["/usr/bin/python3", "-c", PROGRAM],
        env=env,
        cwd="/",
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count(f"needs root to create containers (running as uid {NOBODY})") == 2
    assert "hint:" in proc.stdout
    assert os.listdir(state) == []
