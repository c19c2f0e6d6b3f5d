"""The four examples of the issue that founded the project, verbatim (plus type hints)."""

from pathlib import Path

from pytest_sandbox import Image, Sandbox


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
