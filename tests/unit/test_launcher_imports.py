"""The launcher runs with ``python -I -S`` from this package alone: stdlib and its own modules only.

It runs as root and forks every container: pytest, pluggy, filelock and pyroute2 must not be in
it (nor be importable by accident from the environment: ``-I`` ignores PYTHONPATH, ``-S`` the
site-packages).  Possible because ``import pytest_sandbox`` imports nothing (PEP 562).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from pytest_sandbox.launcher.client import PACKAGE_PARENT, launcher_argv

THIRD_PARTY = ("pytest", "_pytest", "pluggy", "filelock", "pyroute2")


def test_the_launcher_is_started_isolated_from_the_package_parent_only() -> None:
    argv = launcher_argv()
    assert argv[:3] == [sys.executable, "-I", "-S"]
    assert argv[-1] == PACKAGE_PARENT
    assert "types.ModuleType" not in " ".join(argv)  # no fake parent package any more


def test_the_launcher_imports_only_the_standard_library_and_its_own_modules() -> None:
    """Its entry code, as it runs, with the server imported: then what sys.modules holds."""
    argv = launcher_argv()
    code = argv[4].replace(
        "from pytest_sandbox.launcher.server import main; main(sys.argv[1:])",
        "import pytest_sandbox.launcher.server; print(sys.path[-1]); print(' '.join(sorted(sys.modules)))",
    )
    assert code != argv[4]
    out = subprocess.run(
        [*argv[:4], code, argv[5]], capture_output=True, text=True, check=True, timeout=60
    ).stdout.splitlines()
    assert out[0] == PACKAGE_PARENT
    modules = set(out[1].split())
    assert "pytest_sandbox.launcher.server" in modules
    assert not {m for m in modules if m.split(".")[0] in THIRD_PARTY}
    assert not {m for m in modules if m.startswith(("pytest_sandbox.images", "pytest_sandbox.net"))}
    assert "site" not in modules  # -S


def test_a_stdlib_name_next_to_the_package_does_not_shadow_the_standard_library(tmp_path: Path) -> None:
    """The package's parent is often site-packages: a ``json.py`` there (a stray file, an old
    backport) must not be what the root-run launcher imports as ``json``."""
    (tmp_path / "pytest_sandbox").symlink_to(os.path.join(PACKAGE_PARENT, "pytest_sandbox"))
    (tmp_path / "json.py").write_text("raise SystemExit('the launcher imported a shadowing json.py')\n")
    argv = launcher_argv()
    code = argv[4].replace(
        "from pytest_sandbox.launcher.server import main; main(sys.argv[1:])",
        "import pytest_sandbox.launcher.server, json; print(json.__file__)",
    )
    r = subprocess.run(
        [*argv[:4], code, str(tmp_path)], check=False, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert not r.stdout.strip().startswith(str(tmp_path))
