"""sandbox.network() without pyroute2: a NetworkError in the caller's thread that says what to install.

pyroute2 is a dependency, but an environment may lack it (a broken install, a vendored copy):
the first import must not happen on psbx-net, where a ModuleNotFoundError would kill the thread.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

CHILD = """
import sys, threading

class BlockPyroute2:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "pyroute2":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, BlockPyroute2())
from pytest_sandbox import NetworkError, Sandbox

with Sandbox() as sb:
    try:
        sb.network()
    except NetworkError as e:
        print("NetworkError in", threading.current_thread().name)
        print(e)
    print("threads:", sorted(t.name for t in threading.enumerate()))
    print("containers still run:", sb.run(["true"]).exit_code)
"""


def test_network_without_pyroute2_is_a_clear_network_error(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["PYTEST_SANDBOX_STATE_DIR"] = str(tmp_path)
    r = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120, env=env, check=False
    )
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "NetworkError in MainThread"
    assert "need the pyroute2 package" in lines[1]
    assert "No module named 'pyroute2'" in lines[1]
    assert "hint: pip install pyroute2" in r.stdout
    assert "psbx-net" not in r.stdout  # the network thread was never started
    assert "containers still run: 0" in r.stdout
    assert "Traceback" not in r.stderr
