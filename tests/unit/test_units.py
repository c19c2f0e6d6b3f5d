"""The pure parsers of the values users type: sizes, CPU counts, cpusets, signals, and Limits.parse.

No kernel, no containers: each test pins one documented semantic (Docker/go-units compatible sizes,
podman's signal wording, "no swap" by default, minimum memory and pids, 0 is never "unlimited")
so a change to it fails here first.
"""

from __future__ import annotations

import math
import signal

import pytest

from pytest_sandbox.core.errors import InvalidSignalError, InvalidSpecError
from pytest_sandbox.core.limits import (
    CPU_PERIOD_US,
    MAX_CPU_SHARES,
    MIN_CPU_SHARES,
    MIN_MEMORY,
    MIN_PIDS,
    UNLIMITED,
    Limits,
)
from pytest_sandbox.core.units import (
    format_cpu_list,
    format_size,
    online_cpus,
    parse_cpu_list,
    parse_cpus,
    parse_cpuset,
    parse_signal,
    parse_size,
)

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

# ------------------------------------------------------------------------------------------ sizes


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("40m", 40 * MiB),
        ("40M", 40 * MiB),
        ("40MB", 40 * MiB),
        ("40mib", 40 * MiB),
        ("40MiB", 40 * MiB),
        ("1.5g", 3 * GiB // 2),
        ("1.5GiB", 3 * GiB // 2),
        ("41943040", 41943040),
        (41943040, 41943040),
        ("512k", 512 * KiB),
        ("1kb", KiB),
        ("0.5k", 512),
        ("1b", 1),
        ("2t", 2 << 40),
        ("1p", 1 << 50),
        ("64 m", 64 * MiB),
        (" 64m ", 64 * MiB),
        ("0", 0),
        (0, 0),
    ],
)
def test_parse_size_valid(text: object, expected: int) -> None:
    """Docker-compatible sizes: binary units, case-insensitive, optional b/ib suffix, decimals."""
    assert parse_size(text, what="memory") == expected


@pytest.mark.parametrize(
    "bad",
    [
        "abc",
        "10asdfg",
        "-1",
        "1.2.3m",
        "",
        "1e9",
        "m",
        ".5m",
        "1.m",
        "5ib",
        "10 mm",
        "1,5g",
        "0x10",
        -1,
        1.5,
        math.nan,
        None,
        True,
        b"64m",
        [64],
    ],
)
def test_parse_size_invalid(bad: object) -> None:
    """Malformed sizes raise InvalidSpecError (a ValueError) that quotes the value and names the option."""
    with pytest.raises(InvalidSpecError) as e:
        parse_size(bad, what="memory")
    assert isinstance(e.value, ValueError)
    assert f"memory={bad!r}" in str(e.value)


@pytest.mark.parametrize("bad", ["99999999p", "4096p", str(1 << 62), 1 << 62, 10**30])
def test_parse_size_overflow(bad: object) -> None:
    """Sizes that overflow the kernel's 64-bit counters are refused, as strings or ints."""
    with pytest.raises(InvalidSpecError, match="too large"):
        parse_size(bad, what="memory")


def test_parse_size_error_shows_accepted_forms() -> None:
    """The message tells the user what would have worked."""
    with pytest.raises(InvalidSpecError, match=r"'64m'.*'1\.5g'"):
        parse_size("lots", what="memory")
    with pytest.raises(InvalidSpecError, match="needs a unit"):
        parse_size("5ib", what="memory")


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0"),
        (1, "1"),
        (1536, "1536"),
        (KiB, "1k"),
        (64 * MiB, "64m"),
        (3 * MiB, "3m"),
        (GiB, "1g"),
        (5 << 40, "5t"),
        (1 << 50, "1p"),
        (MiB + 1, "1048577"),
    ],
)
def test_format_size(n: int, text: str) -> None:
    """format_size gives the shortest exact form, which parses back to the same number."""
    assert format_size(n) == text
    assert parse_size(text, what="x") == n


# ------------------------------------------------------------------------------------------- cpus


@pytest.mark.parametrize(("value", "expected"), [(0.5, 0.5), (1, 1.0), ("1.5", 1.5), (0.01, 0.01), (4, 4.0)])
def test_parse_cpus_valid(value: object, expected: float) -> None:
    """A CPU count from 0.01 up to the online CPUs, as int, float or numeric string."""
    assert parse_cpus(value, online=4) == expected


@pytest.mark.parametrize("bad", [0, -1, 0.001, 5, 1000, "x", "", math.nan, math.inf, True, None, [1]])
def test_parse_cpus_invalid(bad: object) -> None:
    """Zero, negative, NaN, infinite, non-numeric or more than online CPUs: refused, value quoted."""
    with pytest.raises(InvalidSpecError) as e:
        parse_cpus(bad, online=4)
    assert f"cpus={bad!r}" in str(e.value)


def test_parse_cpus_range_message() -> None:
    """Docker's wording: the range and how many CPUs the host has."""
    with pytest.raises(InvalidSpecError, match=r"from 0\.01 to 2\.00, as there are only 2 CPUs"):
        parse_cpus(3, online=2)


def test_online_cpus_matches_the_kernel() -> None:
    """online_cpus reads the kernel's list; it is non-empty and includes CPU 0 on this host."""
    cpus = online_cpus()
    with open("/sys/devices/system/cpu/online") as f:
        assert cpus == parse_cpu_list(f.read().strip(), what="online")
    assert 0 in cpus


# ---------------------------------------------------------------------------------------- cpusets


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", {0}),
        ("0-1", {0, 1}),
        ("0-1,3", {0, 1, 3}),
        (" 0 , 2-3 ", {0, 2, 3}),
        ("3-3", {3}),
        ("1,1,0-1", {0, 1}),
        ("0-7", set(range(8))),
    ],
)
def test_parse_cpu_list_valid(text: str, expected: set[int]) -> None:
    """The kernel's list format: numbers and inclusive ranges, comma separated."""
    assert parse_cpu_list(text, what="cpuset") == expected


@pytest.mark.parametrize("bad", ["", "a", "1-0", "0-", "-1", "0,,1", "1:2", "0-1-2", "1.5"])
def test_parse_cpu_list_invalid(bad: str) -> None:
    """Malformed lists and reversed ranges are refused, quoting the whole value."""
    with pytest.raises(InvalidSpecError) as e:
        parse_cpu_list(bad, what="cpuset")
    assert f"cpuset={bad!r}" in str(e.value)


def test_parse_cpu_list_reversed_range_named() -> None:
    """A reversed range is called reversed, naming the part."""
    with pytest.raises(InvalidSpecError, match=r"range '3-1' is reversed"):
        parse_cpu_list("0,3-1", what="cpuset")


@pytest.mark.parametrize(
    ("cpus", "text"),
    [(set(), ""), ({5}, "5"), ({0, 1, 3}, "0-1,3"), ({0, 1, 2, 3}, "0-3"), ({0, 2, 4}, "0,2,4")],
)
def test_format_cpu_list(cpus: set[int], text: str) -> None:
    """Sets of CPUs print in the kernel's compact list format and parse back."""
    assert format_cpu_list(cpus) == text
    if cpus:
        assert parse_cpu_list(text, what="x") == cpus


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0-1", "0-1"),
        ("1,0", "0-1"),
        ("0,1,3", "0-1,3"),
        (2, "2"),
        ([3, 1, 0], "0-1,3"),
        ((0,), "0"),
        (range(0, 2), "0-1"),
        (frozenset({1, 2}), "1-2"),
    ],
)
def test_parse_cpuset_normalises(value: object, expected: str) -> None:
    """cpuset= accepts a list string, an int or an iterable of ints, normalised to the kernel format."""
    assert parse_cpuset(value, online={0, 1, 2, 3}) == expected


@pytest.mark.parametrize("bad", ["99", "1-0", "", [], True, [True], ["0"], 1.0, None, "4"])
def test_parse_cpuset_invalid(bad: object) -> None:
    """Offline CPUs, empty sets, reversed ranges and wrong types are refused, quoting the value."""
    with pytest.raises(InvalidSpecError) as e:
        parse_cpuset(bad, online={0, 1, 2, 3})
    assert f"cpuset={bad!r}" in str(e.value)


def test_parse_cpuset_offline_cpu_message() -> None:
    """Naming an offline CPU says which one and what the host has."""
    with pytest.raises(InvalidSpecError, match=r"CPU 6-7,9 is not online; this host has 0-3"):
        parse_cpuset("0,6-7,9", online={0, 1, 2, 3})


# ---------------------------------------------------------------------------------------- signals


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (15, 15),
        (signal.SIGTERM, 15),
        ("15", 15),
        (" 15 ", 15),
        ("TERM", 15),
        ("SIGTERM", 15),
        ("sigterm", 15),
        ("term", 15),
        ("KILL", 9),
        ("SIGHUP", 1),
        ("SIGUSR1", signal.SIGUSR1),
        ("SIGIOT", signal.SIGABRT),
        ("SIGRTMIN", signal.SIGRTMIN),
        ("SIGRTMIN+1", signal.SIGRTMIN + 1),
        ("rtmin+2", signal.SIGRTMIN + 2),
        ("SIGRTMAX", 64),
        (1, 1),
        (64, 64),
    ],
)
def test_parse_signal_valid(value: object, expected: int) -> None:
    """Numbers, numeric strings and names with or without SIG, any case, including real-time ones."""
    assert parse_signal(value) == expected


@pytest.mark.parametrize("bad", [0, 65, -1, 1000, "0", "65"])
def test_parse_signal_out_of_range(bad: object) -> None:
    """Out-of-range numbers get podman's 'valid signals are 1 through 64' wording."""
    with pytest.raises(InvalidSignalError) as e:
        parse_signal(bad)
    assert isinstance(e.value, InvalidSpecError)
    assert isinstance(e.value, ValueError)
    assert str(e.value) == f"invalid signal {bad!r}: valid signals are 1 through 64"


@pytest.mark.parametrize(
    "bad",
    [
        "SIGBAD",
        "",
        "SIG",
        "BAD",
        "KILL 9",
        "SIG-TERM",
        "+15",
        "1.5",
        "SIGRTMIN+x",
        True,
        False,
        1.5,
        None,
        b"TERM",
        [15],
    ],
)
def test_parse_signal_unknown(bad: object) -> None:
    """Unknown names and wrong types: 'invalid signal: <value>' (podman's wording), a ValueError."""
    with pytest.raises(InvalidSignalError) as e:
        parse_signal(bad)
    assert str(e.value) == f"invalid signal: {bad!r}"


def test_parse_signal_realtime_overflow() -> None:
    """SIGRTMIN+N beyond 64 is out of range, not wrapped around."""
    with pytest.raises(InvalidSignalError, match="valid signals are 1 through 64"):
        parse_signal("SIGRTMIN+40")


# ----------------------------------------------------------------------------------- Limits.parse


def test_limits_default_is_unlimited() -> None:
    """No arguments: no limit of any kind, and no controller needed."""
    limits = Limits.parse()
    assert limits == Limits()
    assert limits.is_empty()
    assert limits.controllers() == []
    assert limits.cpus is None


def test_memory_limit_turns_swap_off_by_default() -> None:
    """memory= alone sets memory_swap == memory: no swap, so an OOM is deterministic (unlike Docker)."""
    limits = Limits.parse(memory="64m")
    assert limits.memory == 64 * MiB
    assert limits.memory_swap == 64 * MiB
    assert limits.controllers() == ["memory"]


@pytest.mark.parametrize(
    ("swap", "expected"),
    [(-1, UNLIMITED), ("-1", UNLIMITED), ("128m", 128 * MiB), ("64m", 64 * MiB), (128 * MiB, 128 * MiB)],
)
def test_memory_swap_semantics(swap: object, expected: int) -> None:
    """memory_swap is Docker's total of memory + swap; -1 means unlimited swap."""
    assert Limits.parse(memory="64m", memory_swap=swap).memory_swap == expected


def test_memory_swap_below_memory_refused() -> None:
    """memory_swap smaller than memory makes no sense (it includes memory): refused, both quoted."""
    with pytest.raises(InvalidSpecError, match=r"memory_swap='32m': must be at least memory='64m'"):
        Limits.parse(memory="64m", memory_swap="32m")
    with pytest.raises(InvalidSpecError, match=r"memory_swap=0"):
        Limits.parse(memory="64m", memory_swap=0)


def test_memory_swap_needs_memory() -> None:
    """memory_swap without memory is refused (there is nothing to add swap to)."""
    with pytest.raises(InvalidSpecError, match=r"memory_swap='1g': set memory too"):
        Limits.parse(memory_swap="1g")


def test_memory_minimum() -> None:
    """The minimum memory limit is 6 MiB (Docker's); one byte less is refused with the reason."""
    assert 6 * MiB == MIN_MEMORY
    assert Limits.parse(memory="6m").memory == MIN_MEMORY
    assert Limits.parse(memory=MIN_MEMORY).memory == MIN_MEMORY
    for bad in ("1m", MIN_MEMORY - 1, "5.9m", "4096k"):
        with pytest.raises(InvalidSpecError) as e:
            Limits.parse(memory=bad)
        assert f"memory={bad!r}: minimum memory limit allowed is 6m" in str(e.value)


def test_memory_zero_is_not_unlimited() -> None:
    """memory=0 is an error, not podman's silent 'no limit'."""
    for zero in (0, "0", "0m"):
        with pytest.raises(InvalidSpecError, match="0 is not a limit; leave memory unset"):
            Limits.parse(memory=zero)


@pytest.mark.parametrize("bad", ["64q", "abc", "", -1, "-1", 1.5, True])
def test_memory_invalid(bad: object) -> None:
    """Malformed memory values are refused, quoted."""
    with pytest.raises(InvalidSpecError) as e:
        Limits.parse(memory=bad)
    assert f"memory={bad!r}" in str(e.value)


@pytest.mark.parametrize(
    ("cpus", "quota"), [(0.5, 50_000), (1, 100_000), ("0.25", 25_000), (0.01, 1000), (0.011, 1100)]
)
def test_cpus_become_a_cfs_quota(cpus: object, quota: int) -> None:
    """cpus=N is a quota of N periods per 100 ms period (at least 1 ms, the kernel's minimum)."""
    limits = Limits.parse(cpus=cpus)
    assert limits.cpu_quota_us == quota
    assert limits.cpu_period_us == CPU_PERIOD_US == 100_000
    assert limits.cpus == pytest.approx(float(cpus))  # type: ignore[arg-type]
    assert limits.controllers() == ["cpu"]


@pytest.mark.parametrize("bad", [0, -1, "x", 1000, math.nan])
def test_cpus_invalid(bad: object) -> None:
    """cpus=0 is not unlimited; negative, non-numeric or more than the host has: refused, quoted."""
    with pytest.raises(InvalidSpecError) as e:
        Limits.parse(cpus=bad)
    assert f"cpus={bad!r}" in str(e.value)


def test_cpus_up_to_online_count() -> None:
    """Exactly the number of online CPUs is allowed; one more is not."""
    n = len(online_cpus())
    assert Limits.parse(cpus=n).cpu_quota_us == n * CPU_PERIOD_US
    with pytest.raises(InvalidSpecError, match=f"only {n} CPUs"):
        Limits.parse(cpus=n + 1)


def test_cpu_shares_bounds() -> None:
    """cpu_shares is the v1 weight, 2..262144; outside that (or not an int) it is refused."""
    assert Limits.parse(cpu_shares=MIN_CPU_SHARES).cpu_shares == 2
    assert Limits.parse(cpu_shares=MAX_CPU_SHARES).cpu_shares == 262_144
    assert Limits.parse(cpu_shares=512).controllers() == ["cpu"]
    for bad in (0, 1, MAX_CPU_SHARES + 1, -1, True, "512", 512.0):
        with pytest.raises(InvalidSpecError) as e:
            Limits.parse(cpu_shares=bad)
        assert f"cpu_shares={bad!r}" in str(e.value)


def test_cpuset_is_normalised_and_checked_against_the_host() -> None:
    """cpuset= is validated against the host's online CPUs and stored in kernel list form."""
    online = online_cpus()
    first = min(online)
    assert Limits.parse(cpuset=str(first)).cpuset == str(first)
    assert Limits.parse(cpuset=[first, first]).cpuset == str(first)
    assert Limits.parse(cpuset=[first]).controllers() == ["cpuset"]
    with pytest.raises(InvalidSpecError, match="cpuset='99': CPU 99 is not online"):
        Limits.parse(cpuset="99")
    with pytest.raises(InvalidSpecError, match="reversed"):
        Limits.parse(cpuset="1-0")


def test_pids_minimum_and_zero() -> None:
    """pids counts our init, so the minimum is 2; 0 is an error, never 'unlimited' (runc's surprise);
    -1 is no limit, as podman's --pids-limit=-1 (issue 9, item 4: it lifts the default)."""
    assert MIN_PIDS == 2
    assert Limits.parse(pids=2).pids == 2
    assert Limits.parse(pids=64).controllers() == ["pids"]
    assert Limits.parse(pids=-1).pids is None
    assert Limits.parse(pids=-1).is_empty()
    for bad in (0, 1, -2, True, "10", 10.0):
        with pytest.raises(InvalidSpecError) as e:
            Limits.parse(pids=bad)
        assert f"pids={bad!r}" in str(e.value)
        assert "or -1 for no limit" in str(e.value)


def test_limits_wire_round_trip_and_controllers() -> None:
    """All limits together: every controller needed, and the launcher gets back exactly the same limits."""
    limits = Limits.parse(
        memory="64m", memory_swap="128m", cpus=0.5, cpu_shares=512, cpuset=str(min(online_cpus())), pids=32
    )
    assert limits.controllers() == ["memory", "cpu", "cpuset", "pids"]
    assert not limits.is_empty()
    assert Limits.from_wire(limits.to_wire()) == limits
