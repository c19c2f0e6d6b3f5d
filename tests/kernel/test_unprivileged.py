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
    proc = _run_as_nobody(PROGRAM, [], pkg=public_dir / "pkg", state=state)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count(f"needs root to create containers (running as uid {NOBODY})") == 2
    assert "hint:" in proc.stdout
    assert os.listdir(state) == []


BUILD_PROGRAM = """
import sys
from pytest_sandbox import Image, RootRequiredError, SetupError
from pytest_sandbox.images.archive import import_image

layer, layout, archive = sys.argv[1:]
for what, call in (
    ("from_layers", lambda: Image.from_layers(layer).tag("a:1")),
    ("copy", lambda: Image.from_layers().copy(layer, "/app").tag("b:1")),
    ("oci import", lambda: import_image("oci:" + layout, "c:1")),
    ("docker-archive import", lambda: import_image("docker-archive:" + archive, "d:1")),
):
    try:
        call()
    except RootRequiredError as e:
        assert isinstance(e, SetupError) and isinstance(e, PermissionError), type(e).__mro__
        print("refused:", what, "|", e)
    else:
        sys.exit(f"{what}: stored a layer without root")
"""


def test_non_root_image_build_is_a_clear_error_and_leaves_nothing(public_dir: Path) -> None:
    """Issue 9, item 14: a build or import of root's files, run as a non-root user, is a
    RootRequiredError (a SetupError and a PermissionError) saying why it needs root and that
    rootless mode is not supported yet -- not a bare PermissionError from os.chown -- and leaves
    nothing: the store's tmp/ and layers/ stay empty.  (A layer of the user's own files needs no
    root: tests/unit/test_store_records.py stores them as an unprivileged user.)"""
    import filelock

    from pytest_sandbox import Image
    from pytest_sandbox.images.archive import export_image
    from pytest_sandbox.images.store import Store

    pkg = public_dir / "pkg"
    shutil.copytree(Path(pytest_sandbox.__file__).parent, pkg / "pytest_sandbox")
    shutil.copytree(Path(filelock.__file__).parent, pkg / "filelock")  # the store's lock files
    layer = public_dir / "layer"
    (layer / "etc").mkdir(parents=True)
    (layer / "etc" / "motd").write_text("hello\n")
    ours = Store(public_dir / "root-store")  # root's, for the archives nobody imports
    ours.tag("made:1", Image.from_layers(layer, base=None).save(store=ours).image_id or "")
    export_image("made:1", f"oci:{public_dir / 'layout'}:1", store=ours)
    export_image("made:1", f"docker-archive:{public_dir / 'image.tar'}", store=ours)
    subprocess.run(["chmod", "-R", "a+rX", str(public_dir)], check=True)
    state = public_dir / "state"
    args = [str(layer), str(public_dir / "layout"), str(public_dir / "image.tar")]
    proc = _run_as_nobody(BUILD_PROGRAM, args, pkg=pkg, state=state)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    refused = [line for line in lines if line.startswith("refused:")]
    assert len(refused) == 4, proc.stdout
    assert all(
        "needs root: stored layers keep their files' owners (container root is host uid 0), device "
        f"nodes and trusted.* attributes, which only root can set (running as uid {NOBODY})" in line
        for line in refused
    ), proc.stdout
    assert (
        proc.stdout.count("rootless mode (layers owned by a subordinate uid range) is not supported yet") == 4
    )
    store = state / "data" / "store"
    for sub in ("tmp", "layers/sha256"):
        assert not (store / sub).exists() or os.listdir(store / sub) == [], sub


def _run_as_nobody(
    program: str, args: list[str], *, pkg: Path, state: Path
) -> subprocess.CompletedProcess[str]:
    """``program`` run by the system's python3 as nobody, importing from ``pkg``, with ``state``
    (made here, owned by nobody) as its state directory, data root and home."""
    state.mkdir()
    os.chown(state, NOBODY, NOBODY)
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(pkg),
        "PYTEST_SANDBOX_STATE_DIR": str(state),
        "PYTEST_SANDBOX_DATA_ROOT": str(state / "data"),
        "HOME": str(state),
    }
    return subprocess.run(
        ["/usr/bin/python3", "-c", program, *args],
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
