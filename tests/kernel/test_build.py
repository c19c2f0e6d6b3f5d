"""Build steps: copy, env, workdir, user, run -- real containers, a real store (tmp_path), a cache
keyed on (parent image, step, inputs) that makes an unchanged rebuild touch no layer content."""

from __future__ import annotations

import collections
import contextlib
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pytest_sandbox import Image, InvalidSpecError, Sandbox
from pytest_sandbox import build as build_mod
from pytest_sandbox.core.errors import BuildError, LayerNotFoundError
from pytest_sandbox.images import layers as layers_mod
from pytest_sandbox.images import layertar
from pytest_sandbox.images import store as store_mod
from pytest_sandbox.images.store import Store, stat_snapshot
from tests import probes


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store")


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    d = tmp_path / "app"
    (d / "lib").mkdir(parents=True)
    (d / "main.sh").write_text("#!/bin/sh\necho main says $GREETING from $(pwd) as $(id -u)\n")
    os.chmod(d / "main.sh", 0o755)
    (d / "lib" / "data.txt").write_text("data\n")
    return d


def _run(image: Image, cmd: str) -> bytes:
    with Sandbox() as sb:
        r = sb.run(["sh", "-c", cmd], image=image)
    assert r.exit_code == 0, r.stderr
    return r.stdout


def _build(busybox_layer: Path, app_dir: Path, store: Store) -> Image:
    return (
        Image.from_layers(busybox_layer, base=None, store=store)
        .copy(app_dir, "/app")
        .copy(app_dir / "lib" / "data.txt", "/etc/")
        .env(GREETING="hello")
        .workdir("/app")
        .run(["sh", "-c", "./main.sh > built.txt; rm /bin/vi; rm -rf /etc; mkdir /etc; echo new > /etc/only"])
        .user("1000")
        .tag("app:1")
    )


def test_build_steps_produce_a_working_image(busybox_layer: Path, app_dir: Path, store: Store) -> None:
    image = _build(busybox_layer, app_dir, store)
    assert image.config.env == (("GREETING", "hello"),)
    assert image.config.workdir == "/app"
    assert image.config.user == "1000"
    assert len(image.layers) == 4  # busybox, two copies, the run
    out = _run(
        image,
        "./main.sh; cat built.txt; echo $(ls /etc); test -e /bin/vi || echo vi-gone; ls -ln /app/main.sh",
    )
    lines = out.decode().splitlines()
    assert lines[0] == "main says hello from /app as 1000"
    assert lines[1] == "main says hello from /app as 0"  # the run step ran as root, in /app
    # rm -rf /etc; mkdir /etc: an opaque directory hides the lower /etc (hostname, hosts: the launcher's)
    assert lines[2] == "hostname hosts only"
    assert lines[3] == "vi-gone"  # a whiteout
    assert lines[4].split()[2:4] == ["0", "0"]  # copied files belong to container root
    record = store.resolve("app:1")
    assert [h.created_by.split()[0] for h in record.history] == [
        "from_layers", "COPY", "COPY", "ENV", "WORKDIR", "RUN", "USER",
    ]  # fmt: skip
    assert [h.empty_layer for h in record.history].count(True) == 3
    run_layer = Path(image.layers[-1])
    assert stat.S_ISCHR(os.lstat(run_layer / "bin" / "vi").st_mode)
    assert os.getxattr(run_layer / "etc", "trusted.overlay.opaque") == b"y"
    assert sorted(os.listdir(run_layer)) == ["app", "bin", "etc"]  # no mount points, no /etc/hostname
    assert Path(image.layers[2], "etc", "data.txt").read_text() == "data\n"


def test_unchanged_rebuild_is_a_cache_hit_touching_no_content(
    busybox_layer: Path, app_dir: Path, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = _build(busybox_layer, app_dir, store)
    records = len(store.images())
    layers = {path: stat_snapshot(path) for path in first.layers}
    size = sum(f.stat().st_size for path in first.layers for f in Path(path).rglob("*") if f.is_file())
    assert size > 1 << 20  # the busybox binary: a read of the layers could not hide

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cache hit must not read layer content or start a container")

    with monkeypatch.context() as m:
        m.setattr(layertar, "digest_dir", forbidden)
        m.setattr(store_mod, "copy_tree", forbidden)
        m.setattr(build_mod, "copy_tree", forbidden)
        m.setattr(layers_mod, "capture_upper", forbidden)
        m.setattr(Sandbox, "start", forbidden)
        before = probes.bytes_read()
        second = _build(busybox_layer, app_dir, store)
        read = probes.bytes_read() - before
    assert read < 64 << 10  # records, cache entries, refs.json: no layer's (or source's) content
    assert second.image_id == first.image_id
    assert second.layers == first.layers
    assert {path: stat_snapshot(path) for path in first.layers} == layers  # not written either
    assert len(store.images()) == records


def test_changed_input_rebuilds_from_that_step(busybox_layer: Path, app_dir: Path, store: Store) -> None:
    first = _build(busybox_layer, app_dir, store)
    (app_dir / "main.sh").write_text("#!/bin/sh\necho changed\n")
    second = _build(busybox_layer, app_dir, store)
    assert second.image_id != first.image_id
    assert second.layers[0] == first.layers[0]
    assert second.layers[1] != first.layers[1]
    assert _run(second, "cat built.txt") == b"changed\n"
    assert _run(Image.load("app:1", store=store), "cat built.txt") == b"changed\n"
    # the old image is still there by id, and prune keeps what a tag still needs
    assert first.image_id is not None
    assert store.has_image(first.image_id)
    store.prune()
    assert _run(Image.load("app:1", store=store), "cat built.txt") == b"changed\n"


def test_stacking_on_a_stored_image(busybox_layer: Path, app_dir: Path, store: Store, tmp_path: Path) -> None:
    base = _build(busybox_layer, app_dir, store)
    extra = tmp_path / "extra"
    (extra / "app").mkdir(parents=True)
    (extra / "app" / "extra.txt").write_text("extra\n")
    on_top = Image.from_layers(extra, base=Image.load("app:1", store=store))
    assert on_top.store == store
    assert on_top.config == base.config
    assert on_top.layers[:-1] == base.layers
    assert on_top.layers[-1] == str(extra)  # not copied until stored
    assert _run(on_top, "cat extra.txt built.txt") == b"extra\nmain says hello from /app as 0\n"
    stored = on_top.tag("app:extra")
    assert stored.layers[-1] != str(extra)
    assert [h.created_by for h in store.resolve("app:extra").history][-1] == "from_layers"


def test_run_on_the_host_base_captures_usr_and_root(store: Store) -> None:
    image = Image.from_layers(store=store).run(
        [
            "sh",
            "-c",
            "mkdir -p /usr/local/psbx && echo in-usr > /usr/local/psbx/f && echo at-root > /rootfile",
        ]
    )
    assert image.host is True
    assert len(image.layers) == 1
    layer = Path(image.layers[0])
    assert (layer / "usr" / "local" / "psbx" / "f").read_text() == "in-usr\n"
    assert (layer / "rootfile").read_text() == "at-root\n"
    assert image.image_id is not None
    assert store.get_image(image.image_id).host_base is True
    assert _run(image, "cat /usr/local/psbx/f /rootfile; test -x /usr/bin/env && echo host") == (
        b"in-usr\nat-root\nhost\n"
    )
    assert not os.path.exists("/usr/local/psbx")


def test_failing_run_raises_build_error_with_output(busybox_layer: Path, store: Store) -> None:
    base = Image.from_layers(busybox_layer, base=None, store=store)
    with pytest.raises(BuildError, match="exit code 3") as err:
        base.run(["sh", "-c", "echo step-output; echo step-error >&2; exit 3"])
    assert isinstance(err.value, RuntimeError)
    assert "step-output" in str(err.value)
    assert "step-error" in str(err.value)
    assert err.value.result.exit_code == 3
    assert len(store.images()) == 1  # the base only: nothing recorded for the failed step
    # not cached: it runs (and fails) again
    with pytest.raises(BuildError):
        base.run(["sh", "-c", "exit 3"])


def test_run_timeout_raises_build_error(busybox_layer: Path, store: Store) -> None:
    base = Image.from_layers(busybox_layer, base=None, store=store)
    with pytest.raises(BuildError, match="did not finish"):
        base.run(["sleep", "30"], timeout=0.5)


def test_copy_file_to_a_name_and_into_a_dir(busybox_layer: Path, app_dir: Path, store: Store) -> None:
    base = Image.from_layers(busybox_layer, base=None, store=store)
    image = base.copy(app_dir / "main.sh", "/opt/run.sh").copy(app_dir / "main.sh", "/opt/bin/")
    out = _run(image, "ls -ln /opt/run.sh /opt/bin/main.sh | cut -c1-10; stat -c %a /opt /opt/bin")
    assert out == b"-rwxr-xr-x\n-rwxr-xr-x\n755\n755\n"
    root_copy = base.copy(app_dir, "/")
    assert _run(root_copy, "cat /lib/data.txt") == b"data\n"


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda i, d: i.copy(d, "relative/path"), InvalidSpecError),
        (lambda i, d: i.copy(d, "/proc/x"), InvalidSpecError),
        (lambda i, d: i.copy(d / "missing", "/x"), LayerNotFoundError),
        (lambda i, d: i.copy("", "/x"), InvalidSpecError),
        (lambda i, d: i.copy("/dev/null", "/x"), InvalidSpecError),
        (lambda i, d: i.env({"BAD=KEY": "1"}), InvalidSpecError),
        (lambda i, d: i.env(), InvalidSpecError),
        (lambda i, d: i.workdir("rel"), InvalidSpecError),
        (lambda i, d: i.user("a:b:c"), InvalidSpecError),
        (lambda i, d: i.run("sh -c true"), InvalidSpecError),
        (lambda i, d: i.run(["true"], timeout=-1), InvalidSpecError),
        (lambda i, d: i.tag("Bad Name"), InvalidSpecError),
    ],
)
def test_bad_build_input_is_refused_before_anything_is_stored(
    busybox_layer: Path, app_dir: Path, store: Store, call: object, error: type[Exception]
) -> None:
    image = Image.from_layers(busybox_layer, base=None, store=store)
    with pytest.raises(error):
        call(image, app_dir)  # type: ignore[operator]
    assert not os.path.exists(os.path.join(store.root, "layers"))


def test_a_fifo_copy_source_is_refused_at_once(busybox_layer: Path, store: Store, tmp_path: Path) -> None:
    """Security review of issue 9, item 2: a FIFO as COPY source is an InvalidSpecError naming
    it, raised before anything is stored (an open() of it would block pytest)."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    image = Image.from_layers(busybox_layer, base=None, store=store)
    with pytest.raises(InvalidSpecError, match=r"is a FIFO: only files and directories"):
        _within(10.0, lambda: image.copy(fifo, "/x"), release=[fifo])
    assert not os.path.exists(os.path.join(store.root, "layers"))


SWAPPER = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
a, b = (os.fsencode(p) for p in sys.argv[1:3])
print("swapping", flush=True)
while libc.renameat2(-100, a, -100, b, 2) == 0:  # RENAME_EXCHANGE
    pass
sys.exit(ctypes.get_errno())
"""


def test_a_fifo_swapped_in_for_a_copy_source_never_hangs(store: Store, tmp_path: Path) -> None:
    """Security review of issue 9, item 2: a process exchanges a COPY source file with a FIFO
    (``renameat2(RENAME_EXCHANGE)``, as a container writing the parent directory could) while
    COPY steps are made for 3 s: each is the file's step or an InvalidSpecError, at once -- the
    source is checked and hashed through one descriptor, so no open() blocks on the FIFO (before
    the fix, one that saw the file in a stat and the FIFO in open() hung within a second or two)."""
    src, fifo = tmp_path / "src", tmp_path / "other"
    src.write_bytes(b"file\n")
    os.mkfifo(fifo)
    outcomes: collections.Counter[str] = collections.Counter()

    def steps() -> None:
        end = time.monotonic() + 3.0
        while time.monotonic() < end:
            try:
                build_mod.copy_step(store, src, "/x")
                outcomes["step"] += 1
            except InvalidSpecError:
                outcomes["refused"] += 1

    swapper = subprocess.Popen([sys.executable, "-c", SWAPPER, str(src), str(fifo)], stdout=subprocess.PIPE)
    try:
        assert swapper.stdout is not None
        assert swapper.stdout.readline() == b"swapping\n"
        _within(30.0, steps, release=[src, fifo])
    finally:
        swapper.kill()
        swapper.wait()
    print(f"COPY steps made for 3 s under a swap: {dict(outcomes)}")
    assert outcomes["step"] > 0
    assert outcomes["refused"] > 0  # the swap was seen


def _within(seconds: float, call: Callable[[], object], *, release: list[Path]) -> None:
    """``call()`` in a thread; a failure if it is not done within ``seconds`` (a hang), after
    opening each FIFO in ``release`` for writing so the blocked reader returns."""
    error: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as e:
            error.append(e)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        for path in release:
            with contextlib.suppress(OSError):  # ENXIO: no reader waits on it; not a FIFO now
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(10.0)
        pytest.fail(f"the COPY step hung for {seconds} s on a FIFO")
    if error:
        raise error[0]
