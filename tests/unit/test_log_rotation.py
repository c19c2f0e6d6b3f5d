"""Container output: the launcher's capped, rotated log files and the bounded readers
(launcher/logs.py, on plain pipes and files), and the escaping of output shown on a terminal
(core/terminal.py).  Issue 9, items 2 and 11; the same paths with real containers are in
tests/kernel/test_logs.py."""

from __future__ import annotations

import contextlib
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_sandbox.core.terminal import escape_controls, output_text
from pytest_sandbox.launcher.logs import CHUNK, LogFollower, LogLimits, LogPipe, read_tail, rotated_paths


def _feed(log: LogPipe, write_fd: int, data: bytes) -> None:
    """Push ``data`` through the pipe in pieces the pipe holds, the log copying each."""
    for start in range(0, len(data), CHUNK // 2):
        os.write(write_fd, data[start : start + CHUNK // 2])
        assert log.drain()


def _numbered(count: int) -> bytes:
    return b"".join(b"line %06d\n" % i for i in range(count))


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    os.set_blocking(r, False)
    yield r, w
    for fd in (r, w):
        with contextlib.suppress(OSError):
            os.close(fd)


def test_rotation_keeps_at_most_max_file_files_of_max_size(tmp_path: Path, pipe: tuple[int, int]) -> None:
    """A stream written past max_size * max_file: never more than max_file files, none over
    max_size, and the newest output intact across them (issue 9, item 2)."""
    limits = LogLimits(max_size=8192, max_file=3)
    path = str(tmp_path / "stdout")
    log = LogPipe(pipe[0], path, limits)
    data = _numbered(20_000)  # 240,000 bytes: 29 rotations
    _feed(log, pipe[1], data)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["stdout", "stdout.1", "stdout.2"]
    sizes = [os.path.getsize(p) for p in rotated_paths(path, limits.max_file)]
    assert all(size <= limits.max_size for size in sizes)
    assert sizes[:2] == [limits.max_size, limits.max_size]
    assert read_tail(path, limits) == data[-limits.max_size :]  # the default: max_size bytes
    everything = read_tail(path, limits, limit=1 << 30)
    assert everything == data[-sum(sizes) :]
    assert read_tail(path, limits, limit=100) == data[-100:]
    assert log.dropped == 0
    log.close()


def test_max_file_1_starts_the_file_over(tmp_path: Path, pipe: tuple[int, int]) -> None:
    """Docker's default max-file 1: the one file starts over when full; nothing else is left."""
    limits = LogLimits(max_size=4096, max_file=1)
    path = str(tmp_path / "stderr")
    log = LogPipe(pipe[0], path, limits)
    data = b"y" * 10_000 + b"end\n"
    _feed(log, pipe[1], data)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stderr"]
    assert os.path.getsize(path) == len(data) - 2 * limits.max_size
    assert read_tail(path, limits) == data[2 * limits.max_size :]
    log.close()


def test_a_refused_write_drops_the_output_and_still_drains_the_pipe(pipe: tuple[int, int]) -> None:
    """A full disk (/dev/full: every write is ENOSPC) costs the output, never a blocked writer."""
    log = LogPipe(pipe[0], "/dev/full", LogLimits(max_size=4096, max_file=2))
    os.write(pipe[1], b"z" * 50_000)
    assert log.drain()
    assert log.dropped == 50_000
    with pytest.raises(BlockingIOError):
        os.read(pipe[0], 1)  # drained
    os.close(pipe[1])
    assert not log.pump()  # EOF
    log.close()


def test_reads_are_bounded_whatever_size_a_file_claims(tmp_path: Path) -> None:
    """A 1 TiB sparse file (what a command could make of a log it owned) is read 1 MiB at most."""
    path = tmp_path / "stdout"
    with open(path, "wb") as f:
        f.truncate(1 << 40)
        f.seek((1 << 40) - 4)
        f.write(b"end\n")
    data = read_tail(str(path), LogLimits(max_size=1 << 20, max_file=1))
    assert len(data) == 1 << 20
    assert data.endswith(b"\0end\n")
    follower = LogFollower(str(path), 1 << 16)
    assert follower.search(re.compile(b"end")) is not None
    assert len(follower.text) <= 2 << 16
    follower.close()


def test_the_follower_reads_new_output_and_survives_a_rotation(tmp_path: Path, pipe: tuple[int, int]) -> None:
    """wait_for_log's reader: what comes after it started, through the rotation that moves the
    file it holds to stdout.1 (and with max_file 1, to nowhere)."""
    for max_file in (1, 2):
        path = str(tmp_path / f"out{max_file}")
        limits = LogLimits(max_size=4096, max_file=max_file)
        log = LogPipe(pipe[0], path, limits)
        _feed(log, pipe[1], b"old\n")
        follower = LogFollower(path, 1024)
        assert follower.search(re.compile(b"old")) is not None  # what was there before it
        assert follower.search(re.compile(b"MARK")) is None
        _feed(log, pipe[1], b"a" * 4000 + b"MARK1\n" + b"b" * 8000 + b"MARK2\n")
        assert follower.search(re.compile(b"MARK1")) is not None  # in the rotated-away file
        assert follower.search(re.compile(b"MARK2")) is not None  # in the new one
        assert len(follower.text) <= 2048
        follower.close()
        log.stop_writing()


def test_the_follower_never_skips_output_written_while_it_opens(tmp_path: Path) -> None:
    """A line appended while a follower is being made is found (2000 tries with a writer racing).

    The follower once took the file's size twice -- for its first read and for its offset --
    and a readiness wait then missed a container's "up" written in between (a 30 s timeout
    with "up" in the log tail).
    """
    path = tmp_path / "stdout"
    for attempt in range(2000):
        path.write_bytes(b"")
        writer = threading.Thread(target=_append, args=(path, b"up\n"))
        writer.start()
        follower = LogFollower(str(path), 1 << 20)
        writer.join()
        try:
            assert follower.search(re.compile(rb"up")), f"missed on attempt {attempt}"
        finally:
            follower.close()


def _append(path: Path, data: bytes) -> None:
    with path.open("ab") as f:
        f.write(data)


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("plain text\n\tindented\n", "plain text\n\tindented\n"),
        ("\x1b[2J\x1b[H", "\\x1b[2J\\x1b[H"),  # clear screen, cursor home
        ("\x1b]52;c;cHduZWQ=\x07", "\\x1b]52;c;cHduZWQ=\\x07"),  # OSC 52: write the clipboard
        ("ok\rFAILED", "ok\\rFAILED"),  # a carriage return hiding what came before
        ("\x9b2J", "\\x9b2J"),  # the one-character C1 CSI
        ("abc\u202edcba", "abc\\u202edcba"),  # a bidi override (CVE-2021-42574)
        ("\x00\x7f\x0b\x0c", "\\x00\\x7f\\x0b\\x0c"),
        ("caf\u00e9 \u2713 \\ 'q'", "caf\u00e9 \u2713 \\ 'q'"),  # printable: unchanged
    ],
)
def test_control_characters_are_escaped_as_repr_does(raw: str, shown: str) -> None:
    """Issue 9, item 11: nothing a container prints reaches the terminal as a control sequence."""
    assert escape_controls(raw) == shown
    assert "\x1b" not in escape_controls(raw)


def test_output_text_replaces_invalid_utf8_and_escapes() -> None:
    assert output_text(b"\xff\x1b[31mred\n") == "\ufffd\\x1b[31mred\n"
    assert output_text("\u009b".encode()) == "\\x9b"  # a C1 control encoded as valid UTF-8
