"""The command-line tool, run as a user runs it: a subprocess with its own data root.

``python -m pytest_sandbox`` and the ``pytest-sandbox`` console script, against a store made in
the test and a real registry (Debian's docker-registry) on loopback.
"""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_sandbox import Image
from pytest_sandbox.images.store import Store
from tests.registry_support import RegistryServer, make_image

SCRIPT = os.path.join(os.path.dirname(sys.executable), "pytest-sandbox")


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    server = RegistryServer(tmp_path_factory.mktemp("registry"))
    yield server
    server.close()


def child_env(data_root: Path, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PYTEST_SANDBOX_", "PYTEST_")) and k.lower() not in ("http_proxy", "https_proxy")
    }
    env["PYTEST_SANDBOX_DATA_ROOT"] = str(data_root)
    env["DOCKER_CONFIG"] = str(data_root / "no-docker-config")
    env.update(extra)
    return env


def cli(
    data_root: Path, *args: str, script: bool = False, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    argv = [SCRIPT] if script else [sys.executable, "-m", "pytest_sandbox"]
    return subprocess.run(
        [*argv, *args],
        env=env or child_env(data_root),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_help_and_usage_errors(tmp_path: Path) -> None:
    r = cli(tmp_path, "--help")
    assert r.returncode == 0
    for command in ("images", "pull", "push", "import", "export", "tag", "rmi", "prune", "inspect"):
        assert command in r.stdout
    assert cli(tmp_path).returncode == 2  # no command
    assert cli(tmp_path, "frobnicate").returncode == 2
    assert cli(tmp_path, "pull").returncode == 2  # REF missing


def test_console_script_is_installed(tmp_path: Path) -> None:
    r = cli(tmp_path, "images", script=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["REPOSITORY", "TAG", "IMAGE", "ID", "CREATED", "LAYERS", "SIZE"]


def test_images_tag_inspect_rmi_prune(tmp_path: Path, busybox_layer: Path) -> None:
    data = tmp_path / "data"
    store = Store(str(data / "store"))
    record = make_image(store, busybox_layer, tmp_path, "app:1")
    image_id = store.resolve_id("app:1")

    r = cli(data, "tag", "app:1", "user/app:2")
    assert (r.returncode, r.stdout) == (0, "user/app:2\n"), r.stderr
    r = cli(data, "images")
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stdout.splitlines()]
    assert rows[0][:2] == ["REPOSITORY", "TAG"]
    assert sorted(row[:3] for row in rows[1:]) == [
        ["app", "1", image_id[7:19]],
        ["user/app", "2", image_id[7:19]],
    ]
    assert all(row[-1].endswith("MB") and "2" in row for row in rows[1:])  # two layers, busybox's size
    assert cli(data, "images", "-q").stdout == image_id[7:19] + "\n"

    r = cli(data, "inspect", "user/app:2")
    assert r.returncode == 0, r.stderr
    (doc,) = json.loads(r.stdout)
    assert doc["Id"] == image_id
    assert doc["RepoTags"] == ["app:1", "user/app:2"]
    assert [layer["digest"] for layer in doc["Layers"]] == list(record.layers)
    assert doc["config"]["env"] == [["GREETING", "hi"]]

    r = cli(data, "rmi", "app:1")
    assert (r.returncode, r.stdout) == (0, "Untagged: app:1\n"), r.stderr
    r = cli(data, "prune")
    assert r.stdout.endswith("0 layer(s) removed\n")  # user/app:2 still uses both layers
    r = cli(data, "rmi", "user/app:2")
    assert r.returncode == 0, r.stderr
    r = cli(data, "prune")
    assert r.returncode == 0, r.stderr
    assert sorted(line.split()[-1] for line in r.stdout.splitlines()[:-1]) == sorted(record.layers)
    assert cli(data, "images", "-q").stdout == ""


def test_errors_print_message_and_hint_and_exit_1(tmp_path: Path) -> None:
    r = cli(tmp_path, "inspect", "nosuch:1")
    assert r.returncode == 1
    assert r.stdout == ""
    assert "pytest-sandbox inspect: error: no image 'nosuch:1'" in r.stderr
    assert "hint: pull it" in r.stderr
    assert "Traceback" not in r.stderr
    r = cli(tmp_path, "tag", "../etc", "x:1")
    assert r.returncode == 1
    assert "reference '../etc'" in r.stderr
    assert not (tmp_path / "store" / "refs.json").exists()
    r = cli(tmp_path, "--insecure-registry", "not a host", "pull", "127.0.0.1:9/x:1")
    assert r.returncode == 1
    assert "not a registry host" in r.stderr


def test_push_and_pull_through_a_registry(
    tmp_path: Path, busybox_layer: Path, registry: RegistryServer
) -> None:
    ref = f"{registry.host}/cli/app:1"
    src, dst = tmp_path / "src", tmp_path / "dst"
    record = make_image(Store(str(src / "store")), busybox_layer, tmp_path, ref)

    # Not listed as insecure: refused, and the message says how to fix it.
    r = cli(src, "push", ref)
    assert r.returncode == 1
    assert "TLS" in r.stderr
    assert f"PYTEST_SANDBOX_INSECURE_REGISTRIES={registry.host}" in r.stderr

    r = cli(src, "--insecure-registry", registry.host, "push", ref)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"{ref}@sha256:")
    assert r.stderr.count(" layer ") == 2  # progress: one line per layer (stderr is not a tty)

    env = child_env(dst, PYTEST_SANDBOX_INSECURE_REGISTRIES=registry.host)
    r = cli(dst, "pull", ref, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{ref}\n"
    assert [line.split()[3] for line in r.stderr.splitlines()[:2]] == ["1/2", "2/2"]
    assert Store(str(dst / "store")).resolve(ref).layers == record.layers
    r = cli(dst, "pull", "-q", ref, env=env)
    assert (r.returncode, r.stderr) == (0, "")


def test_image_pull_from_python_uses_the_data_root(
    tmp_path: Path, busybox_layer: Path, registry: RegistryServer
) -> None:
    ref = f"{registry.host}/cli/python:1"
    src = Store(str(tmp_path / "src" / "store"))
    record = make_image(src, busybox_layer, tmp_path, ref)
    assert cli(tmp_path / "src", "--insecure-registry", registry.host, "push", "-q", ref).returncode == 0
    code = (
        "import sys\n"
        "from pytest_sandbox import Image\n"
        "image = Image.pull(sys.argv[1])\n"
        "print(len(image.layers), image.layers[0])\n"
    )
    data = tmp_path / "data"
    proc = subprocess.run(
        [sys.executable, "-c", code, ref],
        env=child_env(data, PYTEST_SANDBOX_INSECURE_REGISTRIES=f"10.0.0.0/8,{registry.host}"),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    count, first = proc.stdout.split()
    assert int(count) == 2
    assert first == Store(str(data / "store")).layer_path(record.layers[0])


def test_progress_on_a_terminal_is_a_live_line(
    tmp_path: Path, busybox_layer: Path, registry: RegistryServer
) -> None:
    ref = f"{registry.host}/cli/tty:1"
    make_image(Store(str(tmp_path / "src" / "store")), busybox_layer, tmp_path, ref)
    assert cli(tmp_path / "src", "--insecure-registry", registry.host, "push", "-q", ref).returncode == 0
    master, slave = pty.openpty()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "pytest_sandbox", "--insecure-registry", registry.host, "pull", ref],
            env=child_env(tmp_path / "dst"),
            stdout=subprocess.PIPE,
            stderr=slave,
            timeout=120,
            check=False,
        )
        os.close(slave)
        slave = -1
        chunks = []
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the terminal's other side is closed and drained
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    assert proc.returncode == 0
    text = b"".join(chunks).decode()
    assert "\r" in text  # the line is rewritten in place
    assert "\x1b[K" in text
    assert text.count("\n") == 3  # two layers, one summary


@pytest.mark.parametrize("transport", ["oci", "docker-archive"])
def test_export_then_import(tmp_path: Path, busybox_layer: Path, transport: str) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    record = make_image(Store(str(src / "store")), busybox_layer, tmp_path, "app:1")
    where = (
        f"oci:{tmp_path / 'layout'}:v1" if transport == "oci" else f"docker-archive:{tmp_path / 'app.tar'}"
    )
    r = cli(src, "export", "app:1", where)
    assert r.returncode == 0, r.stderr
    r = cli(dst, "import", where, "imported/app:2")
    assert (r.returncode, r.stdout) == (0, "imported/app:2\n"), r.stderr
    # progress: one line per layer read (stderr is not a tty), as pull prints
    progress = [line for line in r.stderr.splitlines() if line.startswith("import imported/app:2 ")]
    assert len(progress) == 2, r.stderr
    assert all(" in " in line and line.endswith("s") for line in progress)
    got = Store(str(dst / "store")).resolve("imported/app:2")
    assert got.layers == record.layers
    assert got.config == record.config
    r = cli(tmp_path / "quiet", "import", "-q", where, "imported/app:3")
    assert (r.returncode, r.stdout, r.stderr) == (0, "imported/app:3\n", "")
    r = cli(dst, "import", f"{transport}:{tmp_path / 'missing'}", "x:1")
    assert r.returncode == 1
    assert "error:" in r.stderr


def test_images_leaves_out_intermediate_steps_unless_all(tmp_path: Path, busybox_layer: Path) -> None:
    """As `docker images`: a build's untagged steps are listed with -a only."""
    data = tmp_path / "data"
    store = Store(str(data / "store"))
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    built = Image.from_layers(busybox_layer, base=None, store=store).copy(src, "/f").env(A="1").tag("built:1")
    assert built.image_id is not None
    listed = [line.split()[:2] for line in cli(data, "images").stdout.splitlines()[1:]]
    assert listed == [["built", "1"]]
    every = cli(data, "images", "-a").stdout.splitlines()[1:]
    assert len(every) == len(store.images()) > 1
    assert sum(line.startswith("<none>") for line in every) == len(every) - 1
