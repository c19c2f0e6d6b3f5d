"""Descriptors sent along a unix stream socket with SCM_RIGHTS (stdlib only; see unix(7)).

The bind-mount sources of a create request travel this way, pytest -> launcher -> the
container's first process (a spare gets them on its spec socket): as descriptors, not paths, so
that nothing looks a source up again (:mod:`pytest_sandbox.host.bindsource`).  Descriptors ride
with the first bytes of the message they were sent with, and a stream read never goes past
them, so a receiver has them before the message is complete; a frame's header says how many are
its own (:func:`take`).
"""

from __future__ import annotations

import array
import collections
import os
import socket

MAX_FDS = 253  # SCM_MAX_FD: the most one sendmsg may carry


def send(sock: socket.socket, data: bytes, fds: tuple[int, ...] = ()) -> None:
    """``sock.sendall(data)``, with ``fds`` attached to its first bytes."""
    if fds:
        sent = sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        data = data[sent:]
    sock.sendall(data)


def recv(sock: socket.socket, size: int = 1 << 16) -> tuple[bytes, list[int]]:
    """What one read returns, and the descriptors that came with it (close-on-exec)."""
    data, ancillary, flags, _ = sock.recvmsg(size, socket.CMSG_SPACE(MAX_FDS * 4), socket.MSG_CMSG_CLOEXEC)
    fds = array.array("i")
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    if flags & socket.MSG_CTRUNC:  # more than any frame may carry: the rest were dropped, and
        for fd in fds:  # the frame that claims them is refused by take()
            os.close(fd)
        return data, []
    return data, list(fds)


def take(header: dict[str, object], inbox: collections.deque[int]) -> tuple[int, ...]:
    """The descriptors of the frame ``header`` (its ``fds`` count), first come first taken.

    If fewer arrived than it claims, the stream is out of step: every queued descriptor is closed.
    """
    count = header.get("fds", 0)
    if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= len(inbox):
        while inbox:
            os.close(inbox.popleft())
        raise ValueError(f"launcher protocol: a frame claims {count!r} descriptors that did not come")
    return tuple(inbox.popleft() for _ in range(count))
