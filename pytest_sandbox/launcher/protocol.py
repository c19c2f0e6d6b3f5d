"""The launcher's wire protocol (stdlib only; shared by the pytest side and the launcher).

Between pytest and its launcher: a ``SOCK_STREAM`` socketpair carrying frames of a 4-byte
big-endian length followed by one UTF-8 JSON object.  Requests carry ``rid`` (request id, chosen by
the client) and ``op``; every request gets exactly one reply ``{"rid": ..., "ok": {...}}`` or
``{"rid": ..., "error": {...}}`` (an error dict from :func:`pytest_sandbox.core.errors.to_wire`).
Replies may come out of order: ``wait`` is answered only when the process exits.

Operations (``id`` is a container id, or ``<container id>.<n>`` for an exec):

=========  =========================================================  =============================
op         request fields                                             reply (``ok``)
=========  =========================================================  =============================
hello      --                                                         pid, uid_base, idmap, cgroup
create     spec (:class:`pytest_sandbox.core.spec.ContainerSpec` as a      pid (host pid of the command),
           dict), dir (its state directory), until_exit               init_pid; with until_exit:
                                                                      the exit, as for ``wait``
exec       id, parent, process, stdout, stderr, stdin                 pid (host pid of the command)
wait       id                                                         exit, error, stats, duration_s
signal     id, signal                                                 --
stats      id                                                         cgroup stats now (or at exit)
limits     id                                                         limits (cgroup files), paths
remove     id                                                         -- (after everything is gone)
shutdown   --                                                         -- (the launcher then exits)
=========  =========================================================  =============================

The launcher hands a spare first process its spec as one JSON object on a pipe; a container's
init and an exec helper report on a pipe, one JSON object per line (``ev``: ``userns``,
``started``, ``error``, ``exit``).
"""

from __future__ import annotations

import json
import os
import socket
import struct
from typing import Any

_HEADER = struct.Struct(">I")
MAX_FRAME = 64 << 20


def encode(message: dict[str, Any]) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    return _HEADER.pack(len(body)) + body


def send(sock: socket.socket, message: dict[str, Any]) -> None:
    sock.sendall(encode(message))


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    chunks = []
    while n:
        chunk = sock.recv(n)
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def recv(sock: socket.socket) -> dict[str, Any] | None:
    """One message, or None at end of stream."""
    header = _recv_exact(sock, _HEADER.size)
    if header is None:
        return None
    (size,) = _HEADER.unpack(header)
    if size > MAX_FRAME:
        raise ValueError(f"launcher protocol: frame of {size} bytes is too large")
    body = _recv_exact(sock, size)
    if body is None:
        return None
    message = json.loads(body)
    if not isinstance(message, dict):
        raise ValueError("launcher protocol: a frame must hold a JSON object")
    return message


class FrameBuffer:
    """Splits a non-blocking byte stream into messages."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buf += data
        out = []
        while len(self._buf) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(self._buf)
            if size > MAX_FRAME:
                raise ValueError(f"launcher protocol: frame of {size} bytes is too large")
            if len(self._buf) < _HEADER.size + size:
                break
            body = bytes(self._buf[_HEADER.size : _HEADER.size + size])
            del self._buf[: _HEADER.size + size]
            out.append(json.loads(body))
        return out


def write_event(fd: int, event: dict[str, Any]) -> None:
    """One status line from a container process to the launcher (atomic: well under PIPE_BUF)."""
    data = json.dumps(event, separators=(",", ":")).encode() + b"\n"
    os.write(fd, data)


class LineBuffer:
    """Splits a status pipe's bytes into JSON events."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        return [json.loads(line) for line in lines if line.strip()]
