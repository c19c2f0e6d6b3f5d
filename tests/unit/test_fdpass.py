"""launcher/fdpass: descriptors ride with their frame, and none is lost or leaked on a bad count."""

from __future__ import annotations

import collections
import os
import socket

import pytest

from pytest_sandbox.launcher import fdpass


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_descriptors_arrive_with_their_frame_and_name_the_same_files(tmp_path: os.PathLike[str]) -> None:
    """Two messages, with 2 and 0 descriptors: the receiver gets both bytes and the 2 descriptors
    (close-on-exec) of the same inodes; after closing them, no descriptor is left over."""
    before = _fd_count()
    files = [os.open(tmp_path, os.O_PATH | os.O_CLOEXEC), os.open("/", os.O_PATH | os.O_CLOEXEC)]
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        fdpass.send(ours, b"x" * 50_000, tuple(files))
        fdpass.send(ours, b"y")
        ours.shutdown(socket.SHUT_WR)
        got: list[int] = []
        data = b""
        while True:
            chunk, fds = fdpass.recv(theirs)
            got += fds
            if not chunk:
                break
            data += chunk
        assert data == b"x" * 50_000 + b"y"
        assert [(os.fstat(f).st_dev, os.fstat(f).st_ino) for f in got] == [
            (os.fstat(f).st_dev, os.fstat(f).st_ino) for f in files
        ]
        assert all(not os.get_inheritable(f) for f in got)
        for fd in got + files:
            os.close(fd)
    assert _fd_count() == before


def test_a_frame_claiming_descriptors_that_did_not_come_closes_the_queue() -> None:
    """take(): a count larger than what is queued (or not an int) is a ValueError, and every
    queued descriptor is closed (the stream is out of step); a right count takes them in order."""
    before = _fd_count()
    inbox = collections.deque([os.open("/", os.O_PATH | os.O_CLOEXEC) for _ in range(3)])
    first = fdpass.take({"fds": 2}, inbox)
    assert len(first) == 2
    assert len(inbox) == 1
    assert fdpass.take({}, inbox) == ()
    for bad in (5, -1, True, "1"):  # the one left queued is closed by the first bad count
        inbox.append(os.open("/", os.O_PATH | os.O_CLOEXEC))
        with pytest.raises(ValueError, match="descriptors that did not come"):
            fdpass.take({"fds": bad}, inbox)
        assert not inbox
    for fd in first:
        os.close(fd)
    assert _fd_count() == before
