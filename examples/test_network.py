"""Two services on a private network, the way the seed's Docker host wires containers to a bridge.

``sandbox.network()`` makes a network with its own subnet; containers on it reach each other by
name, and the test reaches a service through ``address(port)``.  A container on another network
cannot reach them.  Nothing needs a tool inside the image: readiness is probed from outside.
"""

import urllib.request

from pytest_sandbox import Sandbox

KV = """
import http.server, json
store = {}
class KV(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps(store.get(self.path, None)).encode()
        self.send_response(200 if self.path in store else 404); self.end_headers(); self.wfile.write(body)
    def do_PUT(self):
        store[self.path] = self.rfile.read(int(self.headers["Content-Length"])).decode()
        self.send_response(204); self.end_headers()
http.server.HTTPServer(("0.0.0.0", 6379), KV).serve_forever()
"""

APP = """
import urllib.request as u
u.urlopen(u.Request("http://kv:6379/greeting", data=b"hello", method="PUT"))
print(u.urlopen("http://kv:6379/greeting").read().decode())
"""


def test_an_app_talks_to_its_store_by_name(sandbox: Sandbox) -> None:
    net = sandbox.network()
    kv = sandbox.start(["python3", "-c", KV], network=net, name="kv", memory="64m")
    kv.wait_for_http(6379, "/nothing", status=404)

    app = sandbox.run(["python3", "-c", APP], network=net, memory="64m")
    assert app.stdout.strip() == b'"hello"', app.stderr

    host, port = kv.address(6379)  # the test process itself, through a published loopback port
    assert urllib.request.urlopen(f"http://{host}:{port}/greeting").read() == b'"hello"'

    stranger = sandbox.run(["python3", "-c", APP], network=sandbox.network())
    assert stranger.exit_code != 0  # another network: "kv" does not even resolve there
