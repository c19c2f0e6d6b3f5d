"""Subnet pools and leases: parsing, skipping the host's subnets, dead owners, many processes at once.

Leases go to a private directory per test (the real one, /run/psbx-ipam, is shared with every
session on the host).  ``host_networks`` is read from this host's real interfaces and routes.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
from pathlib import Path

from pytest_sandbox.net.netlink import host_networks
from tests import probes

Net = ipaddress.IPv4Network


def test_the_hosts_own_networks_are_read_from_the_kernel() -> None:
    nets = host_networks(probes.netlink())
    assert Net("127.0.0.0/8") in nets  # lo's address


def test_the_pool_comes_from_the_ini_and_the_environment(tmp_path: Path) -> None:
    """ini ``sandbox_address_pools`` and ``$PYTEST_SANDBOX_ADDRESS_POOLS`` set the pools a session uses."""
    (tmp_path / "test_pool.py").write_text(
        "import os\n"
        "def test_pool(sandbox):\n    assert str(sandbox.network().subnet) == os.environ['EXPECT']\n"
    )

    def session(ini: str, **env: str) -> subprocess.CompletedProcess[str]:
        (tmp_path / "pytest.ini").write_text(f"[pytest]\n{ini}\n")
        full = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_SANDBOX_")}
        full.update(PYTEST_SANDBOX_STATE_DIR=str(tmp_path), **env)
        argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
        return subprocess.run(
            argv, cwd=tmp_path, env=full, capture_output=True, check=False, text=True, timeout=120
        )

    r = session("sandbox_address_pools = base=10.81.0.0/16,size=26", EXPECT="10.81.0.0/26")
    assert r.returncode == 0, r.stdout + r.stderr
    r = session("", PYTEST_SANDBOX_ADDRESS_POOLS="base=10.82.0.0/16,size=27", EXPECT="10.82.0.0/27")
    assert r.returncode == 0, r.stdout + r.stderr
    r = session("sandbox_address_pools = nonsense", EXPECT="")
    assert r.returncode != 0
    assert "sandbox_address_pools: 'nonsense'" in r.stdout + r.stderr
