"""Parsing of the values users type: sizes, CPU counts, cpusets, signals (pure, stdlib only).

Sizes follow Docker (go-units ``RAMInBytes``): binary units, case-insensitive, an optional ``b`` /
``ib`` suffix: ``"64m"``, ``"64MB"``, ``"64mib"``, ``"1.5g"``, ``67108864``.  Every error is an
:class:`~pytest_sandbox.core.errors.InvalidSpecError` that quotes the value and shows accepted forms.
"""

from __future__ import annotations

import re
import signal as _signal

from .errors import InvalidSignalError, InvalidSpecError

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b)?\s*$", re.IGNORECASE)
SIZE_FORMS = "an int of bytes or a string like '512k', '64m', '1.5g', '64MiB'"
_MAX_SIZE = 1 << 62


def parse_size(value: object, *, what: str) -> int:
    """Bytes from an int or a Docker-style size string."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise InvalidSpecError(f"{what}={value!r}: expected {SIZE_FORMS}")
    if isinstance(value, int):
        if value < 0:
            raise InvalidSpecError(f"{what}={value!r}: a size cannot be negative; expected {SIZE_FORMS}")
        if value >= _MAX_SIZE:  # the kernel would silently truncate it (10**30 became ~4.4 EiB)
            raise InvalidSpecError(f"{what}={value!r}: size is too large")
        return value
    m = _SIZE_RE.match(value)
    if not m:
        raise InvalidSpecError(f"{what}={value!r}: invalid size; expected {SIZE_FORMS}")
    number, unit = m.group(1), m.group(2).lower()
    if unit == "" and m.group(3) and m.group(3).lower() == "ib":
        raise InvalidSpecError(f"{what}={value!r}: 'ib' needs a unit (k, m, g, t, p); expected {SIZE_FORMS}")
    scaled = float(number) * _UNITS[unit] if "." in number else int(number) * _UNITS[unit]
    if scaled >= _MAX_SIZE:
        raise InvalidSpecError(f"{what}={value!r}: size is too large")
    return int(scaled)


def format_size(n: int) -> str:
    """``64m`` for 67108864: the shortest exact binary form."""
    for unit in ("p", "t", "g", "m", "k"):
        if n and n % _UNITS[unit] == 0:
            return f"{n // _UNITS[unit]}{unit}"
    return str(n)


def parse_cpus(value: object, *, online: int) -> float:
    """A positive CPU count (``0.5`` = half a core), at most the number of online CPUs."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise InvalidSpecError(f"cpus={value!r}: expected a number of CPUs such as 0.5 or 2")
    try:
        cpus = float(value)
    except ValueError:
        raise InvalidSpecError(f"cpus={value!r}: expected a number of CPUs such as 0.5 or 2") from None
    if not 0.01 <= cpus <= online:  # also false for NaN
        raise InvalidSpecError(
            f"cpus={value!r}: range of CPUs is from 0.01 to {online}.00, as there are only {online} CPUs "
            "available; leave cpus unset for no limit"
        )
    return cpus


def online_cpus() -> set[int]:
    """The CPUs the kernel has online (``/sys/devices/system/cpu/online``)."""
    try:
        with open("/sys/devices/system/cpu/online") as f:
            return parse_cpu_list(f.read().strip(), what="online cpus")
    except OSError:
        import os

        return set(range(os.cpu_count() or 1))


def parse_cpu_list(text: str, *, what: str) -> set[int]:
    """``{0, 1, 3}`` from the kernel's list format ``0-1,3``."""
    cpus: set[int] = set()
    for raw in text.split(","):
        part = raw.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise InvalidSpecError(f"{what}={text!r}: expected a CPU list such as '0', '0-1' or '0,2-3'")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise InvalidSpecError(f"{what}={text!r}: range {part!r} is reversed")
        cpus.update(range(lo, hi + 1))
    return cpus


def format_cpu_list(cpus: set[int]) -> str:
    """The kernel's list format for a set of CPUs: ``{0, 1, 3}`` -> ``0-1,3``."""
    out: list[str] = []
    ordered = sorted(cpus)
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        out.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(out)


def parse_cpuset(value: object, *, online: set[int]) -> str:
    """A validated, normalised cpuset (``"0-1"``) from a string or an iterable of CPU numbers."""
    if isinstance(value, str):
        cpus = parse_cpu_list(value, what="cpuset")
    elif isinstance(value, int) and not isinstance(value, bool):
        cpus = {value}
    elif isinstance(value, (list, tuple, set, frozenset, range)) and all(
        isinstance(c, int) and not isinstance(c, bool) for c in value
    ):
        cpus = set(value)
    else:
        raise InvalidSpecError(f"cpuset={value!r}: expected a CPU list such as '0', '0-1' or [0, 1]")
    if not cpus:
        raise InvalidSpecError(f"cpuset={value!r}: names no CPU")
    missing = cpus - online
    if missing:
        raise InvalidSpecError(
            f"cpuset={value!r}: CPU {format_cpu_list(missing)} is not online; "
            f"this host has {format_cpu_list(online)}"
        )
    return format_cpu_list(cpus)


_SIGNAL_MAX = 64


def parse_signal(value: object) -> int:
    """A signal number from ``15``, ``"15"``, ``"TERM"``, ``"SIGTERM"``, ``"sigterm"``, ``signal.SIGTERM``."""
    if isinstance(value, bool):
        raise InvalidSignalError(f"invalid signal: {value!r}")
    if isinstance(value, int):
        number = int(value)
    elif isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"\d+", text):
            number = int(text)
        else:
            name = text.upper()
            if not name.startswith("SIG"):
                name = "SIG" + name
            m = re.fullmatch(r"SIGRTMIN\+(\d+)", name)
            if m:
                number = _signal.SIGRTMIN + int(m.group(1))
            else:
                sig = getattr(_signal.Signals, name, None) if name.isidentifier() else None
                if sig is None:
                    raise InvalidSignalError(f"invalid signal: {value!r}")
                number = int(sig)
    else:
        raise InvalidSignalError(f"invalid signal: {value!r}")
    if not 1 <= number <= _SIGNAL_MAX:
        raise InvalidSignalError(f"invalid signal {value!r}: valid signals are 1 through {_SIGNAL_MAX}")
    return number
