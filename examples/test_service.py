"""A service in a container that the test talks to.

The server runs isolated (its own namespaces, limits, a loopback-only network) and listens on a
unix socket in a directory bind-mounted from the test's tmp_path, so the test process reaches it
without any network.  ``wait_for_log`` is the readiness wait; ``exec`` checks it from inside.
"""

import socket
import textwrap
from pathlib import Path

from pytest_sandbox import Sandbox

SERVER = textwrap.dedent(
    """
    import os, socketserver

    class Upper(socketserver.StreamRequestHandler):
        def handle(self):
            self.wfile.write(self.rfile.readline().upper())

    with socketserver.UnixStreamServer("/run/svc/upper.sock", Upper) as server:
        os.chmod("/run/svc/upper.sock", 0o666)
        print("ready", flush=True)
        server.serve_forever()
    """
)


def test_talk_to_a_service(sandbox: Sandbox, tmp_path: Path) -> None:
    sock_dir = tmp_path / "svc"
    sock_dir.mkdir()
    server = sandbox.start(
        ["python3", "-c", SERVER], mounts={str(sock_dir): "/run/svc"}, memory="128m", pids=16
    )
    server.wait_for_log(b"ready", timeout=10)

    with socket.socket(socket.AF_UNIX) as client:
        client.connect(str(sock_dir / "upper.sock"))
        client.sendall(b"hello sandbox\n")
        assert client.makefile("rb").readline() == b"HELLO SANDBOX\n"

    inside = server.exec(["python3", "-c", "import os; print(sorted(os.listdir('/run/svc')))"])
    assert inside.stdout == b"['upper.sock']\n"
    assert server.stop(timeout=2).signal in (15, 9)
