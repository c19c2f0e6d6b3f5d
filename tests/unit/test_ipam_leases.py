"""Subnet pools and leases without the kernel: parsing, allocation, dead owners, many processes.

Leases go to a private directory per test (tmp_path; the real one, /run/psbx-ipam, is shared with
every session on the host), and the host's own subnets are given as a list.  Reading them from
the kernel, and the pools a session takes from ini and environment, are in tests/kernel/test_ipam.py.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pytest_sandbox.config import AddressPool, parse_address_pools
from pytest_sandbox.core.errors import InvalidSpecError, NetworkError
from pytest_sandbox.core.naming import interface_name, owner_tag
from pytest_sandbox.net.ipam import DEFAULT_POOLS, SubnetLeases, parse_subnet

Net = ipaddress.IPv4Network


def test_pools_parse_as_dockers_default_address_pools() -> None:
    assert parse_address_pools("base=10.243.0.0/16,size=24", what="x") == DEFAULT_POOLS
    two = parse_address_pools(["base=10.10.0.0/16,size=24", "base=192.168.0.0/16,size=28"], what="x")
    assert [str(p) for p in two] == ["base=10.10.0.0/16,size=24", "base=192.168.0.0/16,size=28"]


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "10.0.0.0/16",
        "base=10.0.0.0/16",
        "base=10.0.0.0/16,size=8",
        "base=10.0.0.0/16,size=30",
        "base=8.8.0.0/16,size=24",
        "base=10.0.0.1/16,size=24",
        "base=banana,size=24",
    ],
)
def test_bad_pools_are_refused_with_the_expected_form(raw: str) -> None:
    with pytest.raises(InvalidSpecError, match="sandbox_address_pools"):
        parse_address_pools(raw, what="sandbox_address_pools")


def test_subnets_parse() -> None:
    assert parse_subnet(None) is None
    assert parse_subnet("10.1.2.0/24") == Net("10.1.2.0/24")


def test_allocation_skips_leased_and_host_subnets(tmp_path: Path) -> None:
    pools = parse_address_pools("base=10.77.0.0/22,size=24", what="x")
    a, b = SubnetLeases(str(tmp_path), "psbx-1-1"), SubnetLeases(str(tmp_path), owner_tag())
    # psbx-1-1 is init's pid with a wrong start time: a dead owner, swept by the next allocation.
    first = a.allocate(pools, lambda: [])
    assert first == Net("10.77.0.0/24")
    busy = [Net("10.77.1.128/25")]  # the host uses part of the second subnet
    assert b.allocate(pools, lambda: busy) == Net("10.77.0.0/24")  # the dead owner's lease is reused
    assert b.allocate(pools, lambda: busy) == Net("10.77.2.0/24")
    assert b.allocate(pools, lambda: busy) == Net("10.77.3.0/24")
    with pytest.raises(NetworkError, match="no free subnet") as info:
        b.allocate(pools, lambda: busy)
    assert "sandbox_address_pools" in info.value.hint
    b.release(Net("10.77.2.0/24"))
    assert sorted(b.mine()) == [Net("10.77.0.0/24"), Net("10.77.3.0/24")]
    a.release(Net("10.77.0.0/24"))  # not a's any more: left alone
    assert Net("10.77.0.0/24") in b.mine()


ALLOCATE_MANY = """
import json, sys
from pathlib import Path
from pytest_sandbox.config import parse_address_pools
from pytest_sandbox.net.ipam import SubnetLeases
from pytest_sandbox.core.naming import owner_tag
directory, count, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
leases = SubnetLeases(directory, owner_tag())
pools = parse_address_pools("base=10.78.0.0/16,size=24", what="x")
Path(out + ".tmp").write_text(json.dumps([str(leases.allocate(pools, lambda: [])) for _ in range(count)]))
Path(out + ".tmp").rename(out)
sys.stdin.read()  # hold the leases (a dead owner's are free again) until the test has looked
"""


def test_concurrent_processes_get_distinct_subnets(tmp_path: Path) -> None:
    outs = [tmp_path / f"out{i}.json" for i in range(4)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", ALLOCATE_MANY, str(tmp_path), "15", str(out)], stdin=subprocess.PIPE
        )
        for out in outs
    ]
    try:
        deadline = time.monotonic() + 60
        while not all(o.exists() for o in outs) and time.monotonic() < deadline:
            time.sleep(0.02)
        got = [s for o in outs for s in json.loads(o.read_text())]
    finally:
        for p in procs:
            assert p.stdin is not None
            p.stdin.close()
            assert p.wait(60) == 0
    assert len(got) == len(set(got)) == 60
    # Their owners have exited: the next allocation sweeps all 60 leases and starts over.
    assert SubnetLeases(str(tmp_path), owner_tag()).allocate(
        parse_address_pools("base=10.78.0.0/16,size=24", what="x"), lambda: []
    ) == Net("10.78.0.0/24")
    assert len([n for n in os.listdir(tmp_path) if n.startswith("10.")]) == 1


def test_interface_names_fit_ifnamsiz() -> None:
    assert interface_name("b", 0, pid=4194304) == "psbxb2hwcgx0"
    assert len(interface_name("v", 36**4 - 1, pid=4194304)) == 15
    with pytest.raises(ValueError, match="15 bytes"):
        interface_name("v", 36**4, pid=4194304)


def test_an_empty_lease_left_by_a_crashed_writer_is_swept(tmp_path: Path) -> None:
    (tmp_path / "10.79.0.0-24").write_text("")
    pools = (AddressPool(Net("10.79.0.0/16"), 24),)
    assert SubnetLeases(str(tmp_path), owner_tag()).allocate(pools, lambda: []) == Net("10.79.0.0/24")


def test_a_lease_of_another_size_blocks_every_subnet_it_overlaps(tmp_path: Path) -> None:
    """Two sessions cutting one range differently (ini pools differ): a live /20 lease covers
    sixteen /24s, none of which may be handed out; the first free /24 is after it."""
    wide = SubnetLeases(str(tmp_path), owner_tag())  # this process: alive
    narrow = SubnetLeases(str(tmp_path), owner_tag(1))  # init: alive, another owner
    assert wide.allocate(parse_address_pools("base=10.76.0.0/16,size=20", what="x"), lambda: []) == Net(
        "10.76.0.0/20"
    )
    got = narrow.allocate(parse_address_pools("base=10.76.0.0/16,size=24", what="x"), lambda: [])
    assert got == Net("10.76.16.0/24")
    # And the other way round: a live /24 keeps the /20 that holds it from being leased.
    assert wide.allocate(parse_address_pools("base=10.76.0.0/16,size=20", what="x"), lambda: []) == Net(
        "10.76.32.0/20"
    )


def test_the_sweep_keeps_live_leases_and_takes_the_lock(tmp_path: Path) -> None:
    live = SubnetLeases(str(tmp_path), owner_tag())
    subnet = live.allocate(parse_address_pools("base=10.75.0.0/16,size=24", what="x"), lambda: [])
    (tmp_path / "10.75.9.0-24").write_text("psbx-1-1\n")  # a dead owner's
    assert SubnetLeases(str(tmp_path), owner_tag(1)).sweep() == {subnet}
    assert sorted(os.listdir(tmp_path)) == [".lock", "10.75.0.0-24"]
