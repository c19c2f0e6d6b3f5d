"""The README's examples, verbatim (plus type hints): the founding issue's four, networks, images."""

import urllib.request
from pathlib import Path

import pytest

from pytest_sandbox import Image, Sandbox
from tests import probes


def test_isolated(sandbox: Sandbox) -> None:
    r = sandbox.run(["sh", "-c", "hostname; id -u"], hostname="box")
    assert r.exit_code == 0 and r.stdout.split() == [b"box", b"0"]


def test_layers(sandbox: Sandbox, tmp_path: Path) -> None:
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "hello.txt").write_text("hi")
    img = Image.from_layers(tmp_path / "app")  # stacked on the default base
    assert sandbox.run(["cat", "/hello.txt"], image=img).stdout == b"hi"


def test_oom(sandbox: Sandbox) -> None:
    r = sandbox.run(["python3", "-c", "b = bytearray(200 << 20)"], memory="64m")
    assert r.oom_killed and r.signal == 9


def test_service(sandbox: Sandbox) -> None:
    c = sandbox.start(["python3", "-m", "http.server", "8000"], memory="128m", cpus=0.5, pids=64)
    c.wait_for_log(b"Serving HTTP")
    assert c.exec(["cat", "/proc/1/cmdline"]).exit_code == 0
    c.stop(timeout=2)  # SIGTERM, then SIGKILL after the timeout


def test_two_services(sandbox: Sandbox) -> None:
    net = sandbox.network()  # own subnet, removed with the scope
    db = sandbox.start(["python3", "-m", "http.server", "5000"], network=net, name="db")
    db.wait_for_port(5000)  # probed from outside: no tool needed inside
    app = sandbox.run(
        ["python3", "-c", "import urllib.request as u; print(u.urlopen('http://db:5000').status)"],
        network=net,
    )
    assert app.stdout.strip() == b"200"
    host, port = db.address(5000)  # reachable from the test process itself
    assert urllib.request.urlopen(f"http://{host}:{port}").status == 200


@pytest.fixture
def private_store(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's image example stores into the default store: here, a store of this test's own."""
    root = str(tmp_path_factory.mktemp("data-root"))
    probes.use_data_root(monkeypatch, root)


@pytest.mark.usefixtures("private_store")
def test_built_image(sandbox: Sandbox, tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "main.py").write_text("print('hello from the app')")
    app = (
        Image.from_layers()  # the host base; or Image.load("myapp:base"),
        .copy(tmp_path / "src", "/app")  # Image.pull("registry:5000/x:1"), ...
        .env(MODE="test")
        .workdir("/app")  # each step is cached on (parent, step, inputs)
        .run(["sh", "-c", "echo built > /app/stamp"])  # runs in a sandbox: its upper dir is the layer
        .tag("myapp:test")
    )
    c = sandbox.start(["sh", "-c", "cat stamp; python3 main.py; sleep 60"], image=app)
    c.wait_for_log("hello from the app")
    debug = c.commit("myapp:debug")  # the container's writable layer, as a layer
    assert sandbox.run(["cat", "/app/stamp"], image=debug).stdout == b"built\n"
