"""Sparse files and oversized layers in captures (issue 9, item 8).

``commit()`` and a build ``run`` step copy a container's upper directory into the store.  A 2 GiB
sparse file -- free inside a ``memory="32m"`` container -- used to be written out in full (2 GiB
on the store's disk, 6 s).  Now holes are kept (SEEK_DATA/SEEK_HOLE) and a layer whose tar would
pass ini ``sandbox_max_layer_size`` is refused before anything is stored.  What is checked is the
kernel's: the stored file's ``st_blocks``, its bytes (``cmp``), the store's directories.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from pytest_sandbox import Image, LayerTooLargeError, Sandbox
from pytest_sandbox.config import DEFAULT_MAX_LAYER_SIZE
from pytest_sandbox.images.store import Store
from tests import probes

GiB = 1 << 30
MiB = 1 << 20

# A 2 GiB file with 4 bytes of data at 1 MiB and 4 at its end: everything else is a hole.
SPARSE = "truncate -s 2G /sparse && printf head | dd of=/sparse bs=1 seek=1048576 conv=notrunc 2>/dev/null"
SPARSE += " && printf tail | dd of=/sparse bs=1 seek=2147483644 conv=notrunc 2>/dev/null"


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store")


def _store_leftovers(store: Store) -> list[str]:
    """Everything in the store's tmp/ below the owner directories, and every stored layer."""
    found = []
    for sub in ("tmp", "layers/sha256"):
        top = Path(store.root, sub)
        for entry in top.iterdir() if top.is_dir() else []:
            found += [str(p) for p in entry.iterdir()] if sub == "tmp" and entry.is_dir() else [str(entry)]
    return found


def test_a_committed_2_gib_sparse_file_keeps_its_holes(busybox_image: Image, store: Store) -> None:
    """Item 8: the stored copy of a 2 GiB sparse file has a few blocks, not 2 GiB, and the same
    bytes (cmp against the container's upper file, holes read as zeros)."""
    with Sandbox() as sb:
        c = sb.start(["sh", "-c", SPARSE], image=busybox_image, memory="32m")
        assert c.wait(30).exit_code == 0, c.logs()
        upper = Path(probes.upper_dir(c), "sparse")
        assert upper.stat().st_size == 2 * GiB
        started = time.monotonic()
        image = c.commit("sparse:1", store=store)
        took = time.monotonic() - started
        stored = Path(image.layers[-1], "sparse")
        st = stored.stat()
        assert st.st_size == 2 * GiB
        assert st.st_blocks * 512 < MiB, f"the holes were written out: {st.st_blocks * 512} bytes on disk"
        same = subprocess.run(["cmp", str(upper), str(stored)], check=False, capture_output=True)
        assert same.returncode == 0, same.stdout
    with open(stored, "rb") as f:
        assert os.pread(f.fileno(), 4, MiB) == b"head"
        assert os.pread(f.fileno(), 4, 2 * GiB - 4) == b"tail"
    # No time bound: what is left is the digest of 2 GiB of zeros (a tar holds the file dense),
    # CPU-bound and at the mercy of the host's load (15-20 s here at a load average of 14).
    print(f"commit of a 2 GiB sparse file: {took:.2f} s, {st.st_blocks * 512} bytes on disk")


def test_an_oversized_capture_is_refused_and_leaves_nothing(busybox_image: Image, store: Store) -> None:
    """Item 8: a container's 1 TiB sparse file (free to make) is over the default
    sandbox_max_layer_size (4g): commit() raises LayerTooLargeError naming the size, the limit and
    the setting, at once (before any digest), and the store holds no layer and no temporary file."""
    assert 4 * GiB == DEFAULT_MAX_LAYER_SIZE
    with Sandbox() as sb:
        c = sb.start(["sh", "-c", "echo small > /a; truncate -s 1099511627776 /huge"], image=busybox_image)
        assert c.wait(30).exit_code == 0, c.logs()
        started = time.monotonic()
        with pytest.raises(LayerTooLargeError) as e:
            c.commit("huge:1", store=store)
        assert time.monotonic() - started < 5
    message = str(e.value)
    for named in ("sandbox_max_layer_size", "4g", str(e.value.size)):  # the setting, limit, size
        assert named in message
    assert e.value.limit == 4 * GiB
    assert e.value.size > 4 * GiB
    assert e.value.errno == 27  # EFBIG
    assert isinstance(e.value, OSError)
    assert _store_leftovers(store) == [], _store_leftovers(store)
    assert "huge:1" not in store.refs()


def test_an_oversized_build_run_step_is_refused_and_leaves_nothing(
    busybox_layer: Path, store: Store, tmp_path: Path
) -> None:
    """Item 8: a build run step's layer is bounded the same way; with the setting lowered to 1m a
    2 MiB file is refused, and nothing of the step reaches the store but its parent's layer."""
    rt = probes.new_runtime(max_layer_size=MiB, state_dir=str(tmp_path / "state"))
    base = Image.from_layers(busybox_layer, base=None, store=store)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr("pytest_sandbox.sandbox.get_runtime", lambda: rt)  # the step's Sandbox()
            too_large = r"RUN .*over the limit of 1m .*sandbox_max_layer_size"
            with pytest.raises(LayerTooLargeError, match=too_large):
                base.run(["sh", "-c", "dd if=/dev/zero of=/big bs=1M count=2 2>/dev/null"]).tag("big:1")
    finally:
        rt.close()
    layers = [p.name for p in Path(store.root, "layers/sha256").iterdir()]
    assert len(layers) == 1, layers  # the busybox layer only
    assert not [p for d in Path(store.root, "tmp").iterdir() for p in d.iterdir()]


def test_zeros_in_an_imported_layer_tar_become_holes(store: Store, tmp_path: Path) -> None:
    """Item 8, the store's other way in: a tar holds a sparse file dense (our writer and Docker's
    do), so the extractor turns each all-zero 1 MiB chunk back into a hole.  The stored file has
    the same bytes and a few blocks; its layer's digest (of the dense tar) is what it was."""
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "sparse", "wb") as f:
        f.seek(64 * MiB)
        f.write(b"tail")
    exported = store.add_layer_dir(src)
    with store.open_layer_tar(exported.digest) as tar:  # the layer as it leaves the store: dense
        data = tar.read()
    assert len(data) > 64 * MiB
    other = Store(tmp_path / "other")
    with open(tmp_path / "layer.tar", "wb") as f:
        f.write(data)
    with open(tmp_path / "layer.tar", "rb") as f:
        imported = other.add_layer_tar(f)
    assert imported.digest == exported.digest
    stored = Path(imported.path, "sparse").stat()
    assert stored.st_size == 64 * MiB + 4
    assert stored.st_blocks * 512 < MiB, stored.st_blocks
    assert Path(imported.path, "sparse").read_bytes() == (src / "sparse").read_bytes()
    assert Path(exported.path, "sparse").stat().st_blocks * 512 < MiB  # copy_tree kept the hole too
